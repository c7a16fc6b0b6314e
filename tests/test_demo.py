"""The demo end to end (media -> shards -> curriculum training over dp x tp, dp x cp, dp -> streamed
mp4 -> caption scores), and the throughput accounting the trainer logs per step and per stage."""

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO
from magitrain.parallel.dispatch import PlanStats

from magitrain import perf
from magitrain.batch import Batch
from magitrain.config import ModelConfig
from magitrain.layout import PackedLayout

# --- throughput accounting (fast) -------------------------------------------------------------


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def dense_block_causal_pairs(layout: PackedLayout) -> int:
    """Independent count: token i sees token j iff same sample and chunk(j) <= chunk(i)."""
    sample = torch.full((layout.total_tokens,), -1)
    chunk = torch.zeros(layout.total_tokens, dtype=torch.long)
    for n, s in enumerate(layout.samples):
        idx = torch.arange(s.num_tokens)
        sample[s.offset:s.offset + s.num_tokens] = n
        chunk[s.offset:s.offset + s.num_tokens] = idx // s.chunk_tokens
    same = (sample[:, None] == sample[None, :]) & (sample[:, None] >= 0)
    return int((same & (chunk[None, :] <= chunk[:, None])).sum())


def test_masked_area_counts_the_block_causal_mask_not_dense():
    layouts = [PackedLayout.pack([(8, 4, 4, 2), (1, 4, 4, 1), (4, 2, 2, 2)], 200),
               PackedLayout.pack([(6, 2, 4, 2)], 64)]
    batches = [Batch(torch.zeros(lay.total_tokens, 4, 1, 2, 2), lay, torch.zeros(lay.num_chunks, 2, 8),
                     torch.ones(lay.num_chunks, 2, dtype=torch.bool), [], []) for lay in layouts]
    want = sum(dense_block_causal_pairs(lay) for lay in layouts)
    assert perf.masked_area(batches) == want
    assert want < sum(lay.total_tokens ** 2 for lay in layouts)  # not N^2


def test_step_flops_formula():
    m = ModelConfig(num_layers=3, num_heads=4, head_dim=16)
    # 6 * params * tokens + 12 * layers * head_dim * heads * area, by hand
    assert perf.step_flops(1000, 50, 700, m) == 6 * 1000 * 50 + 12 * 3 * 16 * 4 * 700
    assert perf.default_peak_flops(torch.device("cpu")) == perf.CPU_PEAK_FLOPS


def test_cp_figures_and_stage_summary(tmp_path):
    assert perf.cp_figures([]) == {}
    fig = perf.cp_figures([PlanStats([30, 10], [4, 0], 1.5), PlanStats([10, 10], [2, 6], 1.0)])
    assert fig["cp_area_per_rank"] == [40, 20] and fig["cp_remote_kv_tokens"] == [6, 6]
    assert fig["cp_area_imbalance"] == pytest.approx(40 / 30) and fig["cp_remote_kv_tokens_max"] == 6

    summary = perf.StageSummary(str(tmp_path), peak_total=1e6, enabled=True)
    lines = []
    for step in range(1, 6):
        stage = "images" if step <= 2 else "long"
        lines.append(summary.update({"step": step, "stage": stage, "step_time_s": 0.5, "tokens_per_s": 200.0,
                                     "data_time_s": 0.1, "model_flops": 1e5, "data_skipped": step // 4,
                                     **fig}))
    lines.append(summary.finish())
    assert lines[:2] == [None, None] and lines[3:5] == [None, None]
    assert lines[2].startswith("stage 'images': 2 steps") and lines[5].startswith("stage 'long': 3 steps")
    rows = read_jsonl(tmp_path / "stages.jsonl")
    assert [(r["stage"], r["first_step"], r["steps"]) for r in rows] == [("images", 1, 2), ("long", 3, 3)]
    assert rows[1]["tokens_per_s"] == pytest.approx(200.0) and rows[1]["data_time_frac"] == pytest.approx(0.2)
    assert rows[1]["mfu"] == pytest.approx(1e5 / 0.5 / 1e6) and rows[1]["data_skipped"] == 1
    assert rows[0]["cp_remote_kv_tokens_per_step"] == [6, 6]
    # a resume at step 2 keeps the finished 'images' row, drops 'long' (its steps will be redone)
    perf.StageSummary(str(tmp_path), 1e6, True, start_step=2)
    assert [r["stage"] for r in read_jsonl(tmp_path / "stages.jsonl")] == ["images"]


