"""Tensor parallelism (and optional sequence parallelism) for every MAGI-1 variant, applied from
outside the model (torchtitan style): parameters become DTensors on the 1-D ``tp`` mesh under
their unchanged names, and the model's modules read them through local views while they run.

Per layer (Megatron's layout; the planner :mod:`magitrain.plan` models exactly this):

- **TP regions.** A region starts at a pre-LN output (``linear_qkv.layer_norm``,
  ``mlp.layer_norm``) and ends at a row-parallel output (``linear_proj``, ``mlp.linear_fc2``).
  Entry: identity forward, gradient all-reduced over tp (one all-reduce for q, qx, k and v
  together). Exit: partial outputs all-reduced. With sequence parallelism
  (``parallel.sequence_parallel``) the entry is an all-gather over the sequence and the exit a
  reduce-scatter, so everything between regions (norms, gating, residual adds, the embedder and
  the final layer) runs on ``1/tp`` of the tokens.
- ``linear_qkv.q/qx/k/v`` and ``linear_kv_xattn``: column parallel by heads (``Shard(0)``;
  ``kv_xattn``'s rows are ``[key_h | value_h]`` per KV head, so a row split keeps whole heads).
  GQA: rank ``r`` holds query heads ``[r Hq/tp, (r+1) Hq/tp)``. When ``tp <= num_kv_heads`` it
  holds KV heads ``[r Hk/tp, (r+1) Hk/tp)``, exactly the ones those queries use. When ``tp >
  num_kv_heads`` (``tp`` a multiple of ``Hk``) the KV weights stay whole on every rank and rank
  ``r`` computes only KV head ``r // (tp / Hk)``, the one its queries use; the ``tp / Hk`` ranks
  sharing a head each contribute their queries' share of its gradient, summed over tp.
- ``linear_proj``: row parallel. The model interleaves ``[self | cross]`` outputs in 8 groups
  before it; a rank's local heads are groups ``[r 8/tp, (r+1) 8/tp)`` of each branch, whose
  interleave is the contiguous input slice ``[r, r+1) * 2 q_dim / tp``: a plain ``Shard(1)``
  (``tp`` must divide 8).
- MLP: ``linear_fc1`` column, ``linear_fc2`` row parallel. A SwiGLU ``linear_fc1`` stores
  ``[gate | up]`` as one ``[2 ffn, hidden]`` matrix; rank ``r`` needs gate rows ``[r ffn/tp,
  (r+1) ffn/tp)`` AND the same up rows. That is DTensor's ``_StridedShard(0, split_factor=2)``
  (split into ``[gate | up]``, then each half by tp): the full tensor is MAGI-1's matrix, the
  local one ``[gate_r; up_r]``, so the model's ``chunk(2)`` pairs them. Two things need care:
  FSDP2 must shard it on dim 1 (:func:`fsdp_shard_placement`: stacking FSDP's strided shard on
  the same dim gives wrong full tensors in torch 2.13), and DCP cannot write a non-contiguous
  local piece, so checkpoints see it as a plain ``Shard(0)`` (:func:`checkpoint_layout`).
- adaLN gates (``ada_modulate_layer.proj``): column parallel with the output all-gathered
  (every token needs every gate; ``[chunks, 2 hidden]``, tiny).
- Per-head q/k norms and RoPE bands act on each rank's own heads: their gradients are partial
  per rank and are summed over tp (a view whose backward all-reduces). Under sequence
  parallelism the same holds for every parameter used between regions (norms, embedder, final
  layer) since each rank sees only its tokens.

Embedders and the final layer stay replicated (0.16% of the 24B model's parameters, see
docs/design.md); under sequence parallelism they run on the rank's own tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.distributed.tensor.placement_types import _StridedShard

# torch >= 2.13 renamed all_gather_into_tensor (the old name warns)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# --- Collectives with their autograd duals ----------------------------------------------------

class _SumGradOverGroup(torch.autograd.Function):
    """Identity forward; the backward all-reduces (sums) the gradient over ``group``."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _SumOverGroup(torch.autograd.Function):
    """Forward all-reduces (sums) partial results over ``group``; the backward is the identity."""

    @staticmethod
    def forward(ctx, x, group):
        out = x.contiguous().clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _pad_rows(x, rows: int):
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros((rows - x.shape[0], *x.shape[1:]))])


