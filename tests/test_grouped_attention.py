"""The grouped CPU kernel computes exactly the reference's function (forward, LSE, gradients), on
random masks of every slice type, packed videos and sparse masks, with few batched groups."""

from __future__ import annotations

import random

import pytest
import torch

from magitrain.parallel.grouped_attention import MIN_DENSITY, plan_groups
from magitrain.parallel.kernels import slice_attention
from magitrain.parallel.mask import AttnSlice, AttnSlices, block_causal_video, packed_videos, sliding_window_causal, varlen_causal
from test_cp_attention import dense_reference, random_slices


def _masks():
    return {
        "random": random_slices(61, random.Random(3)),
        "packed_videos": packed_videos([[16, 16, 16], [16, 16, 16], [8, 8]]),
        "varlen_causal": varlen_causal([20, 7, 30]),
        "sliding_window": sliding_window_causal(64, 9),
        "one_video": block_causal_video([12, 12, 12, 12]),
    }


@pytest.mark.parametrize("name", list(_masks()))
def test_grouped_equals_reference_forward_lse_and_gradients(name):
    slices = _masks()[name]
    n = slices.total_q
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64, requires_grad=True) for h in (4, 2, 2))
    dout, dlse = torch.randn(n, 4, 8, generator=g, dtype=torch.float64), torch.randn(n, 4, generator=g,
                                                                                   dtype=torch.float64)
    results = {}
    for backend in ("torch", "grouped"):
        out, lse = slice_attention(q, k, v, slices, backend=backend)
        covered = torch.isfinite(lse)
        loss = (out * dout).sum() + (torch.where(covered, lse, torch.zeros_like(lse)) * dlse).sum()
        grads = torch.autograd.grad(loss, (q, k, v))
        results[backend] = (out.detach(), lse.detach(), grads)
    (o_t, l_t, g_t), (o_g, l_g, g_g) = results["torch"], results["grouped"]
    assert torch.equal(torch.isfinite(l_t), torch.isfinite(l_g))
    assert torch.allclose(o_g, o_t, atol=1e-12)
    assert torch.allclose(o_g, dense_reference(q.detach(), k.detach(), v.detach(), slices), atol=1e-12)
    covered = torch.isfinite(l_t)
    assert torch.allclose(l_g[covered], l_t[covered], atol=1e-12)
    for a, b in zip(g_g, g_t):
        assert torch.isfinite(a).all()
        assert torch.allclose(a, b, atol=1e-10)


def test_identical_clips_run_as_one_batched_group():
    slices = packed_videos([[32, 32, 32, 32]] * 8)  # the demo's packed sequence: 8 clips of 4 chunks
    groups = [g for g, _, _ in plan_groups(slices)]
    assert len(groups) == 1 and groups[0].q_index.shape == (8, 128)


def test_sparse_components_are_split_so_work_stays_near_the_area():
    # every chunk sees the first chunk (a sink) and itself: dense slices joined by the sink's keys
    # into one component whose box is ~6% allowed, so it is computed slice by slice
    c, n = 32, 32
    sink = AttnSlices([AttnSlice((0, c), (0, c))] + [s for i in range(1, n) for s in
                       (AttnSlice((i * c, (i + 1) * c), (0, c)), AttnSlice((i * c, (i + 1) * c), (i * c, (i + 1) * c)))],
                      n * c)
    for slices in (sink, sliding_window_causal(2048, 64)):
        work = sum(g.q_index.shape[0] * g.q_index.shape[1] * g.k_index.shape[1] for g, _, _ in plan_groups(slices))
        reference_work = sum(s.q_range.size * s.k_range.size for s in slices)  # one dense box per slice
        assert work <= max(slices.area() / MIN_DENSITY, reference_work)
    assert sum(g.q_index.numel() * g.k_index.shape[1] for g, _, _ in plan_groups(sink)) == sink.area()


def test_cached_boxes_keep_mask_types_and_positions_apart():
    """The per-component box cache is keyed by geometry relative to the component's corner: two
    components of the same shape but another mask type, or at another offset, must not share a
    pattern or positions (fails if the key drops ``mask_type`` or the shift back is skipped)."""
    from magitrain.parallel import grouped_attention as ga

    ga._BOXES.clear()
    full = [AttnSlice((0, 8), (0, 8), "full"), AttnSlice((8, 12), (8, 12), "causal")]
    causal = [AttnSlice((12, 20), (12, 20), "causal"), AttnSlice((20, 24), (20, 24), "full")]
    slices = AttnSlices(full + causal + [AttnSlice((24, 32), (24, 32), "full")], 32)
    for _ in range(2):  # the second plan comes from the cache
        allowed = torch.zeros(32, 32, dtype=torch.bool)
        for g, _, _ in plan_groups(slices):
            for qi, ki in zip(g.q_index, g.k_index):
                allowed[qi[:, None], ki[None, :]] |= g.allowed
        want = torch.zeros(32, 32, dtype=torch.bool)
        for s in slices:
            lo, hi = s.row_bounds()
            for r, (a, b) in enumerate(zip(lo.tolist(), hi.tolist())):
                want[s.q_range.start + r, s.k_range.start + a:s.k_range.start + b] = True
        assert torch.equal(allowed, want)
    assert ga._BOXES  # the plans did go through the cache
