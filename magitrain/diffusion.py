"""Flow matching with per-chunk noise levels, in MAGI-1's convention.

Time ``t`` runs from 0 (pure noise) to 1 (clean): ``x_t = t * x_clean + (1 - t) * noise``, and
the network predicts the velocity ``v = dx_t/dt = x_clean - noise``. Sampling integrates
``x <- x + v * (t_next - t)`` from t=0 up to t=1.

Every chunk carries its own ``t``. Within a sample the noise level never decreases from
earlier to later chunks (earlier chunks are cleaner: larger ``t``), which is what makes
chunk-by-chunk streaming generation possible (the denoising window). A sample may hold its
first chunks clean (``t = clean_t``) as context, as in image-to-video and continuation; those
chunks carry no loss. With ``history_t = [low, high]`` (history noise augmentation) the context
chunks of a sample are instead noised to one level ``t ~ U(low, high)`` drawn per sample, so the
model learns to read imperfect history; the sampler caches finished chunks at a matching level
(``context_t``). The level is the sample's last draw, so every other draw is unchanged.

Randomness is drawn per sample from a generator seeded by ``(seed, step, sample_id)``, so
the noise, times and dropouts of a sample do not depend on how the batch is split over
data-parallel or context-parallel ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from magitrain.batch import Batch
from magitrain.config import DiffusionConfig


def shift_t(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift in MAGI-1's convention: ``t' = (t/s) / (1 + (1/s - 1) t)``.

    ``shift > 1`` moves times toward the noise end (t=0), where high resolutions need more
    steps. ``shift = 1`` is the identity.
    """
    if shift == 1.0:
        return t
    return (t / shift) / (1 + (1 / shift - 1) * t)


def sample_t(n: int, cfg: DiffusionConfig, gen: torch.Generator) -> torch.Tensor:
    """``n`` training times from the configured sampler, shifted."""
    if cfg.t_sampler == "uniform":
        t = torch.rand(n, generator=gen, dtype=torch.float64)
    else:  # logit-normal (SD3): concentrates on mid noise levels
        t = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(n, generator=gen, dtype=torch.float64))
    return shift_t(t, cfg.shift)


