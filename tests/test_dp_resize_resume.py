"""Resume under another layout keeps every data-parallel rank on its own data stream.

The rule (docs/design.md, issue 14): the per-rank state (data position, RNG) a rank resumes from
is that of its own dp rank in the saved run. A changed cp or tp keeps the data split, so the
streams continue exactly. A changed dp size cannot re-split a WebDataset epoch (its remaining
samples sit in per-rank shard positions, shuffle buffers and packer bins): the WebDataset source
refuses it with a one-line ConfigError naming both sizes. Before issue 14 every rank got rank 0's
data state when the world size changed: duplicated streams, no error.

Checkpoint folders are written here the way N ranks write them (one ``rank_NNNNN.json`` each) and
read back through ``Checkpointer.load_into`` as each rank of the new layout would.
"""

from __future__ import annotations

import inspect
import os
from collections import Counter

import pytest
import torch
from test_data_common import batch_keys, tiny_cfg, write_latent_shards

import magitrain.checkpoint as ckpt_mod
from magitrain.checkpoint import Checkpointer
from magitrain.config import ConfigError
from magitrain.data_pipeline.source import WebDatasetSource

SHARDS, PER_SHARD, BEFORE = 8, 5, 3  # 40 samples; 3 batches per rank before the checkpoint


class _Weights:
    def __init__(self):
        self.w = torch.zeros(2)

    def state_dict(self):
        return {"w": self.w}

    def load_state_dict(self, state):
        self.w = state["w"]


def _cfg(root, dp):
    return tiny_cfg(root, "data.num_workers=0", "data.seq_tokens=16", f"data.batch_size={dp}",
                    "data.shuffle_buffer=3", "data.pack_bins=2")


def _shards(tmp_path) -> str:
    write_latent_shards(str(tmp_path / "shards"), [[(1, 4, 4)] * PER_SHARD for _ in range(SHARDS)])
    return str(tmp_path / "shards")


def _saved_run(tmp_path, shards, layout) -> tuple[str, list[WebDatasetSource]]:
    """A checkpoint of a run with ``layout`` (dp, cp, tp) after BEFORE batches per dp rank, written
    as its ranks would; returns (folder, the sources of each dp rank, still running)."""
    dp, cp, tp = layout
    cfg = _cfg(shards, dp)
    sources = [WebDatasetSource(cfg, d, dp) for d in range(dp)]
    consumed = Counter()
    for src in sources:
        for _ in range(BEFORE):
            consumed.update(batch_keys(src.next_batch()))
    folder = str(tmp_path / f"ckpt_{dp}{cp}{tp}")
    ck = Checkpointer(folder)
    path = ck.save(1, {"weights": _Weights()}, "", per_rank={"data": sources[0]})
    saved = ckpt_mod.read_json(os.path.join(path, ckpt_mod.STATE_JSON))
    saved.update(world_size=dp * cp * tp, layout={"dp": dp, "cp": cp, "tp": tp})
    ckpt_mod._write_json(os.path.join(path, ckpt_mod.STATE_JSON), saved)
    for rank in range(dp * cp * tp):
        d = rank // (cp * tp)
        ckpt_mod._write_json(os.path.join(path, f"rank_{rank:05d}.json"),
                             ckpt_mod._inline_tensors(ckpt_mod._as_tree({"data": sources[d]})))
    _saved_run.consumed = consumed
    return path, sources


