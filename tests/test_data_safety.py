"""Issue 21: data that cannot be trained on stops the run with a clear message, never a spin or a hang,
and stale shards or a config-named module are not used behind the user's back.

- build_shards into a non-empty folder refuses; ``--overwrite`` replaces the whole set (no stale tar);
- a shard folder with a manifest is read through it; a ``*.tar`` it does not list is an error;
- every shard unreadable with ``data.max_bad_fraction=1.0``: BadDataError, exit 2 (was an endless loop);
- SIGTERM while the reader is blocked (a ``pipe:`` shard that stalls): exits after
  ``parallel.timeout_s``; a second SIGTERM exits at once (both were ignored forever);
- ``generate`` imports a module named by a checkpoint's / release's config only when asked.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import REPO
from test_data_common import write_latent_shards

from magitrain.data_pipeline.build_shards import main as build_shards
from magitrain.data_pipeline.shards import expand_shards

TINY = os.path.join(REPO, "configs", "tiny.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false"]
WEBDATASET = ["data.source=webdataset", "data.shuffle_buffer=4", "data.buckets=[[2,8,8,1]]"]


def _media(folder, n: int) -> str:
    from PIL import Image

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(os.path.join(folder, f"img{i}.png"))
    return str(folder)


def test_build_shards_refuses_a_non_empty_folder(tmp_path, capsys):
    out = str(tmp_path / "shards")
    write_latent_shards(out, [[(2, 8, 8)] * 3 for _ in range(3)])  # an older build: 3 shards
    before = sorted(os.listdir(out))
    assert build_shards([_media(tmp_path / "media", 2), out, "--quiet"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == before
    assert build_shards([str(tmp_path / "media"), out, "--quiet", "--overwrite"]) == 0
    assert sorted(os.listdir(out)) == ["manifest.json", "shard-000000.tar"]  # the old set is gone as a whole
    assert expand_shards(out) == [os.path.join(out, "shard-000000.tar")]


def test_shard_folder_is_read_through_its_manifest(tmp_path):
    folder = str(tmp_path / "shards")
    paths = write_latent_shards(folder, [[(2, 8, 8)] * 3 for _ in range(2)])
    assert expand_shards(folder) == paths
    os.link(paths[0], os.path.join(folder, "shard-000007.tar"))  # a stale shard of an older build
    with pytest.raises(ValueError, match="shard-000007.tar is not listed in manifest.json"):
        expand_shards(folder)
    os.remove(os.path.join(folder, "shard-000007.tar"))
    os.remove(paths[1])
    with pytest.raises(FileNotFoundError, match="shard-000001.tar"):
        expand_shards(folder)
    os.remove(os.path.join(folder, "manifest.json"))  # no manifest: every *.tar
    assert expand_shards(folder) == [paths[0]]


def _trainer(run_dir, *overrides) -> subprocess.Popen:
    """The trainer in its own session; its output goes to files (a stalled ``pipe:`` child keeps pipes open)."""
    os.makedirs(run_dir, exist_ok=True)
    out, err = open(os.path.join(run_dir, "..", "stdout.txt"), "w"), open(os.path.join(run_dir, "..", "stderr.txt"), "w")
    return subprocess.Popen([sys.executable, "-m", "magitrain.train", "--config", TINY, f"run.dir={run_dir}", *QUIET,
                             *WEBDATASET, *overrides], cwd=REPO, stdout=out, stderr=err, start_new_session=True,
                            env={**os.environ, "PYTHONFAULTHANDLER": "1"})


def _finish(p: subprocess.Popen, run_dir, timeout: float) -> str:
    """Wait for the trainer to exit; its stderr."""
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGABRT)  # faulthandler: where it hangs, into stderr.txt
        time.sleep(2)
        raise AssertionError(open(os.path.join(run_dir, "..", "stderr.txt")).read()[-5000:]) from None
    return open(os.path.join(run_dir, "..", "stderr.txt")).read()


def _stop_group(p: subprocess.Popen) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)  # the trainer's own session: it and its pipe: children
    except ProcessLookupError:
        pass


@pytest.mark.parametrize("manifest", [True, False])
def test_every_shard_unreadable_stops_with_bad_data_error(tmp_path, manifest):
    folder = tmp_path / "bad"
    os.makedirs(folder)
    for i in range(2):
        (folder / f"shard-{i:06d}.tar").write_bytes(b"\0not a tar" * 100)
    if manifest:
        (folder / "manifest.json").write_text('{"shards": [{"name": "shard-000000.tar", "samples": 3},'
                                              ' {"name": "shard-000001.tar", "samples": 3}]}')
    p = _trainer(tmp_path / "run", f"data.shards={folder}", "data.max_bad_fraction=1.0", "train.steps=2")
    try:
        err = _finish(p, tmp_path / "run", 90)
    finally:
        _stop_group(p)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "no readable sample" in lines[0], err[-2000:]
    assert len(err) < 100_000  # no log flood


def _wait_for_child(p: subprocess.Popen, name: str, timeout: float) -> None:
    """Until a process of the trainer's session runs ``name`` (the stalled pipe: reader)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                argv = open(f"/proc/{pid}/cmdline").read().split("\0")
                if int(pid) != p.pid and os.getsid(int(pid)) == p.pid and any(a.startswith(name) for a in argv):
                    return
            except (OSError, ProcessLookupError):
                continue
        time.sleep(0.2)
    raise AssertionError(f"no '{name}' child after {timeout} s")


