"""The training loop: ``python -m magitrain.train --config configs/tiny.yaml key.sub=value ...``.

Short on purpose (torchtitan style): build the model, hand it to ``parallelize_model`` for
whatever layout the config asks, then loop: fetch micro-batches, noise them per chunk,
forward, masked flow-matching loss, backward, clip, step, EMA, log, checkpoint. Nothing in the
loop changes with the parallel layout.
"""

from __future__ import annotations

import argparse
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from magitrain import perf
from magitrain.checkpoint import Checkpointer, CheckpointError, ModelState, OptimizerState, RNGState
from magitrain.config import Config, ConfigError, load_config, save_config, to_yaml
from magitrain.data import build_data_source
from magitrain.diffusion import NoisedBatch, masked_sq_error, noise_batch
from magitrain.distill import ShortcutDistillation, load_init
from magitrain.ema import EMA
from magitrain.metrics import MetricsLogger, open_wandb
from magitrain.model import MagiDiT
from magitrain.parallel.context_parallel import take_plan_stats
from magitrain.parallel.deepspeed_engine import EngineModelState, EngineOptimizerState, is_engine, unwrap
from magitrain.parallel.mesh import ParallelEnv, RankLostError, init_parallel, report_lost_ranks
from magitrain.parallel.parallelize import attach_optimizer, clip_grad_norm_, parallelize_model
from magitrain.weights import resolve_init


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. too many non-finite losses in a row)."""


@dataclass
class TrainState:
    """Counters that a checkpoint carries besides model/optimizer/EMA/data."""

    step: int = 0  # optimizer steps completed
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, int(v))


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning) ask for a checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, env: ParallelEnv) -> bool:
        """True on every rank if any rank was signalled (so all save the same step)."""
        if not env.distributed:
            return self.requested
        flag = torch.tensor([1.0 if self.requested else 0.0], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, RoPE bands)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to ``optim.lr``, then cosine down to ``min_lr_ratio * lr``."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    progress = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def all_reduce_sum(value: float, env: ParallelEnv, group=None) -> float:
    if not env.distributed:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=env.device)
    dist.all_reduce(t, group=group)
    return float(t.item())


class FlowMatching:
    """The base objective. An objective's ``noise(batch, step)`` draws the batch's :class:`NoisedBatch`
    (``loss_mask``, ``target``: counted before any forward); calling it with ``(model, batch, noised,
    device)`` runs the model and returns ``(prediction, target)`` for the masked squared error."""

    def __init__(self, cfg: Config):
        self.cfg = cfg

    def noise(self, batch, step: int) -> NoisedBatch:
        return noise_batch(batch, self.cfg.diffusion, self.cfg.train.seed, step)

    def __call__(self, model, batch, nb: NoisedBatch, device) -> tuple[torch.Tensor, torch.Tensor]:
        pred = model(nb.x_t.to(device), nb.t.to(device), batch.text_emb, batch.text_mask, batch.layout,
                     text_null=nb.text_null.to(device), drop_history=nb.drop_history.to(device))
        return pred, nb.target.to(device)


def build_objective(cfg: Config, env: ParallelEnv):
    """What the model is trained to predict: flow matching, or shortcut + guidance distillation
    (``distill.enabled``; its frozen teacher is parallelised like the model)."""
    if cfg.distill.enabled:
        return ShortcutDistillation.from_config(cfg, env)
    return FlowMatching(cfg)


def train_step(model, micro_batches, cfg: Config, env: ParallelEnv, step: int, optimizer, objective=None) -> dict:
    """One optimizer step over this rank's micro-batches; returns the step's figures.

    The loss is the mean squared error between the model's prediction and the ``objective``'s
    target (default: flow matching's velocity) over every loss token of the *global* batch
    (all ranks, all micro-batches), so it does not depend on how the batch is split.
    """
    objective = objective or FlowMatching(cfg)
    noised = [objective.noise(b, step) for b in micro_batches]
    local_count = sum(int(n.loss_mask.sum()) * n.target[0].numel() for n in noised)
    global_count = max(1.0, all_reduce_sum(local_count, env, env.group("dp")))
    autocast = (torch.autocast(env.device.type, dtype=torch.bfloat16)
                if cfg.train.dtype == "bf16" else nullcontext())
    loss_sum = 0.0
    for batch, nb in zip(micro_batches, noised):
        batch = batch.to(env.device)
        with autocast:
            pred, target = objective(model, batch, nb, env.device)
        sq, _ = masked_sq_error(pred, target, nb.loss_mask.to(env.device))
        loss = sq / global_count
        loss.backward()
        loss_sum += float(loss.detach())
    loss_value = all_reduce_sum(loss_sum, env, env.group("dp"))
    grad_norm = clip_grad_norm_(model, cfg.optim.grad_clip, env)
    finite = math.isfinite(loss_value) and math.isfinite(grad_norm)
    if finite:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    tokens = all_reduce_sum(sum(b.num_tokens for b in micro_batches), env, env.group("dp"))
    return {"loss": loss_value, "grad_norm": grad_norm, "finite": finite, "tokens": int(tokens)}


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the last logged record."""
    env = init_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    model = MagiDiT(cfg.model).to(env.device)
    init_path = resolve_init(cfg)  # ckpt.init_from, or an imported weights-only checkpoint: new run, step 0
    if init_path:
        load_init(model, init_path)
    model = parallelize_model(model, env, cfg)
    objective = build_objective(cfg, env)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model, optimizer = attach_optimizer(model, optimizer, env, cfg)  # deepspeed: its engine steps
    ema = EMA(unwrap(model), cfg.optim.ema_decay) if cfg.optim.ema_decay > 0 else None
    data = build_data_source(cfg, env.dp_rank, env.dp)
    state = TrainState()
    ckpt = Checkpointer(cfg.run.dir, cfg.ckpt.keep_last, async_save=cfg.ckpt.async_save)

    def stateful() -> dict:  # the same on every rank (tensors sharded as the model is)
        model_state, optim_state = ((EngineModelState(model), EngineOptimizerState(model, optimizer))
                                    if is_engine(model) else (ModelState(model), OptimizerState(model, optimizer)))
        return {"model": model_state, "optim": optim_state, "sched": scheduler,
                "trainer": state, **({"ema": ema} if ema is not None else {})}

    def per_rank() -> dict:
        return {"data": data, "rng": RNGState()}

    resume_path = None if init_path else ckpt.resolve(cfg.ckpt.resume)
    if resume_path:
        Checkpointer.load_into(resume_path, stateful(), per_rank())

    if env.is_main:
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    wandb_run = (open_wandb(cfg.run.dir, cfg.log.wandb_project, cfg.log.wandb_mode, cfg.log.wandb_name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)))
                 if cfg.log.wandb and env.is_main else None)
    logger = MetricsLogger(cfg.run.dir, cfg.train.steps, state.step, enabled=env.is_main,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, wandb_run=wandb_run)
    if resume_path:
        logger.message(f"resumed from {resume_path} at step {state.step}")
    stop = StopRequest()
    params = perf.count_params(model)  # throughput accounting: see magitrain/perf.py for the FLOPs formula
    peak_total = (cfg.log.peak_flops or perf.default_peak_flops(env.device)) * env.world_size
    stages = perf.StageSummary(cfg.run.dir, peak_total, env.is_main, state.step)

    def save() -> str:
        return ckpt.save(state.step, stateful(), to_yaml(cfg), per_rank=per_rank())

    record: dict = {}
    last_saved = state.step if resume_path else -1
    with report_lost_ranks(env, lambda: f"step {state.step + 1}"):  # a dead rank: a clear error, no hang
        end = cfg.train.stop_at or cfg.train.steps  # stop_at: an early, resumable end (same lr schedule)
        while state.step < end:
            t0 = time.perf_counter()
            micro = [data.next_batch() for _ in range(cfg.train.grad_accum)]
            data_time = time.perf_counter() - t0
            out = train_step(model, micro, cfg, env, state.step, optimizer, objective)
            if out["finite"]:
                scheduler.step()
                if ema is not None:
                    ema.update(unwrap(model))
                state.bad_steps_in_row = 0
            else:
                state.bad_steps_in_row += 1
                state.bad_steps_total += 1
                logger.message(f"step {state.step + 1}: non-finite loss/grad ({out['loss']}, "
                               f"{out['grad_norm']}), skipped")
                if state.bad_steps_in_row > cfg.train.max_bad_steps:
                    raise TrainingError(f"{state.bad_steps_in_row} non-finite steps in a row (train.max_bad_steps="
                                        f"{cfg.train.max_bad_steps}); stopping. Lower optim.lr or check the data.")
            state.step += 1
            state.tokens_seen += out["tokens"]
            dt = time.perf_counter() - t0
            record = {"step": state.step, "loss": out["loss"], "grad_norm": out["grad_norm"],
                      "lr": scheduler.get_last_lr()[0], "tokens_per_s": out["tokens"] / dt, "step_time_s": dt,
                      "tokens_seen": state.tokens_seen, "bad_steps": state.bad_steps_total, **data.stats()}
            area = all_reduce_sum(perf.masked_area(micro), env, env.group("dp"))
            flops = perf.step_flops(params, out["tokens"], area, cfg.model)
            record.update({"data_time_s": data_time, "attn_area": int(area), "model_flops": flops,
                           "mfu": flops / dt / peak_total, **perf.cp_figures(take_plan_stats(model))})
            if state.step % cfg.log.every == 0 or state.step == end:
                logger.log(record)
            summary = stages.update(record)  # a line per finished curriculum stage
            if summary:
                logger.message(summary)
            stopping = stop.agreed(env)
            if (cfg.ckpt.every and state.step % cfg.ckpt.every == 0) or stopping or state.step == end:
                path = save()
                last_saved = state.step
                logger.message(f"checkpoint: {path}")
            if stopping:
                logger.message(f"stop requested: saved step {state.step}, exiting")
                break
    if last_saved != state.step and state.step > 0:
        save()
    ckpt.wait()
    summary = stages.finish()
    if summary:
        logger.message(summary)
    logger.close()
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magitrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        train(cfg)
    except (ConfigError, CheckpointError, TrainingError, RankLostError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # e.g. a shard named by data.shards is gone: a start-up error
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
