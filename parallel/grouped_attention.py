"""The CPU training kernel: a mask's slices grouped into dense, batched blocks.

The reference ``torch`` backend (:mod:`.kernels`) runs one small dense attention per slice. A
packed batch of short clips has hundreds of slices per layer (a slice per chunk, for the self-
and the cross-attention of every clip), so on a CPU the per-slice Python and kernel-launch cost,
not arithmetic, sets the step time (measured in docs/design.md, issue 13: 84% of the attention
time of the demo's model). This kernel computes the same function with a few large operations:

1. **Components.** Slices that share query rows or key columns are joined (union-find over the
   two interval orders). A component's rows are the union of its slices' ``q_range`` and its
   columns the union of their ``k_range``; different components touch disjoint rows, so their
   outputs never need merging. A component whose allowed area is below ``MIN_DENSITY`` of its
   dense box (a long causal video, say) is split back into its slices, which keeps the work
   within ``1 / MIN_DENSITY`` of the mask's area. So is a component whose box exceeds ``MAX_BOX``
   pairs: its slices are large enough that per-slice overhead no longer matters, and a dense box
   would only double the work (a 4096-token causal video: 5x slower measured).
2. **Groups.** Components with the same box shape and the same allowed pattern inside it (the
   eight identical clips of a packed sequence) are stacked into one batch.
3. **Kernel.** Per group: gather ``q, k, v`` rows, one batched score matrix, the boolean
   pattern, a masked softmax in fp32 (fp64 for fp64 inputs), and scatter the rows back.

Invariants (the reference's contract, :mod:`.kernels`): slices do not overlap in ``(q, k)``, so
the boolean union of their patterns counts each allowed pair once; rows that see no key get
``out = 0`` and ``lse = -inf``, with finite gradients (0) everywhere. The grouping is a pure
function of the slices and is cached per mask (every layer of a step uses the same one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from torch._subclasses.fake_tensor import unset_fake_temporarily

from .mask import AttnSlices

MIN_DENSITY = 0.25  # below this share of allowed pairs a component's dense box is split into slices
MAX_BOX = 1 << 17  # (q, k) pairs: a larger component is split too: its slices are big enough to run alone
_NEG_INF = float("-inf")


@dataclass(frozen=True)
class Group:
    """``G`` components of one shape: rows ``q_index [G, Lq]`` attend columns ``k_index [G, Lk]``
    where ``allowed [Lq, Lk]`` (the same pattern for all ``G``)."""

    q_index: torch.Tensor
    k_index: torch.Tensor
    allowed: torch.Tensor

    @property
    def dense(self) -> bool:
        """Every pair of the box allowed (no masking needed)."""
        return bool(self.allowed.all())

    def single_span(self) -> tuple[int, int, int, int] | None:
        """``(q0, q1, k0, k1)`` when the group is one component with contiguous rows and columns
        (then plain slicing replaces the gathers)."""
        if self.q_index.shape[0] != 1:
            return None
        q, k = self.q_index[0], self.k_index[0]
        q0, k0 = int(q[0]), int(k[0])
        if int(q[-1]) - q0 + 1 != len(q) or int(k[-1]) - k0 + 1 != len(k):
            return None
        return q0, q0 + len(q), k0, k0 + len(k)


def _union_find_components(spans: list[tuple[int, int, int, int]]) -> list[list[int]]:
    """Indices of ``spans = [(q0, q1, k0, k1)]`` joined when their q or k intervals overlap."""
    parent = list(range(len(spans)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for lo, hi in ((0, 1), (2, 3)):  # sweep each axis in start order; join a span to the running one it meets
        order = sorted(range(len(spans)), key=lambda i: spans[i][lo])
        run, run_end = None, None
        for i in order:
            if run is not None and spans[i][lo] < run_end:
                parent[find(i)] = find(run)
                run_end = max(run_end, spans[i][hi])
            else:
                run, run_end = i, spans[i][hi]
    groups: dict[int, list[int]] = {}
    for i in range(len(spans)):
        groups.setdefault(find(i), []).append(i)
    return list(groups.values())


def _union_index(ranges: list[tuple[int, int]]) -> torch.Tensor:
    """The sorted union of half-open integer ranges, as an index tensor."""
    return torch.unique(torch.cat([torch.arange(a, b) for a, b in ranges]))


def _pattern(members, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """The ``[len(rows), len(cols)]`` boolean pattern of ``members`` (slices) inside a component box."""
    allowed = torch.zeros(len(rows), len(cols), dtype=torch.bool)
    col_pos = torch.arange(len(cols))
    for s in members:
        r = torch.searchsorted(rows, torch.arange(s.q_range.start, s.q_range.end))
        lo, hi = s.row_bounds()
        # a slice's keys are a contiguous run of the component's columns: map its bounds into it
        base = int(torch.searchsorted(cols, torch.tensor(s.k_range.start)))
        allowed[r] |= (col_pos[None, :] >= base + lo[:, None]) & (col_pos[None, :] < base + hi[:, None])
    return allowed


def _component_boxes(members) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """One component's boxes ``(rows, cols, allowed)``: its dense box, or one per slice when split."""
    rows = _union_index([(s.q_range.start, s.q_range.end) for s in members])
    cols = _union_index([(s.k_range.start, s.k_range.end) for s in members])
    area = sum(s.area() for s in members)
    box = len(rows) * len(cols)
    if len(members) > 1 and (area < MIN_DENSITY * box or box > MAX_BOX):
        out = []
        for s in members:
            r, c = torch.arange(s.q_range.start, s.q_range.end), torch.arange(s.k_range.start, s.k_range.end)
            out.append((r, c, _pattern([s], r, c)))
        return out
    return [(rows, cols, _pattern(members, rows, cols))]


