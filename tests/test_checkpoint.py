"""Checkpoint folders: complete-or-ignored, newest complete wins, failures leave the previous intact."""

import os

import pytest
import torch

from magitrain.checkpoint import MARKER, Checkpointer, CheckpointError


def test_auto_picks_newest_complete_and_ignores_partial(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=5)
    assert ck.resolve("auto") is None and ck.resolve("") is None
    ck.save(3, {"w": torch.ones(2)}, "a: 1\n")
    ck.save(6, {"w": torch.full((2,), 6.0)}, "a: 1\n")
    # a crashed save: folder without marker, and a leftover temp folder
    os.makedirs(ck.path_for(9))
    torch.save({"w": torch.zeros(2)}, os.path.join(ck.path_for(9), "state.pt"))
    os.makedirs(os.path.join(ck.root, ".tmp_step_00000012_1"))
    assert ck.resolve("auto") == ck.path_for(6)
    assert torch.equal(Checkpointer.load(ck.resolve("auto"))["w"], torch.full((2,), 6.0))
    assert ck.resolve(str(tmp_path)) == ck.path_for(6)  # a run dir resolves to its newest
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        ck.resolve(ck.path_for(9))


def test_keep_last(tmp_path):
    ck = Checkpointer(str(tmp_path), keep_last=2)
    for s in (1, 2, 3, 4):
        ck.save(s, {"s": s}, "")
    assert [s for s, _ in ck.complete_checkpoints()] == [3, 4]


def test_failed_write_keeps_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(str(tmp_path))
    ck.save(1, {"w": torch.ones(3)}, "")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(CheckpointError, match="No space left"):
        ck.save(2, {"w": torch.zeros(3)}, "")
    monkeypatch.undo()
    assert ck.resolve("auto") == ck.path_for(1)
    assert torch.equal(Checkpointer.load(ck.path_for(1))["w"], torch.ones(3))
    assert [n for n in os.listdir(ck.root) if n.startswith(".tmp")] == []


class Gadget:
    pass


def test_load_refuses_pickled_objects(tmp_path):
    path = tmp_path / "evil"
    os.makedirs(path)

    torch.save({"x": Gadget()}, path / "state.pt")  # a non-allowlisted class must not be unpickled
    (path / MARKER).write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="cannot be loaded"):
        Checkpointer.load(str(path))
