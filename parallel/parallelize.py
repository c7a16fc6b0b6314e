"""``parallelize_model(model, env, cfg)``: apply TP, CP attention, activation checkpointing and
sharded data parallel to a plain model, in that order (torchtitan style).

The model file knows nothing of this; everything here swaps or wraps modules from outside.
"""

from __future__ import annotations

from torch import nn

from magitrain.config import Config, ConfigError

from .mesh import ParallelEnv


def parallelize_model(model: nn.Module, env: ParallelEnv, cfg: Config) -> nn.Module:
    """Return the model ready for this process's place in the mesh."""
    if env.world_size == 1:
        return model
    raise ConfigError(f"multi-process training (world size {env.world_size}) is not available yet in this build")
