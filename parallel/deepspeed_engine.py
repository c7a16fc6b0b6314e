"""DeepSpeed ZeRO as the data-parallel engine (``parallel.dp_engine=deepspeed``, dp only).

The training loop stays as it is: :func:`apply_deepspeed` turns the plain model and its
``torch.optim.AdamW`` into a DeepSpeed engine (``model(...)`` and ``loss.backward()`` work on it:
DeepSpeed >= 0.18 hooks the engine's output for torch-style backward) and a small
:class:`EngineOptimizer` whose ``step()`` / ``zero_grad()`` go through the engine.

- ZeRO stage from ``parallel.zero_stage`` (1, 2 or 3).
- ``parallel.cpu_offload=true``: ZeRO-Offload. The fp32 master weights, both Adam moments and the
  optimizer step live on the CPU and step with DeepSpeed's C++ ``DeepSpeedCPUAdam`` (AdamW
  mode; JIT-built once, ~100 s, cached under ``TORCH_EXTENSIONS_DIR``). It is built on the SAME
  param-group dicts as the loop's torch AdamW, so the loop's LR schedule still drives it.
- ``train.grad_accum > 1``: the loop runs forward + ``loss.backward()`` per micro-batch and one
  ``optimizer.step()``. A forward pre-hook tells the engine which micro-batch is the last
  (``set_gradient_accumulation_boundary``): ZeRO reduces the accumulated gradients there, so the
  norm read before ``step()`` is the whole step's. DeepSpeed divides the output gradient by the
  accumulation count; the scale below multiplies it back (powers of two: exact).
- Gradients are SUMMED over dp, not DeepSpeed's mean: the trainer divides every rank's loss by
  the global loss-token count. A forward hook multiplies the gradient of the model's output by
  dp x grad_accum, which DeepSpeed's 1/dp average and 1/grad_accum scaling then cancel.
- Clipping is DeepSpeed's (``gradient_clipping`` = ``optim.grad_clip``: the same formula as
  :func:`torch.nn.utils.clip_grad_norm_`); :func:`grad_norm` reads the norm it will clip with.
- EMA: :class:`PartitionEMA` keeps the moving average of this rank's fp32 master partition only
  (ZeRO-3 keeps no full parameters between steps; at stages 1/2 it is 1/dp of a full copy too).
- Checkpoints: :class:`EngineModelState`, :class:`EngineOptimizerState` and the EMA hand the
  Checkpointer each rank's OWN partition, as a ``ShardedTensor`` of the parameter's full shape
  keyed by parameter name (the FSDP2 run's keys). ZeRO partitions the flattened parameter, so a
  rank's piece is a flat range: :func:`flat_range_boxes` cuts it into at most ``2 * ndim - 1``
  row-major boxes, each a view of the partition. DCP writes each box once (per-rank writes are
  ~1/dp of model + optimizer, no gather), and reads any layout back: FSDP2 runs, other ZeRO
  stages and dp sizes, and release export all see ordinary full-shape tensors.
- The learning-rate schedule drives the wrapped optimizer's ``param_groups``: ZeRO keeps those
  dicts (it only swaps their ``params`` for its flat fp32 partitions).
"""

from __future__ import annotations

import math
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

from magitrain.config import Config, ConfigError

from . import collectives
from .mesh import ParallelEnv

