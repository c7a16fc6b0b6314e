"""launch/slurm.sh: argument handling (fake srun/scontrol, fast) and real single-node SLURM jobs.

The real-SLURM tests need Debian's slurm-wlm + munge. If the daemons are not running and we are
root, the module starts a private cluster with launch/ci_slurm.sh and stops it afterwards;
without the packages the tests skip with the reason. Both jobs train configs/tiny.yaml with
dp=2 on one node; the second gets the warning signal mid-training (`scancel --signal=USR1
--batch`), must checkpoint, requeue itself, resume, and end with exactly the losses of the first.
"""

import json
import os
import re
import shutil
import stat
import subprocess
import time

import pytest
from conftest import REPO

SCRIPT = os.path.join(REPO, "launch", "slurm.sh")
CI_SLURM = os.path.join(REPO, "launch", "ci_slurm.sh")
CI_CONF = os.path.join(os.environ.get("MAGITRAIN_SLURM_DIR", "/tmp/magitrain-slurm"), "slurm.conf")
STEPS = 40  # enough steps after the second that USR1 lands mid-run on a fast host (at 10, a run once finished first)


# ------------------------------------------------------------------------------------------
# The script's argument handling, with srun and scontrol replaced by recorders
# ------------------------------------------------------------------------------------------

FAKE_SRUN = """#!/bin/bash
printf '%s\\0' "$@" > "$FAKE_OUT"
"""
FAKE_SCONTROL = """#!/bin/bash
if [ "$1 $2" = "show hostnames" ]; then printf 'node-a\\nnode-b\\n'; else echo "scontrol $*" >> "$FAKE_OUT.scontrol"; fi
"""


def _write_exe(path, text):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR)


