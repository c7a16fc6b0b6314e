"""Issue 14 defect 4: a hostile checkpoint cannot run code through DCP's pickled ``.metadata``.

A corpus of pickle gadgets (``os.system`` named through an importable module path, ``builtins.eval``
/ ``exec``, ``subprocess``, ``torch.load`` of a nested pickle, reduce calls nested inside allowed
classes) is written as the ``.metadata`` of a checkpoint whose checksums are recomputed to match (a
hostile checkpoint comes with valid checksums). Every path that opens a checkpoint must refuse it
with exit code 2 and without running anything: each gadget would create a marker file, and the
marker must not appear. A control run unpickles every gadget with plain ``pickle.loads`` in a
subprocess and checks that each marker *does* appear, so the corpus is live.
"""

from __future__ import annotations

import functools
import io
import json
import os
import pickle
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from magitrain.checkpoint import MARKER, Checkpointer, CheckpointError, SafeFileSystemReader

QUIET = ["log.progress=false", "log.tensorboard=false"]


def _su(text: str) -> bytes:
    data = text.encode()
    return b"\x8c" + bytes([len(data)]) + data  # SHORT_BINUNICODE


def _global4(module: str, name: str) -> bytes:
    return _su(module) + _su(name) + b"\x93"  # STACK_GLOBAL (protocol 4: dotted names resolve)


def _call(callable_ops: bytes, *args_ops: bytes) -> bytes:
    return callable_ops + b"(" + b"".join(args_ops) + b"tR"  # MARK args TUPLE REDUCE


def corpus(marker_dir: str) -> dict[str, bytes]:
    """name -> pickle bytes; unpickling gadget ``name`` creates ``marker_dir/name``."""
    def touch(name):
        return os.path.join(marker_dir, name)

    def shell(name):
        return _su(f"touch {touch(name)}")

    head = b"\x80\x04"
    g = {}
    g["os_system_via_dcp_metadata"] = head + _call(_global4("torch.distributed.checkpoint.metadata", "os.system"),
                                                   shell("os_system_via_dcp_metadata")) + b"."
    g["os_system_via_dcp_filesystem"] = head + _call(_global4("torch.distributed.checkpoint.filesystem", "os.system"),
                                                     shell("os_system_via_dcp_filesystem")) + b"."
    g["os_system_via_torch"] = head + _call(_global4("torch", "serialization.os.system"),
                                            shell("os_system_via_torch")) + b"."
    g["posix_system"] = head + _call(_global4("posix", "system"), shell("posix_system")) + b"."
    g["builtins_eval"] = head + _call(_global4("builtins", "eval"),
                                      _su(f"__import__('os').system('touch {touch('builtins_eval')}')")) + b"."
    g["builtins_exec"] = head + _call(_global4("builtins", "exec"),
                                      _su(f"open({touch('builtins_exec')!r}, 'w').close()")) + b"."
    g["subprocess_call"] = head + _call(_global4("subprocess", "check_call"),
                                        b"(" + _su("touch") + _su(touch("subprocess_call")) + b"l") + b"."
    inner = pickle.dumps(_Reduce(os.system, (f"touch {touch('torch_load_nested')}",)), protocol=2)
    unsafe_load = functools.partial(torch.load, weights_only=False)  # torch.load(BytesIO(pickle), weights_only=False)
    g["torch_load_nested"] = pickle.dumps(_Reduce(unsafe_load, (io.BytesIO(inner),)), protocol=4)
    # allowed classes with a gadget nested in their arguments
    g["nested_in_ordereddict"] = head + _call(
        _global4("collections", "OrderedDict"),
        b"]" + b"(" + b"(" + _su("k") + _call(_global4("os", "system"), shell("nested_in_ordereddict")) + b"t" + b"e"
    ) + b"."
    g["nested_in_metadata"] = head + _call(
        _global4("torch.distributed.checkpoint.metadata", "Metadata"),
        b"}" + _su("x") + _call(_global4("subprocess", "getoutput"), shell("nested_in_metadata")) + b"s") + b"."
    getattr_ = _global4("builtins", "getattr")
    os_module = _call(getattr_, _global4("torch.distributed.checkpoint", "metadata"), _su("os"))
    g["getattr_module"] = head + _call(_call(getattr_, os_module, _su("system")), shell("getattr_module")) + b"."
    # protocol 0 GLOBAL opcode (no dotted-name resolution there, but names must still be refused)
    g["proto0_global"] = (b"cos\nsystem\n(V" + f"touch {touch('proto0_global')}".encode() + b"\ntR.")
    return g


