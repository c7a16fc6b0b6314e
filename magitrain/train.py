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
import threading
import time
import uuid
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from omegaconf import OmegaConf

from magitrain import perf
from magitrain.checkpoint import (Checkpointer, CheckpointError, ModelState, OptimizerState, RNGState, _reason,
                                  all_ranks_ok)
from magitrain.config import Config, ConfigError, load_config, save_config, to_yaml
from magitrain.data import build_data_source
from magitrain.diffusion import NoisedBatch, masked_sq_error, noise_batch
from magitrain.distill import ShortcutDistillation, load_init
from magitrain.self_rollout import SelfRollout
from magitrain.ema import EMA
from magitrain.lora import apply_lora
from magitrain.lora_base import BaseReference, base_fingerprint
from magitrain.validation import Validator
from magitrain.metrics import MetricsLogger, open_wandb
from magitrain.data_pipeline.dataset import BadDataError
from magitrain.model import MagiDiT
from magitrain.parallel import collectives
from magitrain.parallel.context_parallel import ahead_spec, offer_dispatch, take_plan_stats
from magitrain.parallel.deepspeed_engine import (EngineModelState, EngineOptimizerState, PartitionEMA, is_engine,
                                                 unwrap)
from magitrain.parallel.mesh import ParallelEnv, RankLostError, init_parallel, report_lost_ranks
from magitrain.parallel.parallelize import attach_optimizer, clip_grad_norm_, parallelize_model
from magitrain.run_dir import (RunDirError, RunLock, check_fresh_start, check_run_dir_path, config_changes,
                               describe_changes, unsafe_changes)
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


class StopNow(BaseException):
    """A second stop signal, or a stop request while the data reader stalls: exit without saving.
    A BaseException (like KeyboardInterrupt), so that no reader's ``except Exception`` retry loop
    swallows it."""


class StopRequest:
    """SIGTERM / SIGUSR1 (SLURM's warning) ask for a checkpoint at the next step boundary.

    A second signal raises :class:`StopNow` at once, wherever the main thread is (also inside a
    blocked read: the handler runs when the read returns EINTR). A first signal that arrives
    while the trainer waits for data starts a watchdog: if the data still has not come after
    ``stall_s`` seconds, it delivers the second signal itself.
    """

    def __init__(self, stall_s: float = 120.0):
        self.requested = False
        self.stall_s = stall_s
        self.waiting_for_data: int | None = None  # the step whose batch is being fetched, if any
        self.stalled = False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGUSR1)}

    def _handle(self, signum, frame):
        if self.requested:
            step, self.waiting_for_data = self.waiting_for_data, None  # also ends the watchdog
            if self.stalled:
                why = (f"stop requested, and the data reader has been blocked for more than parallel.timeout_s="
                       f"{self.stall_s:g} s (step {step})")
            else:
                why = "stop requested again" + (f" while waiting for the data of step {step}" if step else "")
            raise StopNow(f"{why}: exiting now without a checkpoint (the newest complete checkpoint stays the "
                          "resume point)")
        self.requested = True
        if self.waiting_for_data is not None:
            step = self.waiting_for_data
            threading.Thread(target=self._watch_stall, args=(step,), daemon=True).start()

    def _watch_stall(self, step: int) -> None:
        deadline = time.monotonic() + self.stall_s
        while time.monotonic() < deadline:
            if self.waiting_for_data != step:
                return
            time.sleep(0.2)
        if self.waiting_for_data == step:
            self.stalled = True
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, env: ParallelEnv) -> bool:
        """True on every rank if any rank was signalled (so all save the same step): host-side
        agreement, on the CPU group."""
        return collectives.any_rank(self.requested)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (not on norms, biases, RoPE bands).

    ``foreach``: one multi-tensor kernel per update term instead of one op per parameter; with
    FSDP2's DTensor parameters every op also pays DTensor dispatch, and the per-parameter loop
    cost 87 ms of a 2-layer model's step against 20 ms (docs/design.md, issue 13). Only when the
    parameters are all DTensors or all plain tensors (multi-tensor ops refuse a mix)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    o = cfg.optim
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kinds = {isinstance(p, DTensor) for p in decay + no_decay}
    foreach = len(kinds) == 1  # torch's multi-tensor ops refuse a mix of DTensors and plain tensors (TP's replicated embedders)
    return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, foreach=foreach)