def chunk_times(num_chunks: int, cfg: DiffusionConfig, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """Per-chunk ``t`` of one sample, non-increasing with chunk index, and its clean-prefix length.

    ``sorted``: draw one time per chunk and sort them descending. ``window``: the first
    chunk's time is drawn, each later chunk is noisier by ``window_spread * U(0, 1)``
    (a denoising window with staggered levels, as MAGI-1's pipelined sampler sees).
    """
    if cfg.monotone == "sorted":
        t = sample_t(num_chunks, cfg, gen).sort(descending=True).values
    else:
        t0 = sample_t(1, cfg, gen)
        steps = cfg.window_spread * torch.rand(num_chunks - 1, generator=gen, dtype=torch.float64)
        t = (t0 - torch.cat([torch.zeros(1, dtype=torch.float64), steps.cumsum(0)])).clamp(min=0.0)
    clean = 0
    if num_chunks > 1 and torch.rand(1, generator=gen).item() < cfg.clean_prefix_prob:
        clean = int(torch.randint(1, min(cfg.max_clean_prefix_chunks, num_chunks - 1) + 1, (1,), generator=gen))
        t[:clean] = cfg.clean_t
    return t.float(), clean


@dataclass
class NoisedBatch:
    """Everything the model call and the loss need for one batch."""

    x_t: torch.Tensor  # [N, C, pt, ph, pw] noisy input
    target: torch.Tensor  # [N, C, pt, ph, pw] velocity target
    t: torch.Tensor  # [num_chunks]
    text_null: torch.Tensor  # [num_chunks] bool, caption dropped
    drop_history: torch.Tensor  # [num_samples] bool
    loss_mask: torch.Tensor  # [N] bool: tokens that count in the loss
    noise: Optional[torch.Tensor] = None  # [N, C, pt, ph, pw] the noise drawn (distillation re-noises at its own t)


def sample_generator(seed: int, step: int, sample_id: int) -> torch.Generator:
    """The generator of one sample at one step (independent of the parallel layout)."""
    mixed = (seed * 1_000_003 + step) * 1_000_033 + sample_id
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


def noise_batch(batch: Batch, cfg: DiffusionConfig, seed: int, step: int) -> NoisedBatch:
    """Draw noise, per-chunk times and dropouts for every sample of ``batch``."""
    layout = batch.layout
    x0 = batch.latents
    noise = torch.zeros_like(x0)
    t = torch.empty(layout.num_chunks)
    text_null = torch.zeros(layout.num_chunks, dtype=torch.bool)
    drop_history = torch.zeros(len(layout.samples), dtype=torch.bool)
    chunk_counts_loss = torch.zeros(layout.num_chunks, dtype=torch.bool)
    chunk = 0
    for i, (s, sid) in enumerate(zip(layout.samples, batch.sample_ids)):
        gen = sample_generator(seed, step, sid)
        noise[s.offset:s.end] = torch.randn(x0[s.offset:s.end].shape, generator=gen).to(x0.dtype)
        t_s, clean = chunk_times(s.num_chunks, cfg, gen)
        t[chunk:chunk + s.num_chunks] = t_s
        drop_caption = torch.rand(1, generator=gen).item() < cfg.caption_dropout
        text_null[chunk:chunk + s.num_chunks] = drop_caption
        drop_history[i] = torch.rand(1, generator=gen).item() < cfg.history_dropout
        if clean and cfg.history_t:
            low, high = cfg.history_t
            level = low + (high - low) * torch.rand(1, generator=gen, dtype=torch.float64).item()
            t[chunk:chunk + clean] = level
        chunk_counts_loss[chunk + clean:chunk + s.num_chunks] = True
        chunk += s.num_chunks
    chunk_ids = layout.token_chunk_ids()
    x_t = interpolate(x0, noise, t, chunk_ids)
    loss_mask = (chunk_ids >= 0) & chunk_counts_loss[chunk_ids.clamp(min=0)]
    return NoisedBatch(x_t, x0 - noise, t, text_null, drop_history, loss_mask, noise)


def per_token(values: torch.Tensor, chunk_ids: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-chunk ``values [C]`` as ``[N, 1, ...]`` (broadcasting against ``like [N, ...]``); padding gets 0."""
    chunk_ids = chunk_ids.to(like.device)
    v = torch.where(chunk_ids >= 0, values.to(like.device)[chunk_ids.clamp(min=0)], torch.zeros((), device=like.device))
    return v.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """``x_t = t * x0 + (1 - t) * noise`` at per-chunk ``t [C]``; padding tokens (chunk id -1) are 0."""
    t_tok = per_token(t, chunk_ids, x0)
    return torch.where((chunk_ids >= 0).view_as(t_tok), t_tok * x0 + (1 - t_tok) * noise, torch.zeros_like(x0))


def masked_sq_error(pred: torch.Tensor, target: torch.Tensor, loss_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum of squared errors over masked-in tokens, and the number of elements summed.

    The caller divides by the (global) count, so the loss is the same whatever the split.
    """
    per_token = (pred.float() - target.float()).pow(2).flatten(1).sum(1)
    count = int(loss_mask.sum()) * pred[0].numel()
    return (per_token * loss_mask).sum(), count


# ------------------------------------------------------------------------------------------
# Sampling schedule and ODE steps (used by generation and distillation)
# ------------------------------------------------------------------------------------------

def sampling_schedule(steps: int, shift: float = 3.0, square: bool = True) -> torch.Tensor:
    """``steps + 1`` times from 0 (noise) to 1 (clean), MAGI-1's: linspace -> square -> shift."""
    t = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    if square:
        t = t * t
    return shift_t(t, shift).float()


def euler_step(x: torch.Tensor, v: torch.Tensor, dt: torch.Tensor | float) -> torch.Tensor:
    """One Euler step ``x + v * dt`` of the flow ODE (``dt`` broadcast per token)."""
    return x + v * dt


def guided_velocity(v_full: torch.Tensor, v_no_text: torch.Tensor | None, v_uncond: torch.Tensor | None,
                    s_history: float | torch.Tensor, s_text: float | torch.Tensor) -> torch.Tensor:
    """MAGI-1's 3-pass classifier-free guidance.

    ``v_full``: history + text; ``v_no_text``: history, null text; ``v_uncond``: no history,
    null text. ``out = uncond + s_hist * (no_text - uncond) + s_text * (full - no_text)``.
    With one or both optional passes missing it falls back to plain or 2-pass guidance.
    """
    if v_no_text is None:
        return v_full
    out = v_no_text + s_text * (v_full - v_no_text)
    if v_uncond is not None:
        out = out + (s_history - 1) * (v_no_text - v_uncond)
    return out

