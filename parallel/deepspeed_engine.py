"""DeepSpeed ZeRO as the data-parallel engine (``parallel.dp_engine=deepspeed``, dp only).

The training loop stays as it is: :func:`apply_deepspeed` turns the plain model and its
``torch.optim.AdamW`` into a DeepSpeed engine (``model(...)`` and ``loss.backward()`` work on it:
DeepSpeed >= 0.18 hooks the engine's output for torch-style backward) and a small
:class:`EngineOptimizer` whose ``step()`` / ``zero_grad()`` go through the engine.

- ZeRO stage from ``parallel.zero_stage`` (1, 2 or 3). ``parallel.cpu_offload`` is refused with a
  ConfigError: offload steps with DeepSpeed's own C++ CPU Adam, not the loop's torch AdamW.
- Gradients are SUMMED over dp, not DeepSpeed's mean: the trainer divides every rank's loss by
  the global loss-token count. A forward hook multiplies the gradient of the model's output by
  dp, which DeepSpeed's 1/dp average then cancels exactly (dp is a power of two in practice, and
  a scale by any integer before one division is what FSDP2's sum does up to rounding order).
- Clipping is DeepSpeed's (``gradient_clipping`` = ``optim.grad_clip``: the same formula as
  :func:`torch.nn.utils.clip_grad_norm_`); :func:`grad_norm` reads the norm it will clip with.
- Checkpoints: :class:`EngineModelState` / :class:`EngineOptimizerState` gather the ZeRO
  partitions into full tensors keyed by parameter name (the FSDP2 run's keys and layout), so our
  Checkpointer saves them as usual and a checkpoint moves between stages and engines.
- The learning-rate schedule drives the wrapped torch optimizer's ``param_groups``: ZeRO keeps
  those dicts (it only swaps their ``params`` for its flat fp32 partitions).
"""

from __future__ import annotations

import os
import sys

import torch
from torch import nn

from magitrain.config import Config, ConfigError

from .mesh import ParallelEnv


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the incoming gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale: float):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def ds_config(cfg: Config, env: ParallelEnv) -> dict:
    """The DeepSpeed JSON config for this run (fp32 or bf16 as ``train.dtype``; one micro-batch a step
    per engine call: the loop's gradient accumulation is its own, see :class:`EngineOptimizer`)."""
    p = cfg.parallel
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 1, 2 or 3 with dp_engine=deepspeed")
    zero: dict = {"stage": p.zero_stage}
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "train_batch_size": env.dp,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": env.device.type == "cuda" and cfg.train.dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class EngineOptimizer:
    """What the loop calls ``optimizer``: ``step()`` and ``zero_grad()`` go through the engine."""

    def __init__(self, engine, torch_optimizer: torch.optim.Optimizer):
        self.engine, self.torch_optimizer = engine, torch_optimizer

    @property
    def param_groups(self):
        return self.torch_optimizer.param_groups

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


def apply_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, env: ParallelEnv, cfg: Config):
    """``(engine, EngineOptimizer)`` for ``model`` trained by ``optimizer`` (a torch AdamW)."""
    if cfg.train.grad_accum != 1:
        raise ConfigError("parallel.dp_engine=deepspeed supports train.grad_accum=1 only")
    if cfg.parallel.cpu_offload:
        raise ConfigError("parallel.cpu_offload=true is not supported with dp_engine=deepspeed in this build: "
                          "offload needs DeepSpeed's own CPU Adam (a C++ JIT build) instead of torch AdamW; "
                          "use parallel.cpu_offload=false")
    if cfg.parallel.zero_stage == 3 and cfg.optim.ema_decay > 0:
        raise ConfigError("optim.ema_decay > 0 is not supported with parallel.zero_stage=3 (ZeRO-3 keeps only "
                          "parameter partitions between steps); use zero_stage 1 or 2, or optim.ema_decay=0")
    import deepspeed  # imported here: an optional dependency

    if env.dp > 1:
        model.register_forward_hook(lambda m, args, out: _ScaleGrad.apply(out, float(env.dp)))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=ds_config(cfg, env), dist_init_required=False)
    return engine, EngineOptimizer(engine, optimizer)