# A component's boxes depend only on its slices' geometry relative to its corner (min q, min k): the
# clips of a packed batch, and the same clip shapes from step to step, share one entry.
_BOXES: dict[tuple, list] = {}
_BOXES_MAX = 256


def _shifted_boxes(members) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """:func:`_component_boxes`, cached by relative geometry (the cached tensors are never written)."""
    r0 = min(s.q_range.start for s in members)
    c0 = min(s.k_range.start for s in members)
    key = tuple(sorted((s.q_range.start - r0, s.q_range.end - r0, s.k_range.start - c0, s.k_range.end - c0,
                        s.mask_type.value) for s in members))
    rel = _BOXES.get(key)
    if rel is None:
        rel = [(r - r0, c - c0, allowed) for r, c, allowed in _component_boxes(members)]
        if len(_BOXES) >= _BOXES_MAX:
            _BOXES.pop(next(iter(_BOXES)))  # oldest first
        _BOXES[key] = rel
    return [(r + r0, c + c0, allowed) for r, c, allowed in rel]


def plan_groups(slices: AttnSlices) -> list[tuple[Group, bool, tuple | None]]:
    """The batched groups computing ``slices`` (see the module docstring), each with its
    :attr:`Group.dense` flag and :meth:`Group.single_span`."""
    live = [s for s in slices if s.area() > 0]
    spans = [(s.q_range.start, s.q_range.end, s.k_range.start, s.k_range.end) for s in live]
    boxes = []  # (rows, cols, allowed)
    for comp in _union_find_components(spans):
        boxes.extend(_shifted_boxes([live[i] for i in comp]))
    by_pattern: dict[tuple, list] = {}
    pattern_keys: dict[int, tuple] = {}  # id(allowed) -> key: a cached pattern is hashed once per plan
    for rows, cols, allowed in boxes:
        key = pattern_keys.get(id(allowed))
        if key is None:
            key = pattern_keys[id(allowed)] = (len(rows), len(cols), allowed.numpy().tobytes())
        by_pattern.setdefault(key, []).append((rows, cols, allowed))
    groups = [Group(torch.stack([b[0] for b in members]), torch.stack([b[1] for b in members]), members[0][2])
              for members in by_pattern.values()]
    return [(g, g.dense, g.single_span()) for g in groups]


_PLANS: list = []  # [(slices, groups)], most recent first


def cached_groups(slices: AttnSlices) -> list[tuple[Group, bool, tuple | None]]:
    """:func:`plan_groups`, cached: the layers of a step (and a CP plan's steps) share a mask. The
    plan is host data: built outside any FakeTensorMode (the planner's dry runs trace under one)."""
    for cached, groups in _PLANS:
        if cached is slices or cached == slices:
            return groups
    with unset_fake_temporarily():
        groups = plan_groups(slices)
    _PLANS.insert(0, (slices, groups))
    del _PLANS[16:]
    return groups


def _where(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A plan tensor on ``like``'s device; a fake copy when ``like`` is a FakeTensor (a traced dry run)."""
    mode = getattr(like, "fake_mode", None)
    return (mode.from_tensor(t) if mode is not None else t).to(like.device)


def grouped_slice_attention(q, k, v, slices: AttnSlices, scale: float | None = None):
    """``(out [Nq,Hq,D], lse [Nq,Hq])`` of ``q`` over ``k, v`` restricted to ``slices``; see the module."""
    from .kernels import _check_shapes, _expand_kv_heads

    nq, hq, d = q.shape
    _check_shapes(q, k, slices)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = _expand_kv_heads(k, hq), _expand_kv_heads(v, hq)
    acc = torch.promote_types(q.dtype, torch.float32)
    row_parts, out_parts, lse_parts = [], [], []
    for g, dense, span in cached_groups(slices):
        if span is not None:  # one contiguous box: views, no gathers
            q0, q1, k0, k1 = span
            qg, kg, vg = q[None, q0:q1].to(acc), k[None, k0:k1].to(acc), v[None, k0:k1].to(acc)
        else:
            q_index, k_index = _where(g.q_index, q), _where(g.k_index, q)
            qg, kg, vg = q[q_index].to(acc), k[k_index].to(acc), v[k_index].to(acc)  # [G, L, H, D]
        scores = torch.einsum("gqhd,gkhd->ghqk", qg, kg) * scale
        if not dense:
            scores = scores.masked_fill(~_where(g.allowed, q), _NEG_INF)
        row_max = scores.detach().amax(-1, keepdim=True)
        row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
        expd = torch.exp(scores - row_max)
        sumexp = expd.sum(-1)  # [G, H, Lq]; 0 exactly where a row sees no key
        seen = sumexp > 0
        probs = expd / torch.where(seen, sumexp, torch.ones_like(sumexp))[..., None]
        lse = torch.where(seen, torch.log(torch.where(seen, sumexp, torch.ones_like(sumexp))) + row_max[..., 0],
                          torch.full_like(sumexp, _NEG_INF))
        out = torch.einsum("ghqk,gkhd->gqhd", probs, vg)
        row_parts.append(_where(g.q_index, q).reshape(-1))
        out_parts.append(out.reshape(-1, hq, d))
        lse_parts.append(lse.permute(0, 2, 1).reshape(-1, hq))
    out = torch.zeros(nq, hq, d, device=q.device, dtype=acc)
    lse = torch.full((nq, hq), _NEG_INF, device=q.device, dtype=acc)
    if row_parts:
        rows = torch.cat(row_parts)
        out = out.index_put((rows,), torch.cat(out_parts))
        lse = lse.index_put((rows,), torch.cat(lse_parts))
    return out.to(q.dtype), lse