# --- the quick demo end to end (slow) ---------------------------------------------------------


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    """``magitrain demo --quick``: a shorter run of the same command, end to end: exit 0, an mp4 that
    decodes, a contact sheet, every caption scored, all three parallel axes used, the curriculum's
    stages. (Whether a trained model follows its captions: the next test.)"""
    import numpy as np
    from PIL import Image
    from magitrain.data_pipeline.media import decode_video

    from magitrain import demo

    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "magitrain.demo", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=1500, check=False)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = out / "run"
    for label, path in (("run dir:", run_dir), ("TensorBoard:   tensorboard --logdir", run_dir / "tensorboard"),
                        ("video:", out / "demo.mp4"), ("contact sheet:", out / "demo.png")):
        assert f"{label}" in proc.stdout and str(path) in proc.stdout and path.exists()
    assert "dp=2 x tp=2" in proc.stdout and "dp=2 x cp=2" in proc.stdout and "caption following" in proc.stdout

    # the mp4 decodes and is twice as long as any training clip
    video = decode_video((out / "demo.mp4").read_bytes())
    cfg = demo.demo_config(str(out), True, [])
    longest = max(b[0] for st in cfg.data.curriculum for b in st.buckets) * demo.TEMPORAL_FACTOR
    assert video.shape[0] == demo.GEN_CHUNKS * cfg.model.chunk_frames * demo.TEMPORAL_FACTOR >= 2 * longest
    assert tuple(video.shape[1:]) == (demo.PIXELS, demo.PIXELS, 3)

    # the scores the demo reports, one video per caption
    scores = json.loads((out / "scores.json").read_text())
    assert len(scores["videos"]) == len(demo.SEEN_CAPTIONS) + len(demo.HELD_OUT_CAPTIONS)
    # the scored latents are the ones written: rescoring one gives the same figures
    first = scores["videos"][0]
    again = demo.score_latents(first["video"][:-4] + ".npy", first["caption"], cfg.model.in_channels)
    assert again.object_present == first["object_present"] and again.motion == first["motion"]
    assert np.asarray(Image.open(first["contact_sheet"])).shape[2] == 3

    # 3 curriculum stages, with the per-step figures of the dispatch plan and the MFU estimate
    stages = read_jsonl(run_dir / "stages.jsonl")
    names = [s["stage"] for s in stages]  # a stage split over two launches has a row per launch
    assert [n for i, n in enumerate(names) if i == 0 or names[i - 1] != n] == ["images", "short", "long"]
    assert sum(s["steps"] for s in stages) == cfg.train.steps
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, cfg.train.steps + 1))
    for key in ("tokens_per_s", "mfu", "attn_area", "data_time_s", "data_skipped"):
        assert all(key in r for r in records), key
    # the dp=2 x cp=2 launch: the dispatch plan's figures, long clips spanning both CP ranks
    cp_steps = [r for r in records if "cp_remote_kv_tokens" in r]
    assert len(cp_steps) == demo.CP_STEPS and all(r["stage"] == "long" for r in cp_steps)
    assert all(len(r["cp_remote_kv_tokens"]) == 2 and "cp_area_imbalance" in r for r in cp_steps)
    assert any(sum(r["cp_remote_kv_tokens"]) > 0 for r in cp_steps)
    assert "on dp=2\n" in proc.stdout or "on dp=2 " in proc.stdout  # the dp-only launch for the rest


@pytest.mark.slow
def test_small_model_follows_captions(tmp_path):
    """A smaller run of the demo's recipe (its 120 clips, one process, 1000 steps of the long stage
    only): its streamed videos of the 8 seen captions, two seeds each, must clear caption-following
    marks that noise and an untrained model cannot reach (both score 0 on every field;
    benchmarks/README.md). The run is bimodal: scored band-aware (a shape grown into a band across
    the frame is not an object), train.seed 0-4 here gave 88 / 28 / 76 / 87 / 86% object present,
    and the CI machine's run (other CPUs round differently) 26%: in the low mode most captions draw
    a band or an empty frame (design.md, issue 13, "CI after the band check"). So the mark sits
    below the low mode and far above noise's 0."""
    from magitrain import demo
    from magitrain.caption_score import mean_score, score_video
    from magitrain.config import load_config
    from magitrain.configs import config_path
    from magitrain.data_pipeline.encoders import PatchEncoder
    from magitrain.train import train

    torch.set_num_threads(2)  # CI runs this test alone on 2 cores
    demo.make_media(str(tmp_path / "media"), demo.VIDEOS)
    overrides = [f"run.dir={tmp_path / 'run'}", f"data.shards={tmp_path / 'shards'}", "parallel.dp=1",
                 "parallel.cp=1", "parallel.tp=1", "train.steps=1000", "optim.restart_at=0", "log.progress=false",
                 "log.tensorboard=false"]
    cfg = load_config(config_path("demo.yaml"), overrides, world_size=1)
    demo.build_shards(str(tmp_path / "media"), str(tmp_path / "shards"), cfg, demo.VIDEOS)
    cfg.data.curriculum = cfg.data.curriculum[-1:]  # the long clips only
    train(cfg)

    captions = demo.SEEN_CAPTIONS
    scores = []
    for k in range(2):
        for i, caption in enumerate(captions):
            summary = demo.stream_video(cfg.run.dir, caption, str(tmp_path / f"v{i}_{k}.mp4"), chunks=4,
                                        seed=i + 1 + 100 * k)
            scores.append(demo.score_latents(summary["latents"], caption, cfg.model.in_channels))
    trained = mean_score(scores)
    print("trained:", trained)
    enc, g = PatchEncoder(4), torch.Generator().manual_seed(0)
    noise = mean_score([score_video(enc.decode(torch.randn(4, 8, 8, 8, generator=g)), c) for c in captions])
    assert noise.object_present == 0 and noise.colour == 0
    assert trained.object_present >= 0.15 and trained.colour >= 0.15, trained
