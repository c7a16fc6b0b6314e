"""Training on its own rollouts (``objective: self_rollout``): a loss and a data path, not a new trainer.

A model trained with clean (teacher-forced) history sees its own imperfect chunks as history at
inference, and errors compound chunk after chunk (issue 17). Here, every optimizer step, the model
being trained first streams the first chunks of each sample itself, then is trained on the next
chunk with that self-generated history as context. :class:`SelfRollout` is the trainer's objective
(:func:`magitrain.train.build_objective`); data, parallel layout, optimizer, EMA, checkpoints and
resume are base training's.

Per sample of the packed batch (``C`` chunks), drawn from its own generator
``sample_generator(seed + ROLLOUT_SEED_SALT, step, sample_id)``:

1. ``r``, the self-generated history length, uniform in ``[1, min(rollout.context_chunks, C - 1)]``,
   and ``i``, the loss chunk's step index, uniform in ``[0, rollout.steps)``. A 1-chunk sample (an
   image) has no history: ``r = 0``, and it is trained on-policy at its own state after ``i`` steps.
2. The rollout, without gradient, with the model being trained: chunk ``j < r`` is generated from its
   starting noise in ``rollout.steps`` Euler steps of the sampling schedule
   (:func:`~magitrain.diffusion.sampling_schedule`, ``rollout.shift``, squared as MAGI-1's); then chunk
   ``r`` takes ``i`` steps. One model forward ("tick") runs the whole packed batch: per sample, the
   finished chunks as history at ``t = rollout.context_t`` (re-noised to ``context_t * x + (1 -
   context_t) * noise'`` with a fresh draw when below 1, as ``generate --context-t``), the current chunk
   at its state, later chunks at their noise and ``t = 0`` (the block-causal mask keeps them from the
   current chunk). Sample ``s`` needs ``n_s = r * steps + i`` ticks; all samples advance together and a
   finished sample stops updating, so a micro-batch costs ``T = max n_s`` forwards, agreed over all
   ranks (FSDP's all-gathers need every rank in the same forwards).
3. The training input: chunks ``< r`` as generated (history, no loss), chunk ``r`` at ``x(t_i)`` (the
   LOSS chunk: a state the model itself visits), later chunks at noise, ``t = 0`` (no loss). The student
   predicts with gradient; the target is the frozen teacher's guided velocity on exactly the same
   input (``rollout.text_scale``, ``rollout.history_scale``: MAGI-1's 3-pass guidance,
   :func:`~magitrain.distill.guided_teacher_velocity`), without gradient. The ground-truth next chunk
   is never the target: it does not continue the self-generated history; the teacher's velocity at the
   student's own state, given the student's own history, does.

Caption and history dropout are base training's draws (:func:`~magitrain.diffusion.noise_batch`) and
apply to the rollout, the student and the teacher's first pass alike; the data's latents are not used
by the loss (only their shapes, and the health figure below), nor are ``diffusion``'s training times,
clean prefix or ``history_t``.

Health figures per optimizer step (:meth:`SelfRollout.take_figures`, into metrics.jsonl):
``rollout_chunks`` (mean ``r`` over the global batch), ``rollout_calls`` (model forwards of the
rollout, summed over micro-batches) and ``rollout_power_ratio`` (mean square of the self-generated
history chunks over that of the data at the same chunks: near 1 while the rollouts stay in the data's
range, drifting off when they blow up or fade to grey). The loss itself is the student-teacher gap.

The teacher is loaded from ``rollout.teacher`` (default ``ckpt.init_from``, EMA weights when present)
and parallelised like the student, so the objective runs under any dp x cp x tp layout; every draw
depends only on ``(seed, step, sample id)``, so the loss does not depend on the layout and a resumed run
continues bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from magitrain.batch import Batch
from magitrain.config import Config
from magitrain.diffusion import NoisedBatch, euler_step, noise_batch, per_token, sample_generator, sampling_schedule
from magitrain.distill import guided_teacher_velocity, load_teacher
from magitrain.parallel import collectives

ROLLOUT_SEED_SALT = 0x5E1F  # separates the rollout's draws from the noise draws of the same (seed, step, sample)


@dataclass
class RolloutBatch(NoisedBatch):
    """A :class:`NoisedBatch` for a self-rollout step. ``x_t`` is where the rollout starts (every chunk at its
    noise, ``t = 0``); ``t`` is the training input's per-chunk time (``context_t`` for history, ``t_i`` for the
    loss chunk, 0 after it); ``loss_mask`` holds the loss chunk of every sample; ``target`` stays the data's
    flow-matching target ``x_clean - noise`` (not the loss's: that is the teacher's, computed per call)."""

    history: Optional[torch.Tensor] = None  # [num_samples] long: r, the self-generated chunks before the loss chunk
    step_index: Optional[torch.Tensor] = None  # [num_samples] long: i, the loss chunk's steps taken
    context_noise: Optional[torch.Tensor] = None  # [N, ...] the re-noising draw of history chunks (context_t < 1)

    def ticks(self, steps: int) -> torch.Tensor:
        """``[num_samples]`` the rollout forwards each sample needs: ``r * steps + i``."""
        return self.history * steps + self.step_index

    def max_ticks(self, steps: int) -> int:
        """The forwards this batch's rollout needs on its own (0 for a batch without samples)."""
        return int(self.ticks(steps).max()) if len(self.history) else 0


