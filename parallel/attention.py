"""Context-parallel slice attention: the model's attention over tokens spread across CP ranks.

Each CP rank holds the tokens of its chunks (see :mod:`magitrain.parallel.dispatch`). For one
attention call a rank computes its local queries against

1. its local KV, while stage 0 of the remote KV is in flight, then
2. each remote KV stage ``s`` (received by group-cast, :mod:`magitrain.parallel.comm`) while
   stage ``s + 1`` is in flight,

and merges the partial results exactly by log-sum-exp. The backward recomputes per stage,
re-fetching remote KV (as MagiAttention does: memory over comm), and group-reduces each
stage's partial dK/dV to the owners while the next stage is computed.

The mask stays global (:class:`AttnSlices` over the unpadded sequence); each KV part is given
its own local mask by :func:`restrict_slices`, which cuts every slice to the rectangles
(local query range) x (available key range). The cut algebra: a slice of any type is the
rectangle ``Q x K`` intersected with a diagonal band ``lo <= j - i <= hi`` (global indices):

- CAUSAL (bottom-right aligned) has ``hi = K.end - Q.end`` and no ``lo``;
- INV_CAUSAL (top-left aligned) has ``lo = K.start - Q.start`` and no ``hi``;
- BI_CAUSAL has both, FULL neither.

Cutting keeps the band and shrinks the rectangle to ``[a, b) x [c, d)``. Within it the upper
bound binds on rows ``i < d - hi`` and the lower one on rows ``i > c - lo``, so splitting the
rows at those two points gives at most three pieces on which each bound binds everywhere or
nowhere. A piece where only the upper bound binds is a CAUSAL slice with keys
``[c, r1 + hi)``, only the lower one an INV_CAUSAL slice with keys ``[r0 + lo, d)``, both a
BI_CAUSAL slice with keys ``[r0 + lo, r1 + hi)``, neither a FULL slice over ``[c, d)``; each
keeps the band exactly because a slice's band offsets depend only on its own corners. Rows of
a piece that see no key are trimmed, so every local slice row sees at least one key.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .comm import CommPlan
from .dispatch import DispatchPlan
from .kernels import merge_partials, partial_attention_backward, slice_attention
from .mask import AttnRange, AttnSlice, AttnSlices, MaskType

# ----------------------------------------------------------------------------------------
# Slice-cutting algebra
# ----------------------------------------------------------------------------------------


def _band(s: AttnSlice) -> tuple[int | None, int | None]:
    """``(lo, hi)`` with the slice's pairs = rectangle and ``lo <= j - i <= hi`` (None: unbounded)."""
    lo = s.k_range.start - s.q_range.start if s.mask_type in (MaskType.INV_CAUSAL, MaskType.BI_CAUSAL) else None
    hi = s.k_range.end - s.q_range.end if s.mask_type in (MaskType.CAUSAL, MaskType.BI_CAUSAL) else None
    return lo, hi


_TYPES = {(False, False): MaskType.FULL, (False, True): MaskType.CAUSAL,
          (True, False): MaskType.INV_CAUSAL, (True, True): MaskType.BI_CAUSAL}


def cut_slice(s: AttnSlice, q: AttnRange, k: AttnRange) -> list[AttnSlice]:
    """The pairs of ``s`` inside the rectangle ``q x k`` as <= 3 slices (global indices).

    Every row of every returned slice sees at least one key (see the module docstring).
    """
    q, k = s.q_range.intersect(q), s.k_range.intersect(k)
    if q.is_empty() or k.is_empty():
        return []
    lo, hi = _band(s)
    a, b, c, d = q.start, q.end, k.start, k.end
    cuts = {a, b}
    if hi is not None:
        cuts.add(min(max(d - hi, a), b))  # rows below this see up to d: the upper bound is slack
    if lo is not None:
        cuts.add(min(max(c - lo + 1, a), b))  # rows above this see from c: the lower bound is slack
    cuts = sorted(cuts)
    pieces = []
    for r0, r1 in zip(cuts, cuts[1:]):
        upper = hi is not None and r1 <= d - hi
        lower = lo is not None and r0 > c - lo
        if upper and not lower:
            r0 = max(r0, c - hi)  # row i sees [c, i + hi]: empty for i + hi < c
        if lower and not upper:
            r1 = min(r1, d - lo)  # row i sees [i + lo, d): empty for i + lo >= d
        if upper and lower and hi < lo:
            continue
        if r1 <= r0:
            continue
        k0 = r0 + lo if lower else c
        k1 = r1 + hi if upper else d
        pieces.append(AttnSlice(AttnRange(r0, r1), AttnRange(k0, k1), _TYPES[(lower, upper)]))
    return pieces


Layout = tuple[tuple[AttnRange, int], ...]  # (global token range, offset in the local tensor)