def lr_factor(step: int, cfg: Config) -> float:
    """Linear warmup to ``optim.lr``, then cosine down to ``min_lr_ratio * lr``; with ``optim.restart_at = R``
    that first cycle ends at ``R`` and a second one (``restart_warmup_steps``, peak ``restart_lr``) runs from
    ``R`` to ``train.steps``."""
    o = cfg.optim
    if o.restart_at and step >= o.restart_at:
        peak = (o.restart_lr or o.lr) / o.lr
        return peak * _cycle(step - o.restart_at, cfg.train.steps - o.restart_at, o.restart_warmup_steps, o.min_lr_ratio)
    return _cycle(step, o.restart_at or cfg.train.steps, o.warmup_steps, o.min_lr_ratio)


def _cycle(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def restart_from_ema(model, optimizer, ema) -> None:
    """``optim.restart_at``: the weights become their EMA and the optimizer's moments start again (the EMA
    itself is unchanged: it already equals the new weights)."""
    ema.copy_to(unwrap(model))
    optimizer.state.clear()


def all_reduce_sum(value: float, env: ParallelEnv, group=None) -> float:
    """The sum of a per-rank number over ``group`` (a device group: computed on ``env.device``)."""
    if not env.distributed:
        return value
    return collectives.device_sum([value], env.device, group)[0]


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
    """What the model is trained to predict: flow matching, shortcut + guidance distillation
    (``distill.enabled``) or a teacher's velocity on the model's own rollouts (``objective: self_rollout``);
    a frozen teacher is parallelised like the model."""
    if cfg.distill.enabled:
        return ShortcutDistillation.from_config(cfg, env)
    if cfg.objective == "self_rollout":
        return SelfRollout.from_config(cfg, env)
    return FlowMatching(cfg)


def objective_figures(objective, env: ParallelEnv) -> dict:
    """The objective's own figures of the step (an objective may define ``take_figures() -> {name: (sum,
    count)}`` over this rank's micro-batches): ``sum / count`` over the dp group, summed on the group's
    device; a figure whose global count is 0 is left out. {} for objectives without the hook."""
    take = getattr(objective, "take_figures", None)
    if take is None:
        return {}
    local = take()
    names = sorted(local)
    flat = [v for name in names for v in local[name]]
    totals = collectives.device_sum(flat, env.device, env.group("dp")) if env.distributed else flat
    return {name: totals[2 * k] / totals[2 * k + 1] for k, name in enumerate(names) if totals[2 * k + 1]}


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
        offer_dispatch(unwrap(model), batch)  # its CP plan, solved ahead in the loader (if any)
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
    return {"loss": loss_value, "grad_norm": grad_norm, "finite": finite, "tokens": int(tokens),
            "figures": objective_figures(objective, env)}


def train(cfg: Config) -> dict:
    """Run (or resume) training as configured; returns the last logged record."""
    env = init_parallel(cfg)
    lock = RunLock(cfg.run.dir)
    error = None
    if env.is_main:  # one trainer per run dir: rank 0 holds the lock for the whole run
        try:
            check_run_dir_path(cfg.run.dir)
            lock.acquire()
        except (RunDirError, OSError) as e:
            error = e
    if not all_ranks_ok(error is None):
        raise error or RunDirError(f"run.dir={cfg.run.dir}: rank 0 could not take the run directory (see its message)")
    try:
        if lock.took_over:
            print(lock.took_over, file=sys.stderr)
        return _train_locked(cfg, env)
    finally:
        lock.release()


def _train_locked(cfg: Config, env: ParallelEnv) -> dict:
    torch.manual_seed(cfg.train.seed)
    ckpt = Checkpointer(cfg.run.dir, cfg.ckpt.keep_last, async_save=cfg.ckpt.async_save, verify=cfg.ckpt.verify)
    resume_path = ckpt.resolve(cfg.ckpt.resume, log=lambda m: env.is_main and print(m, file=sys.stderr))
    init_path = resolve_init(cfg, resume_path)  # ckpt.init_from, or an imported weights-only checkpoint: step 0
    if init_path:
        resume_path = None
    error = None
    if not cfg.ckpt.resume and env.is_main:  # a fresh run: the folder must not hold another run's checkpoints
        try:
            moved = check_fresh_start(cfg.run.dir, ckpt.complete_checkpoints(), cfg.run.overwrite)
            if moved:
                print(moved, file=sys.stderr)
        except (RunDirError, OSError) as e:
            error = e
    if not all_ranks_ok(error is None):
        raise error or RunDirError(f"run.dir={cfg.run.dir}: refused by rank 0 (see its message)")
    changes = []
    if resume_path:
        changes = _resume_config_changes(resume_path, cfg)
    ckpt.run_id = (Checkpointer.marker(resume_path).get("run_id") if resume_path else None) or uuid.uuid4().hex
    model = MagiDiT(cfg.model).to(env.device)
    lora, base_ref = cfg.model.lora, None
    if lora.rank:  # the frozen base is loaded on resume too: a LoRA checkpoint holds only the adapters
        base_path = init_path or cfg.ckpt.init_from
        load_init(model, base_path)
        if lora.base_dtype == "bf16":  # frozen: no fp32 master copy needed; the adapters are added in fp32
            for p in model.parameters():
                if p.dim() >= 2:  # the matrices (all but ~0.1% of the weights); norms and biases stay fp32
                    p.data = p.data.to(torch.bfloat16)
        base_ref = BaseReference(base_fingerprint(base_path), lora.rank, lora.alpha, lora.targets)
    elif init_path:
        load_init(model, init_path)
    adapters = ((lambda m, tp_mesh: apply_lora(m, lora.rank, lora.alpha, lora.targets, cfg.train.seed, tp_mesh))
                if lora.rank else None)
    model = parallelize_model(model, env, cfg, adapters=adapters)
    objective = build_objective(cfg, env)
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg))
    model, optimizer = attach_optimizer(model, optimizer, env, cfg)  # deepspeed: its engine steps
    ema = None
    if cfg.optim.ema_decay > 0:  # deepspeed: the EMA of this rank's ZeRO partition
        ema = PartitionEMA(model, cfg.optim.ema_decay) if is_engine(model) else EMA(unwrap(model), cfg.optim.ema_decay)
    data = build_data_source(cfg, env.dp_rank, env.dp)
    if cfg.parallel.cp_solve_ahead and hasattr(data, "solve_ahead"):  # CP plans solved in the loader workers
        data.solve_ahead = ahead_spec(unwrap(model), block_masks=env.device.type == "cuda")
    validator = Validator(cfg, env)  # held-out data for eval.every (read once), captions for eval.video_every
    state = TrainState()

    def stateful() -> dict:  # the same on every rank (tensors sharded as the model is)
        model_state, optim_state = ((EngineModelState(model), EngineOptimizerState(model, optimizer))
                                    if is_engine(model) else (ModelState(model, trainable_only=base_ref is not None),
                                                              OptimizerState(model, optimizer)))
        return {"model": model_state, "optim": optim_state, "sched": scheduler,
                "trainer": state, **({"ema": ema} if ema is not None else {}),
                **({"lora_base": base_ref} if base_ref is not None else {})}

    def per_rank() -> dict:
        return {"data": data, "rng": RNGState()}

    layout = {"dp": env.dp, "cp": env.cp, "tp": env.tp}
    if resume_path:
        Checkpointer.load_into(resume_path, stateful(), per_rank(), layout=layout,
                               verify=False)  # verified by resolve()

    if env.is_main:
        save_config(cfg, os.path.join(cfg.run.dir, "config.yaml"))
    wandb_run = (open_wandb(cfg.run.dir, cfg.log.wandb_project, cfg.log.wandb_mode, cfg.log.wandb_name,
                            OmegaConf.to_container(OmegaConf.structured(cfg)))
                 if cfg.log.wandb and env.is_main else None)
    logger = MetricsLogger(cfg.run.dir, cfg.train.steps, state.step, enabled=env.is_main,
                           tensorboard=cfg.log.tensorboard, progress=cfg.log.progress, wandb_run=wandb_run)
    if resume_path:
        logger.message(f"resumed from {resume_path} at step {state.step}")
        if changes:
            logger.message(f"config changed since the checkpoint: {describe_changes(changes)}")
        end = cfg.train.stop_at or cfg.train.steps
        if state.step >= end:
            key = f"train.stop_at={cfg.train.stop_at}" if cfg.train.stop_at else f"train.steps={cfg.train.steps}"
            logger.message(f"the checkpoint is at step {state.step}, {key}: nothing to train "
                           f"(raise {key.split('=')[0]} to continue this run)")
    stop = StopRequest(cfg.parallel.timeout_s)
    params = perf.count_params(model)  # throughput accounting: see magitrain/perf.py for the FLOPs formula
    peak_total = (cfg.log.peak_flops or perf.default_peak_flops(env.device)) * env.world_size
    stages = perf.StageSummary(cfg.run.dir, peak_total, env.is_main, state.step,
                               skipped_before=int(data.stats().get("data_skipped", 0)))

    def save() -> str:
        return ckpt.save(state.step, stateful(), to_yaml(cfg), per_rank=per_rank(), layout=layout)

    try:
        record: dict = {}
        last_saved = state.step if resume_path else -1
        with report_lost_ranks(env, lambda: f"step {state.step + 1}"):  # a dead rank: a clear error, no hang
            end = cfg.train.stop_at or cfg.train.steps  # stop_at: an early, resumable end (same lr schedule)
            while state.step < end:
                t0 = time.perf_counter()
                stop.waiting_for_data = state.step + 1
                micro = [data.next_batch() for _ in range(cfg.train.grad_accum)]
                stop.waiting_for_data = None
                data_time = time.perf_counter() - t0
                if cfg.optim.restart_at and state.step == cfg.optim.restart_at:  # also when resumed right here
                    restart_from_ema(model, optimizer, ema)
                    logger.message(f"step {state.step + 1}: restart from the EMA weights (optim.restart_at)")
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
                          "tokens_seen": state.tokens_seen, "bad_steps": state.bad_steps_total, **data.stats(),
                          **out["figures"]}
                area = all_reduce_sum(perf.masked_area(micro), env, env.group("dp"))
                flops = perf.step_flops(params, out["tokens"], area, cfg.model)
                record.update({"data_time_s": data_time, "attn_area": int(area), "model_flops": flops,
                               "mfu": flops / dt / peak_total, **perf.cp_figures(take_plan_stats(model))})
                val_due, samples_due = validator.due(state.step, end)  # eval.every / eval.video_every
                if val_due:
                    record.update(validator.losses(model))
                if samples_due:
                    for path in validator.samples(model, state.step, logger.writer):
                        logger.message(f"sample: {path}")
                if state.step % cfg.log.every == 0 or state.step == end or val_due:
                    logger.log(record)
                summary = stages.update(record)  # a line per finished curriculum stage
                if summary:
                    logger.message(summary)
                ckpt.poll()  # an asynchronous checkpoint whose write finished everywhere becomes complete
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
    finally:
        stop.restore()
    return record


