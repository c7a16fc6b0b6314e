"""Issue 21: checkpoints are verified on load.

- a flipped byte in any file of the newest checkpoint (every file kind) is found: ``auto`` falls
  back to the previous complete checkpoint with a warning naming both; naming that checkpoint
  explicitly is exit code 2 naming the file;
- ``release export``, ``ckpt.init_from`` and ``generate`` refuse a damaged checkpoint with exit 2;
- a release whose tensor data changed after export is refused by ``release import``,
  ``ckpt.init_from`` and ``load_run_weights`` (the index's SHA-256 is checked on every read);
- checkpoints written before checksums existed still load.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch
from conftest import REPO

from magitrain import generate, release, train
from magitrain.checkpoint import MARKER, Checkpointer, CheckpointError


def verify_checkpoint(path):
    from magitrain.checkpoint import verify_checkpoint as verify  # imported late: the test file loads on old code

    return verify(path)

TINY = os.path.join(REPO, "configs", "tiny.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false"]


def _train(run_dir, *overrides) -> int:
    return train.main(["--config", TINY, f"run.dir={run_dir}", *QUIET, *overrides])


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A tiny run with complete checkpoints at steps 2 and 4."""
    run = str(tmp_path_factory.mktemp("integrity") / "run")
    assert _train(run, "train.steps=4", "ckpt.every=2", "ckpt.keep_last=5") == 0
    return run


def _flip(path: str, where: float = 0.5) -> None:
    data = bytearray(open(path, "rb").read())
    i = min(len(data) - 1, int(len(data) * where))
    data[i] ^= 0x01
    open(path, "wb").write(bytes(data))


def _kinds(ckpt: str) -> list[str]:
    out = []
    for root, _, names in os.walk(ckpt):
        out += [os.path.relpath(os.path.join(root, n), ckpt) for n in names]
    return sorted(out)


def test_every_file_kind_is_covered(two_checkpoints):
    ckpt = Checkpointer(two_checkpoints).latest()
    assert set(_kinds(ckpt)) == {MARKER, "config.yaml", "rank_00000.json", "state.json", "sha256_00000.json",
                                 "tensors/.metadata", "tensors/__0_0.distcp"}
    assert verify_checkpoint(ckpt) is True


@pytest.mark.parametrize("kind", [MARKER, "config.yaml", "rank_00000.json", "state.json", "sha256_00000.json",
                                  "tensors/.metadata", "tensors/__0_0.distcp"])
def test_bit_flip_detected(two_checkpoints, tmp_path, capsys, kind):
    run = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, run)
    ck = Checkpointer(run)
    newest, previous = ck.path_for(4), ck.path_for(2)
    _flip(os.path.join(newest, kind), 0.5 if kind != MARKER else 0.3)
    warnings = []
    assert ck.resolve("auto", log=warnings.append) == previous
    assert len(warnings) == 1 and newest in warnings[0] and previous in warnings[0]
    # naming the damaged checkpoint: exit 2, naming a file of it
    assert _train(run, f"ckpt.resume={newest}", "train.steps=6") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and len(err.splitlines()) == 1 and newest in err and "damaged" in err


def test_auto_resume_falls_back_and_trains_on(two_checkpoints, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, run)
    ck = Checkpointer(run)
    data = os.path.join(ck.path_for(4), "tensors", "__0_0.distcp")
    blob = bytearray(open(data, "rb").read())
    mid = len(blob) // 2
    blob[mid:mid + 64] = bytes(b ^ 0xFF for b in blob[mid:mid + 64])  # the probe: 64 bytes flipped
    open(data, "wb").write(bytes(blob))
    assert _train(run, "ckpt.resume=auto", "train.steps=6", "ckpt.every=2", "ckpt.keep_last=5") == 0
    out = capsys.readouterr()
    assert "__0_0.distcp: damaged" in out.err and f"resumed from {ck.path_for(2)} at step 2" in out.out
    assert verify_checkpoint(ck.path_for(4)) and verify_checkpoint(ck.path_for(6))  # step 4 rewritten


def test_damaged_checkpoint_refused_by_export_init_generate(two_checkpoints, tmp_path, capsys):
    run = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, run)
    _flip(os.path.join(Checkpointer(run).path_for(4), "tensors", "__0_0.distcp"))
    calls = {
        "export": lambda: release.main(["export", run, str(tmp_path / "rel")]),
        "init_from": lambda: _train(str(tmp_path / "init"), f"ckpt.init_from={run}", "train.steps=1"),
        "generate": lambda: generate.main(["--ckpt", run, "--chunks", "1", "--prompt", "x", "--quiet",
                                           "--out", str(tmp_path / "g.mp4")]),
    }
    for name, call in calls.items():
        assert call() == 2, name
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and len(err.splitlines()) == 1 and "__0_0.distcp" in err, (name, err)


