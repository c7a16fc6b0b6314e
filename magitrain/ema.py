"""Exponential moving average of model weights (used for sampling and release)."""

from __future__ import annotations

import torch
from torch import nn


class EMA:
    """``ema <- decay * ema + (1 - decay) * param`` after every optimizer step.

    Keeps an fp32 copy of every trainable parameter (local shards under FSDP: it works on whatever
    tensors ``model.parameters()`` holds, so it is sharded exactly like the model). Frozen parameters
    (a LoRA run's base) never change and get no copy.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().clone().float() for n, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                self.shadow[n].lerp_(p.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        for n, p in model.named_parameters():
            if n in self.shadow:
                p.copy_(self.shadow[n].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks {sorted(missing)[:5]}...")
        for n, t in state["shadow"].items():
            self.shadow[n].copy_(t)