ADAM_KEYS = ("exp_avg", "exp_avg_sq")


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
    """The DeepSpeed JSON config for this run (fp32 or bf16 as ``train.dtype``; ``train.grad_accum``
    micro-batches a step, the boundary set by :func:`apply_deepspeed`'s hook)."""
    p = cfg.parallel
    if p.zero_stage not in (1, 2, 3):
        raise ConfigError(f"parallel.zero_stage={p.zero_stage} must be 1, 2 or 3 with dp_engine=deepspeed")
    zero: dict = {"stage": p.zero_stage}
    if p.cpu_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": env.device.type == "cuda"}
    gas = cfg.train.grad_accum
    return {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": gas,
        "train_batch_size": env.dp * gas,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": env.device.type == "cuda" and cfg.train.dtype == "bf16"},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


class EngineOptimizer:
    """What the loop calls ``optimizer``: ``step()`` and ``zero_grad()`` go through the engine;
    ``param_groups`` are the dicts the LR schedule writes (shared by the optimizer that steps)."""

    def __init__(self, engine, torch_optimizer: torch.optim.Optimizer):
        self.engine, self.torch_optimizer = engine, torch_optimizer

    @property
    def param_groups(self):
        return self.torch_optimizer.param_groups

    @property
    def stepping_optimizer(self) -> torch.optim.Optimizer:
        """The optimizer ZeRO steps (torch AdamW, or DeepSpeedCPUAdam under offload): its ``state``."""
        return self.engine.optimizer.optimizer

    def step(self) -> None:
        self.engine.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad()


def _cpu_adam(optimizer: torch.optim.Optimizer):
    """DeepSpeed's CPU AdamW on ``optimizer``'s own param-group dicts (same lr/betas/eps/decay)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    d = optimizer.defaults
    return DeepSpeedCPUAdam(optimizer.param_groups, lr=d["lr"], betas=tuple(d["betas"]), eps=d["eps"],
                            weight_decay=d["weight_decay"], adamw_mode=True)


def apply_deepspeed(model: nn.Module, optimizer: torch.optim.Optimizer, env: ParallelEnv, cfg: Config):
    """``(engine, EngineOptimizer)`` for ``model`` trained by ``optimizer`` (a torch AdamW)."""
    if env.cp * env.tp != 1:
        raise ConfigError("parallel.dp_engine=deepspeed shards over data parallel only; use parallel.cp=1 and "
                          "parallel.tp=1 (or dp_engine=fsdp2)")
    import deepspeed  # imported here: an optional dependency

    gas = cfg.train.grad_accum
    if env.dp * gas > 1:
        model.register_forward_hook(lambda m, args, out: _ScaleGrad.apply(out, float(env.dp * gas)))
    engine_ref: list = []
    if gas > 1:
        micro = [0]

        def mark_boundary(module, args):  # runs before each micro-batch's forward (with grad)
            if torch.is_grad_enabled() and engine_ref:
                engine_ref[0].set_gradient_accumulation_boundary(micro[0] % gas == gas - 1)
                micro[0] += 1
        model.register_forward_pre_hook(mark_boundary)
    stepping = _cpu_adam(optimizer) if cfg.parallel.cpu_offload else optimizer
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=stepping,
                                           config=ds_config(cfg, env), dist_init_required=False)
    engine_ref.append(engine)
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


# ------------------------------------------------------------------------------------------
# A rank's ZeRO partition of each parameter, as DCP-writable boxes
# ------------------------------------------------------------------------------------------

def flat_range_boxes(start: int, numel: int, shape: tuple) -> list[tuple[tuple, tuple]]:
    """The row-major boxes ``(offsets, sizes)`` that exactly tile the flat element range
    ``[start, start + numel)`` of a tensor of ``shape``, in memory order; each box is a contiguous
    run of that range (so a view of the flat partition). At most ``2 * ndim - 1`` boxes."""
    if numel <= 0:
        return []
    if len(shape) <= 1:
        return [((start,) if shape else (), (numel,) if shape else ())]
    inner = math.prod(shape[1:])
    end = start + numel
    first, last = start // inner, (end - 1) // inner

    def within(row, lo, hi):  # a range inside one row: recurse on the trailing dims
        return [((row,) + o, (1,) + s) for o, s in flat_range_boxes(lo, hi - lo, tuple(shape[1:]))]

    if first == last:
        return within(first, start - first * inner, end - first * inner)
    boxes = []
    if start % inner:
        boxes += within(first, start % inner, inner)
        first += 1
    full_end = end // inner  # rows [first, full_end) are whole
    if full_end > first:
        boxes.append(((first,) + (0,) * (len(shape) - 1), (full_end - first,) + tuple(shape[1:])))
    if end % inner:
        boxes += within(full_end, 0, end % inner)
    return boxes


class _Partition:
    """This rank's piece of one parameter: the flat range ``[start, start + numel)`` of the
    flattened parameter, and accessors for its fp32 master / Adam-moment values (1-D tensors)."""

    def __init__(self, name: str, param: nn.Parameter, stage: int, rank: int):
        self.name, self.param, self.shape = name, param, tuple(param.ds_shape if stage == 3 else param.shape)
        self.stage = stage
        if stage == 3:
            part = param.ds_tensor.ds_numel
            self.start = min(rank * part, param.ds_numel)
            self.numel = min(part, param.ds_numel - self.start)
        else:
            mapping = getattr(param, "_hp_mapping", None)
            self.start = mapping.lp_fragment_address.start if mapping is not None else 0
            self.numel = mapping.lp_fragment_address.numel if mapping is not None else 0

    def get(self, key: str | None) -> torch.Tensor:
        """The fp32 master (``key=None``) or an optimizer-state piece, length ``numel``."""
        if self.numel == 0:
            return torch.zeros(0)
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state

            full = safe_get_local_fp32_param(self.param) if key is None else \
                safe_get_local_optimizer_state(self.param, key)
            return full.reshape(-1)[:self.numel]
        m = self.param._hp_mapping
        return (m.get_hp_fragment() if key is None else m.get_optim_state_fragment(key)).reshape(-1)

    def set(self, key: str | None, value: torch.Tensor) -> None:
        if self.numel == 0:
            return
        if self.stage == 3:
            from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

            padded = torch.zeros(self.param.ds_tensor.ds_numel, dtype=torch.float32, device=value.device)
            padded[:self.numel] = value.reshape(-1)
            if key is None:
                safe_set_local_fp32_param(self.param, padded)
                self.param.ds_tensor.data.reshape(-1)[:self.numel].copy_(value.reshape(-1))  # the working copy
            else:
                safe_set_local_optimizer_state(self.param, padded, key)
        else:
            self.get(key).copy_(value.reshape(-1))


def partitions(engine) -> list[_Partition]:
    """This rank's ZeRO partition of every trainable parameter, in ``named_parameters`` order."""
    stage, rank = engine.zero_optimization_stage(), dist.get_rank()
    return [_Partition(_fqn(n), p, stage, rank) for n, p in engine.module.named_parameters() if p.requires_grad]


def _all_ranges(parts: list[_Partition]) -> torch.Tensor:
    """``[world, len(parts), 2]`` (start, numel) of every rank's partitions (host-side, CPU group)."""
    mine = torch.tensor([[p.start, p.numel] for p in parts], dtype=torch.int64).reshape(len(parts), 2)
    group = collectives.cpu_group()
    out = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(out, mine, group=group)
    return torch.stack(out)


def sharded_partition(flat: torch.Tensor, shape: tuple, ranges: list[tuple[int, int]], rank: int):
    """A ``ShardedTensor`` of global ``shape`` whose local shards are views of ``flat`` (this rank's
    flat range ``ranges[rank]``); ``ranges`` holds every rank's (start, numel)."""
    from torch.distributed._shard.metadata import ShardMetadata
    from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor
    from torch.distributed._shard.sharded_tensor.metadata import ShardedTensorMetadata, TensorProperties

    device = flat.device
    where = (lambda r: f"rank:{r}/cpu") if device.type == "cpu" else (lambda r: f"rank:{r}/{device}")
    all_md, local = [], []
    for r, (start, numel) in enumerate(ranges):
        pos = 0
        for offsets, sizes in flat_range_boxes(start, numel, shape):
            md = ShardMetadata(list(offsets), list(sizes), where(r))
            all_md.append(md)
            n = math.prod(sizes)
            if r == rank:
                local.append(Shard(flat[pos:pos + n].view(sizes), md))
            pos += n
    props = TensorProperties(dtype=flat.dtype, layout=torch.strided, requires_grad=False,
                             memory_format=torch.contiguous_format, pin_memory=False)
    return ShardedTensor._init_from_local_shards_and_global_metadata(
        local, ShardedTensorMetadata(all_md, torch.Size(shape), props))


def _local_of(st) -> torch.Tensor:
    """The flat values of a ``ShardedTensor`` built by :func:`sharded_partition` (its boxes in order)."""
    shards = st.local_shards()
    if not shards:
        return torch.zeros(0)
    return torch.cat([s.tensor.reshape(-1) for s in shards])


class _PartitionedState:
    """Builds (state_dict) and reads back (load_state_dict) per-parameter ShardedTensors of one
    kind of value (fp32 master or an Adam moment) over :func:`partitions`."""

    def __init__(self, engine):
        self.engine = engine
        self.parts = partitions(engine)
        self.ranges = _all_ranges(self.parts)
        self.rank = dist.get_rank()

    def tensors(self, values: list[torch.Tensor]) -> dict:
        return {p.name: sharded_partition(v.detach(), p.shape, [tuple(r[i].tolist()) for r in self.ranges], self.rank)
                for i, (p, v) in enumerate(zip(self.parts, values))}


class EngineModelState:
    """Checkpoint adapter: the engine's fp32 master weights keyed by parameter name; each rank
    hands over only its own partition (a full-shape ``ShardedTensor``, see :func:`sharded_partition`)."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        ps = _PartitionedState(self.engine)
        out = ps.tensors([p.get(None).clone() for p in ps.parts])
        params = {_fqn(n) for n, _ in self.engine.module.named_parameters()}
        for n, b in self.engine.module.state_dict(keep_vars=True).items():  # buffers (replicated)
            if _fqn(n) not in params:
                out[_fqn(n)] = b.detach().clone()
        return out

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        parts = partitions(self.engine)
        for p in parts:
            p.set(None, _local_of(state[p.name]))
        if self.engine.zero_optimization_stage() < 3:
            _rebuild_full_params(parts)
        for n, b in self.engine.module.named_buffers():
            if _fqn(n) in state:
                b.copy_(state[_fqn(n)])


def _rebuild_full_params(parts: list[_Partition]) -> None:
    """ZeRO-1/2 keep a full working copy of every parameter on each rank: refill it from the
    ranks' master partitions (disjoint ranges: a sum over dp of zero-padded pieces is exact)."""
    for p in parts:
        flat = torch.zeros(p.param.numel(), dtype=torch.float32, device=p.param.device)
        flat[p.start:p.start + p.numel] = p.get(None).to(flat.device)
        dist.all_reduce(flat)
        p.param.data.copy_(flat.view_as(p.param))


class EngineOptimizerState:
    """Checkpoint adapter: AdamW's state in ``get_optimizer_state_dict``'s layout
    (``{"state": {name: {exp_avg, exp_avg_sq, step}}, "param_groups": [...with names]}``), each
    moment as this rank's partition (a full-shape ``ShardedTensor``)."""

    KEYS = ADAM_KEYS

    def __init__(self, engine, optimizer: EngineOptimizer):
        self.engine, self.optimizer = engine, optimizer

    @property
    def _state(self) -> dict:
        return self.optimizer.stepping_optimizer.state

    def _link(self) -> None:
        """Before the first step (a resume) the optimizer's flat-partition state does not exist
        yet: create the fresh state (zeros, step 0); ZeRO-1/2 then (re)link each parameter onto it
        so the per-parameter views exist."""
        opt = self.engine.optimizer
        cpu_adam = type(self.optimizer.stepping_optimizer).__name__ == "DeepSpeedCPUAdam"  # counts steps in an int
        flats = getattr(opt, "single_partition_of_fp32_groups", None) or opt.fp32_partitioned_groups_flat
        for flat in flats:
            if not self._state[flat]:
                self._state[flat] = {"step": 0 if cpu_adam else torch.zeros((), dtype=torch.float32),
                                     **{k: torch.zeros_like(flat) for k in self.KEYS}}
        if hasattr(opt, "_lazy_init_hp_params_optimizer_state"):
            opt._hp_optimizer_states_linked = False
            opt._lazy_init_hp_params_optimizer_state()

    def _step(self) -> torch.Tensor:
        steps = [s["step"] for s in self._state.values() if "step" in s]
        groups = [g["step"] for g in self.optimizer.stepping_optimizer.param_groups if "step" in g]
        step = steps[0] if steps else (groups[0] if groups else 0.0)  # DeepSpeedCPUAdam: per state or group
        return torch.as_tensor(float(step), dtype=torch.float32).clone()

    def state_dict(self) -> dict:
        self._link()
        step = self._step()
        ps = _PartitionedState(self.engine)
        moments = {k: ps.tensors([p.get(k).clone() for p in ps.parts]) for k in self.KEYS}
        state = {p.name: {"step": step.clone(), **{k: moments[k][p.name] for k in self.KEYS}} for p in ps.parts}
        names = {id(p): _fqn(n) for n, p in self.engine.module.named_parameters()}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": names_of}
                  for g, names_of in zip(self.optimizer.param_groups, self._group_names(names))]
        return {"state": state, "param_groups": groups}

    def _group_names(self, names: dict) -> list[list[str]]:
        """Parameter names of each group, in the order the groups were built (ZeRO replaced the
        groups' params with its flat partitions; the engine keeps the originals per group)."""
        opt = self.engine.optimizer
        original = getattr(opt, "bit16_groups", None) or getattr(opt, "fp16_groups", None)
        return [[names[id(p)] for p in group] for group in original]

    @torch.no_grad()
    def load_state_dict(self, saved: dict) -> None:
        self._link()
        for p in partitions(self.engine):
            for k in self.KEYS:
                p.set(k, _local_of(saved["state"][p.name][k]))
        step = float(next(iter(saved["state"].values()))["step"])
        for s in self._state.values():
            if "step" in s:
                s["step"] = torch.as_tensor(step, dtype=torch.float32).clone() if torch.is_tensor(s["step"]) \
                    else int(step)
        for g in self.optimizer.stepping_optimizer.param_groups:
            if "step" in g:
                g["step"] = int(step)
        for g, sg in zip(self.optimizer.param_groups, saved["param_groups"]):
            g.update({k: v for k, v in sg.items() if k not in ("params", "step")})


class PartitionEMA:
    """EMA of the weights under DeepSpeed: ``ema <- decay * ema + (1 - decay) * master`` on this
    rank's fp32 master partition only (ZeRO-3 holds no full weights between steps). The same
    interface and checkpoint keys (``decay``, ``shadow/<name>``) as :class:`magitrain.ema.EMA`;
    ``shadow`` entries are saved as full-shape ShardedTensors, so FSDP2 runs and release export
    read them as usual."""

    def __init__(self, engine, decay: float):
        self.engine, self.decay = engine, decay
        self.shadow = {p.name: p.get(None).detach().clone().float() for p in partitions(engine)}

    @torch.no_grad()
    def update(self, model=None) -> None:
        for p in partitions(self.engine):
            self.shadow[p.name].lerp_(p.get(None).float().to(self.shadow[p.name].device), 1.0 - self.decay)

    def state_dict(self) -> dict:
        ps = _PartitionedState(self.engine)
        return {"decay": self.decay, "shadow": ps.tensors([self.shadow[p.name] for p in ps.parts])}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}...")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(_local_of(t) if hasattr(t, "local_shards") else t.reshape(-1))
