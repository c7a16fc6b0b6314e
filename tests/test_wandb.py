"""``log.wandb``: offline Weights & Biases logging (no network) carries the metrics.jsonl values;
without the wandb package the option is a one-line config error."""

from __future__ import annotations

import glob
import json
import os
import time

import pytest

from magitrain.config import ConfigError
from magitrain.metrics import MetricsLogger

from conftest import tiny_config


class RecordingRun:
    def __init__(self):
        self.logged, self.finished = [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


def test_logger_sends_every_numeric_field(tmp_path):
    run = RecordingRun()
    logger = MetricsLogger(str(tmp_path), 2, tensorboard=False, progress=False, wandb_run=run)
    records = [{"step": 1, "loss": 1.5, "grad_norm": 0.25, "lr": 1e-3, "tokens_per_s": 10.0, "stage": "a"},
               {"step": 2, "loss": float("nan"), "grad_norm": 0.5, "lr": 1e-3, "tokens_per_s": 11.0, "stage": "a"}]
    for r in records:
        logger.log(r)
    logger.close()
    assert run.finished
    assert [s for s, _ in run.logged] == [1, 2]
    assert run.logged[0][1] == {"train/loss": 1.5, "train/grad_norm": 0.25, "train/lr": 1e-3, "train/tokens_per_s": 10.0}
    assert "train/loss" not in run.logged[1][1]  # non-finite: dropped, as in metrics.jsonl (null)


def test_not_rank0_sends_nothing(tmp_path):
    run = RecordingRun()
    MetricsLogger(str(tmp_path), 1, enabled=False, wandb_run=run).log({"step": 1, "loss": 1.0})
    assert run.logged == []


def test_offline_run_holds_the_losses(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    from magitrain.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: never the network
    cfg = tiny_config(tmp_path, "train.steps=2", "log.wandb=true")
    train(cfg)
    runs = glob.glob(os.path.join(cfg.run.dir, "wandb", "offline-run-*", "*.wandb"))
    assert len(runs) == 1
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    wanted = [b"train/loss"] + [json.dumps(loss).encode() for loss in losses]  # values are stored as JSON text
    deadline = time.monotonic() + 60  # wandb's service process may still be flushing the file (seen under load)
    while True:
        with open(runs[0], "rb") as f:
            blob = f.read()
        if all(w in blob for w in wanted) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(losses) == 2
    for w in wanted:
        assert w in blob, w


def test_missing_wandb_is_a_config_error(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"log\.wandb.*pip install"):
        tiny_config(tmp_path, "log.wandb=true")
