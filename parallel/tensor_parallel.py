"""Tensor parallelism: shard each transformer layer's matrices by heads / hidden units (DTensor).

Per layer (Megatron's layout, expressed with torch-native DTensor so that FSDP2 shards the
same parameters over data parallel and DCP reshards them):

- ``linear_qkv.q/qx/k/v`` and ``linear_kv_xattn``: column parallel (output rows split by heads;
  ``kv_xattn``'s rows are ``[key_h | value_h]`` per KV head, so a row split keeps whole heads).
  GQA: rank ``r`` holds query heads ``[r Hq/tp, (r+1) Hq/tp)`` and KV heads
  ``[r Hk/tp, (r+1) Hk/tp)``, which are exactly the KV heads those queries use, so
  ``parallel.tp`` must divide ``num_kv_heads`` (checked at start; KV heads are not replicated).
- ``linear_proj``: row parallel. The model interleaves ``[self | cross]`` outputs in 8 groups
  before it; a rank's local heads are groups ``[r 8/tp, (r+1) 8/tp)`` of each branch, whose
  interleave is the contiguous input slice ``[r, r+1) * 2 q_dim / tp``: a plain ``Shard(1)``
  (``tp`` must divide 8). The model calls it as ``F.linear(x, linear_proj.weight)`` (an fp32
  island), so the layer reads the weight through a local view and the attention block's
  output is summed over TP afterwards.
- MLP: ``linear_fc1`` column, ``linear_fc2`` row parallel (GELU MLP). A SwiGLU ``linear_fc1``
  stores ``[gate | up]`` rows, which a row split cannot cut into matching halves: it stays
  replicated (correct, not memory-saving).
- adaLN gates (``ada_modulate_layer.proj``): column parallel with the output all-gathered
  (every token needs every gate).
- Norms, embedders, RoPE bands and the final linear stay replicated. The per-head q/k norms and
  the RoPE bands act on each rank's own heads only, so their gradients are partial per rank:
  they are read through a view whose backward sums the gradient over TP.

Sequence parallelism is not applied: the replicated activations between blocks are ``[n,
hidden]`` fp32 per rank and SP would trade the block's all-reduce for a reduce-scatter plus an
all-gather of the same volume.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module


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


_VIEW_CLASSES: dict = {}


def read_params_through(module: nn.Module, names: tuple[str, ...], view, scope: nn.Module | None = None) -> None:
    """While ``scope`` (default: ``module``) runs its forward, make ``module.<name>`` return
    ``view(parameter)`` for each of ``names``.

    Outside that forward the attribute is the parameter itself, so FSDP2, DCP and state dicts
    see the registered parameter under its unchanged name. Done by giving the module a subclass
    with one property per name (no change to model code).
    """
    base = type(module)
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
    object.__setattr__(module, "_param_view_scope", scope)  # a plain reference, not a submodule
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


def _layer_plan(layer: nn.Module) -> dict:
    attn = "self_attention."
    plan = {attn + f"linear_qkv.{n}": ColwiseParallel() for n in ("q", "qx", "k", "v")}
    plan[attn + "linear_kv_xattn"] = ColwiseParallel()
    plan["ada_modulate_layer.proj.0"] = ColwiseParallel(output_layouts=Replicate())
    if not layer.mlp.gated:
        plan["mlp.linear_fc1"] = ColwiseParallel()
        plan["mlp.linear_fc2"] = RowwiseParallel()
    return plan


def apply_tensor_parallel(model: nn.Module, tp_mesh) -> None:
    """Shard ``model`` (a :class:`magitrain.model.MagiDiT`) in place over the 1-D ``tp_mesh``."""
    group = tp_mesh.get_group()
    sum_grad = lambda p: _SumGradOverGroup.apply(p, group)  # noqa: E731
    for layer in model.layers:
        parallelize_module(layer, tp_mesh, _layer_plan(layer))
        attn = layer.self_attention
        proj = attn.linear_proj
        proj.weight = nn.Parameter(distribute_tensor(proj.weight.detach(), tp_mesh, [Shard(1)]))
        read_params_through(proj, ("weight",), _to_local, scope=attn)
        attn.register_forward_hook(lambda mod, args, out: _SumOverGroup.apply(out, group))
        for norm in (attn.q_layernorm, attn.k_layernorm, attn.q_layernorm_xattn, attn.k_layernorm_xattn):
            read_params_through(norm, ("weight", "bias"), sum_grad)
    read_params_through(model.rope, ("bands",), sum_grad)
