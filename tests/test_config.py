"""Config loading: typed schema, overrides, clear errors with exit code 2."""

import os
import subprocess
import sys

import pytest

from magitrain.config import ConfigError, load_config

from conftest import REPO

TINY = os.path.join(REPO, "configs", "tiny.yaml")


def test_tiny_loads_and_overrides_apply():
    cfg = load_config(TINY, ["train.steps=7", "parallel.dp=1", "ckpt.resume=auto", "run.dir=/tmp/x"])
    assert cfg.train.steps == 7 and cfg.ckpt.resume == "auto" and cfg.run.dir == "/tmp/x"
    assert cfg.data.source == "synthetic"


@pytest.mark.parametrize("override,needle", [
    ("model.nope=1", "model.nope"),
    ("train.steps=abc", "train.steps"),
    ("model.num_heads=3", "model.num_heads"),
    ("model.num_kv_heads=3", "model.num_kv_heads"),
    ("model.chunk_frames=3", "model.chunk_frames"),
    ("data.source=parquet", "data.source"),
    ("parallel.tp=3", "parallel.tp"),
    ("parallel.dp=3", "parallel.dp"),
    ("optim.ema_decay=1.5", "optim.ema_decay"),
    ("parallel.dp_engine=ddp", "parallel.dp_engine"),  # not implemented: refused, not silently run as fsdp2
    ("log.wandb_mode=cloud", "log.wandb_mode"),
])
def test_bad_config_names_the_key(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TINY, [override])


def test_world_size_mismatch_is_a_config_error():
    with pytest.raises(ConfigError, match="WORLD_SIZE|processes"):
        load_config(TINY, ["parallel.cp=2"], world_size=1)


@pytest.mark.parametrize("override", ["model.nope=1", "train.steps=abc", "model.num_heads=3",
                                      "parallel.dp_engine=ddp"])
def test_cli_exit_code_2_without_traceback(tmp_path, override):
    r = subprocess.run([sys.executable, "-m", "magitrain.train", "--config", TINY, f"run.dir={tmp_path}", override],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1
    assert not os.path.exists(os.path.join(tmp_path, "metrics.jsonl"))


def test_published_configs_load():
    for name in ("magi1_4.5b.yaml", "magi1_24b.yaml"):
        path = os.path.join(REPO, "configs", name)
        if os.path.exists(path):
            load_config(path, ["parallel.dp=1", "parallel.cp=1", "parallel.tp=1"])
