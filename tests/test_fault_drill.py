"""Fault drill: the tiny model on 2 ranks launched by torchrun, with real faults.

- kill -9 of one rank mid-training: the survivor stops within ``parallel.timeout_s`` naming the
  lost rank; rerunning with ``ckpt.resume=auto`` continues from the last complete checkpoint
  and its loss curve equals the uninterrupted run's;
- kill -9 of a rank in the middle of writing a checkpoint: the previous checkpoint stays
  complete and loadable, ``auto`` picks it, and the resumed run again matches;
- SIGTERM to the launcher: both ranks save the same step and exit 0;
- a shard truncated between runs: counted skips and the run goes on; a missing shard: a clear
  start-up error;
- disk full while saving (the checkpoint writer raises ENOSPC on one rank): a clear error on
  every rank, the previous checkpoint intact.

Each rank runs a small entry script (written by :func:`entry_script`) that records its pid
and exit code and, when ``DRILL_FAULT`` says so, makes the checkpoint writer fail at a chosen
step: SIGKILL after writing its part, or ``OSError(ENOSPC)`` before. The uninterrupted
reference run (CP=2, 16 steps, a checkpoint every 4) is shared by the tests that compare with it.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO

from magitrain.checkpoint import Checkpointer

TIMEOUT_S = 20  # parallel.timeout_s of every drill run
STEPS, EVERY = 16, 4
COMMON = ["log.progress=false", "log.tensorboard=false", "parallel.cp=2", f"parallel.timeout_s={TIMEOUT_S}",
          f"train.steps={STEPS}", f"ckpt.every={EVERY}", "ckpt.keep_last=10"]

ENTRY = r'''
import errno, os, signal, sys

drill, rank = os.environ["DRILL_DIR"], int(os.environ["RANK"])
with open(os.path.join(drill, f"pid_{rank}"), "w") as f:
    f.write(str(os.getpid()))
fault = os.environ.get("DRILL_FAULT", "")
if fault:  # "kill:STEP:RANK" or "enospc:STEP:RANK": the checkpoint writer of that step fails there
    kind, step, who = fault.split(":")
    import magitrain.checkpoint as ckpt

    class FaultyWriter(ckpt.dcp.FileSystemWriter):
        def write_data(self, plan, planner):
            if f"step_{int(step):08d}" not in str(self.path) or rank != int(who):
                return super().write_data(plan, planner)
            if kind == "enospc":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
            super().write_data(plan, planner).wait()  # this rank's part is on disk, then it dies
            os.kill(os.getpid(), signal.SIGKILL)

    ckpt.dcp.FileSystemWriter = FaultyWriter
from magitrain.train import main

rc = main(sys.argv[1:])
with open(os.path.join(drill, f"rc_{rank}"), "w") as f:
    f.write(str(rc))
sys.exit(rc)
'''


def entry_script(folder) -> str:
    path = os.path.join(folder, "drill_entry.py")
    if not os.path.exists(path):
        with open(path, "w") as f:
            f.write(ENTRY)
    return path


class Launch:
    """``torchrun --standalone --nproc_per_node=N drill_entry.py --config tiny.yaml OVERRIDES``."""

    def __init__(self, folder, run_dir, overrides, fault="", nproc=2):
        self.drill = os.path.join(folder, f"drill_{os.path.basename(run_dir)}_{time.monotonic_ns()}")
        os.makedirs(self.drill)
        self.log = os.path.join(self.drill, "output.log")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               entry_script(folder), "--config", os.path.join(REPO, "configs", "tiny.yaml"),
               f"run.dir={run_dir}", *COMMON, *overrides]
        env = dict(os.environ, DRILL_DIR=self.drill, DRILL_FAULT=fault, OMP_NUM_THREADS="1",
                   PYTHONWARNINGS="ignore:FSDP2-wrapped module:UserWarning,ignore:Slicing a flattened dim:UserWarning")
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.run_dir = run_dir

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # the launcher; its workers die with it
            self.proc.wait()
            raise AssertionError(f"the run did not finish within {timeout} s:\n{self.output()[-3000:]}") from None

    def output(self) -> str:
        with open(self.log) as f:
            return f.read()

    def _read(self, name: str):
        path = os.path.join(self.drill, name)
        return int(open(path).read()) if os.path.exists(path) else None

    def rc(self, rank: int):
        """The rank's exit code from ``main`` (None: it never returned, e.g. killed)."""
        return self._read(f"rc_{rank}")

    def pid(self, rank: int):
        return self._read(f"pid_{rank}")

    def wait_until(self, condition, timeout: float = 240) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert self.proc.poll() is None, f"the run ended early:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"condition not met within {timeout} s:\n{self.output()[-3000:]}"
            time.sleep(0.05)