@torch.no_grad()
def grad_norm(engine) -> float:
    """The global L2 norm of the reduced gradients, before clipping (a collective over dp).

    The engine clips inside ``step()``; this reads the same norm beforehand so the loop can skip
    a non-finite step as it does under FSDP2.
    """
    opt = engine.optimizer
    if engine.zero_optimization_stage() == 3:
        from deepspeed.runtime.utils import combine_grad_norm_groups

        norm = combine_grad_norm_groups(opt._get_norm_groups())
    else:
        norm = opt.scaled_global_norm()
    return float(norm) / float(getattr(opt, "loss_scale", 1.0) or 1.0)


def is_engine(model) -> bool:
    """True for a DeepSpeed engine (never imports deepspeed: no engine exists before it is imported)."""
    ds = sys.modules.get("deepspeed")
    return ds is not None and isinstance(model, ds.DeepSpeedEngine)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DeepSpeed engine (the model itself otherwise)."""
    return model.module if is_engine(model) else model


def _fqn(name: str) -> str:
    return name.replace("_checkpoint_wrapped_module.", "")  # the names FSDP2/DCP checkpoints use


class EngineModelState:
    """Checkpoint adapter: the engine's weights keyed by parameter name, as FULL fp32 tensors on
    every rank (gathered from the ZeRO partitions), so the checkpoint has the FSDP2 run's keys."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        module = self.engine.module
        params = dict(module.named_parameters())
        return {_fqn(n): (safe_get_full_fp32_param(params[n]) if n in params else t).detach().clone()
                for n, t in module.state_dict(keep_vars=True).items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param

        module = self.engine.module
        for n, p in module.named_parameters():
            value = state[_fqn(n)]
            safe_set_full_fp32_param(p, value)  # ZeRO's fp32 master partition
            with deepspeed.zero.GatheredParameters([p], modifier_rank=0, enabled=hasattr(p, "ds_id")):
                p.data.copy_(value)  # the module's working copy (stage 3: re-partitioned on exit)
        for n, b in module.named_buffers():
            if _fqn(n) in state:
                b.copy_(state[_fqn(n)])


class EngineOptimizerState:
    """Checkpoint adapter: AdamW's state in ``get_optimizer_state_dict``'s full layout
    (``{"state": {name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...with names]}``)."""

    KEYS = ("exp_avg", "exp_avg_sq")

    def __init__(self, engine, optimizer: EngineOptimizer):
        self.engine, self.torch_optimizer = engine, optimizer.torch_optimizer

    def _link(self) -> None:
        """ZeRO-1/2 map each parameter onto AdamW's flat-partition state once, lazily; (re)link so
        the per-parameter views exist whenever this adapter reads or writes them."""
        opt = self.engine.optimizer
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            for flat in opt.single_partition_of_fp32_groups:  # before the first step (resume): AdamW's fresh state
                if not self.torch_optimizer.state[flat]:
                    self.torch_optimizer.state[flat] = {"step": torch.zeros((), dtype=torch.float32),
                                                        **{k: torch.zeros_like(flat) for k in self.KEYS}}
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _step(self) -> torch.Tensor:
        steps = [s["step"] for s in self.torch_optimizer.state.values() if "step" in s]
        return torch.as_tensor(steps[0] if steps else 0.0, dtype=torch.float32).clone()

    def state_dict(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        self._link()
        step = self._step()
        state = {_fqn(n): {"step": step.clone(), **{k: safe_get_full_optimizer_state(p, k).detach().clone()
                                                    for k in self.KEYS}}
                 for n, p in self.engine.module.named_parameters() if p.requires_grad}
        names = {id(p): _fqn(n) for n, p in self.engine.module.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names_of}
                  for g, names_of in zip(self.torch_optimizer.param_groups, self._group_names(names))]
        return {"state": state, "param_groups": groups}

    def _group_names(self, names: dict) -> list[list[str]]:
        """Parameter names of each group, in the order the groups were built (ZeRO replaced the
        groups' params with its flat partitions; the engine keeps the originals per group)."""
        opt = self.engine.optimizer
        original = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
        return [[names[id(p)] for p in group] for group in original]

    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        from deepspeed.utils import safe_set_full_optimizer_state

        self._link()
        for n, p in self.engine.module.named_parameters():
            if p.requires_grad:
                for k in self.KEYS:
                    safe_set_full_optimizer_state(p, saved["state"][_fqn(n)][k], k)
        step = next(iter(saved["state"].values()))["step"]
        for s in self.torch_optimizer.state.values():
            s["step"] = torch.as_tensor(step, dtype=torch.float32).clone()
        for g, sg in zip(self.torch_optimizer.param_groups, saved["param_groups"]):
            g.update({k: v for k, v in sg.items() if k != "params"})
