"""Solve-ahead: the loader solves each batch's CP dispatch; the forward only looks it up."""

from __future__ import annotations

import pytest
import torch
from test_data_common import tiny_cfg, write_latent_shards

import magitrain.parallel.context_parallel as cpmod
from magitrain.data_pipeline.source import WebDatasetSource
from magitrain.parallel.attention import CPSliceAttention
from magitrain.parallel.context_parallel import ContextParallelForward
from magitrain.parallel.dispatch import plan_stats, solve
from magitrain.parallel.mask import AttnSlices, packed_videos
from magitrain.parallel.solve_ahead import AheadSpec, solve_for_batch


class _Mesh:
    def __init__(self, size, rank):
        self._size, self._rank = size, rank

    def get_group(self):
        return "cp-group"

    def size(self):
        return self._size

    def get_local_rank(self):
        return self._rank


class _NoLayers(torch.nn.Module):
    layers: list = []


def _forward(cp=4, rank=1, chunk=16, stages=2):
    return ContextParallelForward(_NoLayers(), _Mesh(cp, rank), chunk, "default", overlap_stages=stages)


def _no_solving(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the step solved a plan")
    monkeypatch.setattr(cpmod, "solve", refuse)


MASK = packed_videos([[32] * 4, [32] * 2, [32]])  # 224 tokens


def test_offered_plan_is_used_without_solving(monkeypatch):
    fwd = _forward()
    solved = solve_for_batch(MASK, fwd.ahead_spec())
    assert solved.plan == solve(MASK, 4, 16)  # the same plan the step would have solved
    _no_solving(monkeypatch)
    CPSliceAttention._cache.clear()
    fwd.offer(solved)
    assert fwd.plan_for(AttnSlices(list(MASK), MASK.total_q)) == solved.plan  # an equal mask object
    # the loader's per-rank runtime serves the layers: no comm plan is built in the step
    assert CPSliceAttention._cache[0][4] is solved.runtime
    assert fwd.recent_stats[-1].area == solved.stats.area
    assert fwd.plan_for(MASK) == solved.plan  # a second forward on the same batch: cached


def test_history_dropout_mask_reuses_the_solved_plan(monkeypatch):
    fwd = _forward()
    solved = solve_for_batch(MASK, fwd.ahead_spec())
    dropped = AttnSlices([s if i != 5 else type(s)(s.q_range, s.q_range, s.mask_type) for i, s in enumerate(MASK)],
                         MASK.total_q)  # chunk 5 sees only itself
    _no_solving(monkeypatch)
    fwd.offer(solved)
    assert fwd.plan_for(dropped) == solved.plan
    assert fwd.recent_stats[-1] == plan_stats(solved.plan, dropped)  # figures of the mask actually run


def test_without_an_offer_the_step_solves():
    fwd = _forward()
    fwd.offer(None)
    assert fwd.plan_for(MASK) == solve(MASK, 4, 16)


def test_a_plan_for_another_layout_is_refused():
    solved = solve_for_batch(MASK, AheadSpec(4, 0, 16, "default", 2))  # cp rank 0, the model runs rank 1
    with pytest.raises(ValueError, match="solved for"):
        _forward().offer(solved)


@pytest.mark.parametrize("workers", [0, 1])
def test_loader_batches_carry_their_plan(tmp_path, workers):
    """Batches of varied packing (a different mask each) come with the plan of their own mask."""
    shapes = [(2, 4, 4), (4, 4, 4), (2, 2, 4), (6, 4, 4), (2, 4, 2), (4, 2, 4)] * 2
    write_latent_shards(str(tmp_path), [shapes[:6], shapes[6:]])
    cfg = tiny_cfg(str(tmp_path / "shard-{000000..000001}.tar"), f"data.num_workers={workers}", "data.batch_size=1")
    source = WebDatasetSource(cfg, 0, 1)
    source.solve_ahead = AheadSpec(2, 1, 16, "default", 2, block_masks=True)
    masks = set()
    for _ in range(3):
        batch = source.next_batch()
        mask = batch.layout.self_attn_slices()
        masks.add(repr(list(mask)))
        assert batch.dispatch is not None and batch.dispatch.slices == mask
        assert batch.dispatch.plan == solve(mask, 2, 16)
        assert batch.dispatch.block_counts["local"].shape[0] == -(-batch.dispatch.plan.local_seqlen // 128)
    assert len(masks) > 1
    source.close()
