"""The remote-KV lower bounds against exhaustive enumeration of every plan on tiny problems.

A bound that is too high is worse than a loose one, so each bound is checked against the true
optimum: :func:`gap_lower_bound` (valid for any balance) against the least total remote KV of
all plans, :func:`sharing_lower_bound` and :func:`remote_kv_lower_bound` against the least of the
plans within the cap.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from magitrain.parallel.dispatch import (ChunkCosts, balance_cap, gap_charges, gap_lower_bound, plan_stats,
                                         remote_kv_lower_bound, sharing_lower_bound, solve)
from magitrain.parallel.mask import (AttnRange, AttnSlice, AttnSlices, MaskType, block_causal_video,
                                     packed_videos, sliding_window_causal, varlen_causal)


def balanced_partitions(n: int, cp: int):
    """Every assignment of ``n`` chunks to ``cp`` ranks of ``n / cp`` chunks each, up to
    renaming the ranks (rank ids appear in order of their lowest chunk)."""
    k = n // cp
    owner = [0] * n
    count = [0] * cp

    def place(c: int, used: int):
        if c == n:
            yield np.array(owner)
            return
        for r in range(min(used + 1, cp)):
            if count[r] < k:
                owner[c], count[r] = r, count[r] + 1
                yield from place(c + 1, max(used, r + 1))
                count[r] -= 1

    yield from place(0, 0)


def optima(p: ChunkCosts, cap_ratio: float) -> tuple[int, int | None]:
    """(least total remote KV of all plans, least of the plans within ``cap_ratio``), all plans
    scored at once: per rank, needed = any held chunk needs the segment, remote = needed and not
    held (the definition :meth:`ChunkCosts.rank_figures` implements)."""
    cap = cap_ratio * float(p.areas.sum()) / p.cp * (1 + 1e-12)
    owners = np.stack(list(balanced_partitions(p.num_chunks, p.cp)))  # [plans, n]
    need = p.need.astype(np.int64)
    total = np.zeros(len(owners), dtype=np.int64)
    worst_area = np.zeros(len(owners), dtype=np.int64)
    for r in range(p.cp):
        held = (owners == r).astype(np.int64)
        needed = held @ need > 0
        remote = (needed & (owners[:, p.seg_chunk] != r)) @ p.seg_len
        total += remote
        worst_area = np.maximum(worst_area, held @ p.areas)
    within = worst_area <= cap
    return int(total.min()), (int(total[within].min()) if within.any() else None)


def check_bounds(mask: AttnSlices, cp: int, chunk_size: int):
    p = ChunkCosts.build(mask, cp, chunk_size)
    cap = balance_cap(p)
    best_any, best_capped = optima(p, cap)
    assert gap_lower_bound(p) <= best_any
    assert sharing_lower_bound(p, 100.0) <= best_any  # a cap no plan reaches: only chunk counts bind
    assert sharing_lower_bound(p, cap) <= best_capped
    assert remote_kv_lower_bound(p, cap) <= best_capped  # area_greedy's plan is within the cap
    return p, best_any


# (n, cp) shapes small enough to enumerate: 35, 280, 105, 5775 plans
SHAPES = [(8, 2), (9, 3), (8, 4), (12, 3)]

NAMED = {
    "window 3": lambda t: sliding_window_causal(t, 3),
    "window 7": lambda t: sliding_window_causal(t, 7),
    "window 13": lambda t: sliding_window_causal(t, 13),
    "causal": lambda t: varlen_causal([t]),
    "documents": lambda t: varlen_causal([t // 2, t // 4, t - t // 2 - t // 4]),
    "video": lambda t: block_causal_video([t // 4] * 4),
    "packed": lambda t: packed_videos([[t // 6] * 3, [t // 6] * 2, [t - 5 * (t // 6)]]),
    "windowed documents": lambda t: AttnSlices(list(sliding_window_causal(t // 2, 5))
                                               + list(sliding_window_causal(t - t // 2, 4, offset=t // 2)), t),
}


@pytest.mark.parametrize("shape", SHAPES, ids=[f"n{n}-cp{cp}" for n, cp in SHAPES])
@pytest.mark.parametrize("name", list(NAMED))
def test_bounds_hold_on_every_plan(name, shape):
    n, cp = shape
    chunk_size = 3
    check_bounds(NAMED[name](n * chunk_size), cp, chunk_size)


@st.composite
def band_masks(draw):
    """Random unions of causal / band / full / inv-causal slices, windows of any width."""
    total = draw(st.integers(4, 30))
    slices = []
    for _ in range(draw(st.integers(1, 4))):
        q0, q1 = sorted(draw(st.tuples(st.integers(0, total), st.integers(0, total))))
        k0, k1 = sorted(draw(st.tuples(st.integers(0, total), st.integers(0, total))))
        slices.append(AttnSlice(AttnRange(q0, q1), AttnRange(k0, k1), draw(st.sampled_from(list(MaskType)))))
    if draw(st.booleans()):
        slices += list(sliding_window_causal(total, draw(st.integers(1, total))))
    return AttnSlices(slices, total)


@settings(max_examples=30, deadline=None)
@given(mask=band_masks(), shape=st.sampled_from(SHAPES[:3]))
def test_bounds_hold_on_random_masks(mask, shape):
    n, cp = shape
    chunk_size = -(-mask.total_q // n)
    p = ChunkCosts.build(mask, cp, chunk_size)
    if p.num_chunks == n:
        check_bounds(mask, cp, chunk_size)


def test_gap_charges_match_the_definition():
    p = ChunkCosts.build(sliding_window_causal(40, 9), 2, 4)  # 10 chunks of 4 tokens
    h = gap_charges(p)
    seg_start = np.cumsum(p.seg_len) - p.seg_len
    for c in range(p.num_chunks):
        for g in range(p.num_chunks + 1):
            in_gap = (seg_start >= max(0, c - g) * 4) & (seg_start < c * 4)
            assert h[c, g] == int(p.seg_len[p.need[c] & in_gap].sum())


def test_the_window_bound_is_tight():
    """Sliding window of w keys, per-rank span >= w: every rank but one fetches w - 1 keys, and
    the contiguous plan (within the cap here) does exactly that, so the bound is the optimum.
    8K tokens, cp=4, the benchmark's window of tokens / 16."""
    w = 512
    mask = sliding_window_causal(8192, w)
    p = ChunkCosts.build(mask, 4, 128)
    bound = remote_kv_lower_bound(p)
    assert bound == gap_lower_bound(p) == 3 * (w - 1)
    contiguous = plan_stats(solve(mask, 4, 128, "contiguous"), mask)
    assert contiguous.max_over_mean_area <= balance_cap(p) and contiguous.total_remote_kv == bound
    assert plan_stats(solve(mask, 4, 128), mask).total_remote_kv == bound
    # a window longer than a rank's span: the second rank fetches its whole span, the rest w - 1
    p = ChunkCosts.build(sliding_window_causal(8192, 4096), 4, 128)
    assert gap_lower_bound(p) == 2048 + 2 * 4095


MID = {  # three of the benchmark's families (the sharing bound's) at 8K tokens, cp=4, chunk 128
    "causal": varlen_causal([8192]),
    "documents": varlen_causal([4096, 2048, 1024, 512, 512]),
    "packed": packed_videos([[512] * 8, [512] * 4, [512] * 2, [512], [512]]),
}


@pytest.mark.parametrize("name", list(MID))
def test_bound_is_below_every_solvers_plan(name):
    """Too large to enumerate: every solver's plan within the cap costs at least the bound."""
    mask = MID[name]
    p = ChunkCosts.build(mask, 4, 128)
    cap = balance_cap(p)
    bound = remote_kv_lower_bound(p, cap)
    assert bound > 0
    for solver in ("contiguous", "zigzag", "area_greedy", "default"):
        stats = plan_stats(solve(mask, 4, 128, solver), mask)
        if stats.max_over_mean_area <= cap + 1e-9:
            assert stats.total_remote_kv >= bound, solver