def restrict_slices(slices: AttnSlices, q_layout: Layout, kv_layout: Layout, num_q: int, num_kv: int) -> AttnSlices:
    """The global mask seen from local tensors: slices over ``[num_q]`` x ``[num_kv]`` rows.

    ``q_layout`` / ``kv_layout`` say which global token ranges the local query / key tensors
    hold and where. Pair ``(i, j)`` of the result is allowed iff the global pair of local
    query row ``i`` and local key row ``j`` is allowed by ``slices``.
    """
    out = []
    for s in slices:
        for q_glob, q_off in q_layout:
            if q_glob.intersect(s.q_range).is_empty():
                continue
            for k_glob, k_off in kv_layout:
                for p in cut_slice(s, q_glob, k_glob):
                    out.append(AttnSlice(p.q_range.shift(q_off - q_glob.start),
                                         p.k_range.shift(k_off - k_glob.start), p.mask_type))
    return AttnSlices(out, num_q, num_kv)


# ----------------------------------------------------------------------------------------
# Per-batch plan and the autograd function
# ----------------------------------------------------------------------------------------


class CPAttnPlan:
    """Everything one rank needs for CP attention on one batch: comm plan and local masks.

    ``local_slices``: local queries x local KV. ``stage_slices[s]``: local queries x the
    receive buffer of stage ``s``.
    """

    def __init__(self, plan: DispatchPlan, slices: AttnSlices, rank: int, overlap_stages: int = 1):
        self.plan, self.rank = plan, rank
        self.comm = CommPlan.build(plan, slices, rank, overlap_stages)
        n = plan.local_seqlen
        self.local_slices = restrict_slices(slices, self.comm.local_ranges, self.comm.local_ranges, n, n)
        self.stage_slices = [restrict_slices(slices, self.comm.local_ranges, st.recv_ranges, n, st.num_recv)
                             for st in self.comm.stages]


