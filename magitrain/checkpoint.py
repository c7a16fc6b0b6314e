"""Checkpoints: complete-or-absent folders, newest-complete resume, safe loading.

Layout of a run's checkpoints::

    RUN_DIR/checkpoints/step_00000100/
        state.pt      model, optimizer, EMA, scheduler, trainer counters, RNG, data position
        config.yaml   the resolved config of the run that wrote it
        COMPLETE      written last: a folder without it is ignored by ``resume=auto``

A checkpoint is written into a hidden temporary folder and renamed into place after its
marker is written, so a crash (or a full disk) mid-save never leaves a half-written
checkpoint where ``auto`` would pick it; the previous checkpoints stay untouched. Loading uses
``torch.load(weights_only=True)``: no arbitrary unpickling.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time

import torch

MARKER = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; the message names the path."""


class Checkpointer:
    """Saves and finds checkpoints under ``run_dir/checkpoints``, keeping the last ``keep_last``."""

    def __init__(self, run_dir: str, keep_last: int = 3):
        self.root = os.path.join(run_dir, "checkpoints")
        self.keep_last = keep_last

    def path_for(self, step: int) -> str:
        return os.path.join(self.root, f"step_{step:08d}")

    def complete_checkpoints(self) -> list[tuple[int, str]]:
        """``(step, path)`` of every complete checkpoint, oldest first."""
        if not os.path.isdir(self.root):
            return []
        found = []
        for name in os.listdir(self.root):
            m = _STEP_DIR.match(name)
            path = os.path.join(self.root, name)
            if m and os.path.exists(os.path.join(path, MARKER)):
                found.append((int(m.group(1)), path))
        return sorted(found)

    def latest(self) -> str | None:
        done = self.complete_checkpoints()
        return done[-1][1] if done else None

    def resolve(self, resume: str) -> str | None:
        """``''`` -> None (fresh run); ``auto`` -> newest complete or None; else a checked path."""
        if not resume:
            return None
        if resume == "auto":
            return self.latest()
        path = resume
        if os.path.isdir(path) and not os.path.exists(os.path.join(path, MARKER)):
            # a run dir: take its newest checkpoint
            inner = Checkpointer(path).latest()
            if inner is None:
                raise CheckpointError(f"ckpt.resume={resume}: no complete checkpoint there (no {MARKER} marker)")
            path = inner
        if not os.path.exists(os.path.join(path, MARKER)):
            raise CheckpointError(f"ckpt.resume={resume}: not a complete checkpoint folder")
        return path

    def save(self, step: int, state: dict, config_yaml: str, extra_files: dict[str, bytes] | None = None) -> str:
        """Write ``state`` (tensors and plain Python values) atomically; returns the folder."""
        final = self.path_for(step)
        tmp = os.path.join(self.root, f".tmp_step_{step:08d}_{os.getpid()}")
        try:
            os.makedirs(tmp, exist_ok=True)
            torch.save(state, os.path.join(tmp, "state.pt"))
            with open(os.path.join(tmp, "config.yaml"), "w") as f:
                f.write(config_yaml)
            for name, data in (extra_files or {}).items():
                with open(os.path.join(tmp, name), "wb") as f:
                    f.write(data)
            with open(os.path.join(tmp, MARKER), "w") as f:
                json.dump({"step": step, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(tmp, final)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointError(f"could not write checkpoint {final}: {e.strerror or e}") from None
        self._prune()
        return final

    def _prune(self) -> None:
        done = self.complete_checkpoints()
        for _, path in done[: max(0, len(done) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    @staticmethod
    def load(path: str, map_location="cpu") -> dict:
        """Load ``state.pt`` of a checkpoint folder with ``weights_only=True``."""
        file = os.path.join(path, "state.pt")
        if not os.path.exists(file):
            raise CheckpointError(f"{path}: no state.pt")
        try:
            return torch.load(file, map_location=map_location, weights_only=True)
        except Exception as e:  # truncated or foreign file: say which
            raise CheckpointError(f"{file}: cannot be loaded ({type(e).__name__}: {e})") from None

    @staticmethod
    def step_of(path: str) -> int:
        with open(os.path.join(path, MARKER)) as f:
            return int(json.load(f)["step"])