def metrics(run_dir) -> list[dict]:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except (FileNotFoundError, json.JSONDecodeError):
        return []


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir)}


def complete_steps(run_dir) -> list[int]:
    return [s for s, _ in Checkpointer(run_dir).complete_checkpoints()]


def model_tensors(checkpoint: str) -> dict[str, torch.Tensor]:
    return Checkpointer.load(checkpoint)["model"]


def assert_same_curve(run_dir, reference_dir, after: int) -> None:
    got, want = losses(run_dir), losses(reference_dir)
    steps = [s for s in want if s > after]
    assert steps and all(s in got for s in steps), (sorted(got), after)
    worst = max(abs(got[s] - want[s]) / abs(want[s]) for s in steps)
    print(f"steps {steps[0]}..{steps[-1]}: max relative loss difference to the uninterrupted run {worst:.2e}")
    assert worst <= 1e-6, {s: (got[s], want[s]) for s in steps}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    """The uninterrupted run every interrupted one is compared with."""
    folder = tmp_path_factory.mktemp("drill_reference")
    run = Launch(folder, str(folder / "run"), [])
    assert run.wait(300) == 0, run.output()[-3000:]
    assert complete_steps(run.run_dir) == list(range(EVERY, STEPS + 1, EVERY))
    return run.run_dir


@pytest.mark.slow
def test_killed_rank_is_named_and_auto_resume_matches(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    run = Launch(tmp_path, run_dir, [])
    run.wait_until(lambda: complete_steps(run_dir) and max(complete_steps(run_dir)) >= 8
                   and len(metrics(run_dir)) >= 9 and run.pid(1) is not None)
    os.kill(run.pid(1), signal.SIGKILL)
    killed_at = time.time()
    run.wait(TIMEOUT_S + 60)
    out = run.output()
    assert run.rc(1) is None and run.rc(0) == 2, out[-3000:]
    stopped_after = os.path.getmtime(os.path.join(run.drill, "rc_0")) - killed_at
    print(f"rank 0 stopped {stopped_after:.1f} s after the kill")
    assert stopped_after < TIMEOUT_S, out[-3000:]
    assert "lost: rank 1 (dp 0, cp 1, tp 0)" in out, out[-3000:]

    last = max(complete_steps(run_dir))
    resumed = Launch(tmp_path, run_dir, ["ckpt.resume=auto"])
    assert resumed.wait(300) == 0, resumed.output()[-3000:]
    assert f"resumed from {Checkpointer(run_dir).path_for(last)} at step {last}" in resumed.output()
    assert_same_curve(run_dir, reference, after=last)


@pytest.mark.slow
def test_kill_during_checkpoint_save_keeps_previous(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    run = Launch(tmp_path, run_dir, [], fault="kill:8:1")  # rank 1 dies after writing its part of step 8
    run.wait(TIMEOUT_S + 120)
    out = run.output()
    assert run.rc(1) is None and run.rc(0) == 2, out[-3000:]
    assert "lost: rank 1" in out, out[-3000:]
    ck = Checkpointer(run_dir)
    assert complete_steps(run_dir) == [4]
    assert os.path.isdir(os.path.join(ck.root, ".tmp_step_00000008"))  # the torn save: no marker, ignored
    assert ck.resolve("auto") == ck.path_for(4)
    got, want = model_tensors(ck.path_for(4)), model_tensors(Checkpointer(reference).path_for(4))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)

    resumed = Launch(tmp_path, run_dir, ["ckpt.resume=auto"])
    assert resumed.wait(300) == 0, resumed.output()[-3000:]
    assert f"resumed from {ck.path_for(4)} at step 4" in resumed.output()
    assert_same_curve(run_dir, reference, after=4)


@pytest.mark.slow
def test_disk_full_while_saving_is_a_clear_error(tmp_path, reference):
    run_dir = str(tmp_path / "run")
    run = Launch(tmp_path, run_dir, [], fault="enospc:8:1")
    rc = run.wait(TIMEOUT_S + 120)
    out = run.output()
    assert rc != 0 and 2 in (run.rc(0), run.rc(1)) and {run.rc(0), run.rc(1)} <= {2, None}, out[-3000:]
    assert "could not write checkpoint" in out and "No space left on device" in out, out[-3000:]
    ck = Checkpointer(run_dir)
    assert complete_steps(run_dir) == [4] and ck.resolve("auto") == ck.path_for(4)
    assert not os.path.exists(os.path.join(ck.root, ".tmp_step_00000008"))  # the failed save is cleaned up
    got, want = model_tensors(ck.path_for(4)), model_tensors(Checkpointer(reference).path_for(4))
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_sigterm_to_launcher_saves_agreed_step_and_exits_zero(tmp_path):
    run_dir = str(tmp_path / "run")
    run = Launch(tmp_path, run_dir, ["train.steps=100000", "ckpt.every=0"])
    run.wait_until(lambda: len(metrics(run_dir)) >= 3)
    run.proc.send_signal(signal.SIGTERM)
    launcher_rc = run.wait(90)
    out = run.output()
    print(f"launcher exit code after SIGTERM: {launcher_rc}")
    assert run.rc(0) == 0 and run.rc(1) == 0, out[-3000:]
    steps = complete_steps(run_dir)
    assert len(steps) == 1 and steps[0] >= 3, steps  # one checkpoint: both ranks saved the same step
    saved = Checkpointer(run_dir).path_for(steps[0])
    assert all(os.path.exists(os.path.join(saved, f"rank_{r:05d}.json")) for r in range(2))
    assert f"stop requested: saved step {steps[0]}, exiting" in out
    assert metrics(run_dir)[-1]["step"] == steps[0]


def demo_shards(tmp_path) -> list[str]:
    """16 demo clips in 4 latent shards for the tiny model; the data overrides that read them
    (cp=2, dp=1: both ranks read every shard, rank 0 logs the counts)."""
    from magitrain import demo
    from magitrain.config import load_config

    shards = str(tmp_path / "shards")
    demo.make_media(str(tmp_path / "media"), 16)
    demo.build_shards(str(tmp_path / "media"), shards, load_config(os.path.join(REPO, "configs", "tiny.yaml")),
                      16, shards=4)
    # named one by one (a brace list): a folder spec would take whatever *.tar are left in it
    return ["data.source=webdataset", f"data.shards={shards}/shard-{{000000..000003}}.tar",
            "data.max_bad_fraction=0.5"]


def truncate(path: str) -> None:
    """Cut a shard mid-sample: a truncated tar."""
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2 + 100)