class _Reduce:
    def __init__(self, fn, args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run with one checkpoint (step 2), trained in this process."""
    from magitrain.train import main

    root = tmp_path_factory.mktemp("gadgets")
    run = str(root / "base")
    assert main(["--config", os.path.join(REPO, "configs", "tiny.yaml"), f"run.dir={run}", "train.steps=2", *QUIET]) == 0
    return run


def test_corpus_is_live(tmp_path):
    """Control: plain pickle.loads runs every gadget (so the refusals below mean something)."""
    gadgets = corpus(str(tmp_path))
    files = []
    for name, data in gadgets.items():
        (tmp_path / f"{name}.pkl").write_bytes(data)
        files.append(str(tmp_path / f"{name}.pkl"))
    code = ("import pickle, sys\nfor f in sys.argv[1:]:\n    try:\n        pickle.loads(open(f, 'rb').read())\n"
            "    except Exception as e:\n        print(f, type(e).__name__, e)\n")
    subprocess.run([sys.executable, "-c", code, *files], cwd=str(tmp_path), timeout=120, capture_output=True)
    ran = {n for n in gadgets if (tmp_path / n).exists()}
    assert ran == set(gadgets), f"gadgets that did not run under plain pickle: {sorted(set(gadgets) - ran)}"


def _rehash(ckpt: str) -> None:
    """Make the checkpoint's checksums match its (hostile) files, as an attacker would."""
    from magitrain.checkpoint import _marker_digest, _write_checksums, sha256_file

    marker_path = os.path.join(ckpt, MARKER)
    marker = json.load(open(marker_path))
    if "checksums" not in marker:
        return  # written before checksums existed
    _write_checksums(ckpt, 0)
    marker["checksums"] = {n: sha256_file(os.path.join(ckpt, n)) for n in marker["checksums"]}
    marker["marker_sha256"] = _marker_digest(marker)
    json.dump(marker, open(marker_path, "w"))


def _hostile_copy(trained: str, dest: str, payload: bytes) -> str:
    """A copy of the trained run whose checkpoint's ``.metadata`` is ``payload``; returns the run dir."""
    shutil.copytree(trained, dest)
    ckpt = Checkpointer(dest).latest()
    with open(os.path.join(ckpt, "tensors", ".metadata"), "wb") as f:
        f.write(payload)
    _rehash(ckpt)
    return dest


def _entry_points(trained: str, hostile: str, work: str):
    """(name, callable -> exit code) for every command that opens the hostile checkpoint."""
    from magitrain import generate, release, train

    tiny = os.path.join(REPO, "configs", "tiny.yaml")
    distill = os.path.join(REPO, "configs", "distill_tiny.yaml")
    ckpt = Checkpointer(hostile).latest()
    return [
        ("resume", lambda: train.main(["--config", tiny, f"run.dir={hostile}", "ckpt.resume=auto", "train.steps=4",
                                       *QUIET])),
        ("init_from", lambda: train.main(["--config", tiny, f"run.dir={work}/init", f"ckpt.init_from={hostile}",
                                          "train.steps=1", *QUIET])),
        ("distill_teacher", lambda: train.main(["--config", distill, f"run.dir={work}/distill",
                                                f"ckpt.init_from={trained}", f"distill.teacher={ckpt}",
                                                "train.steps=1", *QUIET])),
        ("generate", lambda: generate.main(["--ckpt", hostile, "--chunks", "1", "--prompt", "x", "--quiet",
                                            "--out", f"{work}/g.mp4"])),
        ("release_export", lambda: release.main(["export", hostile, f"{work}/release"])),
        ("checkpoint_load", lambda: _load_rc(ckpt)),
    ]


def _load_rc(ckpt: str) -> int:
    try:
        Checkpointer.load(ckpt)
    except CheckpointError:
        return 2
    return 0


def test_every_path_refuses_every_gadget(trained, tmp_path, capsys):
    gadgets = corpus(str(tmp_path / "markers"))
    os.makedirs(tmp_path / "markers")
    failures = []
    for name, payload in gadgets.items():
        hostile = _hostile_copy(trained, str(tmp_path / f"run_{name}"), payload)
        for path, call in _entry_points(trained, hostile, str(tmp_path / f"work_{name}")):
            rc = call()
            err = capsys.readouterr().err
            if (tmp_path / "markers" / name).exists():
                failures.append(f"{name} via {path}: RAN")
                os.remove(tmp_path / "markers" / name)
            elif rc != 2:
                failures.append(f"{name} via {path}: rc {rc}")
            elif path != "checkpoint_load" and "error:" not in err:
                failures.append(f"{name} via {path}: no one-line error ({err[-200:]!r})")
    assert not failures, "\n".join(failures)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_pickled_bytes_entries_are_refused(tmp_path):
    """DCP stores a non-tensor value as a pickle and reads it with ``torch.load(weights_only=False)``;
    our planner refuses such entries (the torch.load gadget of the issue)."""
    import warnings

    import torch.distributed.checkpoint as dcp

    from magitrain.checkpoint import SafeLoadPlanner

    marker = tmp_path / "ran"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"obj": _Evil(str(marker)), "w": torch.ones(2)}, storage_writer=dcp.FileSystemWriter(str(tmp_path / "t")),
                 no_dist=True)
        with pytest.raises((Exception, dcp.CheckpointException), match="refusing to unpickle"):
            dcp.load({"obj": None, "w": torch.zeros(2)}, storage_reader=SafeFileSystemReader(str(tmp_path / "t")),
                     planner=SafeLoadPlanner(), no_dist=True)
    assert not marker.exists()
