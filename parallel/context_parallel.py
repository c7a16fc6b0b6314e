"""Context parallelism at model level: each CP rank runs the model on its share of the tokens.

Per call, :class:`ContextParallelForward` (installed as the model's ``forward``):

1. builds the per-token metadata of the WHOLE packed sequence (``model.prepare(layout)``:
   global RoPE positions, chunk ids, the global self-attention mask);
2. solves the dispatch plan for that mask (``parallel.cp_solver``, ``parallel.cp_chunk_size``;
   cached per mask, every rank computes the same plan without communicating);
3. keeps this rank's rows of ``x`` and of the metadata (dispatch padding: chunk id -1, so no
   gate, no cross-attention, no loss), points every layer's CP ``core_attention`` at the plan;
4. runs ``model.forward_tokens`` on the local rows (self-attention fetches remote KV inside
   :class:`~magitrain.parallel.attention.CPSliceAttention`; cross-attention is per chunk and
   local), and
5. all-gathers the output back to global order (``undispatch``), so the loss code is the same
   as on one process.

Loss and gradients: every CP rank of a data-parallel group computes the same (replicated) loss
from the undispatched output; ``undispatch``'s backward hands each rank the gradient of its own
rows only, so each rank's parameter gradients are its tokens' share and the full gradient is
their SUM over cp (the data-parallel engine sums over dp x cp). The output all-gather costs
``N x C_out`` values per step, small next to the attention KV traffic; it buys an unchanged
training loop.
"""

from __future__ import annotations

import torch
from torch import nn

from .attention import CPSliceAttention, dispatch, local_positions, undispatch
from .dispatch import ALIASES, SOLVERS, DispatchPlan, PlanStats, plan_stats, solve
from .mask import AttnSlices


def resolve_solver(name: str) -> str:
    """``parallel.cp_solver`` as a dispatch solver name ('default' if dispatch has it)."""
    if name in SOLVERS or name in ALIASES:
        return name
    raise ValueError(f"parallel.cp_solver={name!r} is unknown; available: {', '.join(sorted([*SOLVERS, *ALIASES]))}")


class ContextParallelForward:
    """The model's ``forward`` under CP (same signature and result as ``MagiDiT.forward``)."""

    _CACHE_SIZE = 4

    def __init__(self, model: nn.Module, cp_mesh, chunk_size: int, solver: str, overlap_stages: int = 1):
        self.model, self.group = model, cp_mesh.get_group()
        self.cp, self.rank = cp_mesh.size(), cp_mesh.get_local_rank()
        self.chunk_size, self.solver = chunk_size, resolve_solver(solver)
        self.cores = []
        for layer in model.layers:
            core = CPSliceAttention(self.group, plan=None, overlap_stages=overlap_stages)
            layer.self_attention.core_attention = core
            self.cores.append(core)
        self._plans: list[tuple[AttnSlices, DispatchPlan, PlanStats]] = []
        self.recent_stats: list[PlanStats] = []  # one per forward since the last take_plan_stats()

    def plan_for(self, slices: AttnSlices) -> DispatchPlan:
        for cached, plan, stats in self._plans:
            if cached == slices:
                self.recent_stats.append(stats)
                return plan
        if slices.total_q < self.cp * self.chunk_size:
            raise ValueError(f"a sequence of {slices.total_q} tokens is shorter than parallel.cp={self.cp} chunks "
                             f"of parallel.cp_chunk_size={self.chunk_size}")
        plan = solve(slices, self.cp, self.chunk_size, self.solver)
        stats = plan_stats(plan, slices)
        self._plans = [(slices, plan, stats)] + self._plans[: self._CACHE_SIZE - 1]
        self.recent_stats.append(stats)
        return plan

    def __call__(self, x, t, text_emb, text_mask, layout, text_null=None, drop_history=None, step_size=None):
        model = self.model
        if x.shape[0] != layout.total_tokens:
            raise ValueError(f"x holds {x.shape[0]} tokens, the layout {layout.total_tokens}")
        meta = model.prepare(layout, drop_history)
        plan = self.plan_for(meta.self_slices)
        for core in self.cores:
            core.plan = plan
        local = local_rows(meta, plan, self.rank)
        out = model.forward_tokens(dispatch(x, plan, self.rank), t, text_emb, text_mask, local, text_null, step_size)
        return undispatch(out, plan, self.group)


def local_rows(meta, plan: DispatchPlan, rank: int):
    """This rank's rows of ``meta`` (a :class:`magitrain.model.TokenMeta` of the whole sequence).

    ``token_index`` stays None so the model hands the GLOBAL mask to ``core_attention`` (CP
    attention cuts it itself); dispatch padding rows get chunk id -1 and position 0.
    """
    pos = local_positions(plan, rank, meta.chunk_ids.device)
    pad = plan.padded_seqlen - plan.total_seqlen
    chunk_ids = torch.cat([meta.chunk_ids, meta.chunk_ids.new_full((pad,), -1)])
    rope_pos = torch.cat([meta.rope_pos, meta.rope_pos.new_zeros((pad, meta.rope_pos.shape[1]))])
    return type(meta)(rope_pos[pos], chunk_ids[pos], meta.self_slices)


def take_plan_stats(model: nn.Module) -> list[PlanStats]:
    """The dispatch-plan figures (per-rank area, remote KV) of every CP forward of ``model`` since
    the last call, oldest first; [] when the model does not run context parallel."""
    forward = getattr(model, "forward", None)
    if not isinstance(forward, ContextParallelForward):
        return []
    stats, forward.recent_stats = forward.recent_stats, []
    return stats


def apply_context_parallel(model: nn.Module, cp_mesh, chunk_size: int, solver: str, overlap_stages: int) -> None:
    """Install CP on ``model`` in place (its ``forward`` and every layer's ``core_attention``)."""
    model.forward = ContextParallelForward(model, cp_mesh, chunk_size, solver, overlap_stages)