class _CPAttnFunction(torch.autograd.Function):
    """out = attention of local q over (local + remote) KV; hand-written staged backward."""

    @staticmethod
    def forward(ctx, q, k, v, rt: CPAttnPlan, group, scale: float, backend: str | None):
        d = k.shape[-1]
        kv = torch.cat([k, v], dim=-1)
        num_stages = len(rt.stage_slices)
        pending = rt.comm.group_cast(0, kv, group)
        parts = [slice_attention(q, k, v, rt.local_slices, scale, backend)]
        for s in range(num_stages):
            buf = pending.wait()
            if s + 1 < num_stages:
                pending = rt.comm.group_cast(s + 1, kv, group)
            if len(rt.stage_slices[s]):
                parts.append(slice_attention(q, buf[..., :d], buf[..., d:], rt.stage_slices[s], scale, backend))
        nq, hq, dv = q.shape[0], q.shape[1], v.shape[-1]
        out, lse = merge_partials([(0, o, l) for o, l in parts], nq, hq, dv, q.device, q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.rt, ctx.group, ctx.scale, ctx.backend = rt, group, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        rt, group, scale, backend = ctx.rt, ctx.group, ctx.scale, ctx.backend
        d = k.shape[-1]
        dout = dout.contiguous()
        kv = torch.cat([k, v], dim=-1)
        num_stages = len(rt.stage_slices)
        fetch = rt.comm.group_cast(0, kv, group)
        dq, dk, dv = partial_attention_backward(q, k, v, rt.local_slices, out, lse, dout, scale, backend)
        dkv = torch.cat([dk, dv], dim=-1)
        reduces = []
        for s in range(num_stages):
            buf = fetch.wait()
            if s + 1 < num_stages:
                fetch = rt.comm.group_cast(s + 1, kv, group)
            if len(rt.stage_slices[s]):
                dq_s, dk_s, dv_s = partial_attention_backward(q, buf[..., :d], buf[..., d:], rt.stage_slices[s],
                                                              out, lse, dout, scale, backend)
                dq += dq_s
                dkv_s = torch.cat([dk_s, dv_s], dim=-1)
            else:
                dkv_s = buf.new_zeros(buf.shape)
            reduces.append(rt.comm.group_reduce(s, dkv_s, group))
        for s, pending in enumerate(reduces):
            rt.comm.reduce_into(s, pending, dkv)
        return dq, dkv[..., :d], dkv[..., d:], None, None, None, None


def cp_attention(q, k, v, rt: CPAttnPlan, group, scale: float | None = None, backend: str | None = None):
    """Functional CP attention over local ``q [N, Hq, D]``, ``k, v [N, Hk, D]`` -> ``[N, Hq, D]``."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return _CPAttnFunction.apply(q, k, v, rt, group, scale, backend)


class CPSliceAttention(nn.Module):
    """Drop-in ``core_attention`` for context parallelism: ``forward(q, k, v, slices) -> out``.

    ``q [N_local, Hq, D]``, ``k, v [N_local, Hk, D]`` are this rank's local tokens (dispatched
    by ``plan``); ``slices`` is the global mask over the unpadded sequence. ``plan`` may be
    None at construction and set per batch (``module.plan = plan``). The per-batch
    :class:`CPAttnPlan` is built once and shared by every instance (all layers of a model)
    through a small cache keyed by (group, plan, overlap stages, mask).
    """

    _CACHE_SIZE = 4
    _cache: list = []  # [(group, plan, overlap_stages, slices, CPAttnPlan)], most recent first; shared

    def __init__(self, group, plan: DispatchPlan | None, overlap_stages: int = 1, backend: str | None = None,
                 scale: float | None = None):
        super().__init__()
        if overlap_stages < 1:
            raise ValueError(f"overlap_stages must be >= 1, got {overlap_stages}")
        self.group, self.plan, self.overlap_stages = group, plan, overlap_stages
        self.backend, self.scale = backend, scale

    def runtime(self, slices: AttnSlices) -> CPAttnPlan:
        """The (cached) per-batch plan of this rank for ``slices``."""
        if self.plan is None:
            raise ValueError("CPSliceAttention has no dispatch plan: set .plan for this batch first")
        cache = CPSliceAttention._cache
        for group, plan, stages, cached, rt in cache:
            if (group is self.group and stages == self.overlap_stages and plan == self.plan
                    and (cached is slices or cached == slices)):
                return rt
        world = dist.get_world_size(self.group)
        if world != self.plan.cp:
            raise ValueError(f"dispatch plan is for cp={self.plan.cp}, the process group has {world} ranks")
        rt = CPAttnPlan(self.plan, slices, dist.get_rank(self.group), self.overlap_stages)
        cache.insert(0, (self.group, self.plan, self.overlap_stages, slices, rt))
        del cache[self._CACHE_SIZE:]
        return rt

    def forward(self, q, k, v, slices: AttnSlices):
        rt = self.runtime(slices)
        if q.shape[0] != self.plan.local_seqlen or k.shape[0] != self.plan.local_seqlen:
            raise ValueError(f"expected {self.plan.local_seqlen} local tokens, got q {q.shape[0]}, k {k.shape[0]}")
        return cp_attention(q, k, v, rt, self.group, self.scale, self.backend)


# ----------------------------------------------------------------------------------------
# Dispatch / undispatch of activations
# ----------------------------------------------------------------------------------------


def local_positions(plan: DispatchPlan, rank: int, device=None) -> torch.Tensor:
    """``[local_seqlen]`` long: global token index of each local token (padding: >= total_seqlen)."""
    return plan.local_positions(rank, device=device)


def dispatch(x: torch.Tensor, plan: DispatchPlan, rank: int, dim: int = 0) -> torch.Tensor:
    """This rank's tokens of a global ``x`` (``total_seqlen`` along ``dim``), padded with zeros.

    No communication; differentiable (the gradient lands on this rank's rows).
    """
    if x.shape[dim] != plan.total_seqlen:
        raise ValueError(f"dim {dim} has {x.shape[dim]} tokens, the plan {plan.total_seqlen}")
    x = x.movedim(dim, 0)
    pad = plan.padded_seqlen - plan.total_seqlen
    if pad:
        x = torch.cat([x, x.new_zeros((pad, *x.shape[1:]))])
    return x.index_select(0, local_positions(plan, rank, x.device)).movedim(0, dim)


# torch >= 2.13 renamed all_gather_into_tensor (the old name warns)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Undispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, plan: DispatchPlan, group):
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        gathered = x_local.new_empty((world * x_local.shape[0], *x_local.shape[1:]))
        _all_gather(gathered, x_local.contiguous(), group=group)
        positions = torch.cat([local_positions(plan, r, x_local.device) for r in range(world)])
        full = x_local.new_empty((plan.padded_seqlen, *x_local.shape[1:]))
        full[positions] = gathered
        ctx.plan, ctx.rank = plan, rank
        return full[: plan.total_seqlen]

    @staticmethod
    def backward(ctx, grad):
        return dispatch(grad, ctx.plan, ctx.rank), None, None


def undispatch(x_local: torch.Tensor, plan: DispatchPlan, group, dim: int = 0) -> torch.Tensor:
    """All-gather the local tensors and restore global order, padding dropped.

    The backward hands each rank the gradient of its own rows: it assumes every CP rank
    computes the same thing from the undispatched tensor (a replicated loss), as after the
    model's final undispatch.
    """
    if x_local.shape[dim] != plan.local_seqlen:
        raise ValueError(f"dim {dim} has {x_local.shape[dim]} tokens, the plan's local length is {plan.local_seqlen}")
    if dist.get_world_size(group) != plan.cp:
        raise ValueError(f"dispatch plan is for cp={plan.cp}, the process group has {dist.get_world_size(group)}")
    return _Undispatch.apply(x_local.movedim(dim, 0), plan, group).movedim(0, dim)
