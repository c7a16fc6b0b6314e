"""The drift benchmark's ground truth and per-chunk scoring (benchmarks/long_rollout.py)."""

import importlib.util
import os

import numpy as np
import pytest
import torch

from magitrain import demo
from magitrain.caption_score import Caption
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.synthetic import render_shape_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench():
    spec = importlib.util.spec_from_file_location("long_rollout", os.path.join(ROOT, "benchmarks", "long_rollout.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_long_render_continues_the_training_clip():
    """The first 32 frames of a long render are the training clip bit for bit; afterwards the shape keeps
    its speed and its size stays at the end of one clip's range."""
    fixed = dict(color="red", shape="square", motion="right", grows=True)
    clip, _ = render_shape_video(32, 64, 64, 3, torch.Generator().manual_seed(3), **fixed)
    long, _ = render_shape_video(96, 64, 64, 3, torch.Generator().manual_seed(3), period=32, **fixed)
    assert torch.equal(long[:, :32], clip)
    mask = (long[0] > 0).float()  # the red channel: the shape
    area = mask.sum((1, 2))
    assert area[40] == area[95] == area[31]  # size held after one period
    col = lambda f: (mask[f].sum(0) > 0).nonzero().flatten().tolist()  # noqa: E731
    shifted = [(c + 32) % 64 for c in col(40)]  # 32 frames at 1 px/frame later
    assert sorted(shifted) == sorted(col(72))


def test_a_longer_demo_clip_is_the_ground_truth_the_benchmark_scores_against():
    """``demo_clip(seed, frames)`` (drift_methods.py's --process-frames data) continues the demo's clip,
    and is exactly the benchmark's ground truth for the same caption and seed."""
    bench = _bench()
    caption = demo.SEEN_CAPTIONS[2]
    c = Caption.parse(caption)
    fixed = dict(color=c.colour, shape=c.shape, motion=c.direction, grows=c.growing)
    clip, _ = demo.demo_clip(11, **fixed)
    long, text = demo.demo_clip(11, 96, **fixed)
    assert text == caption and long.shape == (96, 64, 64, 3)
    assert torch.equal(long[:32], clip)
    assert torch.equal(bench.ground_truth(caption, 11, 12), long)
    assert not torch.equal(long[40], long[72])  # it keeps moving after the clip


def test_ground_truth_scores_itself_perfectly():
    bench = _bench()
    caption = demo.SEEN_CAPTIONS[0]
    truth = bench.ground_truth(caption, 10**6, 12)
    assert truth.shape == (12 * 8, 64, 64, 3) and truth.dtype == torch.uint8
    got = bench.per_chunk(truth, truth, caption)
    assert got["distance"] == [0.0] * 12
    assert min(got["object_present"]) == 1.0 and min(got["colour"]) == 1.0
    assert min(got["motion"][:4]) == 1.0 and min(got["size_trend"][:4]) == 1.0  # inside one clip
    assert min(got["shape"]) == 1.0
    first, last = bench.quarters(list(range(13)))  # the prefix chunk is left out
    assert (first, last) == (2.0, 11.0)


def test_a_steady_caption_holds_for_any_length():
    """``--steady``: the "keeping its size" ground truth scores 1 on every field in every chunk of an 8x
    rollout (a "growing" caption's size field fails past its first clip), at the same positions as the
    caption it comes from."""
    bench = _bench()
    captions = bench.bench_captions(8, steady=True)
    assert captions[0] == "a red square moving right, keeping its size" and len(captions) == 8
    for caption in captions[:3]:
        truth = bench.ground_truth(caption, 10**6, 32)
        got = bench.per_chunk(truth, truth, caption)
        assert min(min(got[k]) for k in bench.FIELDS) == 1.0, caption
    growing = bench.ground_truth(demo.SEEN_CAPTIONS[0], 10**6, 32)
    assert max(bench.per_chunk(growing, growing, demo.SEEN_CAPTIONS[0])["size_trend"][4:]) == 0.0
    steady = bench.ground_truth(captions[0], 10**6, 32)
    for f in (0, 8, 64, 200):  # frames where neither shape wraps around the edge (x = 32 + f mod 64)
        centres = [(v[f, :, :, 0] > 128).nonzero().float().mean(0) for v in (steady, growing)]  # the red shape's
        assert torch.allclose(*centres, atol=0.5)


def test_bars_across_reaches_the_ground_truth_and_the_rescore(tmp_path):
    """``--bars-across`` renders the ground truth (prefix and scoring) with upright bars for sideways motion;
    a rollout saved as that ground truth rescores perfectly with the flag and not without it (its distance
    and its shape, which reads the bar's way)."""
    bench = _bench()
    caption = bench.bench_captions(8, steady=True)[5]  # a purple bar moving left
    upright = bench.ground_truth(caption, 10**6 + 5, 4, bar_across=True)
    lit = (upright[0].int() - 25).abs().sum(-1) > 100
    assert int(lit.any(1).sum()) > 3 * int(lit.any(0).sum())
    latents = tmp_path / "r.npy"
    np.save(latents, PatchEncoder(4).encode(upright).numpy())
    right = bench.score_rollout(str(latents), caption, 10**6 + 5, 4, bar_across=True)
    wrong = bench.score_rollout(str(latents), caption, 10**6 + 5, 4)
    assert max(right["distance"]) == 0.0 and min(wrong["distance"][1:]) > 0.05
    assert min(right["shape"]) == 1.0 and max(wrong["shape"]) == 0.0  # a flat bar is the wrong shape


def test_last_quarter_presence_is_per_rollout():
    """Each (caption, method) cell lists its own rollouts' last quarters in seed order, not the mean."""
    bench = _bench()
    held, lost = [1.0] * 9, [1.0] * 2 + [0.0] * 7  # 8 chunks after the prefix: the last quarter is 2 chunks
    jobs = [("a", "run", [], "x", 1, 9, "o"), ("a", "run", [], "x", 2, 9, "o"), ("b", "run", [], "x", 1, 9, "o"),
            ("a", "run", [], "y", 1, 9, "o")]
    figures = [{"object_present": f} for f in (held, lost, lost, held)]
    assert bench.last_quarter_presence(jobs, figures, ["x", "y"]) == {"x": {"a": [1.0, 0.0], "b": [0.0]},
                                                                        "y": {"a": [1.0]}}
    shapes = [{"object_present": held, "shape": f} for f in (lost, held, held, lost)]
    assert bench.last_quarter_presence(jobs, shapes, ["x", "y"], "shape") == {"x": {"a": [0.0, 1.0], "b": [1.0]},
                                                                               "y": {"a": [0.0]}}


def test_noise_scores_nothing_and_is_far():
    bench = _bench()
    caption = demo.SEEN_CAPTIONS[1]
    truth = bench.ground_truth(caption, 10**6 + 1, 4)
    noise = torch.randint(0, 256, truth.shape, generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    got = bench.per_chunk(noise, truth, caption)
    assert max(got["object_present"]) == 0.0 and min(got["distance"]) > 0.3


@pytest.mark.parametrize("spec", ["no_equals_sign", "name=/does/not/exist"])
def test_bad_method_is_a_one_line_error(spec, capsys):
    assert _bench().main(["--method", spec, "--out", "/tmp/unused"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


@pytest.mark.parametrize("extra", [[], ["--shards", "/tmp", "--process-frames", "128"], ["--process-frames", "16"],
                                   ["--shards", "/tmp", "--steady"], ["--shards", "/tmp", "--bars-across"]])
def test_drift_methods_wants_one_data_source(extra, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("drift_methods", os.path.join(ROOT, "benchmarks", "drift_methods.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--base", str(tmp_path), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err


def _pooled():
    import sys

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location("drift_pooled", os.path.join(ROOT, "benchmarks", "drift_pooled.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
    finally:
        sys.path.pop(0)
    return mod


def _results(path, rollouts, present_last, methods=None, length=1):
    """A results.json of ``length`` clips whose curves are 1 then ``present_last[m]`` in the last quarter."""
    import json

    chunks = length * 4
    out = {}
    for name in methods or present_last:
        curve = [1.0] * (chunks - 1) + [present_last[name]]
        fields = ("object_present", "colour", "motion", "size_trend", "shape", "distance")
        out[name] = {"curves": {f: curve for f in fields}, "rollouts": rollouts}
    path.write_text(json.dumps({"args": {"length": length, "captions": 8}, "methods": out}))
    return str(path)


def test_pooling_weights_bases_by_rollouts_and_checks_the_point(tmp_path, capsys):
    """The pooled curve is the mean over all rollouts (bases weighted by their rollouts, not averaged);
    a method meets the point on the pooled figures when it halves the baseline's drift."""
    mod = _pooled()
    a = _results(tmp_path / "a.json", 3, {"teacher_forced": 0.6, "both": 1.0, "less": 0.8})
    b = _results(tmp_path / "b.json", 1, {"teacher_forced": 1.0, "both": 0.6, "less": 0.8})
    pooled = mod.pool([__import__("json").load(open(p)) for p in (a, b)])
    assert pooled["both"]["rollouts"] == 4
    assert pooled["teacher_forced"]["curves"]["object_present"][-1] == pytest.approx(0.7)
    assert pooled["both"]["curves"]["object_present"][-1] == pytest.approx(0.9)
    assert mod.main([a, b]) == 0
    out = capsys.readouterr().out
    # pooled drift: baseline 0.3, both 0.1 -> within 10% and halved
    assert "1x both: last quarter within 10% of the first: yes; drift at most half of teacher_forced's: yes -> MET" in out
    assert "+30.0% (+40, +0)" in out
    # drift 0.2: less than the baseline's, more than half of it
    assert "1x less: last quarter within 10% of the first: no; drift at most half of teacher_forced's: no" in out


def test_pooling_without_baseline_drift_meets_nothing(tmp_path, capsys):
    mod = _pooled()
    a = _results(tmp_path / "a.json", 2, {"teacher_forced": 1.0, "both": 1.0})
    assert mod.main([a, "--chart", str(tmp_path / "pooled.png")]) == 0
    assert (tmp_path / "pooled.png").stat().st_size > 0
    assert "teacher_forced does not drift in both fields) -> not met" in capsys.readouterr().out


def test_pooling_refuses_runs_of_different_commands(tmp_path, capsys):
    mod = _pooled()
    a = _results(tmp_path / "a.json", 2, {"teacher_forced": 1.0, "both": 1.0})
    b = _results(tmp_path / "b.json", 2, {"teacher_forced": 1.0}, methods=("teacher_forced",))
    assert mod.main([a, b]) == 2
    assert capsys.readouterr().err.startswith("error: the runs differ")
    assert mod.main([a, "--baseline", "nope"]) == 2
    assert mod.main([str(tmp_path / "missing.json")]) == 2