def _gather_rows(x_local, group, n: int):
    world = dist.get_world_size(group)
    out = x_local.new_empty((world * x_local.shape[0], *x_local.shape[1:]))
    _all_gather(out, x_local.contiguous(), group=group)
    return out[:n]


def _reduce_scatter_rows(x, group):
    """Sum ``x [n, ...]`` over ``group`` and keep this rank's ``ceil(n / world)`` rows (zero padded)."""
    world = dist.get_world_size(group)
    per = -(-x.shape[0] // world)
    x = _pad_rows(x, per * world).contiguous()
    out = x.new_empty((per, *x.shape[1:]))
    dist.reduce_scatter_tensor(out, x, group=group)
    return out


def _own_rows(x, group):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    per = -(-x.shape[0] // world)
    return _pad_rows(x, per * world)[rank * per:(rank + 1) * per]


class _GatherSequence(torch.autograd.Function):
    """SP region entry: all-gather the sequence shards (first ``n`` rows); backward reduce-scatter."""

    @staticmethod
    def forward(ctx, x_local, group, n):
        ctx.group = group
        return _gather_rows(x_local, group, n)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter_rows(grad, ctx.group), None, None


class _ReduceScatterSequence(torch.autograd.Function):
    """SP region exit: sum partial outputs and keep this rank's rows; backward all-gather."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        return _reduce_scatter_rows(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.group, ctx.n), None


class _ScatterSequence(torch.autograd.Function):
    """Replicated ``[n, ...]`` -> this rank's rows; backward all-gathers (each rank's rows' grads)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.n = group, x.shape[0]
        return _own_rows(x, group).clone()

    @staticmethod
    def backward(ctx, grad):
        return _gather_rows(grad, ctx.group, ctx.n), None


class _GatherToReplicated(torch.autograd.Function):
    """Sequence shards -> the replicated ``[n, ...]`` a replicated computation (the loss) reads;
    backward keeps this rank's rows of the (identical on every rank) gradient."""

    @staticmethod
    def forward(ctx, x_local, group, n):
        ctx.group = group
        return _gather_rows(x_local, group, n)

    @staticmethod
    def backward(ctx, grad):
        return _own_rows(grad, ctx.group).clone(), None, None


# --- Reading parameters through views while a module runs ------------------------------------

_VIEW_CLASSES: dict = {}


def read_params_through(module: nn.Module, names: tuple[str, ...], view, scope: nn.Module | None = None) -> None:
    """While ``scope`` (default: ``module``) runs its forward, make ``module.<name>`` return
    ``view(parameter)`` for each of ``names``.

    Outside that forward the attribute is the parameter itself, so FSDP2, DCP and state dicts
    see the registered parameter under its unchanged name. Done by giving the module a subclass
    with one property per name (no change to model code). A second call on the same module and
    names replaces the view (LoRA composes its merged weight with TP's local view this way: pass
    ``module._param_view`` into the new one); other names on a viewed module are refused.
    """
    base = type(module)
    if hasattr(module, "_param_view"):
        if getattr(module, "_param_view_names", None) != names:
            raise ValueError(f"{base.__name__} already reads {module._param_view_names} through a view")
        module._param_view = view
        object.__setattr__(module, "_param_view_scope", module if scope is None else scope)
        _count_forwards(module if scope is None else scope)
        return
    key = (base, names)
    if key not in _VIEW_CLASSES:
        def getter(self, n):
            p = self._parameters[n]
            return self._param_view(p) if self._param_view_scope._in_forward else p
        props = {n: property(lambda self, n=n: getter(self, n)) for n in names}
        _VIEW_CLASSES[key] = type(base.__name__, (base,), props)
    scope = module if scope is None else scope
    module.__class__ = _VIEW_CLASSES[key]
    module._param_view = view
    module._param_view_names = names
    object.__setattr__(module, "_param_view_scope", scope)  # a plain reference, not a submodule
    _count_forwards(scope)


def _count_forwards(scope: nn.Module) -> None:
    """``scope._in_forward``: how many of its forwards are running (hooks added once)."""
    if not hasattr(scope, "_in_forward"):
        scope._in_forward = 0
        scope.register_forward_pre_hook(_enter)
        scope.register_forward_hook(_leave, always_call=True)


def _enter(module, args):
    module._in_forward += 1


def _leave(module, args, out):
    module._in_forward -= 1


def _to_local(p):
    return p.to_local() if isinstance(p, DTensor) else p


def _output_hook(fn):
    return lambda module, args, out: fn(out)


def _input_hook(fn):
    return lambda module, args: (fn(args[0]), *args[1:])


# --- The plan ---------------------------------------------------------------------------------

@dataclass
class SequenceShards:
    """Sequence-parallel state of one model: the tp group and the current (unsharded) token count
    ``n`` of the forward in progress (set where the sequence is split; AC recomputes set it again)."""

    group: object
    n: int = 0


def paired_shard() -> _StridedShard:
    """The placement of a SwiGLU ``linear_fc1`` on the tp mesh: rank r holds gate_r and up_r."""
    return _StridedShard(0, split_factor=2)


def _is_paired(placement) -> bool:
    return isinstance(placement, _StridedShard) and placement.split_factor == 2 and placement.dim == 0


def fsdp_shard_placement(param: nn.Parameter):
    """FSDP2 ``shard_placement_fn``: dim 1 for a paired (SwiGLU) TP weight, FSDP2's default otherwise."""
    if isinstance(param, DTensor) and any(_is_paired(pl) for pl in param.placements):
        return Shard(1)
    return None


def checkpoint_layout(t):
    """``t`` as DCP can write and read it: a DTensor holding a paired shard is redistributed to
    a plain ``Shard(0)`` on that mesh dimension (same full tensor: MAGI-1's ``[gate | up]``
    matrix, so any layout, one process and release export read it). Others: ``t`` itself."""
    if not isinstance(t, DTensor) or not any(_is_paired(pl) for pl in t.placements):
        return t
    placements = [Shard(0) if _is_paired(pl) else pl for pl in t.placements]
    return t.redistribute(t.device_mesh, placements)


def _kv_rows_of_rank(rank: int, tp: int, kv_heads: int, rows_per_head: int) -> slice:
    """Rows of a whole KV weight that rank ``rank`` computes when ``tp > kv_heads``."""
    head = rank // (tp // kv_heads)
    return slice(head * rows_per_head, (head + 1) * rows_per_head)


def _shard_param(module: nn.Module, name: str, mesh, placement) -> None:
    p = getattr(module, name)
    setattr(module, name, nn.Parameter(distribute_tensor(p.detach(), mesh, [placement])))


def _local_views(module: nn.Module, names=("weight",), scope=None) -> None:
    read_params_through(module, names, _to_local, scope=scope)


def _apply_layer(layer: nn.Module, tp_mesh, kv_heads: int, sp: SequenceShards | None) -> None:
    group, tp, rank = tp_mesh.get_group(), tp_mesh.size(), tp_mesh.get_local_rank()
    sum_grad = lambda p: _SumGradOverGroup.apply(p, group)  # noqa: E731
    attn, mlp = layer.self_attention, layer.mlp
    lin = attn.linear_qkv

    if sp is None:
        enter = lambda u: _SumGradOverGroup.apply(u, group)  # noqa: E731
        leave = lambda out: _SumOverGroup.apply(out, group)  # noqa: E731
    else:
        enter = lambda u: _GatherSequence.apply(u, group, sp.n)  # noqa: E731
        leave = lambda out: _ReduceScatterSequence.apply(out, group)  # noqa: E731
    lin.layer_norm.register_forward_hook(_output_hook(enter))
    mlp.layer_norm.register_forward_hook(_output_hook(enter))

    # column parallel by heads
    for name in ("q", "qx"):
        _shard_param(lin[name], "weight", tp_mesh, Shard(0))
        _local_views(lin[name])
    head_dim = attn.head_dim
    if tp <= kv_heads:
        for module in (lin.k, lin.v, attn.linear_kv_xattn):
            _shard_param(module, "weight", tp_mesh, Shard(0))
            _local_views(module)
    else:  # KV heads replicated: whole weights, each rank computes its queries' head
        for module, rows in ((lin.k, head_dim), (lin.v, head_dim), (attn.linear_kv_xattn, 2 * head_dim)):
            own = _kv_rows_of_rank(rank, tp, kv_heads, rows)
            read_params_through(module, ("weight",), lambda p, own=own: sum_grad(p)[own])
            module._tp_replicated_rows = own  # the rows an adapter on it must follow too (lora.py)
    attn.linear_kv_xattn.register_forward_pre_hook(_input_hook(lambda c: _SumGradOverGroup.apply(c, group)))

    # row parallel: the model calls F.linear(x, linear_proj.weight) inside the attention's forward
    _shard_param(attn.linear_proj, "weight", tp_mesh, Shard(1))
    _local_views(attn.linear_proj, scope=attn)
    attn.register_forward_hook(_output_hook(leave))
    for norm in (attn.q_layernorm, attn.k_layernorm, attn.q_layernorm_xattn, attn.k_layernorm_xattn):
        read_params_through(norm, ("weight", "bias"), sum_grad)

    # MLP: fc1 column parallel (SwiGLU: gate/up paired), fc2 row parallel
    _shard_param(mlp.linear_fc1, "weight", tp_mesh, paired_shard() if mlp.gated else Shard(0))
    _local_views(mlp.linear_fc1)
    _shard_param(mlp.linear_fc2, "weight", tp_mesh, Shard(1))
    _local_views(mlp.linear_fc2)
    mlp.linear_fc2.register_forward_hook(_output_hook(leave))

    parallelize_module(layer, tp_mesh, {"ada_modulate_layer.proj.0": ColwiseParallel(output_layouts=Replicate())})

    if sp is not None:
        # between regions each rank sees only its tokens: those parameters' gradients are partial
        for norm in (lin.layer_norm, mlp.layer_norm, layer.self_attn_post_norm, layer.mlp_post_norm):
            read_params_through(norm, ("weight", "bias"), sum_grad)
        # per-token gates of this rank's rows: the per-chunk gates' gradient is partial
        layer.ada_modulate_layer.register_forward_hook(_output_hook(sum_grad))
        layer.forward = functools.partial(_sp_layer_forward, layer.forward, sp)


def _sp_layer_forward(forward, sp: SequenceShards, h, cond, chunk_ids, *args):
    """A layer under SP: ``h`` holds this rank's rows; ``chunk_ids`` (all rows) picks their gates."""
    sp.n = chunk_ids.shape[0]
    return forward(h, cond, _own_rows(_pad_chunk_ids(chunk_ids, sp.group), sp.group), *args)


def _pad_chunk_ids(chunk_ids, group):
    per = -(-chunk_ids.shape[0] // dist.get_world_size(group))
    pad = per * dist.get_world_size(group) - chunk_ids.shape[0]
    return chunk_ids if not pad else torch.cat([chunk_ids, chunk_ids.new_full((pad,), -1)])


def _sp_embed(embed, sp: SequenceShards, x):
    sp.n = x.shape[0]
    return embed(_ScatterSequence.apply(x, sp.group))


def _sp_head(head, sp: SequenceShards, h_local):
    return _GatherToReplicated.apply(head(h_local), sp.group, sp.n)


def apply_tensor_parallel(model: nn.Module, tp_mesh, sequence_parallel: bool = False) -> None:
    """Shard ``model`` (a :class:`magitrain.model.MagiDiT`) in place over the 1-D ``tp_mesh``.

    ``tp`` must divide ``num_heads``, 8 and ``ffn_hidden_size``, and divide ``num_kv_heads`` or
    be a multiple of it (checked at start by :func:`magitrain.parallel.mesh.validate_layout`).
    """
    cfg, tp = model.cfg, tp_mesh.size()
    if cfg.num_heads % tp or 8 % tp or cfg.ffn_hidden_size % tp or (cfg.num_kv_heads % tp and tp % cfg.num_kv_heads):
        raise ValueError(f"tp={tp} does not fit num_heads={cfg.num_heads}, num_kv_heads={cfg.num_kv_heads}, "
                         f"ffn_hidden_size={cfg.ffn_hidden_size} and linear_proj's 8 groups")
    group = tp_mesh.get_group()
    sum_grad = lambda p: _SumGradOverGroup.apply(p, group)  # noqa: E731
    sp = SequenceShards(group) if sequence_parallel else None
    for layer in model.layers:
        _apply_layer(layer, tp_mesh, cfg.num_kv_heads, sp)
    read_params_through(model.rope, ("bands",), sum_grad)
    if sp is not None:  # embedder and final layer run on this rank's tokens only
        read_params_through(model.x_embedder, ("weight",), sum_grad, scope=model)
        read_params_through(model.videodit_blocks.final_layernorm, ("weight", "bias"), sum_grad)
        read_params_through(model.final_linear.linear, ("weight",), sum_grad, scope=model)
        model.embed = functools.partial(_sp_embed, model.embed, sp)
        model.head = functools.partial(_sp_head, model.head, sp)