def rollout_batch(batch: Batch, cfg: Config, step: int) -> RolloutBatch:
    """Noise, caption and history dropout as base training; ``r``, ``i`` and the re-noising draw per sample."""
    ro = cfg.rollout
    nb = noise_batch(batch, cfg.diffusion, cfg.train.seed, step)
    layout = batch.layout
    history = torch.zeros(len(layout.samples), dtype=torch.long)
    step_index = torch.zeros(len(layout.samples), dtype=torch.long)
    context_noise = torch.zeros_like(batch.latents) if ro.context_t < 1.0 else None
    for k, (s, sid) in enumerate(zip(layout.samples, batch.sample_ids)):
        gen = sample_generator(cfg.train.seed + ROLLOUT_SEED_SALT, step, sid)
        if s.num_chunks > 1:
            history[k] = int(torch.randint(1, min(ro.context_chunks, s.num_chunks - 1) + 1, (1,), generator=gen))
        step_index[k] = int(torch.randint(0, ro.steps, (1,), generator=gen))
        if context_noise is not None:
            shape = batch.latents[s.offset:s.end].shape
            context_noise[s.offset:s.end] = torch.randn(shape, generator=gen).to(context_noise.dtype)
    rb = RolloutBatch(nb.noise.clone(), nb.target, torch.zeros(layout.num_chunks), nb.text_null, nb.drop_history,
                      torch.zeros(layout.total_tokens, dtype=torch.bool), nb.noise, history=history,
                      step_index=step_index, context_noise=context_noise)
    rb.t = tick_state(rb, layout, ro.steps, sampling_schedule(ro.steps, ro.shift), ro.context_t,
                      tick=rb.max_ticks(ro.steps))[0]
    chunk_ids = layout.token_chunk_ids()
    sample_of = torch.tensor(layout.chunk_sample_index(), dtype=torch.long)
    is_loss = torch.tensor(layout.chunk_index_in_sample()) == history[sample_of]  # chunk r of its sample
    rb.loss_mask = (chunk_ids >= 0) & is_loss[chunk_ids.clamp(min=0)]
    return rb


