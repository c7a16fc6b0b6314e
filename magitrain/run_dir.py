"""A run directory belongs to one run: its lock, the fresh-start guard and config changes at resume.

- :class:`RunLock`: ``RUN_DIR/run.lock`` is created exclusively (``O_EXCL``) by rank 0 and holds
  ``{"host", "pid", "time"}``; a daemon thread touches it every ``HEARTBEAT_S`` seconds. A second
  trainer on the same folder stops with an error naming the holder. A lock is stale (taken over,
  with a message) when its holder is this host's process that no longer exists, or on another host
  when it was not touched for ``STALE_AFTER_S`` seconds (a dead node stops touching it).
- :func:`check_fresh_start`: a run started without ``ckpt.resume`` in a folder that holds
  checkpoints is an error naming ``ckpt.resume=auto``; ``run.overwrite=true`` moves the old run's
  files aside (``RUN_DIR.replaced-TIME/``), it never deletes them.
- :func:`config_changes`: the keys whose value differs between a checkpoint's config and the
  resumed run's; anything outside :data:`SAFE_TO_CHANGE` needs ``ckpt.allow_config_change=true``.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time

from omegaconf import OmegaConf

from magitrain.config import Config

LOCK = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0

# keys a resume may change freely: length of the run, logging, evaluation, checkpoint cadence, and
# the parallel layout (checkpoints reshard; the math is the same up to float rounding)
SAFE_TO_CHANGE = ("train.steps", "train.stop_at", "log.", "ckpt.every", "ckpt.keep_last", "ckpt.resume", "ckpt.async_save",
                  "ckpt.allow_config_change", "ckpt.init_from", "run.dir", "run.overwrite",
                  "train.max_bad_steps", "parallel.")


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (in use, holds another run, is a file)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """The exclusive lock of one run directory (see the module doc)."""

    def __init__(self, run_dir: str):
        self.run_dir = run_dir
        self.path = os.path.join(run_dir, LOCK)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None  # why a stale lock was replaced, for the log

    def _holder(self) -> dict | None:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why the existing lock may be taken over, or None while its holder may be alive."""
        try:
            age = time.time() - os.path.getmtime(self.path)
        except OSError:
            return "it vanished"
        if not isinstance(holder, dict) or not {"host", "pid"} <= set(holder):
            return "unreadable lock file" if age > 5.0 else None
        if holder["host"] == socket.gethostname():
            if int(holder["pid"]) == os.getpid():
                return f"left by this process (pid {holder['pid']})"
            if not _pid_alive(int(holder["pid"])):
                return f"its holder (host {holder['host']}, pid {holder['pid']}) no longer runs"
            return None
        if age > STALE_AFTER_S:
            return f"its holder (host {holder['host']}, pid {holder['pid']}) has not touched it for {age:.0f} s"
        return None

    def acquire(self) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                why = self._stale_reason(holder)
                if why is None:
                    h = holder or {}
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(h.get("time", 0))))
                    raise RunDirError(f"run.dir={self.run_dir} is in use by another trainer (host {h.get('host', '?')}, "
                                      f"pid {h.get('pid', '?')}, since {since}); use another run.dir, or delete "
                                      f"{self.path} if that process is gone") from None
                self.took_over = f"took over the stale lock {self.path}: {why}"
                aside = f"{self.path}.stale-{os.getpid()}-{time.monotonic_ns()}"
                try:
                    os.replace(self.path, aside)  # atomic: of two trainers taking over, one wins the O_EXCL
                    os.unlink(aside)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
                f.flush()
                os.fsync(f.fileno())
            self._thread = threading.Thread(target=self._heartbeat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise RunDirError(f"run.dir={self.run_dir}: could not take {self.path} (other trainers keep taking it)")

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                return

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass


def check_run_dir_path(run_dir: str) -> None:
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise RunDirError(f"run.dir={run_dir} is an existing file, not a folder")


def check_fresh_start(run_dir: str, checkpoints: list[tuple[int, str]], overwrite: bool) -> str | None:
    """A fresh run (no ``ckpt.resume``) in ``run_dir``: an error if it holds ``checkpoints``, unless
    ``overwrite`` (then everything but the lock moves to a sibling folder; returns a message)."""
    if not checkpoints:
        return None
    newest = os.path.basename(checkpoints[-1][1])
    if not overwrite:
        raise RunDirError(f"run.dir={run_dir} already holds a run ({len(checkpoints)} checkpoint(s), newest {newest}); "
                          "continue it with ckpt.resume=auto, pick a new run.dir, or pass run.overwrite=true to "
                          "move the old run aside")
    aside = f"{os.path.abspath(run_dir).rstrip(os.sep)}.replaced-{time.strftime('%Y%m%d-%H%M%S')}"
    while os.path.exists(aside):
        aside += "_"
    os.makedirs(aside)
    for name in os.listdir(run_dir):
        if name != LOCK:
            os.replace(os.path.join(run_dir, name), os.path.join(aside, name))
    return f"run.overwrite=true: moved the previous run in {run_dir} (newest checkpoint {newest}) to {aside}"


def _flat(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(saved_yaml: str, cfg: Config) -> list[tuple[str, object, object]]:
    """``(key, old, new)`` for every config value that differs from the checkpoint's ``saved_yaml``."""
    from magitrain.config import config_from_yaml_text

    old = _flat(OmegaConf.to_container(OmegaConf.structured(config_from_yaml_text(saved_yaml))))
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def unsafe_changes(changes: list[tuple[str, object, object]]) -> list[tuple[str, object, object]]:
    return [c for c in changes if not any(c[0] == s or (s.endswith(".") and c[0].startswith(s))
                                          for s in SAFE_TO_CHANGE)]


def describe_changes(changes: list[tuple[str, object, object]]) -> str:
    return ", ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes)


__all__ = ["LOCK", "RunDirError", "RunLock", "SAFE_TO_CHANGE", "check_fresh_start", "check_run_dir_path",
           "config_changes", "describe_changes", "unsafe_changes"]
