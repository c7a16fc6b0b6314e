"""The trainer: bitwise resume, SIGTERM checkpoint, non-finite steps, loss falls on learnable data."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from magitrain.checkpoint import Checkpointer
from magitrain.config import ConfigError
from magitrain.train import TrainingError, train

from conftest import REPO, tiny_config


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _final_state(run_dir):
    return Checkpointer.load(Checkpointer(run_dir).latest())


def test_resume_is_bitwise_identical(tmp_path):
    straight = tiny_config(tmp_path / "a", "train.steps=6", "ckpt.every=0")
    train(straight)
    interrupted = tiny_config(tmp_path / "b", "train.steps=6", "ckpt.every=3")
    train(interrupted)
    # as if killed right after step 3's checkpoint: drop everything later and resume
    ck = Checkpointer(interrupted.run.dir)
    shutil.rmtree(ck.path_for(6))
    assert ck.latest() == ck.path_for(3)
    resumed = tiny_config(tmp_path / "b", "train.steps=6", "ckpt.every=3", "ckpt.resume=auto")
    train(resumed)

    a, b = _losses(straight.run.dir), _losses(resumed.run.dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    sa, sb = _final_state(straight.run.dir), _final_state(resumed.run.dir)
    for key in ("model", "ema"):
        flat_a, flat_b = sa[key] if key == "model" else sa[key]["shadow"], sb[key] if key == "model" else sb[key]["shadow"]
        assert flat_a.keys() == flat_b.keys()
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), (key, k)


def test_stop_at_then_resume_equals_straight_run(tmp_path):
    """train.stop_at ends early with a checkpoint and keeps the lr schedule of train.steps, so a
    resume goes on exactly as the uninterrupted run (the demo's two launches rely on it)."""
    straight = tiny_config(tmp_path / "a", "train.steps=6", "ckpt.every=0")
    train(straight)
    first = tiny_config(tmp_path / "b", "train.steps=6", "ckpt.every=0", "train.stop_at=2")
    train(first)
    assert Checkpointer(first.run.dir).latest() == Checkpointer(first.run.dir).path_for(2)
    train(tiny_config(tmp_path / "b", "train.steps=6", "ckpt.every=0", "ckpt.resume=auto"))
    a, b = _losses(straight.run.dir), _losses(first.run.dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b]
    with pytest.raises(ConfigError, match="train.stop_at"):
        tiny_config(tmp_path / "c", "train.steps=6", "train.stop_at=7")


def test_metrics_fields(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=2")
    train(cfg)
    for rec in _losses(cfg.run.dir):
        for field in ("step", "loss", "grad_norm", "lr", "tokens_per_s"):
            assert field in rec
    assert os.path.exists(os.path.join(cfg.run.dir, "config.yaml"))


def test_nonfinite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    import magitrain.train as train_mod

    real = train_mod.noise_batch
    bad_steps = {1}

    def poisoned(batch, cfg, seed, step):
        nb = real(batch, cfg, seed, step)
        if step in bad_steps:
            nb.target = nb.target * float("nan")
        return nb

    monkeypatch.setattr(train_mod, "noise_batch", poisoned)
    cfg = tiny_config(tmp_path / "a", "train.steps=3")
    train(cfg)
    recs = _losses(cfg.run.dir)
    assert recs[-1]["bad_steps"] == 1 and recs[1]["loss"] is None

    bad_steps.update(range(100))
    cfg = tiny_config(tmp_path / "b", "train.steps=20", "train.max_bad_steps=2")
    with pytest.raises(TrainingError, match="non-finite"):
        train(cfg)


def test_sigterm_saves_a_checkpoint_and_exits_0(tmp_path):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "magitrain.train", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
           f"run.dir={run}", "train.steps=100000", "ckpt.every=0", "log.progress=false", "log.tensorboard=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    saved = Checkpointer(str(run)).latest()
    assert saved is not None
    step = Checkpointer.step_of(saved)
    assert step == _losses(str(run))[-1]["step"] and step >= 2


@pytest.mark.slow
def test_tiny_loss_falls(tmp_path):
    cfg = tiny_config(tmp_path, "train.steps=200", "ckpt.every=0")
    start = time.time()
    train(cfg)
    losses = [r["loss"] for r in _losses(cfg.run.dir)]
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    print(f"loss {first:.4f} -> {last:.4f} in {time.time() - start:.0f} s")
    assert last < 0.6 * first