def tick_state(rb: RolloutBatch, layout, steps: int, schedule: torch.Tensor, context_t: float, tick: int):
    """Every chunk's place in the rollout before forward number ``tick`` (``tick >= n_s``: the sample's
    training input). Returns per chunk ``(t, active, finished, k)``: its time; whether this forward moves it
    (one Euler step, ``schedule[k] -> schedule[k + 1]``); whether it is finished history; its step index."""
    sample_of = torch.tensor(layout.chunk_sample_index(), dtype=torch.long)
    pos = torch.tensor(layout.chunk_index_in_sample(), dtype=torch.long)
    running = tick < rb.ticks(steps)  # [num_samples]
    current = torch.where(running, torch.full_like(rb.history, tick // steps), rb.history)[sample_of]
    k = torch.where(running, torch.full_like(rb.step_index, tick % steps), rb.step_index)[sample_of]
    finished = pos < current
    is_current = pos == current
    t = torch.where(finished, torch.full((len(pos),), context_t), torch.where(is_current, schedule[k], 0.0))
    return t.float(), is_current & running[sample_of], finished, k


class SelfRollout:
    """The self-rollout objective (same interface as :class:`~magitrain.train.FlowMatching`):
    ``noise(batch, step)`` -> :class:`RolloutBatch`; ``(model, batch, rb, device)`` -> ``(pred, target)``;
    ``take_figures()`` -> the health figures' ``(sum, count)`` since the last call."""

    def __init__(self, cfg: Config, teacher: nn.Module):
        self.cfg, self.ro, self.teacher = cfg, cfg.rollout, teacher
        self.schedule = sampling_schedule(self.ro.steps, self.ro.shift)
        self._sums: dict[str, list[float]] = {}  # health figures since take_figures: name -> [sum, count]
        self._calls = 0

    @classmethod
    def from_config(cls, cfg: Config, env) -> "SelfRollout":
        return cls(cfg, load_teacher(cfg, env, cfg.rollout.teacher))

    def noise(self, batch: Batch, step: int) -> RolloutBatch:
        return rollout_batch(batch, self.cfg, step)

    def __call__(self, model, batch: Batch, rb: RolloutBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.rollout(model, batch, rb, device)
        t, text_null, drop_history = rb.t.to(device), rb.text_null.to(device), rb.drop_history.to(device)
        with torch.no_grad():
            target = guided_teacher_velocity(self.teacher, x, t, batch, text_null, drop_history, self.ro.text_scale,
                                             self.ro.history_scale)
        pred = model(x, t, batch.text_emb, batch.text_mask, batch.layout, text_null=text_null,
                     drop_history=drop_history)
        return pred, target

    @torch.no_grad()
    def rollout(self, model, batch: Batch, rb: RolloutBatch, device) -> torch.Tensor:
        """The training input of ``rb`` (see the module docstring), on ``device``: the model streams each
        sample's first ``r`` chunks and ``i`` steps of chunk ``r``, all samples together."""
        ro, layout = self.ro, batch.layout
        chunk_ids = layout.token_chunk_ids(device)
        text_null, drop_history = rb.text_null.to(device), rb.drop_history.to(device)
        state = rb.noise.to(device).clone()
        ticks = collectives.max_over_ranks(rb.max_ticks(ro.steps))  # every rank runs the same forwards (FSDP)
        for tick in range(ticks):
            t, active, finished, k = tick_state(rb, layout, ro.steps, self.schedule, ro.context_t, tick)
            v = model(self.model_input(state, finished, rb, chunk_ids), t.to(device), batch.text_emb,
                      batch.text_mask, layout, text_null=text_null, drop_history=drop_history)
            dt = torch.where(active, self.schedule[k + 1] - self.schedule[k], 0.0)
            moved = euler_step(state, v.to(state.dtype), per_token(dt, chunk_ids, state))
            state = torch.where(token_mask(active, chunk_ids), moved, state)
        _, _, finished, _ = tick_state(rb, layout, ro.steps, self.schedule, ro.context_t, tick=ticks)
        self._record(rb, batch, state, token_mask(finished, chunk_ids), ticks)
        return self.model_input(state, finished, rb, chunk_ids)

    def model_input(self, state: torch.Tensor, finished: torch.Tensor, rb: RolloutBatch,
                    chunk_ids: torch.Tensor) -> torch.Tensor:
        """``state`` with the finished (history) chunks at ``context_t`` (re-noised when below 1)."""
        if rb.context_noise is None:
            return state
        c = self.ro.context_t
        noised = c * state + (1 - c) * rb.context_noise.to(state.device, state.dtype)
        return torch.where(token_mask(finished, chunk_ids), noised, state)

    def _record(self, rb: RolloutBatch, batch: Batch, state: torch.Tensor, history: torch.Tensor, ticks: int) -> None:
        history = history.flatten()
        generated = float(state[history].double().pow(2).sum())
        data = float(batch.latents.to(state.device)[history].double().pow(2).sum())
        for name, num, den in (("rollout_chunks", float(rb.history.sum()), float(len(rb.history))),
                               ("rollout_power_ratio", generated, data)):
            self._sums[name] = [a + b for a, b in zip(self._sums.get(name, [0.0, 0.0]), (num, den))]
        self._calls += ticks

    def take_figures(self) -> dict[str, tuple[float, float]]:
        """Per figure ``(sum, count)`` over this rank's micro-batches since the last call; the trainer sums both
        over dp and logs ``sum / count``. ``rollout_calls`` is ``(forwards, 1)``: the forwards are agreed over all
        ranks, so its mean over dp is the step's count."""
        figures = {name: (num, den) for name, (num, den) in self._sums.items()}
        figures["rollout_calls"] = (float(self._calls), 1.0)
        self._sums, self._calls = {}, 0
        return figures


def token_mask(chunk_flags: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """Per-chunk flags ``[C]`` as a per-token mask ``[N, 1, 1, 1, 1]`` (padding: False)."""
    flags = chunk_flags.to(chunk_ids.device)[chunk_ids.clamp(min=0)] & (chunk_ids >= 0)
    return flags.view(-1, 1, 1, 1, 1)


__all__ = ["SelfRollout", "RolloutBatch", "rollout_batch", "tick_state", "ROLLOUT_SEED_SALT"]
