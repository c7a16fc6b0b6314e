"""Issue 21: a run directory belongs to one run, and bad input is one line and exit code 2.

- a fresh start in a folder with checkpoints is refused (naming ckpt.resume=auto); run.overwrite
  moves the old run aside intact;
- two trainers on one run dir: the second exits 2 naming the holder, the first run's files intact;
  a stale lock (dead pid, or another host that stopped touching it) is taken over;
- pruning removes only this run's lineage;
- a torn last line of metrics.jsonl is dropped on resume;
- config changes at resume are listed and refused unless safe or allowed; a resume past
  train.steps says so;
- the listed bad inputs give one ``error:`` line and exit 2; the stage summary counts every skip.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import traceback

import pytest
import torch
from conftest import REPO

from magitrain import generate, train
from magitrain.checkpoint import Checkpointer

LOCK = "run.lock"

TINY = os.path.join(REPO, "configs", "tiny.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false"]


def _train(run_dir, *overrides, config=TINY) -> int:
    return train.main(["--config", config, f"run.dir={run_dir}", *QUIET, *overrides])


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    lines = [l for l in err.splitlines() if "UserWarning" not in l and "return func" not in l]
    assert len(lines) == 1 and lines[0].startswith("error: "), err[-2000:]
    return lines[0]


def _snapshot(folder) -> dict:
    out = {}
    for root, _, names in os.walk(folder):
        for n in names:
            p = os.path.join(root, n)
            out[os.path.relpath(p, folder)] = open(p, "rb").read()
    return out


# --- the run dir belongs to one run ----------------------------------------------------------------

def test_fresh_start_in_a_run_dir_with_checkpoints(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _train(run, "train.steps=4", "ckpt.every=2") == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert _train(run, "train.steps=2") == 2  # forgot ckpt.resume=auto
    assert "ckpt.resume=auto" in _one_error_line(capsys)
    assert _snapshot(run) == before  # nothing of the old run changed
    assert _train(run, "train.steps=2", "run.overwrite=true") == 0
    moved = [n for n in os.listdir(tmp_path) if n.startswith("run.replaced-")]
    assert len(moved) == 1 and _snapshot(tmp_path / moved[0]) == before  # moved aside, byte for byte
    assert [s for s, _ in Checkpointer(run).complete_checkpoints()] == [2]


def _wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_second_trainer_on_the_same_run_dir_exits_2(tmp_path, capsys):
    run = str(tmp_path / "run")
    first = subprocess.Popen([sys.executable, "-m", "magitrain.train", "--config", TINY, f"run.dir={run}", *QUIET,
                              "train.steps=100000", "ckpt.every=2", "ckpt.keep_last=100"],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: Checkpointer(run).complete_checkpoints(), 120, "the first trainer's first checkpoint")
        assert _train(run, "train.steps=2", "ckpt.resume=auto") == 2
        err = _one_error_line(capsys)
        assert f"pid {first.pid}" in err and socket.gethostname() in err and "in use" in err
    finally:
        first.send_signal(signal.SIGTERM)  # the first run saves and exits
        out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == list(range(1, len(steps) + 1))  # one writer, not interleaved
    from magitrain.checkpoint import verify_checkpoint

    for _, path in Checkpointer(run).complete_checkpoints():
        assert verify_checkpoint(path)
    assert not os.path.exists(os.path.join(run, LOCK))  # released at exit


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_locks_are_taken_over(tmp_path):
    from magitrain.run_dir import RunDirError, RunLock

    lock_path = tmp_path / LOCK
    lock_path.write_text(json.dumps({"host": socket.gethostname(), "pid": _dead_pid(), "time": 0}))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "no longer runs" in lock.took_over
    assert json.loads(lock_path.read_text())["pid"] == os.getpid()
    lock.release()
    assert not lock_path.exists()
    # another host: held while it touches the lock, stale once it stopped
    lock_path.write_text(json.dumps({"host": "node-that-is-not-here", "pid": 1, "time": time.time()}))
    with pytest.raises(RunDirError, match="node-that-is-not-here"):
        RunLock(str(tmp_path)).acquire()
    old = time.time() - 3600
    os.utime(lock_path, (old, old))
    lock = RunLock(str(tmp_path))
    lock.acquire()
    assert "has not touched it" in lock.took_over
    lock.release()


def test_pruning_keeps_other_lineages(tmp_path):
    old = Checkpointer(str(tmp_path), keep_last=2, run_id="old-run")
    for s in (100, 200):
        old.save(s, {"w": torch.full((2,), float(s))}, "")
    new = Checkpointer(str(tmp_path), keep_last=1, run_id="new-run")
    for s in (50, 60):
        new.save(s, {"w": torch.full((2,), float(s))}, "")
    assert [s for s, _ in new.complete_checkpoints()] == [60, 100, 200]
    assert new.path_for(60) and Checkpointer.marker(new.path_for(60))["run_id"] == "new-run"


def test_resume_inherits_the_lineage(tmp_path):
    run = str(tmp_path / "run")
    assert _train(run, "train.steps=2") == 0
    assert _train(run, "train.steps=4", "ckpt.resume=auto", "ckpt.keep_last=1") == 0
    done = Checkpointer(run).complete_checkpoints()
    assert [s for s, _ in done] == [4]  # step 2 was this run's lineage: pruned


# --- metrics.jsonl, config changes, resume past the end --------------------------------------------

def test_torn_metrics_line_is_dropped_on_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _train(run, "train.steps=2") == 0
    with open(os.path.join(run, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "lo')  # disk full mid-write
    assert _train(run, "train.steps=4", "ckpt.resume=auto") == 0
    assert "torn" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(os.path.join(run, "metrics.jsonl"))]
    assert steps == [1, 2, 3, 4]


def test_config_change_at_resume(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _train(run, "train.steps=2") == 0
    saved = open(os.path.join(run, "config.yaml")).read()
    capsys.readouterr()
    assert _train(run, "train.steps=4", "ckpt.resume=auto", "train.seed=7", "optim.lr=0.001") == 2
    err = _one_error_line(capsys)
    assert "train.seed: 0 -> 7" in err and "optim.lr: 0.003 -> 0.001" in err and "allow_config_change" in err
    assert open(os.path.join(run, "config.yaml")).read() == saved  # not overwritten
    # safe keys (length, logging, checkpoint cadence) need nothing, and are listed
    assert _train(run, "train.steps=3", "ckpt.resume=auto", "log.every=2", "ckpt.every=3") == 0
    out = capsys.readouterr().out
    assert "log.every: 1 -> 2" in out and "train.steps: 2 -> 3" in out
    assert _train(run, "train.steps=4", "ckpt.resume=auto", "train.seed=7", "ckpt.allow_config_change=true") == 0
    assert "train.seed: 0 -> 7" in capsys.readouterr().out


def test_resume_past_train_steps_says_so(tmp_path, capsys):
    run = str(tmp_path / "run")
    assert _train(run, "train.steps=4") == 0
    capsys.readouterr()
    assert _train(run, "train.steps=2", "ckpt.resume=auto") == 0
    assert "nothing to train" in capsys.readouterr().out


# --- one line and exit code 2 ----------------------------------------------------------------------

@pytest.mark.parametrize("case", ["yaml_syntax", "config_dir", "yaml_list", "run_dir_file", "lr", "betas"])
def test_train_bad_input_is_one_line(tmp_path, capsys, case):
    config, overrides = TINY, [f"run.dir={tmp_path}/run", "train.steps=1"]
    if case == "yaml_syntax":
        config = str(tmp_path / "bad.yaml")
        open(config, "w").write("run: [unclosed\n")
    elif case == "config_dir":
        config = str(tmp_path)
    elif case == "yaml_list":
        config = str(tmp_path / "list.yaml")
        open(config, "w").write("- 1\n- 2\n")
    elif case == "run_dir_file":
        open(tmp_path / "afile", "w").write("x")
        overrides[0] = f"run.dir={tmp_path}/afile"
    elif case == "lr":
        overrides.append("optim.lr=-1")
    elif case == "betas":
        overrides.append("optim.betas=[2.0,-1]")
    assert train.main(["--config", config, *QUIET, *overrides]) == 2
    _one_error_line(capsys)


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), ValueError("bad sample shape")])
def test_errors_during_training_are_one_line(tmp_path, capsys, monkeypatch, error):
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "train_step", fail)
    assert _train(str(tmp_path / "run"), "train.steps=2") == 2
    assert str(error.args[-1]) in _one_error_line(capsys)


def test_dcp_failures_are_named_not_tuples():
    import torch.distributed.checkpoint as dcp

    from magitrain.checkpoint import _reason

    e = dcp.CheckpointException("load", {0: (OSError(5, "Input/output error"), traceback.StackSummary())})
    assert _reason(e) == "rank 0: OSError: Input/output error"
    assert train.one_line(e) == "rank 0: OSError: Input/output error"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    run = str(tmp_path_factory.mktemp("gen") / "run")
    assert _train(run, "train.steps=2") == 0
    return run


@pytest.mark.parametrize("flags", [["--steps", "0"], ["--height", "0"], ["--cfg-scale", "nan"],
                                   ["--history-scale", "inf"], ["--chunks", "0"]])
def test_generate_rejects_silently_wrong_values(small_run, tmp_path, capsys, flags):
    args = ["--ckpt", small_run, "--chunks", "1", "--prompt", "x", "--quiet", "--out", str(tmp_path / "g.mp4")]
    assert generate.main(args + flags) == 2
    _one_error_line(capsys)
    assert not os.path.exists(tmp_path / "g.npy")


def test_generate_file_errors_are_one_line(small_run, tmp_path, capsys):
    open(tmp_path / "afile", "w").write("x")
    base = ["--ckpt", small_run, "--chunks", "1", "--prompt", "x", "--quiet"]
    assert generate.main(base + ["--out", str(tmp_path / "afile" / "g.mp4")]) == 2  # FileExistsError
    _one_error_line(capsys)
    os.makedirs(tmp_path / "adir.mp4")
    assert generate.main(base + ["--out", str(tmp_path / "adir.mp4")]) == 2
    _one_error_line(capsys)
    assert generate.main(["--ckpt", str(tmp_path), "--chunks", "1", "--prompt", "x", "--out", str(tmp_path / "o.mp4")]) == 2
    _one_error_line(capsys)  # not a checkpoint


def test_dispatch_cli_huge_mask_is_one_line(tmp_path, capsys):
    from magitrain.parallel.dispatch import main

    mask = tmp_path / "mask.json"
    mask.write_text(json.dumps({"total_seqlen": 10 ** 12, "slices": [[0, 10 ** 12, 0, 10 ** 12, "full"]]}))
    assert main(["--mask", str(mask), "--cp", "2", "--chunk-size", "16"]) == 2
    assert "chunk" in _one_error_line(capsys)


def test_stage_summary_counts_every_skip(tmp_path):
    from magitrain.perf import StageSummary

    stages = StageSummary(str(tmp_path), 1e12, True, skipped_before=0)
    base = {"step_time_s": 1.0, "tokens_per_s": 10.0, "stage": "a"}
    for step, skipped in ((1, 3), (2, 5)):
        stages.update({**base, "step": step, "data_skipped": skipped})
    for step, skipped in ((3, 6), (4, 9)):
        stages.update({**base, "step": step, "data_skipped": skipped, "stage": "b"})
    stages.finish()
    rows = [json.loads(line) for line in open(tmp_path / "stages.jsonl")]
    assert [r["data_skipped"] for r in rows] == [5, 4]  # metrics: 5 after stage a, 9 = 5 + 4 after b
