"""LoRA adapters on the DiT's layer matrices (``model.lora.rank > 0``).

Each selected base ``nn.Linear`` ``W [out, in]`` gets two child modules, ``lora_A`` (``[rank,
in]``, Kaiming-uniform like PEFT) and ``lora_B`` (``[out, rank]``, zero), and computes
``W x + (alpha / rank) B A x``. With ``B = 0`` the output is the base output plus an exact
zero, so a fresh adapter leaves the model unchanged bit for bit. The names are PEFT's saved
layout without its ``base_model.model.`` prefix: ``...mlp.linear_fc1.lora_A.weight``; the base
keeps its MAGI-1 name (``...mlp.linear_fc1.weight``), so base checkpoints load unchanged.

Targets are MAGI-1 module names matched as whole dotted components (PEFT's suffix rule):
``linear_qkv`` selects ``linear_qkv.q/qx/k/v``, ``linear_qkv.q`` only ``q``; allowed are the
names in :data:`TARGETS` (the adaLN gate projection is not: its TP output is all-gathered).

How the delta is applied:

- a base called as a module (q, qx, k, v, ``linear_kv_xattn``, ``linear_fc1``, ``linear_fc2``):
  a forward hook adds ``s B(A(x))`` to its output (activation path: no weight-sized temporary,
  and the frozen base needs no weight gradient);
- ``linear_proj``, which the model reads as a weight (``F.linear(x, linear_proj.weight)``, an
  fp32 island): the weight is read, during the attention block's forward, as ``W + s B A``
  (one ``[hidden, 2 q_dim]`` temporary per layer, kept for the backward).

Tensor parallelism (applied after TP, before FSDP2; see :func:`apply_lora`): the adapter follows
the base's sharding. Column-parallel base (``W`` ``Shard(0)``): ``B`` is sharded like ``W``'s
rows (the same DTensor placements, so a reordered layout such as paired gate/up halves is
followed too), ``A`` is replicated and its input gradient is summed over TP. Row-parallel base
(``Shard(1)``): ``A`` is sharded like ``W``'s columns, the rank-``r`` intermediate ``A x`` is
summed over TP (``r`` values per token), ``B`` is replicated. Replicated base: both replicated.
A KV weight kept whole on every rank because ``tp > num_kv_heads``, of which each rank computes
only its query heads' KV rows: both replicated, ``B`` read at those rows, and both gradients summed
over TP (each rank holds its queries' share), as TP does for the base weight.
Every replicated adapter matrix receives the same gradient on every TP rank.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from magitrain.config import LORA_TARGETS, lora_target_matches
from magitrain.parallel.tensor_parallel import _SumGradOverGroup, _SumOverGroup

TARGETS = LORA_TARGETS  # the adaptable base Linears of a layer, by their names in a TransformerLayer
matches = lora_target_matches

WEIGHT_READ = ("self_attention.linear_proj",)  # read as a weight by the model, not called
ADAPTER_KEYS = ("lora_A.weight", "lora_B.weight")


class LoraError(ValueError):
    """A LoRA setting or adapter file that cannot be used; the message names it."""


def selected(layer_names, targets) -> list[str]:
    """The names in ``layer_names`` (of :data:`TARGETS`) that ``targets`` select; an unknown target is an error."""
    for t in targets:
        if not any(matches(n, t) for n in TARGETS):
            raise LoraError(f"model.lora.targets: {t!r} names no adaptable module; choose from "
                            f"{', '.join(sorted({n.split('.')[-1] for n in TARGETS} | {'linear_qkv'}))}")
    return [n for n in layer_names if any(matches(n, t) for t in targets)]


def target_modules(model: nn.Module, targets) -> dict[str, nn.Linear]:
    """``{full name: base Linear}`` of every adapted module of a :class:`~magitrain.model.MagiDiT`."""
    names = selected(TARGETS, targets)
    out = {}
    for i, layer in enumerate(model.layers):
        for n in names:
            out[f"videodit_blocks.layers.{i}.{n}"] = layer.get_submodule(n)
    return out


# --- TP-aware autograd pieces -------------------------------------------------------------------

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _split_dim(weight) -> int | None:
    """The dimension of ``weight`` that tensor parallelism splits (0, 1), or None (replicated)."""
    if not isinstance(weight, DTensor):
        return None
    dims = {getattr(p, "dim", None) for p in weight.placements if p.is_shard() or type(p).__name__ == "_StridedShard"}
    if not dims:
        return None
    if len(dims) > 1:
        raise LoraError(f"cannot follow a base weight sharded as {weight.placements}")
    return dims.pop()


# --- the adapter ---------------------------------------------------------------------------------

@dataclass
class _Plan:
    scale: float
    split: int | None  # the base weight's TP-split dimension
    group: object  # the TP process group (None: no TP)
    rows: slice | None = None  # a whole base weight of which this rank computes only these rows


def _init_A(rank: int, fan_in: int, seed: int, name: str) -> torch.Tensor:
    """Kaiming-uniform (a = sqrt 5, nn.Linear's and PEFT's default) from a generator of (seed, name):
    the same values on every rank and under every layout."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63 - 1))
    bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) on [rank, fan_in]
    return (torch.rand(rank, fan_in, generator=gen, dtype=torch.float64) * 2 - 1).mul_(bound).float()