@pytest.mark.slow
def test_corrupt_shard_is_skipped_and_missing_shard_fails_at_start(tmp_path):
    data = demo_shards(tmp_path)
    shards = os.path.dirname(data[1].split("=", 1)[1])
    first = Launch(tmp_path, str(tmp_path / "first"), data + ["train.steps=3"])
    assert first.wait(300) == 0, first.output()[-3000:]
    assert metrics(str(tmp_path / "first"))[-1]["data_skipped"] == 0

    truncate(os.path.join(shards, "shard-000001.tar"))  # between runs
    run_dir = str(tmp_path / "second")
    second = Launch(tmp_path, run_dir, data + ["train.steps=10", "ckpt.every=5"])
    assert second.wait(300) == 0, second.output()[-3000:]
    last = metrics(run_dir)[-1]
    assert last["step"] == 10 and last["data_skipped"] > 0, last
    assert "data: skipped shard=" in second.output() and "shard-000001.tar" in second.output()

    os.remove(os.path.join(shards, "shard-000002.tar"))
    third = Launch(tmp_path, run_dir, data + ["train.steps=20", "ckpt.resume=auto"])
    assert third.wait(120) != 0
    out = third.output()
    # every rank that got this far says why (torchrun stops the slower one once the first exits)
    assert 2 in (third.rc(0), third.rc(1)) and {third.rc(0), third.rc(1)} <= {2, None}, out[-3000:]
    assert "error: shard not found:" in out and "shard-000002.tar" in out, out[-3000:]
    assert metrics(run_dir)[-1]["step"] == 10  # nothing trained


@pytest.mark.slow
def test_resume_after_shard_corruption_goes_on(tmp_path):
    """A shard damaged between runs: the resumed run counts the samples it lost as skips and goes on."""
    data = demo_shards(tmp_path)
    run_dir = str(tmp_path / "run")
    first = Launch(tmp_path, run_dir, data + ["train.steps=6", "ckpt.every=3"])
    assert first.wait(300) == 0, first.output()[-3000:]
    truncate(os.path.join(os.path.dirname(data[1].split("=", 1)[1]), "shard-000001.tar"))
    second = Launch(tmp_path, run_dir, data + ["train.steps=14", "ckpt.resume=auto"])
    assert second.wait(300) == 0, second.output()[-3000:]
    assert metrics(run_dir)[-1]["data_skipped"] > 0