def _damage_release_tensor(folder: str) -> str:
    """Flip one byte inside the data of the largest tensor of a one-file release; returns its name."""
    from magitrain.weights import SafetensorsFile

    path = os.path.join(folder, "model.safetensors")
    header_len = int.from_bytes(open(path, "rb").read(8), "little")
    header = json.loads(open(path, "rb").read(8 + header_len)[8:])
    name, entry = max(((k, v) for k, v in header.items() if k != "__metadata__"),
                      key=lambda kv: kv[1]["data_offsets"][1] - kv[1]["data_offsets"][0])
    start, end = entry["data_offsets"]
    data = bytearray(open(path, "rb").read())
    data[8 + header_len + (start + end) // 2] ^= 0x10
    open(path, "wb").write(bytes(data))
    SafetensorsFile(path)  # the header still parses: only the data changed
    return name


def test_release_sha256_checked_on_import_and_init(two_checkpoints, tmp_path, capsys):
    from magitrain.weights import WeightsError, load_run_weights

    rel = str(tmp_path / "rel")
    assert release.main(["export", two_checkpoints, rel, "--format", "magitrain", "--max-shard-size", "1GB"]) == 0
    name = _damage_release_tensor(rel)
    capsys.readouterr()
    assert release.main(["import", rel, str(tmp_path / "imported")]) == 2
    err = capsys.readouterr().err
    assert name in err and "SHA-256" in err
    assert _train(str(tmp_path / "ft"), f"ckpt.init_from={rel}", "train.steps=1") == 2
    assert name in capsys.readouterr().err
    with pytest.raises(WeightsError, match="damaged"):
        load_run_weights(rel)
    assert release.main(["verify", rel]) == 2  # verify keeps its own report


def test_checkpoint_without_checksums_still_loads(tmp_path):
    ck = Checkpointer(str(tmp_path))
    path = ck.save(1, {"w": torch.arange(4.0)}, "")
    os.remove(os.path.join(path, "sha256_00000.json"))
    marker = json.load(open(os.path.join(path, MARKER)))
    json.dump({k: marker[k] for k in ("step", "time", "world_size", "format")}, open(os.path.join(path, MARKER), "w"))
    assert verify_checkpoint(path) is False  # nothing to check
    assert torch.equal(Checkpointer.load(path)["w"], torch.arange(4.0))
    assert ck.resolve("auto") == path


def test_unreadable_marker_is_an_error_not_a_traceback(tmp_path):
    ck = Checkpointer(str(tmp_path))
    path = ck.save(1, {"w": torch.ones(2)}, "")
    open(os.path.join(path, MARKER), "w").write('{"step": 1, "ti')
    with pytest.raises(CheckpointError, match="COMPLETE"):
        verify_checkpoint(path)


def test_truncated_unverified_checkpoint_is_one_line(two_checkpoints, tmp_path, capsys):
    """Without checksums (an older checkpoint) a truncated file still gives one line and exit 2:
    DCP's CheckpointException is a BaseException, and its failures are (exception, stack) pairs."""
    run = str(tmp_path / "run")
    shutil.copytree(two_checkpoints, run)
    for _, path in Checkpointer(run).complete_checkpoints():
        os.remove(os.path.join(path, "sha256_00000.json"))
        marker = json.load(open(os.path.join(path, MARKER)))
        json.dump({"step": marker["step"], "world_size": 1}, open(os.path.join(path, MARKER), "w"))
        data = os.path.join(path, "tensors", "__0_0.distcp")
        os.truncate(data, os.path.getsize(data) // 2)
    calls = {
        "export": lambda: release.main(["export", run, str(tmp_path / "rel")]),
        "init_from": lambda: _train(str(tmp_path / "init"), f"ckpt.init_from={run}", "train.steps=1"),
        "generate": lambda: generate.main(["--ckpt", run, "--chunks", "1", "--prompt", "x", "--quiet",
                                           "--out", str(tmp_path / "g.mp4")]),
        "resume": lambda: _train(run, "ckpt.resume=auto", "train.steps=6"),
    }
    for name, call in calls.items():
        assert call() == 2, name
        err = [l for l in capsys.readouterr().err.strip().splitlines() if "Warning" not in l and "return func" not in l]
        assert len(err) == 1 and err[0].startswith("error:") and "StackSummary" not in err[0], (name, err)