def _lora_delta(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``s B A x`` as the base's local output piece (activation path)."""
    plan: _Plan = mod._lora_plan
    x = _local(x)
    a, b = _local(mod.lora_A.weight), _local(mod.lora_B.weight)
    if plan.rows is not None:
        # KV weights replicated under TP (tp > num_kv_heads): this rank computes only its query
        # heads' KV rows, and their gradient is this rank's queries' share: summed over tp, as TP
        # sums the base weight's
        a = _SumGradOverGroup.apply(a, plan.group)
        b = _SumGradOverGroup.apply(b, plan.group)[plan.rows]
    elif plan.split == 0:
        # column parallel: B holds this rank's rows, so the gradient reaching A x is this rank's
        # part. A's gradient is summed over tp here; x's is summed where the TP region begins
        # (parallel/tensor_parallel.py sums the input gradient once per region, adapters included)
        a = _SumGradOverGroup.apply(a, plan.group)
    h = F.linear(x.to(a.dtype), a)
    if plan.split == 1:  # row parallel: x and A are column pieces; A x is a partial sum
        h = _SumOverGroup.apply(h, plan.group)
    return F.linear(h, b) * plan.scale


def _hook(mod, args, out):
    return out + _lora_delta(mod, args[0]).to(out.dtype)


def _merged_weight_view(mod: nn.Linear, base_view):
    """For a base read as a weight: ``base_view(W) + s B A`` (local pieces under TP)."""
    def view(w):
        plan: _Plan = mod._lora_plan
        a, b = _local(mod.lora_A.weight), _local(mod.lora_B.weight)
        if plan.split == 1:  # W's columns are split: so are A's; B (replicated) sees a partial gradient
            b = _SumGradOverGroup.apply(b, plan.group)
        elif plan.split == 0:
            a = _SumGradOverGroup.apply(a, plan.group)
        w = base_view(w) if base_view is not None else w
        dt = torch.promote_types(w.dtype, torch.float32)  # a bf16 base: the sum in fp32 (the model reads it so)
        return w.to(dt) + (b @ a).to(dt) * plan.scale
    return view


def apply_lora(model: nn.Module, rank: int, alpha: float, targets, seed: int, tp_mesh=None) -> dict[str, nn.Linear]:
    """Add adapters to ``model`` in place (after TP, before FSDP2) and freeze everything else.

    Returns ``{name: base Linear}`` of the adapted modules. ``tp_mesh``: the 1-D TP mesh when
    ``parallel.tp > 1`` (the adapters are placed on it like their bases), else None.
    """
    if rank < 1:
        raise LoraError(f"model.lora.rank={rank} must be >= 1")
    from magitrain.parallel.tensor_parallel import read_params_through

    modules = target_modules(model, targets)
    if not modules:
        raise LoraError("model.lora.targets selects no module")
    model.requires_grad_(False)
    for name, mod in modules.items():
        out_f, in_f = mod.weight.shape  # global shape (DTensor or not)
        split = _split_dim(mod.weight)
        rows = getattr(mod, "_tp_replicated_rows", None)  # a whole KV weight of which this rank computes rows
        group = tp_mesh.get_group() if (tp_mesh is not None and (split is not None or rows is not None)) else None
        device = _local(mod.weight).device
        a = nn.Linear(in_f, rank, bias=False, device=device)
        b = nn.Linear(rank, out_f, bias=False, device=device)
        with torch.no_grad():
            a.weight.copy_(_init_A(rank, in_f, seed, name))
            b.weight.zero_()
        if split is not None:
            pl = mod.weight.placements
            a_pl = pl if split == 1 else [Replicate()] * len(pl)
            b_pl = pl if split == 0 else [Replicate()] * len(pl)
            if split == 1:
                a.weight = nn.Parameter(distribute_tensor(a.weight.detach(), mod.weight.device_mesh, a_pl))
            if split == 0:
                b.weight = nn.Parameter(distribute_tensor(b.weight.detach(), mod.weight.device_mesh, b_pl))
        mod.lora_A, mod.lora_B = a, b
        mod._lora_plan = _Plan(alpha / rank, split, group, rows)
        if any(name.endswith(w) for w in WEIGHT_READ):
            read_params_through(mod, ("weight",), _merged_weight_view(mod, getattr(mod, "_param_view", None)),
                                scope=_parent(model, name))
        else:
            mod.register_forward_hook(_hook)
        for p in (a.weight, b.weight):
            p.requires_grad_(True)
    return modules


def _parent(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name.rsplit(".", 1)[0])


def is_adapter_key(name: str) -> bool:
    return name.endswith(ADAPTER_KEYS)


def base_name(adapter_key: str) -> str:
    """``...linear_fc1.lora_A.weight`` -> ``...linear_fc1.weight`` (the base weight it adapts)."""
    return adapter_key.rsplit(".", 2)[0] + ".weight"


@torch.no_grad()
def merged_weight(base: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """``W + s B A`` in fp32 (or higher): what an adapted module computes, folded into its weight."""
    dt = torch.promote_types(base.dtype, torch.float32)
    return base.to(dt) + (b.to(dt) @ a.to(dt)) * scale


def trainable_count(model: nn.Module) -> tuple[int, int]:
    """``(trainable parameters, all parameters)`` (global sizes)."""
    n = [p.numel() for p in model.parameters()]
    t = [p.numel() for p in model.parameters() if p.requires_grad]
    return sum(t), sum(n)


def target_names(num_layers: int, targets) -> list[str]:
    """Full names of the adapted modules of a ``num_layers`` model (PEFT's ``target_modules`` form)."""
    names = selected(TARGETS, targets)
    return [f"videodit_blocks.layers.{i}.{n}" for i in range(num_layers) for n in names]
