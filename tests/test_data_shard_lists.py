"""``data.shards`` as a list (YAML list or dotlist ``data.shards=[a.tar,b.tar]``) and brace patterns
that start with ``{``: both name the same shards, in the same order, as the ``::`` form."""

from __future__ import annotations

import json
import os

import pytest
from magitrain.data_pipeline.shards import expand_shards
from magitrain.data_pipeline.source import WebDatasetSource
from omegaconf import OmegaConf

from magitrain.config import ConfigError, load_config
from magitrain.train import train

from conftest import REPO
from test_data_common import batch_keys, tiny_cfg, write_latent_shards

SHAPE = (2, 4, 4)


@pytest.fixture
def two_shards(tmp_path):
    return write_latent_shards(str(tmp_path / "shards"), [[SHAPE] * 4, [SHAPE] * 4])


def test_dotlist_list_expands_like_the_colon_form(two_shards):
    a, b = two_shards
    listed = load_config(overrides=["data.source=webdataset", f"data.shards=[{a},{b}]"])
    assert listed.data.shards == [a, b]
    assert expand_shards(listed.data.shards) == expand_shards(f"{a}::{b}") == [a, b]


def test_brace_pattern_starting_with_a_brace(two_shards, monkeypatch):
    monkeypatch.chdir(os.path.dirname(two_shards[0]))  # a pattern that starts with '{' is relative to here
    cfg = load_config(overrides=["data.source=webdataset", "data.shards={shard-000000,shard-000001}.tar"])
    assert cfg.data.shards == "{shard-000000,shard-000001}.tar"
    assert expand_shards(cfg.data.shards) == ["shard-000000.tar", "shard-000001.tar"]


def test_unquoted_brace_in_yaml_is_a_clear_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  source: webdataset\n  shards: {a, b}\n")  # YAML reads a mapping
    with pytest.raises(ConfigError, match=r"data\.shards.*quote"):
        load_config(str(path))


def test_yaml_list_of_shards(tmp_path, two_shards):
    path = tmp_path / "c.yaml"
    path.write_text(OmegaConf.to_yaml({"data": {"source": "webdataset", "shards": two_shards}}))
    assert load_config(str(path)).data.shards == two_shards


def test_list_reads_the_same_batches_as_the_colon_form(two_shards):
    a, b = two_shards
    by_list = WebDatasetSource(tiny_cfg(f"[{a},{b}]", "data.seq_tokens=16"), 0, 1)
    by_colon = WebDatasetSource(tiny_cfg(f"{a}::{b}", "data.seq_tokens=16"), 0, 1)
    for _ in range(3):
        assert batch_keys(by_list.next_batch()) == batch_keys(by_colon.next_batch())


def test_list_trains_and_is_saved_as_a_list(tmp_path, two_shards):
    a, b = two_shards
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      [f"run.dir={tmp_path}/run", "log.progress=false", "log.tensorboard=false", "train.steps=2",
                       "data.source=webdataset", f"data.shards=[{a},{b}]", "data.seq_tokens=64",
                       "data.shuffle_buffer=4"])
    train(cfg)
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == [1, 2] and records[-1]["data_samples"] > 0
    saved = load_config(str(tmp_path / "run" / "config.yaml"))
    assert saved.data.shards == [a, b]