def _resume_config_changes(resume_path: str, cfg: Config) -> list:
    """The config keys changed since the checkpoint; unsafe ones need ``ckpt.allow_config_change=true``."""
    saved = os.path.join(resume_path, "config.yaml")
    if not os.path.exists(saved):
        return []
    with open(saved) as f:
        changes = config_changes(f.read(), cfg)
    unsafe = unsafe_changes(changes)
    if unsafe and not cfg.ckpt.allow_config_change:
        raise ConfigError(f"resuming {resume_path} with a changed config: {describe_changes(unsafe)}; set "
                          "ckpt.allow_config_change=true to accept, or start a new run.dir")
    return changes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m magitrain.train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML config file, e.g. configs/tiny.yaml")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides (OmegaConf dotlist)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, world_size=int(os.environ.get("WORLD_SIZE", 1)))
        train(cfg)
    except (ConfigError, CheckpointError, TrainingError, RankLostError, RunDirError, BadDataError,
            ValueError, OSError) as e:  # e.g. a shard named by data.shards is gone: a start-up error
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2
    except StopNow as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        if exit_at_once_on_stop:  # freeing the stalled reader would wait for its child (e.g. a pipe: shard)
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(2)
        return 2
    return 0


exit_at_once_on_stop = False  # True when run as a command (python -m magitrain.train)


def one_line(e: BaseException) -> str:
    """An exception as one line (DCP's CheckpointException as its first failed rank's cause)."""
    text = _reason(e) if getattr(e, "failures", None) else str(e) or type(e).__name__
    return " ".join(text.split())


if __name__ == "__main__":
    exit_at_once_on_stop = True
    sys.exit(main())
