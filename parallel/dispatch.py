"""Dispatch: which context-parallel rank holds which tokens.

The sequence (``total_seqlen`` tokens, mask given as :class:`AttnSlices`) is padded to a
multiple of ``chunk_size * cp`` and cut into equal chunks of ``chunk_size`` tokens. Every rank
gets the same number of chunks; a rank's local tensor is its chunks concatenated in
ascending chunk order. A solver decides the assignment (see ``SOLVERS``).

Two figures judge an assignment:

- **area balance**: ``max_over_mean_area``, the largest per-rank attention area (the mask
  area of the rank's query rows) over the mean. 1.0 is perfect.
- **remote KV**: per rank, the number of key/value tokens its queries need that another rank
  holds. That is what context parallelism must move.

Solvers (all deterministic: every rank computes the same plan from the same mask):

- ``contiguous``: rank ``r`` holds chunks ``[r*k, (r+1)*k)``. Least remote KV on most masks,
  poor balance on causal ones.
- ``zigzag``: the ring-attention layout; the chunks are cut into ``2*cp`` parts and rank ``r``
  holds parts ``r`` and ``2*cp-1-r``. Perfect balance on one causal sequence.
- ``area_greedy``: MagiAttention's default; chunks by descending area, each to the least
  loaded rank with room. Near-perfect balance, no locality at all.
- ``locality``: balance first, then the least remote KV. See :func:`_locality`.
- ``structured`` (what ``default`` maps to): the least remote KV under a hard balance cap,
  moving whole runs of chunks. See :func:`_structured`; :func:`remote_kv_lower_bound` says how
  far any plan within the cap is from the best possible.

``python -m magitrain.parallel.dispatch --mask MASK.json --cp N --chunk-size C`` prints a plan
and its figures as one JSON object. This module knows nothing about torch.distributed.
"""

from __future__ import annotations

import argparse
import heapq
import inspect
import json
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .mask import AttnRange, AttnSlice, AttnSlices, MaskType, _check_int


