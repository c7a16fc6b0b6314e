"""Distributed / resumable latent precompute (``build_shards`` parts builds).

* 2 ranks (as array tasks in this process; under ``torchrun`` in the slow test) give the same samples as the classic one-process build (every field of every
  sample byte-equal, order aside), the same manifest counts, and disjoint parts (part p built by rank p % 2).
* Rank 0 of a 2-rank build killed with SIGKILL mid-part, then rerun as two array tasks (``--rank/--world-size``):
  the rerun encodes only the files of unfinished parts, clears the killed part's leftovers, the first task
  leaves the manifest to the last one, and the result again equals the one-process build.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import pytest
import torch
from conftest import REPO
from magitrain.data_pipeline.build_shards import main as build_shards
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.data_pipeline.media import encode_mp4
from PIL import Image

PART_FILES = 2
N_FILES = 12
BLOCK_AFTER = 2  # encodes per process before a blocking encoder hangs: its 1st part done, the 2nd begun


class BlockingPatch(PatchEncoder):
    """PatchEncoder that logs each encode to ``control/log-PID`` and, while ``control/block`` exists, hangs
    forever at its ``BLOCK_AFTER + 1``-th encode (so a kill lands mid-part)."""

    def __init__(self, channels: int, control: str):
        super().__init__(channels)
        self.control, self.count = control, 0

    def encode(self, video):
        if os.path.exists(os.path.join(self.control, "block")) and self.count >= BLOCK_AFTER:
            open(os.path.join(self.control, f"blocked-{os.getpid()}"), "w").close()
            while True:
                time.sleep(1)
        self.count += 1
        with open(os.path.join(self.control, f"log-{os.getpid()}"), "a") as f:
            f.write("x\n")
        return super().encode(video)


def blocking_patch(channels: int, weights: str) -> BlockingPatch:
    return BlockingPatch(channels, weights)


def _make_media(src: str) -> None:
    """12 files: videos and images, one broken file, key clashes within a part (a.mp4 / a.png -> a, a_1) and
    across parts (sub/p4.png, part 2 / sub_p4.png, part 4 -> sub_p4, sub_p4_1)."""
    os.makedirs(os.path.join(src, "sub"))
    g = torch.Generator().manual_seed(0)
    for i in range(4):
        video = torch.randint(0, 256, (8, 16, 16, 3), generator=g, dtype=torch.uint8)
        with open(os.path.join(src, "sub" if i % 2 else "", f"v{i}.mp4"), "wb") as f:
            f.write(encode_mp4(video, fps=8))
    for name in ["a", "p1", "p2", "p3", "sub/p4", "sub/p5", "sub_p4"]:
        img = torch.randint(0, 256, (16, 24, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(img.numpy()).save(os.path.join(src, f"{name}.png"))
        with open(os.path.join(src, f"{name}.txt"), "w") as f:
            f.write(f"caption of {name}")
    with open(os.path.join(src, "a.mp4"), "wb") as f:
        f.write(b"not a video")  # skipped, but it still takes key "a" first


def _samples(out: str) -> dict[str, dict]:
    by_key: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(out, "*.tar"))):
        with tarfile.open(path) as tf:
            for m in tf.getmembers():
                key, ext = m.name.split(".", 1)
                assert ext not in by_key.setdefault(key, {}), f"{key}.{ext} twice"
                by_key[key][ext] = tf.extractfile(m).read()
    return by_key


def _manifest(out: str) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        m = json.load(f)
    return {k: v for k, v in m.items() if k != "shards"} | {"shard_samples": sum(s["samples"] for s in m["shards"])}


FLAGS = ["--latent-encoder", "patch", "--text-encoder", "hash", "--part-files", str(PART_FILES), "--quiet"]


def _reference(tmp_path, src: str) -> str:
    ref = str(tmp_path / "one_process")
    assert build_shards([src, ref, *FLAGS]) == 0
    return ref


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([os.path.join(REPO, "tests"), os.environ.get("PYTHONPATH", "")])}


def _torchrun(src: str, out: str, *extra: str, **kw) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
           "-m", "magitrain.data_pipeline.build_shards", src, out, *FLAGS, *extra]
    return subprocess.Popen(cmd, env=_env(), cwd=REPO, start_new_session=True, **kw)


def _check_equal_and_disjoint(out: str, ref: str) -> None:
    expect, got = _samples(ref), _samples(out)
    assert len(expect) == N_FILES - 1 and {"a_1", "sub_p4_1"} <= set(expect)  # the broken file skipped
    assert got == expect
    assert _manifest(out) == _manifest(ref)
    for p in range(-(-N_FILES // PART_FILES)):
        with open(os.path.join(out, "parts", f"part-{p:06d}.json")) as f:
            rec = json.load(f)
        assert rec["built_by"]["rank"] == p % 2
        assert all(name.startswith(f"shard-{p:06d}-") for name in rec["shards"])


def test_two_ranks_equal_one_process(tmp_path):
    """The two ranks of a 2-rank build (as two array tasks, in this process) against the one-process build."""
    src = str(tmp_path / "src")
    _make_media(src)
    out = str(tmp_path / "two_ranks")
    for rank in (1, 0):
        assert build_shards([src, out, *FLAGS, "--rank", str(rank), "--world-size", "2"]) == 0
    _check_equal_and_disjoint(out, _reference(tmp_path, src))


@pytest.mark.slow  # ~10 s of CPU: three more processes import torch
def test_torchrun_two_ranks_equal_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m magitrain.data_pipeline.build_shards`` against the one-process build."""
    src = str(tmp_path / "src")
    _make_media(src)
    out = str(tmp_path / "torchrun")
    proc = _torchrun(src, out, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    _check_equal_and_disjoint(out, _reference(tmp_path, src))


def test_kill_then_resume_skips_finished_parts(tmp_path):
    src, control = str(tmp_path / "src"), str(tmp_path / "control")
    _make_media(src)
    os.makedirs(control)
    open(os.path.join(control, "block"), "w").close()
    out = str(tmp_path / "resumed")
    enc = ["--latent-encoder", "test_build_shards_distributed:blocking_patch", "--encoder-weights", control]
    cmd = [sys.executable, "-m", "magitrain.data_pipeline.build_shards", src, out, *FLAGS, *enc,
           "--rank", "0", "--world-size", "2"]  # rank 0 of a 2-rank build: parts 0, 2, 4
    proc = subprocess.Popen(cmd, env=_env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    try:
        while not glob.glob(os.path.join(control, "blocked-*")):
            assert proc.poll() is None, proc.stderr.read()
            assert time.time() < deadline, "the blocking build never blocked"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # kill -9 in the middle of part 2
        proc.wait(timeout=60)
    assert sorted(os.listdir(os.path.join(out, "parts"))) == ["part-000000.json"]
    assert os.listdir(os.path.join(out, ".tmp")) == ["part-000002"]  # the interrupted part's leftovers
    os.unlink(os.path.join(control, "block"))
    for log in glob.glob(os.path.join(control, "log-*")):
        os.unlink(log)

    for rank in (0, 1):  # the rerun, as two array tasks one after the other
        assert build_shards([src, out, *FLAGS, *enc, "--rank", str(rank), "--world-size", "2"]) == 0
        assert os.path.exists(os.path.join(out, "manifest.json")) == (rank == 1)  # the last one merges
    encoded = 0
    for log in glob.glob(os.path.join(control, "log-*")):
        with open(log) as f:
            encoded += len(f.read().split())
    assert encoded == N_FILES - PART_FILES  # part 0 (a.png and the broken a.mp4) skipped, the others encoded
    assert not os.listdir(os.path.join(out, ".tmp"))
    ref = _reference(tmp_path, src)
    assert _samples(out) == _samples(ref)
    assert _manifest(out) == _manifest(ref)
    assert build_shards([src, out, *FLAGS, "--resumable", "--text-len", "9"]) == 2  # other options: refused


def test_slurm_array_script_ranks(tmp_path):
    """``launch/build_shards_array.sh`` maps array task ids to ``--rank/--world-size`` (a stub interpreter
    records the command line; the build itself is covered above)."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\necho "$@" > "$STUB_OUT"\n')
    stub.chmod(0o755)
    script = os.path.join(REPO, "launch", "build_shards_array.sh")
    env = {**os.environ, "PYTHON": str(stub), "STUB_OUT": str(tmp_path / "args"), "SLURM_ARRAY_TASK_ID": "5",
           "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}
    assert subprocess.run(["bash", script, "SRC", "OUT", "--part-files", "8"], env=env, check=False).returncode == 0
    assert (tmp_path / "args").read_text().split() == [
        "-m", "magitrain.data_pipeline.build_shards", "SRC", "OUT", "--rank", "1", "--world-size", "3", "--quiet",
        "--part-files", "8"]
    bad = subprocess.run(["bash", script, "SRC"], env=env, capture_output=True, text=True, check=False)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage")
