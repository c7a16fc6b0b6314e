"""The structured solver and the remote-KV lower bound, against brute force on tiny problems."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from magitrain.parallel.dispatch import ChunkCosts, balance_cap, plan_stats, remote_kv_lower_bound, solve
from magitrain.parallel.mask import block_causal_video, packed_videos, sliding_window_causal, varlen_causal

MASKS = {
    "causal": varlen_causal([32]),
    "varlen": varlen_causal([16, 8, 4, 4]),
    "window": sliding_window_causal(32, 6),
    "video": block_causal_video([8, 8, 8, 8]),
    "packed": packed_videos([[4] * 4, [4] * 2, [4], [4]]),
}


def brute_force(p: ChunkCosts, cap_ratio: float) -> int:
    """The least total remote KV of any 2-rank plan within ``cap_ratio`` (all C(8, 4) splits)."""
    n = p.num_chunks
    mean = float(p.areas.sum()) / p.cp
    best = None
    for first in itertools.combinations(range(n), n // 2):
        owner = np.ones(n, dtype=np.int64)
        owner[list(first)] = 0
        area, remote = p.rank_figures(owner)
        if area.max() <= cap_ratio * mean * (1 + 1e-12):
            best = int(remote.sum()) if best is None else min(best, int(remote.sum()))
    return best


@pytest.mark.parametrize("name", list(MASKS))
def test_structured_is_optimal_and_the_bound_holds(name):
    mask = MASKS[name]
    p = ChunkCosts.build(mask, 2, 4)  # 8 chunks of 4 tokens on 2 ranks
    cap = balance_cap(p)
    optimum = brute_force(p, cap)
    stats = plan_stats(solve(mask, 2, 4), mask)
    assert stats.max_over_mean_area <= cap + 1e-9
    assert stats.total_remote_kv == optimum
    assert remote_kv_lower_bound(p, cap) <= optimum


def test_structured_beats_zigzag_on_a_long_causal_sequence():
    """64 chunks on 4 ranks: the search uses the balance slack to beat zigzag (ring attention's
    layout, which ``locality`` keeps on one sequence)."""
    mask = varlen_causal([8192])
    ours = plan_stats(solve(mask, 4, 128), mask)
    zigzag = plan_stats(solve(mask, 4, 128, "zigzag"), mask)
    assert ours.max_over_mean_area <= 1.05 + 1e-9
    assert ours.total_remote_kv < zigzag.total_remote_kv


def test_varlen_documents_at_64k_meet_the_issue_target():
    """The benchmark's varlen documents (1/2, 1/4, 1/8, 1/16, 1/16 of 64K, cp=8, chunk 512):
    at most 0.45 of area_greedy's total remote KV within the cap (one schedule gave 0.460)."""
    k = 4096
    mask = varlen_causal([8 * k, 4 * k, 2 * k, k, k])
    ours = plan_stats(solve(mask, 8, 512), mask)
    greedy = plan_stats(solve(mask, 8, 512, "area_greedy"), mask)
    assert ours.max_over_mean_area <= balance_cap(ChunkCosts.build(mask, 8, 512)) + 1e-9
    assert ours.total_remote_kv <= 0.45 * greedy.total_remote_kv


def test_search_stops_at_the_lower_bound(monkeypatch):
    """On a sliding window the contiguous start already reaches the gap bound: no search runs."""
    from magitrain.parallel import dispatch

    def no_search(*args, **kwargs):
        raise AssertionError("searched although the start was optimal")

    monkeypatch.setattr(dispatch._RunSwapSearch, "run", no_search)
    monkeypatch.setattr(dispatch._SwapSearch, "run", no_search)
    mask = sliding_window_causal(8192, 512)
    stats = plan_stats(solve(mask, 4, 128), mask)
    assert stats.total_remote_kv == 3 * 511
