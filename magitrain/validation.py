"""Validation during training: fixed-t flow-matching loss on held-out data, and streamed samples.

Every ``eval.every`` steps, :meth:`Validator.losses` computes, for each ``t`` in ``eval.t_values``,
the flow-matching loss (the training loss's masked mean squared velocity error) of ``eval.batches``
held-out packed sequences with EVERY chunk at that ``t`` (no clean prefix, no caption or history
dropout), under noise drawn from ``(eval.seed, t index, batch index)``. The held-out sequences are
read once, at start, from ``eval.shards`` (a shard spec like ``data.shards``; '' : synthetic clips
no training step draws), and are the same for every rank. So a value depends only on
the weights: a run and its resumed twin log identical figures, and runs with the same eval settings
are comparable. ``metrics.jsonl`` fields (in the record of the step they were measured after):

- ``val_loss_t<t>`` for each ``t`` (``val_loss_t0.1``, ``val_loss_t0.3``, ...; ``t`` printed with
  ``%g``, MAGI-1's convention t=0 noise, t=1 clean), and
- ``val_loss``: their mean.

Every ``eval.video_every`` steps, one video per caption of ``eval.captions`` is streamed by
:func:`stream_sample` (the pipelined, KV-cached :class:`~magitrain.sampler.ChunkSampler`, on rank 0,
with an unsharded copy of the model gathered from all ranks) and written to
``run.dir/samples/step_<step>_<i>.mp4`` with a contact sheet ``.png`` beside it, and to TensorBoard
as the image ``samples/<i>`` (the contact sheet) at that step. :func:`stream_sample` is the one place
that chooses how a sample is drawn; a sampler running on the training layout replaces it there.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from contextlib import nullcontext

import torch

from magitrain.batch import Batch
from magitrain.config import Config
from magitrain.diffusion import interpolate, masked_sq_error


def metric_name(t: float) -> str:
    return f"val_loss_t{t:g}"


def heldout_config(cfg: Config) -> Config:
    """The data config the held-out sequences are read with (one stream, every rank the same)."""
    held = copy.deepcopy(cfg)
    held.data.curriculum = []
    held.train.grad_accum = 1
    held.data.batch_size = 1
    if cfg.eval.shards:
        held.data.source, held.data.shards = "webdataset", cfg.eval.shards
    else:  # synthetic clips of seed 0 at steps no run reaches (HELDOUT_STEP on): the same for every run
        held.data.source = "synthetic"
        held.train.seed = 0
    return held


HELDOUT_STEP = 1_000_000_000  # synthetic held-out clips are those of "steps" from here on


def read_heldout(cfg: Config) -> list[Batch]:
    from magitrain.data import build_data_source

    held = heldout_config(cfg)
    source = build_data_source(held, 0, 1)
    if held.data.source == "synthetic":
        source.micro_step = HELDOUT_STEP
    return [source.next_batch() for _ in range(cfg.eval.batches)]


def fixed_t_noise(batch: Batch, t: float, seed: int, t_index: int, batch_index: int):
    """``(x_t, target, loss_mask, t per chunk)`` with every chunk of ``batch`` at ``t``."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + t_index) * 1_000_033 + batch_index) % (2**63 - 1))
    x0 = batch.latents
    noise = torch.randn(x0.shape, generator=gen).to(x0.dtype)
    chunk_ids = batch.layout.token_chunk_ids()
    ts = torch.full((batch.layout.num_chunks,), float(t))
    return interpolate(x0, noise, ts, chunk_ids), x0 - noise, chunk_ids >= 0, ts


