"""A 3-stage curriculum (images -> short low-res video -> longer video): switches at the declared
steps, every batch obeys its stage's token budget and buckets, and a resume inside a stage
continues that stage exactly."""

from __future__ import annotations

import logging

import torch
from magitrain.data_pipeline.source import WebDatasetSource
from test_data_common import tiny_cfg, write_latent_shards

STAGES = ("data.curriculum=["
          "{name: images, until_step: 3, seq_tokens: 16, buckets: [[1, 4, 4, 1.0]], image_ratio: 1.0},"
          "{name: short, until_step: 6, seq_tokens: 32, buckets: [[2, 4, 4, 1.0]], image_ratio: 0.0},"
          "{name: long, until_step: 0, seq_tokens: 128, buckets: [[4, 8, 8, 2.0], [2, 8, 8, 1.0]]}]")
EXPECT = {"images": (16, {(1, 2, 2, 1)}), "short": (32, {(2, 2, 2, 2)}), "long": (128, {(4, 4, 4, 2), (2, 4, 4, 2)})}


def _cfg(path):
    write_latent_shards(path, [[(1, 8, 8) if i % 4 == 0 else (4, 8, 8) for i in range(6)] for _ in range(2)])
    return tiny_cfg(path, STAGES, "data.batch_size=2", "data.num_workers=0")


def test_curriculum_switches_at_boundaries_and_obeys_budgets(tmp_path, caplog):
    src = WebDatasetSource(_cfg(str(tmp_path)), 0, 1)
    names = []
    with caplog.at_level(logging.INFO, logger="magitrain.data"):
        for step in range(9):
            batch = src.next_batch()
            name = src.stats()["stage"]
            names.append(name)
            seq, grids = EXPECT[name]
            assert batch.layout.total_tokens == 2 * seq
            assert {(s.frames, s.height, s.width, s.chunk_frames) for s in batch.layout.samples} <= grids
            assert batch.text_emb.shape[0] == batch.layout.num_chunks
    assert names == ["images"] * 3 + ["short"] * 3 + ["long"] * 3
    assert "'images' -> 'short' at step 3" in caplog.text and "'short' -> 'long' at step 6" in caplog.text


def test_resume_inside_a_stage_continues_it(tmp_path):
    cfg = _cfg(str(tmp_path))
    full = WebDatasetSource(cfg, 0, 1)
    ref = [full.next_batch() for _ in range(8)]
    src = WebDatasetSource(cfg, 0, 1)
    for _ in range(4):
        src.next_batch()
    state = src.state_dict()
    assert state["stage_name"] == "short"
    resumed = WebDatasetSource(cfg, 0, 1)
    resumed.load_state_dict(state)
    for i in range(4, 8):
        b = resumed.next_batch()
        assert torch.equal(b.latents, ref[i].latents) and b.layout == ref[i].layout
    assert resumed.stats()["stage"] == "long"


def test_bad_curriculum_configs_are_clear_errors(tmp_path):
    import pytest

    from magitrain.config import ConfigError

    write_latent_shards(str(tmp_path), [[(2, 4, 4)]])
    bad = {"data.curriculum=[{name: a, until_step: 5}, {name: b, until_step: 3}]": "must increase",
           "data.buckets=[[3, 4, 4]]": "multiple of model.chunk_frames",
           "data.buckets=[[2, 4, 5]]": "model.patch_size",
           "data.buckets=[[8, 16, 16]]": "more than the sequence budget"}
    for override, msg in bad.items():
        with pytest.raises(ConfigError, match=msg):
            WebDatasetSource(tiny_cfg(str(tmp_path), override), 0, 1)


def test_temporal_crop_start_cuts_from_the_first_frame_and_changes_no_other_draw(tmp_path):
    """``temporal_crop: start``: every cut shorter than its sample starts at latent frame 0 (random: anywhere),
    and the bucket drawn for each sample is the same in both modes (the start is still drawn)."""
    import random

    import pytest

    from magitrain.config import ConfigError
    from magitrain.data_pipeline.buckets import Bucket, Geometry, Stage, choose_cut, resolve_stages

    geo = Geometry(t_patch=1, patch=2, chunk_frames=2, channels=4)
    buckets = (Bucket(8, 8, 8, 2.0), Bucket(4, 8, 8, 1.0), Bucket(2, 8, 8, 1.0))
    cuts = {}
    for mode in ("random", "start"):
        stage = Stage(0, "long", 0, 1024, ("x",), buckets, 0.0, mode)
        rng = random.Random(0)
        cuts[mode] = [choose_cut(stage, geo, (8, 8, 8), False, False, rng, 1024) for _ in range(200)]
    assert [c.frames for c in cuts["random"]] == [c.frames for c in cuts["start"]]
    assert {c.start for c in cuts["start"]} == {0}
    assert {c.start for c in cuts["random"] if c.frames == 4} == {0, 1, 2, 3, 4}
    write_latent_shards(str(tmp_path), [[(2, 4, 4)]])
    with pytest.raises(ConfigError, match="temporal_crop='middle' must be one of random, start"):
        WebDatasetSource(tiny_cfg(str(tmp_path), "data.temporal_crop=middle"), 0, 1)
    cfg = tiny_cfg(str(tmp_path), STAGES.replace("image_ratio: 0.0}", "image_ratio: 0.0, temporal_crop: start}"))
    assert [s.temporal_crop for s in resolve_stages(cfg, geo)] == ["random", "start", "random"]