@dataclass(frozen=True)
class DispatchPlan:
    """The assignment of chunks to ranks (JSON-serialisable through :meth:`to_json`)."""

    total_seqlen: int  # tokens before padding
    chunk_size: int
    cp: int
    ranks: tuple[tuple[int, ...], ...]  # chunk ids of each rank, ascending
    solver: str = "contiguous"

    @property
    def padded_seqlen(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def num_chunks(self) -> int:
        return sum(len(r) for r in self.ranks)

    @property
    def local_seqlen(self) -> int:
        return self.padded_seqlen // self.cp

    def chunk_owner(self) -> list[int]:
        """For every chunk id, the rank that holds it."""
        owner = [0] * self.num_chunks
        for rank, chunks in enumerate(self.ranks):
            for c in chunks:
                owner[c] = rank
        return owner

    def local_token_ranges(self, rank: int) -> list[AttnRange]:
        """Global (padded) token ranges held by ``rank``, in local order, adjacent chunks merged."""
        return merge_ranges(AttnRange(c * self.chunk_size, (c + 1) * self.chunk_size) for c in self.ranks[rank])

    def local_positions(self, rank: int, device=None) -> torch.Tensor:
        """``[local_seqlen]`` long: global (padded) token index of each local token of ``rank``."""
        return torch.cat([torch.arange(r.start, r.end, device=device) for r in self.local_token_ranges(rank)])

    def to_json(self) -> dict:
        return {"solver": self.solver, "chunk_size": self.chunk_size, "cp": self.cp,
                "total_seqlen": self.total_seqlen, "ranks": [list(r) for r in self.ranks]}


# ----------------------------------------------------------------------------------------
# Token-range helpers and the exact per-row geometry of a slice
# ----------------------------------------------------------------------------------------

def merge_ranges(ranges) -> list[AttnRange]:
    """Sort ranges and merge those that touch or overlap."""
    out: list[AttnRange] = []
    for r in sorted(r for r in ranges if not r.is_empty()):
        if out and r.start <= out[-1].end:
            out[-1] = AttnRange(out[-1].start, max(out[-1].end, r.end))
        else:
            out.append(r)
    return out


def subtract_ranges(ranges: list[AttnRange], holes: list[AttnRange]) -> list[AttnRange]:
    """``ranges`` minus ``holes`` (both sorted and merged)."""
    out = []
    for r in ranges:
        start = r.start
        for h in holes:
            if h.end <= start or h.start >= r.end:
                continue
            if h.start > start:
                out.append(AttnRange(start, h.start))
            start = max(start, h.end)
        if start < r.end:
            out.append(AttnRange(start, r.end))
    return out


def _arith_sum(first: int, last: int, n: int) -> int:
    return n * (first + last) // 2


def rows_area_and_keys(s: AttnSlice, a: int, b: int) -> tuple[int, int, int]:
    """Area of slice-local rows ``[a, b)`` of ``s`` and the keys they see, in closed form.

    Returns ``(area, k_lo, k_hi)``: ``k_lo, k_hi`` are slice-local and bound the union of the
    rows' key intervals exactly (``k_hi <= k_lo`` when the rows see nothing). Per row ``i``
    (see :mod:`magitrain.parallel.mask`), with ``d = Lk - Lq``: CAUSAL rows see
    ``[0, i + d + 1)``, INV_CAUSAL rows ``[i, Lk)``, BI_CAUSAL rows ``[i, i + d + 1)``.
    """
    lq, lk = s.q_range.size, s.k_range.size
    if not 0 <= a <= b <= lq:
        raise ValueError(f"rows [{a}, {b}) are outside {s!r}")
    d = lk - lq
    t = s.mask_type
    if b == a or lk == 0:
        return 0, 0, 0
    if t is MaskType.FULL:
        return (b - a) * lk, 0, lk
    if t is MaskType.CAUSAL:  # row i sees max(0, i + d + 1) keys (never more than lk as i < lq)
        first = max(a, -d)
        if first >= b:
            return 0, 0, 0
        return _arith_sum(first + d + 1, b + d, b - first), 0, b + d
    if t is MaskType.INV_CAUSAL:  # row i sees max(0, lk - i) keys
        last = min(b, lk)
        if last <= a:
            return 0, 0, 0
        return _arith_sum(lk - a, lk - last + 1, last - a), a, lk
    if d < 0:  # BI_CAUSAL narrower than tall: every row is empty
        return 0, 0, 0
    return (b - a) * (d + 1), a, b + d


def needed_kv_ranges(slices: AttnSlices, q_ranges: list[AttnRange]) -> list[AttnRange]:
    """Key ranges that queries in ``q_ranges`` may attend to under ``slices`` (merged).

    Exact per slice type: a causal slice's rows see only a prefix of its k range, an
    inv-causal slice's rows only a suffix, a bi-causal slice's rows a band.
    """
    needed = []
    for s in slices:
        for q in q_ranges:
            part = s.q_range.intersect(q)
            if part.is_empty():
                continue
            _, k_lo, k_hi = rows_area_and_keys(s, part.start - s.q_range.start, part.end - s.q_range.start)
            if k_hi > k_lo:
                needed.append(AttnRange(s.k_range.start + k_lo, s.k_range.start + k_hi))
    return merge_ranges(needed)


def remote_kv_ranges(plan: DispatchPlan, slices: AttnSlices, rank: int) -> list[AttnRange]:
    """Global KV token ranges ``rank`` needs and does not hold (what it must fetch)."""
    local = plan.local_token_ranges(rank)
    return subtract_ranges(needed_kv_ranges(slices, local), local)


def _chunk_pieces(slices: AttnSlices, chunk_size: int, num_chunks: int):
    """Per chunk: its attention area and the global key intervals its rows need."""
    areas = [0] * num_chunks
    keys: list[list[tuple[int, int]]] = [[] for _ in range(num_chunks)]
    for s in slices:
        q0, q1 = s.q_range.start, s.q_range.end
        for c in range(q0 // chunk_size, min(num_chunks, -(-q1 // chunk_size))):
            a, b = max(q0, c * chunk_size) - q0, min(q1, (c + 1) * chunk_size) - q0
            area, k_lo, k_hi = rows_area_and_keys(s, a, b)
            areas[c] += area
            if k_hi > k_lo:
                keys[c].append((s.k_range.start + k_lo, s.k_range.start + k_hi))
    return areas, keys


def chunk_areas(slices: AttnSlices, chunk_size: int, num_chunks: int) -> list[int]:
    """Attention area of the query rows of every chunk."""
    return _chunk_pieces(slices, chunk_size, num_chunks)[0]


# ----------------------------------------------------------------------------------------
# The chunk-level problem every solver works on
# ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChunkCosts:
    """What a solver needs to know about the chunks, in a form that makes remote KV cheap.

    The padded token axis is cut into **segments** at every chunk boundary and every endpoint
    of a needed key interval, so that "chunk ``c`` needs segment ``s``" is all-or-nothing and
    every segment lies inside one chunk. Then for an assignment the remote KV of rank ``r`` is
    exactly ``sum(seg_len[s] for s needed by some chunk of r and held by another rank)``.

    ``areas``: ``[n]`` int64, attention area of each chunk's rows. ``need``: ``[n, S]`` bool.
    ``seg_len``: ``[S]`` int64 tokens. ``seg_chunk``: ``[S]`` the chunk holding each segment.
    """

    cp: int
    chunk_size: int
    areas: np.ndarray
    need: np.ndarray
    seg_len: np.ndarray
    seg_chunk: np.ndarray

    @property
    def num_chunks(self) -> int:
        return len(self.areas)

    @property
    def per_rank(self) -> int:
        return self.num_chunks // self.cp

    @classmethod
    def build(cls, slices: AttnSlices, cp: int, chunk_size: int) -> "ChunkCosts":
        cp, chunk_size = _check_positive("cp", cp), _check_positive("chunk_size", chunk_size)
        if slices.total_q != slices.total_k:
            raise ValueError("dispatch is for self-attention masks (total_q == total_k)")
        unit = chunk_size * cp
        n = -(-max(slices.total_q, 1) // unit) * cp
        areas, keys = _chunk_pieces(slices, chunk_size, n)
        cuts = {c * chunk_size for c in range(n + 1)}
        for intervals in keys:
            for lo, hi in intervals:
                cuts.update((lo, hi))
        bounds = np.array(sorted(cuts), dtype=np.int64)
        need = np.zeros((n, len(bounds) - 1), dtype=bool)
        for c, intervals in enumerate(keys):
            for lo, hi in intervals:
                need[c, np.searchsorted(bounds, lo):np.searchsorted(bounds, hi)] = True
        return cls(cp, chunk_size, np.array(areas, dtype=np.int64), need,
                   np.diff(bounds), bounds[:-1] // chunk_size)

    def rank_figures(self, owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(area, remote_kv)``, both ``[cp]`` int64, for ``owner[chunk] = rank``."""
        area = np.bincount(owner, weights=self.areas, minlength=self.cp).astype(np.int64)
        held = owner[self.seg_chunk][None, :] == np.arange(self.cp)[:, None]
        needed = np.stack([self.need[owner == r].any(axis=0) for r in range(self.cp)])
        return area, (needed & ~held) @ self.seg_len


def _check_positive(name: str, value) -> int:
    value = _check_int(name, value)
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


def _owner_of(ranks: list[list[int]], n: int) -> np.ndarray:
    owner = np.empty(n, dtype=np.int64)
    for r, chunks in enumerate(ranks):
        owner[list(chunks)] = r
    return owner


def _ranks_of(owner: np.ndarray, cp: int) -> list[list[int]]:
    return [np.flatnonzero(owner == r).tolist() for r in range(cp)]


def _balance(area: np.ndarray) -> float:
    mean = float(area.mean())
    return float(area.max()) / mean if mean > 0 else 1.0


# ----------------------------------------------------------------------------------------
# Baseline solvers
# ----------------------------------------------------------------------------------------

def _contiguous(p: ChunkCosts) -> list[list[int]]:
    k = p.per_rank
    return [list(range(r * k, (r + 1) * k)) for r in range(p.cp)]


def _zigzag(p: ChunkCosts) -> list[list[int]]:
    """Parts ``r`` and ``2cp-1-r`` to rank ``r``; with an odd chunk count per rank the first
    ``cp`` parts are one chunk longer than the last ``cp``."""
    k, cp = p.per_rank, p.cp
    sizes = [(k + 1) // 2] * cp + [k // 2] * cp
    starts = np.concatenate([[0], np.cumsum(sizes)])
    part = [list(range(starts[i], starts[i + 1])) for i in range(2 * cp)]
    return [part[r] + part[2 * cp - 1 - r] for r in range(cp)]


def _area_greedy(p: ChunkCosts) -> list[list[int]]:
    """MagiAttention's default: by descending area, each chunk to the least loaded rank with room."""
    order = sorted(range(p.num_chunks), key=lambda c: (-int(p.areas[c]), c))
    heap = [(0, r) for r in range(p.cp)]
    ranks: list[list[int]] = [[] for _ in range(p.cp)]
    for c in order:
        load, r = heapq.heappop(heap)
        ranks[r].append(c)
        if len(ranks[r]) < p.per_rank:
            heapq.heappush(heap, (load + int(p.areas[c]), r))
    return ranks


# ----------------------------------------------------------------------------------------
# The locality solver
# ----------------------------------------------------------------------------------------

def _locality_greedy(p: ChunkCosts, cap: float) -> list[list[int]]:
    """Greedy by descending area; each chunk goes to the rank it shares most KV with.

    A rank is eligible if it has room and, after taking the chunk, can still be filled with
    the smallest remaining chunks without passing ``cap``. Shared KV = tokens of the chunk's
    needed KV the rank already needs or holds, plus tokens of the chunk the rank needs.
    Ties (and chunks no rank can take within the cap) go to the least loaded rank.
    """
    n, cp, k = p.num_chunks, p.cp, p.per_rank
    order = sorted(range(n), key=lambda c: (-int(p.areas[c]), c))
    tail_min = np.minimum.accumulate(p.areas[order][::-1])[::-1]  # min area of order[i:]
    own = p.seg_chunk[None, :] == np.arange(n)[:, None]
    touched = np.zeros((cp, p.need.shape[1]), dtype=bool)  # needed or held, per rank
    needed = np.zeros_like(touched)
    load = np.zeros(cp, dtype=np.int64)
    count = np.zeros(cp, dtype=np.int64)
    ranks: list[list[int]] = [[] for _ in range(cp)]
    for i, c in enumerate(order):
        rest = int(tail_min[i + 1]) if i + 1 < n else 0
        room = count < k
        fits = room & (load + p.areas[c] + (k - count - 1) * rest <= cap)
        shared = (touched & p.need[c]) @ p.seg_len + (needed & own[c]) @ p.seg_len
        pool = np.flatnonzero(fits) if fits.any() else np.flatnonzero(room)
        r = int(min(pool, key=lambda r: (-int(shared[r]), int(load[r]), r)))
        ranks[r].append(c)
        load[r] += p.areas[c]
        count[r] += 1
        touched[r] |= p.need[c] | own[c]
        needed[r] |= p.need[c]
    return ranks


class _SwapSearch:
    """Local search over pair swaps (the only moves that keep chunk counts equal).

    Minimises, lexicographically, (1) the total area above ``cap`` over ranks, then (2)
    ``sum_r remote_r * (1 + remote_r / L)`` (total remote KV, with a mild push against the
    largest). Per chunk ``x`` the partners ``y`` on other ranks are scored at once, with numpy,
    and the best improving swap is applied. Work is bounded by ``max_cells`` (the number of
    segment cells scored), never by wall time, so every rank computes the same plan.
    """

    def __init__(self, p: ChunkCosts, owner: np.ndarray, cap: float):
        self.p, self.cap = p, cap
        self.owner = owner.copy()
        n, cp = p.num_chunks, p.cp
        onehot = np.zeros((cp, n), dtype=np.int32)
        onehot[self.owner, np.arange(n)] = 1
        self.count = onehot @ p.need.astype(np.int32)  # [cp, S] chunks of r needing segment s
        self.load = (onehot.astype(np.int64) @ p.areas).astype(np.float64)
        self.own = p.seg_chunk[None, :] == np.arange(n)[:, None]  # [n, S]
        # float weights for BLAS dot products; sums of token counts stay exact in float32
        # while the padded length is below 2**24
        self.dtype = np.float32 if n * p.chunk_size < 2 ** 24 else np.float64
        self.weight = p.seg_len.astype(self.dtype)
        self.scale = float(max(1, n * p.chunk_size))
        self.tie = 0.4 / max(1.0, float(p.areas.sum()) / cp) ** 2
        held = self.owner[p.seg_chunk][None, :] == np.arange(cp)[:, None]
        self.remote = (((self.count > 0) & ~held) @ p.seg_len).astype(np.float64)

    def _f(self, remote):
        return remote * (1.0 + remote / self.scale)

    def overload(self) -> float:
        return float(np.maximum(0.0, self.load - self.cap).sum())

    def run(self, max_passes: int, max_cells: float, max_partners: int = 64) -> np.ndarray:
        p, cap = self.p, self.cap
        areas, need, own, w, dtype = p.areas, p.need, self.own, self.weight, self.dtype
        n, num_segs = p.num_chunks, need.shape[1]
        cells = 0.0
        swaps = 0
        clean_since = np.full(n, -1)  # swap count when x last found nothing to do
        for _ in range(max_passes):
            improved = False
            for x in np.argsort(-areas, kind="stable"):
                if cells > max_cells:
                    break
                if clean_since[x] == swaps:  # nothing moved since: x would find nothing again
                    continue
                clean_since[x] = swaps
                a = self.owner[x]
                cells += n + num_segs + 2000  # the per-chunk fixed cost
                ys = np.flatnonzero(self.owner != a)
                b = self.owner[ys]
                d_area = areas[ys] - areas[x]
                load_a, load_b = self.load[a], self.load[b]
                d_over = (np.maximum(0.0, load_a + d_area - cap) + np.maximum(0.0, load_b - d_area - cap)
                          - max(0.0, load_a - cap) - np.maximum(0.0, load_b - cap))
                keep = d_over <= 1e-9
                if not keep.any():
                    continue
                ys, b, d_over, d_area = ys[keep], b[keep], d_over[keep], d_area[keep]
                seg_owner = self.owner[p.seg_chunk]
                held_a = (seg_owner == a) & ~own[x]
                need_a_wo = self.count[a] - need[x] > 0
                if len(ys) > max_partners:
                    # cheap pre-selection: partners whose KV rank a mostly needs or holds already
                    extra = (need[ys] & ~(need_a_wo | held_a)[None, :]).astype(dtype) @ w
                    pick = np.argsort(extra, kind="stable")[:max_partners]
                    ys, b, d_over, d_area = ys[pick], b[pick], d_over[pick], d_area[pick]
                    cells += len(keep) * num_segs / 4
                cells += len(ys) * num_segs
                # rank a after the swap: needs what its other chunks and y need, holds y
                remote_a = (need_a_wo[None, :] | need[ys]) & ~(held_a[None, :] | own[ys])
                # rank b (one per partner): needs what its other chunks and x need, holds x
                not_held_b = ((seg_owner[None, :] != b[:, None]) | own[ys]) & ~own[x][None, :]
                remote_b = ((self.count[b] > need[ys]) | need[x][None, :]) & not_held_b
                rem_a = (remote_a.astype(dtype) @ w).astype(np.float64)
                rem_b = (remote_b.astype(dtype) @ w).astype(np.float64)
                d_f = (self._f(rem_a) + self._f(rem_b) - self._f(self.remote[a]) - self._f(self.remote[b]))
                # a flatter load (smaller sum of squared loads) breaks ties: worth < 1 token
                d_f = d_f + self.tie * d_area * (load_a - self.load[b] + d_area)
                # any overload reduction first; among equals, the best remote-KV change
                score = np.where(d_over < -1e-9, -4.0 * self.scale * self.scale, 0.0) + d_f
                j = int(np.argmin(score))
                if score[j] >= -1e-6:
                    continue
                y, rb = int(ys[j]), int(b[j])
                self.owner[x], self.owner[y] = rb, a
                self.count[a] += need[y].astype(np.int32) - need[x]
                self.count[rb] += need[x].astype(np.int32) - need[y]
                self.load[a] += areas[y] - areas[x]
                self.load[rb] += areas[x] - areas[y]
                self.remote[a], self.remote[rb] = rem_a[j], rem_b[j]
                swaps += 1
                improved = True
            if not improved or cells > max_cells:
                break
        self.cells = cells
        return self.owner


def _objective(p: ChunkCosts, owner: np.ndarray, balance_weight: float) -> tuple[float, float, float]:
    """``(score, balance, remote_fraction)``: lower score is better."""
    area, remote = p.rank_figures(owner)
    balance = _balance(area)
    remote_fraction = float(remote.sum()) / max(1, p.cp * p.num_chunks * p.chunk_size)
    return balance_weight * (balance - 1.0) + remote_fraction, balance, remote_fraction


def _coarsen(p: ChunkCosts, group: int) -> ChunkCosts:
    """The same problem with every ``group`` consecutive chunks fused into one.

    Segments of one fused chunk that the same fused chunks need are merged, so the coarse
    problem is small as well as short.
    """
    n = p.num_chunks // group
    areas = p.areas.reshape(n, group).sum(axis=1)
    need = p.need.reshape(n, group, -1).any(axis=1)
    seg_chunk = p.seg_chunk // group
    bits = np.packbits(need, axis=0).T  # one row of bytes per segment
    first: dict[tuple, int] = {}
    inverse = np.array([first.setdefault((int(c), row.tobytes()), len(first)) for c, row in zip(seg_chunk, bits)])
    column = np.unique(inverse, return_index=True)[1]
    seg_len = np.bincount(inverse, weights=p.seg_len, minlength=len(column)).astype(np.int64)
    return ChunkCosts(p.cp, p.chunk_size * group, areas, need[:, column], seg_len, seg_chunk[column])


def _locality(p: ChunkCosts, tolerance: float = 1.05, balance_weight: float = 8.0,
              levels: tuple[float, ...] = (0.0, 0.25, 1.0), max_passes: int = 6,
              max_cells: float = 1e8, coarse_above: int = 128,
              max_partners: int = 64, refine_only_above: int = 1024) -> list[list[int]]:
    """Balance-first, locality-aware assignment.

    1. The best balance ``b0`` any baseline reaches (area_greedy is near perfect) sets the
       tightest area cap; the caps are ``b0 + f * (tolerance - b0)`` for ``f`` in ``levels``
       (never below ``b0``).
    2. At each cap, pair-swap local search (:class:`_SwapSearch`) runs from two starts, first
       removing any area above the cap, then cutting remote KV: the locality-aware greedy for
       that cap, and the best plan so far (at the first cap: zigzag). Problems with more than
       ``coarse_above`` chunks are first solved with pairs of chunks fused (recursively), and
       that plan replaces zigzag: single swaps cannot move a whole group of chunks across a
       plateau of equal remote KV, the coarse problem can. Above ``refine_only_above`` chunks
       the coarse plan is only polished by one search at its own balance.
    3. Among the search results within their caps and the baselines within the tolerance
       (so the result is never worse than a baseline by this score), the one with the least
       ``balance_weight * (max_over_mean_area - 1) + total_remote_kv / (cp * padded_seqlen)``
       wins: with the default weight, +1% of imbalance must save at least 8% of an all-gather's
       KV volume. So a plan trades balance for locality only where that pays (packed samples)
       and keeps the baselines' balance where it does not (one causal sequence).

    ``max_cells`` bounds the work (segment cells scored by the search), so the time is bounded
    and the result does not depend on the machine's speed.
    """
    n, cp = p.num_chunks, p.cp
    if float(p.areas.sum()) == 0:
        return _contiguous(p)
    mean = float(p.areas.sum()) / cp
    base = {name: _owner_of(fn(p), n) for name, fn in
            (("contiguous", _contiguous), ("zigzag", _zigzag), ("area_greedy", _area_greedy))}
    b0 = min(_balance(p.rank_figures(o)[0]) for o in base.values())
    top = max(b0, tolerance)
    caps = sorted({b0 + (top - b0) * f for f in levels})
    seed = None
    if n > coarse_above and p.per_rank % 2 == 0:
        coarse = _locality(_coarsen(p, 2), tolerance, balance_weight, levels, max_passes, max_cells / 2,
                           coarse_above, max_partners, refine_only_above)
        seed = np.repeat(_owner_of(coarse, n // 2), 2)
        if n > refine_only_above:  # too many chunks for the full search: only polish the coarse plan
            cap = float(p.rank_figures(seed)[0].max()) * (1 + 1e-12)  # fusing keeps every rank's area
            return _ranks_of(_SwapSearch(p, seed, cap).run(max_passes, max_cells / 2, max_partners), cp)
    results: list[tuple[float, np.ndarray]] = []
    best_prev = None
    for cap_ratio in caps:
        cap = cap_ratio * mean * (1 + 1e-12)
        starts = [_owner_of(_locality_greedy(p, cap), n)]
        if best_prev is not None:
            starts.append(best_prev)
        elif seed is not None:
            starts.append(seed)
        else:
            starts.append(base["zigzag"])
        for owner in starts:
            search = _SwapSearch(p, owner, cap)
            out = search.run(max_passes, max_cells / (2 * len(caps) * len(starts)), max_partners)
            if search.overload() <= 1e-9:
                results.append((_objective(p, out, balance_weight)[0], out))
        if results:
            best_prev = min(results, key=lambda t: t[0])[1]
    results += [(_objective(p, o, balance_weight)[0], o) for o in base.values()
                if _balance(p.rank_figures(o)[0]) <= top * (1 + 1e-12)]
    return _ranks_of(min(results, key=lambda t: t[0])[1], cp)


# ----------------------------------------------------------------------------------------
# The structured solver: whole runs of chunks moved at once, remote KV under a hard cap
# ----------------------------------------------------------------------------------------

class _RunSwapSearch:
    """Local search over swaps of equal-length runs of chunks between two ranks.

    A run is ``L`` consecutive chunks (aligned to ``L``) held by one rank. Swapping whole runs
    moves a document piece together with its causal prefix, which single-chunk swaps cannot
    do without first crossing a plateau of worse plans. Lengths go from ``per_rank`` down to
    1. Minimises, lexicographically, the area above ``cap`` and then the total remote KV (a
    flatter load breaks ties); the best improving partner of each run is applied. Work is
    bounded by ``max_cells`` (segment cells scored), so the result does not depend on the
    machine's speed.
    """

    def __init__(self, p: ChunkCosts, owner: np.ndarray, cap: float):
        self.p, self.cap = p, cap
        self.owner = owner.copy()
        n, cp = p.num_chunks, p.cp
        self.need_i = p.need.astype(np.int32)
        onehot = np.zeros((cp, n), dtype=np.int32)
        onehot[self.owner, np.arange(n)] = 1
        self.count = onehot @ self.need_i  # [cp, S] chunks of r needing segment s
        self.load = (onehot.astype(np.int64) @ p.areas).astype(np.float64)
        self.own = p.seg_chunk[None, :] == np.arange(n)[:, None]
        self.weight = p.seg_len.astype(np.float64)
        self.tie = 0.4 / max(1.0, float(p.areas.sum()) / cp) ** 2
        held = self.owner[p.seg_chunk][None, :] == np.arange(cp)[:, None]
        self.remote = (((self.count > 0) & ~held) @ p.seg_len).astype(np.float64)
        self.cells = 0.0

    def run(self, lengths, max_passes: int = 4, max_cells: float = 3e7) -> np.ndarray:
        p, cap, w = self.p, self.cap, self.weight
        n, num_segs = p.num_chunks, p.need.shape[1]
        for length in lengths:
            units = n // length
            if units < 2:
                continue
            span = units * length
            unit_area = p.areas[:span].reshape(units, length).sum(1).astype(np.float64)
            unit_need = self.need_i[:span].reshape(units, length, num_segs).sum(1)
            unit_own = self.own[:span].reshape(units, length, num_segs).any(1)
            for _ in range(max_passes):
                improved = False
                for x in range(units):
                    if self.cells > max_cells:
                        return self.owner
                    blocks = self.owner[:span].reshape(units, length)
                    single = (blocks == blocks[:, :1]).all(axis=1)
                    if not single[x]:
                        continue
                    a = int(blocks[x, 0])
                    ys = np.flatnonzero(single & (blocks[:, 0] != a))
                    if len(ys) == 0:
                        continue
                    b = blocks[ys, 0]
                    d_area = unit_area[ys] - unit_area[x]
                    load_a, load_b = self.load[a], self.load[b]
                    d_over = (np.maximum(0.0, load_a + d_area - cap) + np.maximum(0.0, load_b - d_area - cap)
                              - max(0.0, load_a - cap) - np.maximum(0.0, load_b - cap))
                    keep = d_over <= 1e-9
                    if not keep.any():
                        continue
                    ys, b, d_area, d_over = ys[keep], b[keep], d_area[keep], d_over[keep]
                    load_b = self.load[b]
                    nx, ox = unit_need[x], unit_own[x]
                    ny, oy = unit_need[ys], unit_own[ys]
                    seg_owner = self.owner[p.seg_chunk]
                    held_a = (seg_owner == a) & ~ox
                    rem_a = (((self.count[a] - nx)[None, :] + ny > 0) & ~(held_a[None, :] | oy)) @ w
                    held_b = ((seg_owner[None, :] == b[:, None]) & ~oy) | ox[None, :]
                    rem_b = ((self.count[b] - ny + nx[None, :] > 0) & ~held_b) @ w
                    self.cells += 2 * len(ys) * num_segs + num_segs + 2000
                    score = (np.where(d_over < -1e-9, -1e30, 0.0) + rem_a + rem_b - self.remote[a] - self.remote[b]
                             + self.tie * d_area * (load_a - load_b + d_area))
                    j = int(np.argmin(score))
                    if score[j] >= -1e-6:
                        continue
                    y, rb = int(ys[j]), int(b[j])
                    self.owner[x * length:(x + 1) * length] = rb
                    self.owner[y * length:(y + 1) * length] = a
                    self.count[a] += ny[j] - nx
                    self.count[rb] += nx - ny[j]
                    self.load[a] += d_area[j]
                    self.load[rb] -= d_area[j]
                    self.remote[a], self.remote[rb] = rem_a[j], rem_b[j]
                    improved = True
                if not improved:
                    break
        return self.owner


def balance_cap(p: ChunkCosts, tolerance: float = 1.05, slack: float = 0.01) -> float:
    """The largest ``max_over_mean_area`` the structured solver accepts:
    ``max(tolerance, area_greedy's + slack)``."""
    return max(tolerance, _balance(p.rank_figures(_owner_of(_area_greedy(p), p.num_chunks))[0]) + slack)


def _run_lengths(per_rank: int) -> list[int]:
    lengths, length = [], per_rank
    while length >= 1:
        lengths.append(length)
        length //= 2
    return lengths


def _structured(p: ChunkCosts, tolerance: float = 1.05, slack: float = 0.01,
                rounds: int | tuple[int, ...] = (2, 4), max_cells: float = 3e7,
                coarse_above: int = 128) -> list[list[int]]:
    """Least total remote KV under a hard balance cap, using the mask's structure.

    The cap is :func:`balance_cap` (``max(tolerance, area_greedy + slack)``). Starts: the
    contiguous split (whole documents and causal prefixes together), zigzag (the balanced
    contiguous pairs) and the locality greedy; above ``coarse_above`` chunks instead the
    solution of the problem with pairs of chunks fused (recursively). Each start is searched
    once per **schedule** in ``rounds`` (an int is one schedule): ``R`` times run swaps
    (:class:`_RunSwapSearch`, long runs first, so documents and prefixes move as a whole) then
    single-chunk swaps (:class:`_SwapSearch`), the start's budget split evenly over the ``2R``
    searches. The schedules end in different local optima (the searches are greedy), so the
    best of two is better than either on most masks. Above ``coarse_above`` chunks every
    level (the fused problems and the polish) uses the first schedule only: there the time
    goes to the polish at full resolution (1M tokens / cp=32 stays within 1 s of CPU).

    The plan with the least total remote KV (then the least maximum, then the best balance)
    within the cap wins; if no search ends within the cap, area_greedy's plan (always within
    it) is returned. The search stops as soon as a plan within the cap reaches
    :func:`gap_lower_bound` (it is then optimal; on sliding windows the contiguous start does).

    Work is bounded by ``max_cells`` scored segment cells per schedule, never by wall time,
    so every rank computes the same plan.
    """
    n, cp = p.num_chunks, p.cp
    if float(p.areas.sum()) == 0:
        return _contiguous(p)
    schedules = (rounds,) if isinstance(rounds, int) else tuple(rounds)
    mean = float(p.areas.sum()) / cp
    cap = balance_cap(p, tolerance, slack) * mean * (1 + 1e-12)
    lengths = _run_lengths(p.per_rank)
    if n > coarse_above and p.per_rank % 2 == 0:
        coarse = _structured(_coarsen(p, 2), tolerance, slack, schedules[:1], max_cells / 2, coarse_above)
        starts = [np.repeat(_owner_of(coarse, n // 2), 2)]
        lengths = [1]
        budget = max_cells / 2
        schedules = schedules[:1]
    else:
        starts = [_owner_of(_contiguous(p), n), _owner_of(_zigzag(p), n), _owner_of(_locality_greedy(p, cap), n)]
        budget = max_cells / len(starts)
    floor = gap_lower_bound(p)  # no plan has less: one that reaches it is optimal
    best, best_key = None, None

    def offer(owner: np.ndarray) -> bool:
        """Keep ``owner`` if it is within the cap and better; True once the best is optimal."""
        nonlocal best, best_key
        area, remote = p.rank_figures(owner)
        key = (int(remote.sum()), int(remote.max()), int(area.max()))
        if area.max() <= cap and (best_key is None or key < best_key):
            best, best_key = owner, key
        return best_key is not None and best_key[0] <= floor

    if offer(_owner_of(_area_greedy(p), n)):
        return _ranks_of(best, cp)
    for start in starts:
        if offer(start):
            return _ranks_of(best, cp)
        for schedule in schedules:
            owner = start
            per_round = budget / (2 * schedule)
            for _ in range(schedule):
                owner = _RunSwapSearch(p, owner, cap).run(lengths, max_cells=per_round)
                owner = _SwapSearch(p, owner, cap).run(6, per_round)
            if offer(owner):
                return _ranks_of(best, cp)
    return _ranks_of(best, cp)


def remote_kv_lower_bound(p: ChunkCosts, max_over_mean_area: float | None = None) -> int:
    """A lower bound on the total remote KV of ANY plan whose balance is at most
    ``max_over_mean_area`` (default: :func:`balance_cap`), from two relaxations (the larger wins):

    - **demand**: a rank holding chunk ``c`` fetches at least ``|need(c)| - k * chunk_size``
      tokens (it holds only ``k`` chunks). Sorting these values, the j-th largest per-rank
      maximum is at least the value at ``j * k`` (the ranks' chunk sets are disjoint). And each
      rank's area is at least ``total - (cp - 1) * cap``, which the ``k`` largest-area chunks
      needing at most ``u`` tokens reach only from some ``u`` on: every rank fetches at least
      ``u - k * chunk_size``.
    - **left/right edge**: a rank's lowest chunk ``m`` needs ``left(m)`` tokens before
      ``m``'s start, which the rank cannot hold (and likewise after its highest chunk). The
      ranks' lowest chunks are distinct and lie in ``[0, n - k]``: the ``cp`` smallest
      ``left`` values there bound the sum (same for ``right``).
    - **gaps**: :func:`gap_lower_bound`, on the problem and its mirror image (it holds for any
      balance; it is the one that is tight on sliding windows).
    - **sharing**: :func:`sharing_lower_bound` (how many ranks must hold the chunks needing
      each segment; the one that sees documents split to balance).
    """
    n, cp, k, cs = p.num_chunks, p.cp, p.per_rank, p.chunk_size
    need_len = p.need.astype(np.int64) @ p.seg_len
    hold = k * cs
    demand = np.sort(np.maximum(0, need_len - hold))[::-1]
    ratio = balance_cap(p) if max_over_mean_area is None else max_over_mean_area
    total = float(p.areas.sum())
    least_area = total - (cp - 1) * ratio * total / cp
    floor = 0
    if least_area > 0:
        order = np.argsort(need_len, kind="stable")
        top: list[int] = []
        top_sum = 0
        for c in order:
            heapq.heappush(top, int(p.areas[c]))
            top_sum += int(p.areas[c])
            if len(top) > k:
                top_sum -= heapq.heappop(top)
            if top_sum >= least_area:
                floor = max(0, int(need_len[c]) - hold)
                break
    by_demand = int(sum(max(int(demand[j * k]), floor) for j in range(cp)))
    seg_start = np.concatenate([[0], np.cumsum(p.seg_len)[:-1]])
    chunk_start = np.arange(n) * cs
    left = np.array([int(p.seg_len[p.need[c] & (seg_start < chunk_start[c])].sum()) for c in range(n)])
    right = np.array([int(p.seg_len[p.need[c] & (seg_start >= chunk_start[c] + cs)].sum()) for c in range(n)])
    by_left = int(np.sort(left[: n - k + 1])[:cp].sum())
    by_right = int(np.sort(right[k - 1:])[:cp].sum())
    return max(by_demand, by_left, by_right, gap_lower_bound(p), gap_lower_bound(_reversed(p)),
               sharing_lower_bound(p, ratio))


def sharing_lower_bound(p: ChunkCosts, max_over_mean_area: float) -> int:
    """A lower bound on the total remote KV of any plan whose balance is at most
    ``max_over_mean_area``, from how many ranks must share each key segment.

    Let ``N(s)`` be the chunks that need segment ``s``. Every rank holding one of them needs
    ``s`` and at most one of those ranks holds it, so ``s`` is fetched at least ``m - 1`` times
    where ``m`` is the number of ranks holding ``N(s)``. ``m`` ranks hold ``m * per_rank``
    chunks, ``N(s)`` and ``m * per_rank - |N(s)|`` others whose area is at least that of the
    lightest chunks outside ``N(s)``; all of it within ``m * cap``. The least ``m`` meeting both
    conditions is a lower bound on the real one. On causal documents ``N(s)`` is the rest of
    the document above ``s``: the top of a long document needs several ranks to carry its area,
    so its prefix is fetched several times.
    """
    n, cp, k = p.num_chunks, p.cp, p.per_rank
    total = float(p.areas.sum())
    if n == 0 or total == 0:
        return 0
    cap = max_over_mean_area * total / cp * (1 + 1e-9) + 1e-6
    order = np.argsort(p.areas, kind="stable")
    area_sorted = p.areas[order].astype(np.float64)
    outside = ~p.need[order]  # [n, S], chunks by ascending area
    light = np.sort(np.where(outside, area_sorted[:, None], np.inf), axis=0)  # outside areas first, ascending
    lightest = np.zeros((n + 1, light.shape[1]))
    np.cumsum(light, axis=0, out=lightest[1:])  # lightest[j, s]: the j lightest chunks outside N(s) (inf: too few)
    size = p.need.sum(axis=0)
    area_need = p.areas.astype(np.float64) @ p.need
    sharing = np.zeros(p.need.shape[1], dtype=np.int64)  # 0 = not decided yet
    for m in range(1, cp + 1):
        fill = m * k - size
        fits = (fill >= 0) & (area_need + lightest[np.clip(fill, 0, n), np.arange(len(size))] <= m * cap)
        sharing[(sharing == 0) & fits] = m
    sharing[sharing == 0] = 1  # no m fits: no plan within the cap at all (never for balance_cap)
    return int(((sharing - 1) * p.seg_len).sum())


def _reversed(p: ChunkCosts) -> ChunkCosts:
    """The mirror image of the problem (chunk ``c`` becomes ``n - 1 - c``): every plan has the
    same remote KV in both, so a bound of one is a bound of the other."""
    n = p.num_chunks
    return ChunkCosts(p.cp, p.chunk_size, p.areas[::-1].copy(), p.need[::-1, ::-1].copy(), p.seg_len[::-1].copy(),
                      (n - 1 - p.seg_chunk[::-1]).copy())


def gap_charges(p: ChunkCosts) -> np.ndarray:
    """``h[c, g]`` (``[n, n + 1]`` int64; 0 where ``g > c``): tokens that chunk ``c`` needs among
    the ``g`` chunks right before it.

    If a rank holds ``c`` but none of those ``g`` chunks, it fetches at least ``h[c, g]`` tokens
    from them. Non-decreasing in ``g``; ``h[c, 0] == 0``.
    """
    n = p.num_chunks
    first_seg = np.searchsorted(p.seg_chunk, np.arange(n + 1))  # first segment of each chunk (and the end)
    cum = np.zeros((n, p.need.shape[1] + 1), dtype=np.int64)
    np.cumsum(p.need * p.seg_len[None, :], axis=1, out=cum[:, 1:])
    c = np.arange(n)[:, None]
    lo = np.maximum(c - np.arange(n + 1)[None, :], 0)  # first chunk of the gap (clipped at 0)
    return cum[c, first_seg[c]] - cum[c, first_seg[lo]]


MAX_GAP_BOUND_WORK = 5e7  # n * n * per_rank cells: above this gap_lower_bound returns 0


def gap_lower_bound(p: ChunkCosts) -> int:
    """A lower bound on the total remote KV of ANY plan (whatever its balance), from the gaps
    before each rank's runs.

    Cut a rank's chunks into maximal runs of consecutive chunks. The chunks between a run and
    the rank's previous run (for its first run: all chunks before it) are a **gap** the rank does
    not hold; the first chunk ``c`` of the run fetches at least ``h[c, g]`` tokens from a gap of
    ``g`` chunks (:func:`gap_charges`), and gaps are disjoint. So a rank whose highest chunk is
    ``M`` fetches at least ``phi(M)``: the least sum of gap charges over all sets of ``per_rank``
    chunks with highest chunk ``M`` (an exact DP over the previous held chunk). The ranks'
    highest chunks are distinct, the ``j``-th smallest is at least ``j * per_rank - 1`` (``j``
    ranks hold ``j * per_rank`` chunks below it) and the largest is ``n - 1``; the least sum of
    ``phi`` over such sequences (a second DP) is the bound.

    On a sliding window of ``w`` keys this is ``(cp - 1) * (w - 1)`` once ``per_rank`` chunks
    span the window: a rank fetching less than ``w - 1`` has gaps of fewer than ``w - 1``
    tokens in all, so it lies in the first ``per_rank + (w - 1) / chunk_size`` chunks, and two
    such ranks do not fit there. Costs ``O(n^2 per_rank)``; returns 0 above
    ``MAX_GAP_BOUND_WORK``.
    """
    n, cp, k = p.num_chunks, p.cp, p.per_rank
    if n == 0 or float(n) * n * k > MAX_GAP_BOUND_WORK:
        return 0
    h = gap_charges(p).astype(np.float64)
    inf = np.inf
    # runs[c, j - 1]: least gap charges of j held chunks whose highest is c
    runs = np.full((n, k), inf)
    runs[:, 0] = h[np.arange(n), np.arange(n)]
    for c in range(1, n):
        if k > 1:
            prev = np.arange(c)  # the previous held chunk c' < c; the gap between has c - c' - 1 chunks
            runs[c, 1:] = (runs[:c, :-1] + h[c, c - 1 - prev][:, None]).min(axis=0)
    phi = runs[:, k - 1]
    # best[M]: least sum of phi over the j smallest highest chunks, the j-th being M
    best = np.where(np.arange(n) >= k - 1, phi, inf)
    for j in range(2, cp + 1):
        reach = np.concatenate([[inf], np.minimum.accumulate(best)[:-1]])  # min over M' < M
        best = np.where(np.arange(n) >= j * k - 1, phi + reach, inf)
    return int(best[n - 1]) if np.isfinite(best[n - 1]) else 0


SOLVERS = {
    "contiguous": _contiguous,
    "zigzag": _zigzag,
    "area_greedy": _area_greedy,
    "locality": _locality,
    "structured": _structured,
}
ALIASES = {"default": "structured"}


def _solver_names() -> list[str]:
    return sorted(list(SOLVERS) + list(ALIASES))


def solve(slices: AttnSlices, cp: int, chunk_size: int, solver: str = "default", **options) -> DispatchPlan:
    """Pad, cut into chunks and assign them to ``cp`` ranks with the named solver.

    Deterministic: the same mask and arguments give the same plan on every rank. The plan's
    ``solver`` is the resolved name (``default`` resolves to ``structured``). ``options`` go to
    the solver (``structured`` takes ``tolerance``, ``rounds``, ...; see :func:`_structured`).
    """
    name = ALIASES.get(solver, solver) if isinstance(solver, str) else None
    if name not in SOLVERS:
        raise ValueError(f"unknown dispatch solver {solver!r}; available: {', '.join(_solver_names())}")
    p = ChunkCosts.build(slices, cp, chunk_size)
    try:
        inspect.signature(SOLVERS[name]).bind(p, **options)
    except TypeError as e:
        raise ValueError(f"bad options for dispatch solver {name!r}: {e}") from None
    ranks = SOLVERS[name](p, **options)
    return DispatchPlan(slices.total_q, p.chunk_size, p.cp, tuple(tuple(sorted(r)) for r in ranks), name)


@dataclass(frozen=True)
class PlanStats:
    """Per-rank figures of a plan (what the trainer logs every step)."""

    area: list[int]  # attention area of each rank's query rows
    remote_kv_tokens: list[int]  # KV tokens each rank needs and does not hold
    max_over_mean_area: float
    solve_s: float = field(default=0.0, compare=False)  # seconds the step spent getting this plan

    @property
    def total_remote_kv(self) -> int:
        return sum(self.remote_kv_tokens)

    @property
    def max_remote_kv(self) -> int:
        return max(self.remote_kv_tokens)

    def to_dict(self) -> dict:
        return {"area": self.area, "max_over_mean_area": self.max_over_mean_area,
                "remote_kv_tokens": self.remote_kv_tokens, "total_remote_kv": self.total_remote_kv,
                "max_remote_kv": self.max_remote_kv}


def plan_stats(plan: DispatchPlan, slices: AttnSlices) -> PlanStats:
    """Per-rank area, ``max_over_mean_area`` and remote KV of ``plan`` under the mask ``slices``."""
    p = ChunkCosts.build(slices, plan.cp, plan.chunk_size)
    if p.num_chunks != plan.num_chunks:
        raise ValueError(f"the plan has {plan.num_chunks} chunks but the mask needs {p.num_chunks}")
    area, remote = p.rank_figures(_owner_of([list(r) for r in plan.ranks], p.num_chunks))
    return PlanStats([int(a) for a in area], [int(r) for r in remote], _balance(area))


# ----------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------

class _ArgumentParser(argparse.ArgumentParser):
    """Usage errors as one line on stderr and exit code 2, like every other bad input."""

    def error(self, message):
        self.exit(2, f"error: {message}\n")


MAX_CLI_CHUNKS = 1 << 20  # chunks the CLI plans (a few hundred MB of cost tables at most)


def main(argv: list[str] | None = None) -> int:
    """Print one JSON object: the plan, its per-rank figures and the solve time.

    Exit code 2 with a one-line message on stderr for a bad mask file, bad arguments or an
    unknown solver.
    """
    parser = _ArgumentParser(prog="python -m magitrain.parallel.dispatch",
                             description="Solve a context-parallel dispatch plan for a mask file.")
    parser.add_argument("--mask", required=True,
                        help='JSON file {"total_seqlen": N, "slices": [[qs, qe, ks, ke, type], ...]}')
    parser.add_argument("--cp", required=True, type=int, help="context-parallel ranks")
    parser.add_argument("--chunk-size", required=True, type=int, help="tokens per chunk")
    parser.add_argument("--solver", default="default", help=f"one of {', '.join(_solver_names())}")
    args = parser.parse_args(argv)
    try:
        slices = AttnSlices.load(args.mask)
        if args.chunk_size > 0:
            chunks = -(-slices.total_q // args.chunk_size)
            if chunks > MAX_CLI_CHUNKS:
                raise ValueError(f"the mask has {slices.total_q} tokens = {chunks} chunks of --chunk-size "
                                 f"{args.chunk_size}; this command plans at most {MAX_CLI_CHUNKS} chunks "
                                 "(use a larger --chunk-size)")
        start = time.perf_counter()
        plan = solve(slices, args.cp, args.chunk_size, args.solver)
        solve_ms = (time.perf_counter() - start) * 1e3
        stats = plan_stats(plan, slices)
    except (OSError, ValueError, TypeError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"error: out of memory planning {args.mask} (--cp {args.cp}, --chunk-size {args.chunk_size}); "
              "use a larger --chunk-size", file=sys.stderr)
        return 2
    out = {**plan.to_json(), **stats.to_dict(), "solve_ms": round(solve_ms, 3)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
