"""``train.compile``: ``torch.compile`` per transformer block (default off).

Each block's ``forward`` is replaced by its compiled version in place (as activation checkpointing
does), so parameter names, checkpoints and EMA keys do not change. Shapes are dynamic from the
first call (``dynamic=True``): the token count, the chunk count and the caption-token count change
from one packed batch to the next, and a static compile would be redone for each new size. Duck
shaping is off while a block runs: with it, a size that happens to equal a fixed one (16 chunks
and the tiny model's 16-wide condition, ``cond [16, 16]``) shares its symbol and is specialised,
and the next batch with another chunk count recompiles. The attention itself is not traced
(each block's ``ParallelAttention.attend`` is wrapped in ``torch.compiler.disable`` here): its
slice lists are Python data that differ for every mask. So a run compiles each block's dense work
once (the blocks share one compiled graph) and never again, whatever the masks.

Applied after TP/CP and before activation checkpointing (which then recomputes the compiled
forward) and FSDP2 (whose hooks run around the block, outside the compiled code). CPU: inductor
generates C++ and needs a C compiler (``cc``); GPU: Triton.
"""

from __future__ import annotations

import functools

import torch
import torch.fx.experimental._config as shape_config
from torch import nn


def compiled(forward):
    """``forward`` compiled with dynamic shapes and no duck shaping (see the module doc)."""
    fn = torch.compile(forward, dynamic=True)

    @functools.wraps(forward)
    def run(*args, **kwargs):
        with shape_config.patch(use_duck_shape=False):
            return fn(*args, **kwargs)

    return run


def apply_compile(model: nn.Module, enabled: bool) -> int:
    """Compile every block of ``model.layers`` when ``enabled``; returns how many were compiled."""
    if not enabled:
        return 0
    for layer in model.layers:
        attn = layer.self_attention
        attn.attend = torch.compiler.disable(attn.attend)  # never traced (module doc)
        layer.forward = compiled(layer.forward)
    return len(model.layers)
