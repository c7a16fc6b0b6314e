"""``parallelize_model(model, env, cfg)``: apply TP, CP attention, ``torch.compile`` per block
(``train.compile``), activation checkpointing and sharded data parallel to a plain model, in that
order (torchtitan style).

The model file knows nothing of this; everything here swaps or wraps modules from outside and
keeps parameter names unchanged (checkpoints reshard by name). The loop sees one function for
what differs by layout: :func:`clip_grad_norm_`.

How the axes compose (rank ``r = (dp_rank * cp + cp_rank) * tp + tp_rank``):

- TP shards each layer's matrices over the ``tp`` group (innermost: the fastest links); with
  ``parallel.sequence_parallel`` the norms, gating and residual adds between its regions run on
  ``1/tp`` of the tokens (:mod:`.tensor_parallel`).
- CP runs each rank on its dispatched tokens; its attention group is ``cp`` (same dp and tp
  rank), so CP attention runs on the TP rank's local heads and moves only those heads' KV.
- FSDP2 shards every parameter over ``dp_cp`` (dp x cp flattened) and SUMS gradients there.
"""

from __future__ import annotations

from torch import nn

from magitrain.config import Config, ConfigError

from .activation_checkpoint import apply_activation_checkpointing
from .compile import apply_compile
from .context_parallel import apply_context_parallel
from .data_parallel import apply_fsdp, clip_grad_norm_ as _clip_sharded, mixed_precision_policy
from .deepspeed_engine import grad_norm as ds_grad_norm, is_engine
from .mesh import ParallelEnv
from .tensor_parallel import apply_tensor_parallel, fsdp_shard_placement


def parallelize_model(model: nn.Module, env: ParallelEnv, cfg: Config, adapters=None) -> nn.Module:
    """Return the model ready for this process's place in the mesh (the same object, changed in place).
    ``adapters(model, tp_mesh or None)``: adds trainable modules (LoRA, magitrain/lora.py) after TP and CP
    and before FSDP2, so they are placed on the TP mesh like their bases and sharded with them over dp x cp."""
    p = cfg.parallel
    if p.dp_engine not in ("fsdp2", "deepspeed") and env.world_size > 1:
        raise ConfigError(f"parallel.dp_engine={p.dp_engine} is not available in this build; use fsdp2 or deepspeed")
    if env.tp > 1:
        apply_tensor_parallel(model, env.submesh("tp"), p.sequence_parallel)
    if env.cp > 1:
        apply_context_parallel(model, env.submesh("cp"), p.cp_chunk_size, p.cp_solver, p.overlap_stages)
    if adapters is not None:
        adapters(model, env.submesh("tp") if env.tp > 1 else None)
    apply_compile(model, cfg.train.compile)
    apply_activation_checkpointing(model, p.activation_checkpointing, p.ac_every)
    if env.dp * env.cp > 1 and p.dp_engine == "fsdp2":  # deepspeed: attach_optimizer, once the optimizer exists
        apply_fsdp(model, env.submesh("dp_cp"), mixed_precision_policy(env.device, cfg.train.dtype),
                   fsdp_shard_placement if env.tp > 1 else None)
    return model


def attach_optimizer(model: nn.Module, optimizer, env: ParallelEnv, cfg: Config):
    """``(model, optimizer)`` the loop trains with: unchanged, or with ``parallel.dp_engine=deepspeed``
    and dp > 1 a DeepSpeed ZeRO engine and its optimizer (:mod:`.deepspeed_engine`)."""
    if cfg.parallel.dp_engine != "deepspeed" or env.world_size == 1:
        return model, optimizer
    from .deepspeed_engine import apply_deepspeed

    return apply_deepspeed(model, optimizer, env, cfg)


def clip_grad_norm_(model: nn.Module, max_norm: float, env: ParallelEnv) -> float:
    """Clip the (possibly sharded) gradients of ``model`` to ``max_norm``; the norm before clipping.

    A DeepSpeed engine clips inside its ``step()`` (``gradient_clipping``); here only its norm is read.
    """
    if is_engine(model):
        return ds_grad_norm(model)
    return _clip_sharded(model.parameters(), max_norm, env.world_size)