@pytest.mark.parametrize("signals", [1, 2])
def test_stop_signal_while_the_reader_is_blocked(tmp_path, signals):
    timeout_s = 4
    p = _trainer(tmp_path / "run", "data.shards=pipe:sleep 600", "train.steps=2", f"parallel.timeout_s={timeout_s}")
    try:
        _wait_for_child(p, "sleep", 90)
        time.sleep(1.0)  # the reader is blocked on the pipe
        t0 = time.monotonic()
        for _ in range(signals):
            p.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        err = _finish(p, tmp_path / "run", timeout_s + 30)
        elapsed = time.monotonic() - t0
    finally:
        _stop_group(p)
    lines = [l for l in err.splitlines() if l.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "without a checkpoint" in lines[0], err[-2000:]
    if signals == 2:
        assert elapsed < timeout_s, elapsed  # the second signal does not wait for the watchdog
    else:
        assert timeout_s - 0.5 < elapsed < timeout_s + 15, elapsed
        assert "blocked for more than parallel.timeout_s=4 s" in lines[0]


@pytest.fixture(scope="module")
def release_with_code(tmp_path_factory):
    """A release folder whose config.yaml names a latent encoder module shipped inside the folder."""
    from magitrain import release, train

    root = tmp_path_factory.mktemp("release_code")
    run = str(root / "run")
    assert train.main(["--config", TINY, f"run.dir={run}", "train.steps=1", *QUIET]) == 0
    rel = root / "release"
    assert release.main(["export", run, str(rel), "--format", "magitrain"]) == 0
    text = (rel / "config.yaml").read_text()
    assert "latent_encoder: patch" in text
    (rel / "config.yaml").write_text(text.replace("latent_encoder: patch", "latent_encoder: shipped_codec:make"))
    (rel / "shipped_codec.py").write_text(
        "import os\nopen(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'RAN'), 'w').close()\n"
        "from magitrain.data_pipeline.encoders import PatchEncoder\n"
        "def make(channels, weights):\n    return PatchEncoder(channels)\n")
    return rel


def test_generate_imports_config_named_code_only_when_asked(release_with_code, monkeypatch, capsys):
    from magitrain import generate

    rel = release_with_code
    monkeypatch.chdir(rel)
    monkeypatch.syspath_prepend(str(rel))  # as `python -m` does: the working folder is importable
    monkeypatch.delitem(sys.modules, "shipped_codec", raising=False)
    args = ["--ckpt", ".", "--chunks", "1", "--prompt", "x", "--quiet", "--out", "g.mp4"]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    assert "--trust-config-code" in err and "shipped_codec:make" in err, err
    assert not (rel / "RAN").exists()
    assert generate.main(args + ["--decoder", "patch"]) == 0  # the user names a built-in: nothing imported
    assert not (rel / "RAN").exists()
    assert generate.main(args + ["--trust-config-code"]) == 0  # asked for: the shipped module runs (it is live)
    assert (rel / "RAN").exists()
    sys.modules.pop("shipped_codec", None)
