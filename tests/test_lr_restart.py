"""optim.restart_at: one warm restart from the EMA weights (the demo's last phase, docs/design.md issue 13)."""

import json
import os

import pytest
import torch

from magitrain.checkpoint import Checkpointer
from magitrain.config import ConfigError
from magitrain.train import lr_factor, train

from conftest import tiny_config


def _state(run_dir):
    return Checkpointer.load(Checkpointer(run_dir).latest())


def _records(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_schedule_has_two_cycles(tmp_path):
    cfg = tiny_config(tmp_path / "s", "train.steps=100", "optim.lr=1e-2", "optim.warmup_steps=5",
                      "optim.min_lr_ratio=0.1", "optim.restart_at=60", "optim.restart_lr=4e-3",
                      "optim.restart_warmup_steps=4")
    lr = [lr_factor(s, cfg) * cfg.optim.lr for s in range(100)]
    assert lr[4] == pytest.approx(1e-2) and lr[59] == pytest.approx(1e-3, rel=0.01)  # cycle 1 ends at the restart
    assert lr[60] == pytest.approx(1e-3) and lr[63] == pytest.approx(4e-3)  # re-warms to restart_lr
    assert lr[99] == pytest.approx(4e-4, rel=0.05)  # cycle 2 ends at min_lr_ratio * restart_lr
    plain = tiny_config(tmp_path / "p", "train.steps=100", "optim.lr=1e-2", "optim.warmup_steps=5")
    assert [lr_factor(s, plain) for s in range(100)] != [lr_factor(s, cfg) for s in range(100)]


def test_restart_takes_the_ema_weights_and_resumes_bitwise(tmp_path):
    common = ("train.steps=4", "ckpt.every=0", "optim.ema_decay=0.5", "optim.restart_at=3")
    # the weights after a restart step at a vanishing lr are the EMA of the 3 steps before it
    first3 = tiny_config(tmp_path / "a", "train.steps=3", "ckpt.every=0", "optim.ema_decay=0.5")
    train(first3)
    tiny_lr = tiny_config(tmp_path / "b", *common, "optim.restart_lr=1e-20")
    train(tiny_lr)
    ema3, after = _state(first3.run.dir)["ema"]["shadow"], _state(tiny_lr.run.dir)["model"]
    raw3 = _state(first3.run.dir)["model"]
    assert any(not torch.equal(raw3[k], ema3[k]) for k in ema3)  # the EMA differs from the raw weights
    for k in ema3:
        torch.testing.assert_close(after[k].float(), ema3[k], rtol=0, atol=1e-12)
    # straight through the restart == stopped exactly at it and resumed
    straight = tiny_config(tmp_path / "c", *common)
    train(straight)
    stopped = tiny_config(tmp_path / "d", *common, "train.stop_at=3")
    train(stopped)
    train(tiny_config(tmp_path / "d", *common, "ckpt.resume=auto"))
    a, b = _records(straight.run.dir), _records(stopped.run.dir)
    assert [(r["loss"], r["lr"]) for r in a] == [(r["loss"], r["lr"]) for r in b] and len(a) == 4
    sa, sb = _state(straight.run.dir), _state(stopped.run.dir)
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k


@pytest.mark.parametrize("override, match", [("optim.restart_at=5", "restart_at"), ("optim.restart_at=-1", "restart_at"),
                                             ("optim.restart_lr=-1", "restart_lr")])
def test_bad_restart_config(tmp_path, override, match):
    with pytest.raises(ConfigError, match=match):
        tiny_config(tmp_path / "x", "train.steps=5", "optim.restart_at=2", override)


def test_restart_needs_an_ema(tmp_path):
    with pytest.raises(ConfigError, match="ema_decay"):
        tiny_config(tmp_path / "x", "train.steps=5", "optim.restart_at=2", "optim.ema_decay=0")