def _resume(monkeypatch, path, shards, layout, rank) -> WebDatasetSource:
    """What rank ``rank`` of a run with ``layout`` gets from ``load_into``."""
    dp, cp, tp = layout
    monkeypatch.setattr(ckpt_mod, "_dist", lambda: (rank, dp * cp * tp))
    src = WebDatasetSource(_cfg(shards, dp), rank // (cp * tp), dp)
    kwargs = {}
    if "layout" in inspect.signature(Checkpointer.load_into).parameters:  # the pre-issue-14 API had none
        kwargs["layout"] = {"dp": dp, "cp": cp, "tp": tp}
    if "verify" in inspect.signature(Checkpointer.load_into).parameters:  # the files were rewritten by hand above
        kwargs["verify"] = False
    Checkpointer.load_into(path, {"weights": _Weights()}, per_rank={"data": src}, **kwargs)
    return src


def test_per_rank_source_keeps_the_dp_rank():
    from magitrain.checkpoint import per_rank_source

    dp2_tp2 = {"dp": 2, "cp": 1, "tp": 2}
    assert [per_rank_source(dp2_tp2, 4, dp2_tp2, r, 4) for r in range(4)] == [0, 1, 2, 3]
    assert [per_rank_source(dp2_tp2, 4, {"dp": 2, "cp": 2, "tp": 1}, r, 4) for r in range(4)] == [0, 0, 2, 2]
    assert [per_rank_source(dp2_tp2, 4, {"dp": 2, "cp": 1, "tp": 1}, r, 2) for r in range(2)] == [0, 2]
    assert [per_rank_source(None, 4, None, r, 2) for r in range(2)] == [0, 0]  # no layout recorded: as before


@pytest.mark.parametrize("saved, resumed", [((2, 1, 1), (2, 2, 1)), ((2, 1, 2), (2, 1, 1)), ((2, 1, 2), (2, 2, 1))])
def test_changed_cp_or_tp_continues_every_dp_stream_exactly(tmp_path, monkeypatch, saved, resumed):
    shards = _shards(tmp_path)
    path, sources = _saved_run(tmp_path, shards, saved)
    want = {d: [batch_keys(src.next_batch()) for _ in range(3)] for d, src in enumerate(sources)}
    dp, cp, tp = resumed
    for rank in range(dp * cp * tp):
        src = _resume(monkeypatch, path, shards, resumed, rank)
        got = [batch_keys(src.next_batch()) for _ in range(3)]
        assert got == want[rank // (cp * tp)], f"rank {rank} (dp rank {rank // (cp * tp)}) continues another stream"


@pytest.mark.parametrize("saved_dp, new_dp", [(2, 4), (4, 2)])
def test_changed_dp_size_is_refused_with_one_line(tmp_path, monkeypatch, saved_dp, new_dp):
    """Rule: a WebDataset run resumes at the dp size it was saved with. Before issue 14 this went on
    with every rank on rank 0's stream; the duplicates are counted in the failure message."""
    shards = _shards(tmp_path)
    path, _ = _saved_run(tmp_path, shards, (saved_dp, 1, 1))
    seen, errors = Counter(), []
    for rank in range(new_dp):
        try:
            src = _resume(monkeypatch, path, shards, (new_dp, 1, 1), rank)
        except ConfigError as e:
            errors.append(str(e))
            continue
        for _ in range(2):
            seen.update(batch_keys(src.next_batch()))
    dupes = {k: n for k, n in seen.items() if n > 1}
    again = sorted(k for k in seen if k in _saved_run.consumed)
    assert len(errors) == new_dp, (f"resumed without error; in 2 batches per rank, samples read by several ranks: "
                                   f"{dupes}, samples trained on before the checkpoint read again: {again}")
    for e in errors:
        assert "\n" not in e and f"{saved_dp} data-parallel ranks" in e and f"parallel.dp={new_dp}" in e, e


@pytest.mark.slow
@pytest.mark.parametrize("saved_dp, new_dp", [(2, 4), (4, 2)])
def test_trainer_refuses_a_dp_change_on_webdataset(tmp_path, saved_dp, new_dp):
    """The real thing through torchrun: train at dp=saved_dp on WebDataset shards with a checkpoint,
    resume at dp=new_dp: every rank exits 2 with one ``error:`` line, nothing is trained."""
    from test_fault_drill import Launch, demo_shards, metrics

    data = demo_shards(tmp_path) + ["parallel.cp=1", "data.batch_size=4", "train.steps=2", "ckpt.every=2"]
    run_dir = str(tmp_path / "run")
    first = Launch(tmp_path, run_dir, data + [f"parallel.dp={saved_dp}"], nproc=saved_dp)
    assert first.wait(300) == 0, first.output()[-3000:]
    again = Launch(tmp_path, run_dir, data + [f"parallel.dp={new_dp}", "train.steps=4", "ckpt.resume=auto"],
                   nproc=new_dp)
    assert again.wait(300) != 0
    out = again.output()
    lines = [line for line in out.splitlines() if line.startswith("error: the checkpoint's WebDataset stream")]
    assert lines and all(f"split over {saved_dp} data-parallel ranks" in line for line in lines), out[-3000:]
    assert {again.rc(r) for r in range(new_dp)} <= {2, None} and 2 in {again.rc(r) for r in range(new_dp)}, out[-3000:]
    assert metrics(run_dir)[-1]["step"] == 2  # nothing trained after the refusal
