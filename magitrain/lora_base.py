"""The frozen base a LoRA checkpoint refers to: its path and digest (``lora_base`` in every checkpoint).

A LoRA checkpoint holds only the adapters (magitrain/lora.py); the trainer reloads the base from
``ckpt.init_from`` on every start and :class:`BaseReference` refuses a checkpoint whose adapters were
trained on another base. ``release export --merge`` re-checks the digest before folding the adapters in.
"""

from __future__ import annotations

import os

from magitrain.checkpoint import MARKER, sha256_file
from magitrain.lora import LoraError
from magitrain.weights import INDEX, SINGLE, is_release, resolve_checkpoint


def base_fingerprint(path: str) -> dict:
    """``{"path", "sha256"}`` of the base weights at ``path`` (run dir, checkpoint or release folder):
    a checkpoint's digest is its ``COMPLETE`` marker's SHA-256 (the marker holds every file's checksum),
    a release's that of its index (which holds a SHA-256 per tensor in our exports) or single file."""
    if is_release(path):
        for name in (INDEX, SINGLE, SINGLE + ".zst"):
            f = os.path.join(path, name)
            if os.path.exists(f):
                return {"path": os.path.abspath(path), "sha256": sha256_file(f), "file": name}
    folder = resolve_checkpoint(path)
    return {"path": os.path.abspath(folder), "sha256": sha256_file(os.path.join(folder, MARKER)), "file": MARKER}


class BaseReference:
    """The checkpoint entry ``lora_base``: where the frozen base came from and its digest. Loading
    refuses a checkpoint whose base is not the one this run loaded (a LoRA checkpoint holds only the
    adapters: on another base they mean something else)."""

    def __init__(self, fingerprint: dict, rank: int, alpha: float, targets):
        self.fingerprint = dict(fingerprint)
        self.adapter = {"rank": int(rank), "alpha": float(alpha), "targets": list(targets)}

    def state_dict(self) -> dict:
        return {**self.fingerprint, **self.adapter}

    def load_state_dict(self, state: dict) -> None:
        if state.get("sha256") != self.fingerprint["sha256"]:
            raise LoraError(f"the checkpoint's adapters were trained on the base {state.get('path')} "
                            f"(sha256 {state.get('sha256', '?')[:16]}...), but this run loaded {self.fingerprint['path']} "
                            f"(sha256 {self.fingerprint['sha256'][:16]}...); set ckpt.init_from to the original base")
