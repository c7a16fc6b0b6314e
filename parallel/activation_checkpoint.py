"""Activation checkpointing per transformer block: keep a block's inputs, recompute the rest
in the backward. ``none``; ``full`` (every block); ``every_k`` (blocks 0, k, 2k, ...).

The block's ``forward`` is replaced in place rather than wrapped in a new module, so parameter
names (state dicts, checkpoints, EMA keys) do not change. Applied after TP/CP (the recompute
reruns their hooks and collectives) and before FSDP2 (which unshards again for the recompute).
"""

from __future__ import annotations

import functools

from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_activation_checkpointing(model: nn.Module, mode: str, every: int = 1) -> int:
    """Checkpoint ``model.layers`` as ``mode`` says; returns how many blocks were wrapped."""
    if mode == "none":
        return 0
    if mode not in ("full", "every_k"):
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: choose none, full or every_k")
    if mode == "every_k" and every < 1:
        raise ValueError(f"parallel.ac_every={every} must be >= 1")
    step = 1 if mode == "full" else every
    wrapped = 0
    for i, layer in enumerate(model.layers):
        if i % step == 0:
            layer.forward = functools.partial(_checkpointed, layer.forward)
            wrapped += 1
    return wrapped
