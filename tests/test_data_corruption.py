"""Damaged data: a truncated tar, a corrupt npy and a missing field are logged, counted and skipped,
leaving exactly the good samples; too many bad samples stop the run; a missing shard or a
channel mismatch fails at once with a clear message."""

from __future__ import annotations

import os
import tarfile

import pytest
import webdataset as wds
from magitrain.data_pipeline.dataset import BadDataError
from magitrain.data_pipeline.source import WebDatasetSource
from test_data_common import batch_keys, tiny_cfg, write_latent_shards


def _rewrite(path, edit):
    """Rewrite a shard, passing every raw sample through ``edit`` (returns the sample or None)."""
    samples = list(wds.tarfile_to_samples()(iter([{"url": path}])))
    with wds.TarWriter(path, encoder=False) as w:
        for s in samples:
            s = edit(s)
            if s is not None:
                w.write({k: v for k, v in s.items() if k == "__key__" or not k.startswith("__")})


def _truncate(path) -> set[int]:
    """Cut the tar in the middle of its 3rd sample's latent; return the indices of the samples kept whole."""
    with tarfile.open(path) as tf:
        members = tf.getmembers()
    cut = next(m for m in members if m.name.endswith(".latent.npy") and m.name.startswith("s00012"))
    end = cut.offset_data + cut.size // 2
    with open(path, "r+b") as f:
        f.truncate(end)
    whole = {m.name.split(".")[0] for m in members if m.offset_data + m.size <= end}
    complete = {k for k in whole if sum(m.name.startswith(k + ".") for m in members if m.offset_data + m.size <= end) == 3}
    return {int(k[1:]) for k in complete}


def _damaged(folder) -> set[int]:
    paths = write_latent_shards(folder, [[(2, 4, 4)] * 5 for _ in range(4)])  # s00000..s00019
    kept = set(range(20)) - set(range(10, 15))
    kept |= _truncate(paths[2])  # shard 2 holds s00010..s00014
    _rewrite(paths[0], lambda s: {**s, "latent.npy": s["latent.npy"][:40] + b"garbage"} if s["__key__"] == "s00001" else s)
    _rewrite(paths[1], lambda s: {k: v for k, v in s.items() if k != "json"} if s["__key__"] == "s00007" else s)
    return kept - {1, 7}


def _drain(src) -> list[int]:
    keys = []
    while True:
        try:
            keys += batch_keys(src.next_batch())
        except StopIteration:
            return keys


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_samples_are_counted_and_skipped(tmp_path, caplog, workers):
    good = _damaged(str(tmp_path))
    assert 10 in good and 14 not in good  # the cut kept some samples of shard 2 and lost others
    cfg = tiny_cfg(str(tmp_path), f"data.num_workers={workers}", "data.seq_tokens=16", "data.batch_size=1",
                   "data.max_bad_fraction=0.5")
    src = WebDatasetSource(cfg, 0, 1, epochs=1)
    keys = _drain(src)
    assert sorted(keys) == sorted(good)
    stats = src.stats()
    assert stats["data_skipped"] == 20 - len(good) and stats["data_samples"] == 20
    if workers == 0:  # worker processes log in their own process
        assert "key=s00001" in caplog.text and "corrupt latent.npy" in caplog.text
        assert "key=s00007" in caplog.text and "missing field: json" in caplog.text


def test_too_many_bad_samples_stop_the_run(tmp_path):
    _damaged(str(tmp_path))
    cfg = tiny_cfg(str(tmp_path), "data.num_workers=0", "data.seq_tokens=16", "data.batch_size=1",
                   "data.max_bad_fraction=0.05", "data.bad_check_after=4")
    src = WebDatasetSource(cfg, 0, 1)
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        for _ in range(40):
            src.next_batch()


def test_missing_shard_fails_at_startup_naming_it(tmp_path):
    write_latent_shards(str(tmp_path), [[(2, 4, 4)]] * 2)
    spec = os.path.join(str(tmp_path), "shard-{000000..000002}.tar")
    with pytest.raises(FileNotFoundError, match="shard-000002.tar"):
        WebDatasetSource(tiny_cfg(spec), 0, 1)


def test_channel_mismatch_is_a_clear_error(tmp_path):
    write_latent_shards(str(tmp_path), [[(2, 4, 4)] * 2])
    cfg = tiny_cfg(str(tmp_path), "model.in_channels=8", "model.out_channels=8")
    with pytest.raises(ValueError, match="model.in_channels=8"):
        WebDatasetSource(cfg, 0, 1).next_batch()


def test_too_few_shards_for_the_readers_is_a_clear_error(tmp_path):
    write_latent_shards(str(tmp_path), [[(2, 4, 4)]] * 3)
    with pytest.raises(ValueError, match="3 shards cannot feed 2 data-parallel ranks x 2"):
        WebDatasetSource(tiny_cfg(str(tmp_path), "data.num_workers=2"), 0, 2)
