"""Shortcut + guidance distillation: a loss and a conditioning change, not a new trainer.

MAGI-1 ships distilled models that sample in 8 to 16 steps with guidance folded in (one model
call per step instead of three). The student is the configured model with step-size
conditioning (``model.step_size_conditioning``; with ``step_size_embedder: zero_init`` its new
embedder starts at exact zero, so it starts as the base checkpoint it is initialised from,
``ckpt.init_from``). :class:`ShortcutDistillation` is the trainer's objective
(:func:`magitrain.train.build_objective`); everything else (data, parallel layout, optimizer,
EMA, checkpoints, resume) is base training.

Step sizes come from the sampling schedule (:func:`~magitrain.diffusion.sampling_schedule`,
linspace -> square -> shift). ``distill.step_counts`` (MAGI-1: 64, 32, 16, 8 steps) are cycled,
one per optimizer step. For a count ``K`` every loss chunk gets a step ``i`` of the ``K``-step
schedule (drawn per chunk, sorted so earlier chunks stay cleaner, as in base training): it sits
at ``t = T_K[i]`` and is asked for the step to ``t_end = T_K[i+1]``, with step size
``d = t_end - t`` as its condition. Power-of-two counts nest: ``T_K[i] = T_2K[2i]``, so the big
step is exactly two consecutive small steps of the ``2K``-step schedule, through
``t_mid = T_2K[2i+1]``. Targets (all computed without gradient):

- the finest count (``max(step_counts)``): the teacher's guided velocity at ``(x_t, t)``
  (``finest_target: teacher``; ``data``: the plain flow-matching target ``x_clean - noise``);
- a coarser count: self-consistency, ``(x_end - x_t) / (t_end - t)`` where ``x_end`` is two
  explicit Euler steps ``x_t -> x_mid -> x_end`` (:func:`self_consistency_target`). The small
  steps are taken by the teacher when they are of the finest count (or ``self_target:
  teacher``), else by the student itself at the small step size (``self_target: student``,
  stop-gradient, as in shortcut models).

Guidance distillation: "the teacher's velocity" is always its guided velocity, MAGI-1's 3-pass
combination (history + text, history + null text, no history + null text;
:func:`~magitrain.diffusion.guided_velocity`) with ``distill.text_scale`` and
``distill.history_scale``, so the student needs one pass. Each window chunk moves by its own
step; clean (context) chunks have step size 0, do not move and carry no loss; caption and
history dropout apply to the student and the teacher alike (a dropped caption distils the
null-text guided velocity).

The teacher is a frozen copy of the base model, loaded from ``distill.teacher`` (default
``ckpt.init_from``; EMA weights when the checkpoint has them) and passed through the same
``parallelize_model`` as the student, so it runs under the same dp x cp x tp layout, and all
randomness is drawn per sample from ``(seed, step, sample id)``: the loss does not depend on
the layout and a resumed run continues bit for bit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from magitrain.batch import Batch
from magitrain.config import Config, ConfigError, DistillConfig, ModelConfig, validate_distill
from magitrain.diffusion import (NoisedBatch, euler_step, guided_velocity, interpolate, noise_batch, per_token,
                                 sample_generator, sampling_schedule)
from magitrain.weights import check_keys, load_init_weights, load_run_weights, open_weights

DISTILL_SEED_SALT = 0xD157  # separates the step draws from the noise draws of the same (seed, step, sample)
STEP_SIZE_FIELDS = ("step_size_conditioning", "step_size_embedder")  # where student and teacher configs differ

# velocity_fn(x [N, C, pt, ph, pw], t [C], step_size [C]) -> v [N, C, pt, ph, pw]
VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# --- config (the checks of distill.* live with the schema: magitrain.config.validate_distill) ---------

def teacher_passes(text_scale: float, history_scale: float) -> int:
    """Model calls per guided teacher velocity: 1 (no guidance), 2 (text), 3 (MAGI-1's history + text)."""
    if history_scale != 1.0:
        return 3
    return 1 if text_scale == 1.0 else 2


def check_teacher_config(student: ModelConfig, teacher: ModelConfig, where: str) -> None:
    """The teacher must be the student's architecture without step-size conditioning."""
    if teacher.step_size_conditioning:
        raise ConfigError(f"{where}: the teacher is step-size conditioned (already distilled); give a base checkpoint")
    diff = [f"model.{f.name}: student {getattr(student, f.name)!r}, teacher {getattr(teacher, f.name)!r}"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in STEP_SIZE_FIELDS + ("init_std",) and getattr(student, f.name) != getattr(teacher, f.name)]
    if diff:
        raise ConfigError(f"{where}: the teacher's model differs from the student's: " + "; ".join(diff))


# --- weights ---------------------------------------------------------------------------------

@torch.no_grad()
def load_init(model: nn.Module, path: str) -> None:
    """``ckpt.init_from`` for any model: :func:`~magitrain.weights.load_init_weights` (strict), except that a
    ``zero_init`` step-size embedder (``dt_embedder.*``) the checkpoint lacks keeps its zeros: a base
    checkpoint starts a distillation run as exactly the base model."""
    src = open_weights(path)
    params = model.state_dict(keep_vars=True)
    new = {k for k in params if k.startswith("dt_embedder.")} - set(src.info)
    if not new:
        load_init_weights(model, path)
        return
    check_keys({k: tuple(v.shape) for k, v in params.items() if k not in new},
               {k: v.shape for k, v in src.info.items()}, path)
    for name, t in src.items():
        params[name].copy_(t)


def load_teacher(cfg: Config, env, path: str = "") -> nn.Module:
    """The frozen teacher (EMA weights when present), parallelised like the student; from ``path`` (default
    ``distill.teacher``, else ``ckpt.init_from``)."""
    from magitrain.model import MagiDiT
    from magitrain.parallel.parallelize import parallelize_model

    path = path or cfg.distill.teacher or cfg.ckpt.init_from
    teacher_cfg, state = load_run_weights(path, prefer_ema=True)
    check_teacher_config(cfg.model, teacher_cfg.model, path)
    with torch.device("meta"):  # no random init of a model about to be overwritten
        teacher = MagiDiT(teacher_cfg.model)
    teacher.load_state_dict(state, strict=True, assign=True)
    teacher.requires_grad_(False).eval()
    return parallelize_model(teacher.to(env.device), env, cfg)


# --- the step draw ---------------------------------------------------------------------------

@dataclass
class DistillBatch(NoisedBatch):
    """A :class:`NoisedBatch` at schedule points: chunk ``c`` steps ``t[c] -> t_mid[c] -> t_end[c]`` (clean
    chunks: all three ``clean_t``); ``target`` stays the flow-matching target ``x_clean - noise``."""

    t_mid: Optional[torch.Tensor] = None  # [num_chunks]
    t_end: Optional[torch.Tensor] = None  # [num_chunks]
    steps: int = 0  # the schedule's step count K
    finest: bool = False  # K is the finest count: one step of the teacher, no self-consistency

    @property
    def step_size(self) -> torch.Tensor:
        """``[num_chunks]`` the student's condition: ``t_end - t`` (0 for clean chunks)."""
        return self.t_end - self.t


def schedule_grid(d: DistillConfig) -> torch.Tensor:
    """The finest sampling schedule ``[max(step_counts) + 1]``; count ``K`` uses every ``max/K``-th point."""
    return sampling_schedule(max(d.step_counts), d.schedule_shift, d.schedule_square)


def distill_batch(batch: Batch, cfg: Config, step: int) -> DistillBatch:
    """Noise, dropouts and clean prefix as base training (:func:`noise_batch`); times on the schedule of
    ``step_counts[step % len]``, one step index per loss chunk, non-increasing with chunk index."""
    d = cfg.distill
    nb = noise_batch(batch, cfg.diffusion, cfg.train.seed, step)
    steps, finest = d.step_counts[step % len(d.step_counts)], max(d.step_counts)
    stride = finest // steps
    grid = schedule_grid(d)
    layout = batch.layout
    chunk_ids = layout.token_chunk_ids()
    has_loss = torch.zeros(layout.num_chunks, dtype=torch.bool)
    has_loss[chunk_ids[nb.loss_mask]] = True
    t, t_mid, t_end = nb.t.clone(), nb.t.clone(), nb.t.clone()
    chunk = 0
    for s, sid in zip(layout.samples, batch.sample_ids):
        gen = sample_generator(cfg.train.seed + DISTILL_SEED_SALT, step, sid)
        idx = torch.randint(0, steps, (s.num_chunks,), generator=gen).sort(descending=True).values * stride
        loss = has_loss[chunk:chunk + s.num_chunks]
        for dst, offset in ((t, 0), (t_mid, max(stride // 2, 1)), (t_end, stride)):
            dst[chunk:chunk + s.num_chunks][loss] = grid[idx + offset][loss]
        chunk += s.num_chunks
    x_t = interpolate(batch.latents, nb.noise, t, chunk_ids)
    return DistillBatch(x_t, nb.target, t, nb.text_null, nb.drop_history, nb.loss_mask, nb.noise,
                        t_mid=t_mid, t_end=t_end, steps=steps, finest=stride == 1)


# --- targets ---------------------------------------------------------------------------------

def self_consistency_target(velocity: VelocityFn, x: torch.Tensor, t: torch.Tensor, t_mid: torch.Tensor,
                            t_end: torch.Tensor, chunk_ids: torch.Tensor) -> torch.Tensor:
    """The velocity of one big step as two small Euler steps: ``x_mid = x + v(x, t, d1) d1``, ``x_end =
    x_mid + v(x_mid, t_mid, d2) d2`` (``d1 = t_mid - t``, ``d2 = t_end - t_mid`` per chunk), target
    ``(x_end - x) / (t_end - t)``; 0 where a chunk does not move (clean chunks, padding)."""
    d1, d2 = t_mid - t, t_end - t_mid
    x_mid = euler_step(x, velocity(x, t, d1), per_token(d1, chunk_ids, x))
    x_end = euler_step(x_mid, velocity(x_mid, t_mid, d2), per_token(d2, chunk_ids, x))
    total = per_token(t_end - t, chunk_ids, x)
    return torch.where(total > 0, (x_end - x) / torch.where(total > 0, total, torch.ones_like(total)),
                       torch.zeros_like(x))


def guided_teacher_velocity(teacher: nn.Module, x: torch.Tensor, t: torch.Tensor, batch: Batch,
                            text_null: torch.Tensor, drop_history: torch.Tensor, text_scale: float,
                            history_scale: float) -> torch.Tensor:
    """The teacher's guided velocity (1, 2 or 3 passes, :func:`teacher_passes`): pass 1 sees the sample's
    own caption and history dropout, pass 2 the null caption, pass 3 the null caption and no history."""
    passes = teacher_passes(text_scale, history_scale)
    call = lambda null, hist: teacher(x, t, batch.text_emb, batch.text_mask, batch.layout,  # noqa: E731
                                      text_null=null, drop_history=hist)
    v_full = call(text_null, drop_history)
    all_null = torch.ones_like(text_null)
    v_no_text = call(all_null, drop_history) if passes >= 2 else None
    v_uncond = call(all_null, torch.ones_like(drop_history)) if passes == 3 else None
    return guided_velocity(v_full, v_no_text, v_uncond, history_scale, text_scale)


class ShortcutDistillation:
    """The distillation objective (same interface as :class:`~magitrain.diffusion.FlowMatching`):
    ``noise(batch, step)`` -> :class:`DistillBatch`; ``(model, batch, db, device)`` -> ``(pred, target)``."""

    def __init__(self, cfg: Config, teacher: nn.Module):
        self.cfg, self.d, self.teacher = cfg, cfg.distill, teacher

    @classmethod
    def from_config(cls, cfg: Config, env) -> "ShortcutDistillation":
        return cls(cfg, load_teacher(cfg, env))

    def noise(self, batch: Batch, step: int) -> DistillBatch:
        return distill_batch(batch, self.cfg, step)

    def __call__(self, model, batch: Batch, db: DistillBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        dev = lambda v: v.to(device)  # noqa: E731
        x, t, text_null, drop_history = dev(db.x_t), dev(db.t), dev(db.text_null), dev(db.drop_history)
        with torch.no_grad():
            target = self.target(model, batch, db, device)
        pred = model(x, t, batch.text_emb, batch.text_mask, batch.layout, text_null=text_null,
                     drop_history=drop_history, step_size=dev(db.step_size))
        return pred, target

    @torch.no_grad()
    def target(self, model, batch: Batch, db: DistillBatch, device) -> torch.Tensor:
        """The regression target of ``db`` (see the module docstring), on ``device``."""
        text_null, drop_history = db.text_null.to(device), db.drop_history.to(device)

        def teacher(x, t, step_size=None):  # the teacher is not step-size conditioned
            return guided_teacher_velocity(self.teacher, x, t, batch, text_null, drop_history, self.d.text_scale,
                                           self.d.history_scale)

        def student(x, t, step_size):
            return model(x, t, batch.text_emb, batch.text_mask, batch.layout, text_null=text_null,
                         drop_history=drop_history, step_size=step_size)

        x, t = db.x_t.to(device), db.t.to(device)
        if db.finest:
            return teacher(x, t) if self.d.finest_target == "teacher" else db.target.to(device)
        small_is_finest = 2 * db.steps == max(self.d.step_counts)
        velocity = teacher if small_is_finest or self.d.self_target == "teacher" else student
        return self_consistency_target(velocity, x, t, db.t_mid.to(device), db.t_end.to(device),
                                       batch.layout.token_chunk_ids(device))


__all__ = ["ShortcutDistillation", "DistillBatch", "distill_batch", "self_consistency_target",
           "guided_teacher_velocity", "teacher_passes", "load_init", "load_teacher", "validate_distill",
           "check_teacher_config", "schedule_grid"]
