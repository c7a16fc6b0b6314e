"""A dead rank: kill -9 one of two training processes mid-run; the survivor must exit within
``parallel.timeout_s`` with an error that names the lost rank (not hang, not a raw gloo trace).

The two ranks are launched the way torchrun does it (environment variables, one
``python -m magitrain.train`` each), so the whole path is exercised: gloo's error, the
trainer's :func:`~magitrain.parallel.mesh.report_lost_ranks`, ``main``'s exit code.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow  # two trainer processes: ~20 s on an idle 2-core machine, more when loaded

TIMEOUT_S = 20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps_logged(run_dir) -> int:
    try:
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return sum(1 for line in f if json.loads(line).get("step"))
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_killed_rank_is_named_and_survivor_exits(tmp_path):
    run_dir = str(tmp_path / "run")
    port = _free_port()
    cmd = [sys.executable, "-m", "magitrain.train", "--config", os.path.join(REPO, "configs", "tiny.yaml"),
           f"run.dir={run_dir}", "parallel.dp=2", f"parallel.timeout_s={TIMEOUT_S}", "train.steps=100000",
           "ckpt.every=0", "log.progress=false", "log.tensorboard=false", "data.batch_size=2"]
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    survivor, victim = procs
    try:
        deadline = time.monotonic() + 120
        while _steps_logged(run_dir) < 2:  # mid-training: rank 0 has logged two steps
            assert survivor.poll() is None and victim.poll() is None, "training stopped before the kill"
            assert time.monotonic() < deadline, "training did not start within 120 s"
            time.sleep(0.2)
        victim.send_signal(signal.SIGKILL)
        killed_at = time.monotonic()
        _, err = survivor.communicate(timeout=TIMEOUT_S + 30)  # a hang fails here, bounded
        elapsed = time.monotonic() - killed_at
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    print(f"survivor exited {elapsed:.1f} s after the kill, rc {survivor.returncode}; stderr tail:\n{err[-600:]}")
    assert elapsed < TIMEOUT_S, elapsed
    assert survivor.returncode == 2, err[-2000:]
    assert "lost: rank 1 (dp 1, cp 0, tp 0)" in err, err[-2000:]