class Validator:
    """The held-out sequences and what to do with them; built once per run on every rank."""

    def __init__(self, cfg: Config, env):
        self.cfg, self.env = cfg, env
        self.batches = read_heldout(cfg) if cfg.eval.every else []

    def due(self, step: int, end: int) -> tuple[bool, bool]:
        """(fixed-t losses due, samples due) after optimizer step ``step``."""
        e = self.cfg.eval
        return (bool(e.every) and step % e.every == 0,
                bool(e.video_every) and bool(e.captions) and step % e.video_every == 0)

    @torch.no_grad()
    def losses(self, model) -> dict:
        """``{val_loss_t<t>: ..., val_loss: mean}`` (collective: every rank runs the same forwards)."""
        e, env = self.cfg.eval, self.env
        autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16)
                    if self.cfg.train.dtype == "bf16" else nullcontext())
        out = {}
        for j, t in enumerate(e.t_values):
            sq, count = 0.0, 0
            for b, batch in enumerate(self.batches):
                x_t, target, mask, ts = fixed_t_noise(batch, t, e.seed, j, b)
                chunks = ts.shape[0]
                d = batch.to(env.device)
                with autocast:
                    pred = model(x_t.to(env.device), ts.to(env.device), d.text_emb, d.text_mask, d.layout,
                                 text_null=torch.zeros(chunks, dtype=torch.bool, device=env.device),
                                 drop_history=torch.zeros(len(d.layout.samples), dtype=torch.bool, device=env.device))
                s, c = masked_sq_error(pred, target.to(env.device), mask.to(env.device))
                sq, count = sq + float(s), count + c
            out[metric_name(t)] = sq / max(count, 1)
        out["val_loss"] = sum(out.values()) / len(out)
        return out

    def samples(self, model, step: int, writer=None) -> list[str]:
        """Stream one sample per ``eval.captions`` entry and write them (collective: the model is
        gathered from every rank; rank 0 samples and writes). Returns the files written (rank 0)."""
        plain = gathered_model(model, self.cfg, self.env)
        if plain is None:
            return []
        from magitrain.contact_sheet import contact_sheet, write_contact_sheet
        from magitrain.data_pipeline.encoders import (
            build_latent_encoder,
            build_text_encoder,
        )
        from magitrain.generate import Mp4Stream

        m, d, e = self.cfg.model, self.cfg.data, self.cfg.eval
        text = build_text_encoder(d.text_encoder, m.caption_channels, m.caption_max_length, d.text_encoder_weights)
        decoder = build_latent_encoder(d.latent_encoder, m.in_channels, d.latent_encoder_weights)
        folder = os.path.join(self.cfg.run.dir, "samples")
        os.makedirs(folder, exist_ok=True)
        written = []
        for i, caption in enumerate(e.captions):
            emb, mask = text.embed(caption)
            stem = os.path.join(folder, f"step_{step:08d}_{i}")
            video, rows = Mp4Stream(stem + ".mp4", fps=8), []
            try:
                for chunk in stream_sample(plain, self.cfg, emb, mask):
                    frames = decoder.decode(chunk.float().cpu())
                    video.write(frames)
                    rows.append(frames)
            finally:
                video.close()
            write_contact_sheet(stem + ".png", rows)
            with open(stem + ".txt", "w") as f:
                f.write(caption + "\n")
            if writer is not None:
                writer.add_image(f"samples/{i}", contact_sheet(rows), step, dataformats="HWC")
                writer.add_text(f"samples/{i}/caption", caption, step)
            written += [stem + ".mp4", stem + ".png"]
        if writer is not None:
            writer.flush()
        return written


def gathered_model(model, cfg: Config, env):
    """An unsharded, single-process copy of the training ``model`` on rank 0 (None on the others);
    collective. LoRA adapters are re-applied to the copy, so it computes what the model computes."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from magitrain.lora import apply_lora
    from magitrain.model import MagiDiT
    from magitrain.parallel.deepspeed_engine import unwrap

    state = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not env.is_main:
        return None
    with torch.device("meta"):
        plain = MagiDiT(cfg.model)
    plain = plain.to_empty(device="cpu")
    lo = cfg.model.lora
    if lo.rank:
        apply_lora(plain, lo.rank, lo.alpha, lo.targets, cfg.train.seed)
    plain.load_state_dict(state, strict=True)
    return plain.eval()


def stream_sample(model, cfg: Config, text_emb: torch.Tensor, text_mask: torch.Tensor) -> Iterator[torch.Tensor]:
    """The latent chunks ``[C, frames, H, W]`` of one sample of ``eval.sample_chunks`` chunks at the
    training clip size, seeded by ``eval.sample_seed`` (so every run's samples start from the same noise),
    with the KV cache the model is trained for (``model.sink_chunks`` / ``model.max_context_chunks``)."""
    from magitrain.sampler import ChunkSampler, SamplerConfig

    e, m = cfg.eval, cfg.model
    n = e.sample_chunks
    sampler_cfg = SamplerConfig(steps=e.sample_steps, window=min(e.sample_window, e.sample_steps),
                                cfg_scale=e.cfg_scale, clean_t=cfg.diffusion.clean_t, seed=e.sample_seed,
                                max_context_chunks=m.max_context_chunks or None, sink_chunks=m.sink_chunks)
    sampler = ChunkSampler(model, text_emb.expand(n, -1, -1), text_mask.expand(n, -1), cfg.data.height,
                           cfg.data.width, sampler_cfg)
    yield from sampler.stream()