def run_script_with_fakes(tmp_path, args, **env_extra):
    """Run slurm.sh as a 2-node, 8-GPU job would; return (rc, torchrun argv after ``-m``)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _write_exe(bin_dir / "srun", FAKE_SRUN)
    _write_exe(bin_dir / "scontrol", FAKE_SCONTROL)
    out = tmp_path / "srun_args"
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_OUT": str(out),
           "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "exp", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_NODELIST": "node-[a-b]", "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_PER_TASK": "64",
           "RUNS_ROOT": str(tmp_path / "runs"), **env_extra}
    env.pop("NPROC_PER_NODE", None)
    env.pop("OMP_NUM_THREADS", None)
    proc = subprocess.run(["bash", SCRIPT, *args], cwd=REPO, env=env, capture_output=True, text=True, check=False, timeout=60)
    if proc.returncode != 0:
        return proc.returncode, None, proc.stderr
    argv = out.read_text().split("\0")[:-1]
    return 0, argv[argv.index("magitrain-node") + 1:], proc.stdout


def test_script_builds_one_torchrun_per_node(tmp_path):
    rc, cmd, _ = run_script_with_fakes(tmp_path, ["configs/tiny.yaml", "parallel.dp=16", "train.steps=5"])
    assert rc == 0
    assert cmd[1:4] == ["-m", "torch.distributed.run", "--nnodes=2"]
    assert "--nproc-per-node=8" in cmd
    assert "--rdzv-backend=c10d" in cmd
    assert f"--rdzv-endpoint=node-a:{20000 + 4242}" in cmd
    assert "--rdzv-id=4242" in cmd
    train = cmd[cmd.index("magitrain.train") + 1:]
    run_dir = str(tmp_path / "runs" / "exp")
    assert train == ["--config", "configs/tiny.yaml", "log.progress=false", "parallel.dp=16", "train.steps=5",
                     f"run.dir={run_dir}", "ckpt.resume=auto"]
    assert os.path.isdir(os.path.join(run_dir, "logs"))


def test_script_pinned_checkpoint_only_seeds_a_fresh_run(tmp_path):
    run_dir = tmp_path / "r"
    args = ["configs/tiny.yaml", f"run.dir={run_dir}", "ckpt.resume=/ckpts/step_00000100"]
    _, cmd, _ = run_script_with_fakes(tmp_path, args)
    train = cmd[cmd.index("magitrain.train") + 1:]
    assert train[-1] == "ckpt.resume=/ckpts/step_00000100"  # the pin, nothing after it
    # once the run has a complete checkpoint of its own (a requeued start), resume from it
    (run_dir / "checkpoints" / "step_00000007").mkdir(parents=True)
    (run_dir / "checkpoints" / "step_00000007" / "COMPLETE").write_text("")
    _, cmd, _ = run_script_with_fakes(tmp_path, args, SLURM_RESTART_COUNT="1")
    assert cmd[-1] == "ckpt.resume=auto"


def test_script_array_sweep_lines(tmp_path):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("optim.lr=1e-4 train.steps=3\noptim.lr=3e-4 train.steps=4\n")
    _, cmd, _ = run_script_with_fakes(tmp_path, ["configs/tiny.yaml"], SLURM_ARRAY_TASK_ID="1",
                                      SWEEP_FILE=str(sweep))
    train = cmd[cmd.index("magitrain.train") + 1:]
    assert "optim.lr=3e-4" in train and "train.steps=4" in train
    assert f"run.dir={tmp_path / 'runs' / 'exp_1'}" in train
    rc, _, err = run_script_with_fakes(tmp_path, ["configs/tiny.yaml"], SLURM_ARRAY_TASK_ID="5",
                                       SWEEP_FILE=str(sweep))
    assert rc == 2 and "no line 6" in err


def test_script_rejects_missing_config(tmp_path):
    rc, _, err = run_script_with_fakes(tmp_path, ["configs/nope.yaml"])
    assert rc == 2 and "config file not found: configs/nope.yaml" in err
    rc, _, err = run_script_with_fakes(tmp_path, [])
    assert rc == 2 and "usage" in err


# ------------------------------------------------------------------------------------------
# A real SLURM
# ------------------------------------------------------------------------------------------

def _ping(env) -> bool:
    try:
        out = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, check=False, timeout=30)
    except subprocess.TimeoutExpired:
        return False
    return "UP" in out.stdout


@pytest.fixture(scope="module")
def slurm_env():
    """Environment for SLURM client commands; starts (and later stops) a private cluster if needed."""
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM not installed (apt-get install slurm-wlm munge; .ci/run does this)")
    env = dict(os.environ)
    if "SLURM_CONF" not in env and os.path.exists(CI_CONF):
        env["SLURM_CONF"] = CI_CONF
    started = False
    if not _ping(env):
        if "SLURM_CONF" in os.environ or os.geteuid() != 0:
            pytest.skip("no SLURM controller answers and we cannot start one (needs root)")
        subprocess.run(["bash", CI_SLURM, "start"], check=True, timeout=300)
        env["SLURM_CONF"] = CI_CONF
        started = True
    yield env
    if started:
        subprocess.run(["bash", CI_SLURM, "stop"], check=False, timeout=60)


def submit(env, tmp_path, name, extra=()):
    out = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--gpus-per-node=0", "--cpus-per-task=2",
         "--time=10", f"--chdir={REPO}", "--export=ALL,NPROC_PER_NODE=2", f"--output={tmp_path}/%x-%j.out",
         SCRIPT, "configs/tiny.yaml", "parallel.dp=2", f"train.steps={STEPS}", f"run.dir={tmp_path}/run",
         "log.tensorboard=false", *extra],
        env=env, capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip().split(";")[0]


def job_info(env, job) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True, check=False, timeout=30)
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


def wait_for(env, job, tmp_path, done, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        info = job_info(env, job)
        if done(info):
            return info
        if info.get("JobState") in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            break
        time.sleep(1)
    subprocess.run(["scancel", job], env=env, check=False, timeout=30)
    pytest.fail(f"job {job} did not get there: {job_info(env, job)}\n{read_logs(tmp_path)}")


def read_logs(tmp_path) -> str:
    paths = [p for p in tmp_path.glob("*.out")] + list((tmp_path / "run" / "logs").glob("*.log"))
    return "\n".join(f"== {p}\n{p.read_text()}" for p in paths)


def metrics(tmp_path) -> list[dict]:
    path = tmp_path / "run" / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.fixture(scope="module")
def uninterrupted(slurm_env, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("slurm_plain")
    job = submit(slurm_env, tmp, "mt-plain")
    info = wait_for(slurm_env, job, tmp, lambda i: i.get("JobState") == "COMPLETED")
    return tmp, info


@pytest.mark.slow
def test_sbatch_tiny_run_finishes(uninterrupted):
    tmp, info = uninterrupted
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    rows = metrics(tmp)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(r["loss"] is not None and 0 < r["loss"] < 10 for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert (tmp / "run" / "checkpoints" / f"step_{STEPS:08d}" / "COMPLETE").exists()
    node_logs = list((tmp / "run" / "logs").glob("mt-plain-*-node0.log"))
    assert len(node_logs) == 1 and f"step_{STEPS:08d}" in node_logs[0].read_text()
    assert "1 node(s) x 2 process(es)" in read_logs(tmp)


@pytest.mark.slow
def test_usr1_checkpoints_requeues_and_resumes(slurm_env, uninterrupted, tmp_path):
    job = submit(slurm_env, tmp_path, "mt-requeue")
    t0 = time.time()
    while len(metrics(tmp_path)) < 2:  # mid-training: a couple of steps done
        assert time.time() - t0 < 240, read_logs(tmp_path)
        assert job_info(slurm_env, job).get("JobState") in ("PENDING", "RUNNING"), read_logs(tmp_path)
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True, timeout=30)
    info = wait_for(slurm_env, job, tmp_path, lambda i: i.get("JobState") == "COMPLETED" and i["Restarts"] == "1")
    assert info["ExitCode"] == "0:0"

    logs = read_logs(tmp_path)
    saved = re.search(r"stop requested: saved step (\d+)", logs)
    resumed = re.search(r"resumed from \S+step_(\d+) at step (\d+)", logs)
    assert saved and resumed, logs
    k = int(saved.group(1))
    assert 2 <= k < STEPS and int(resumed.group(1)) == int(resumed.group(2)) == k
    assert "requeueing job" in logs and "restart 1:" in logs

    rows, reference = metrics(tmp_path), metrics(uninterrupted[0])
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in reference], rel=1e-6, abs=1e-9)
