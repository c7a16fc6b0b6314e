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

import dataclasses
import time

import torch
from torch import nn

from .attention import CPSliceAttention, dispatch, local_positions, undispatch
from .block_mask import offer_block_counts
from .dispatch import ALIASES, SOLVERS, DispatchPlan, PlanStats, plan_stats, solve
from .mask import AttnSlices
from .solve_ahead import AheadSpec, SolvedDispatch


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
        self.overlap_stages = overlap_stages
        self._plans: list[tuple[AttnSlices, DispatchPlan, PlanStats]] = []
        self._offered: SolvedDispatch | None = None  # the next batch's plan, solved in the loader
        self.recent_stats: list[PlanStats] = []  # one per forward since the last take_plan_stats()

    def ahead_spec(self, block_masks: bool = False) -> AheadSpec:
        """What a data loader needs to solve this forward's plans ahead (:mod:`.solve_ahead`)."""
        return AheadSpec(self.cp, self.rank, self.chunk_size, self.solver, self.overlap_stages, block_masks)

    def offer(self, solved: SolvedDispatch | None) -> None:
        """The plan the loader solved for the next forward's batch (None: nothing solved ahead).

        Used when the forward's mask equals ``solved.slices``; for another mask of the same
        length (history dropout) the plan is reused and only the stats and comm plan rebuilt.
        A plan solved for another CP layout is refused (ValueError), never silently used.
        """
        if solved is not None and solved.spec != self.ahead_spec(solved.spec.block_masks):
            raise ValueError(f"the batch's dispatch was solved for {solved.spec}, this model runs "
                             f"{self.ahead_spec(solved.spec.block_masks)}")
        self._offered = solved

    def plan_for(self, slices: AttnSlices) -> DispatchPlan:
        """The plan for ``slices``: offered by the loader, cached, or solved now (timed: ``solve_s``)."""
        start = time.perf_counter()
        offered, self._offered = self._offered, None
        if offered is not None and offered.plan.total_seqlen == slices.total_q:
            if offered.slices == slices:
                stats = offered.stats
                cache = CPSliceAttention._cache  # the runtime built in the loader serves every layer
                cache.insert(0, (self.group, offered.plan, self.overlap_stages, slices, offered.runtime))
                del cache[CPSliceAttention._CACHE_SIZE:]
                for key, counts in offered.block_counts.items():
                    rt = offered.runtime
                    offer_block_counts(rt.local_slices if key == "local" else rt.stage_slices[key], counts)
                self._plans = [(slices, offered.plan, stats)] + self._plans[: self._CACHE_SIZE - 1]
            else:
                stats = plan_stats(offered.plan, slices)
            self.recent_stats.append(dataclasses.replace(stats, solve_s=time.perf_counter() - start))
            return offered.plan
        for cached, plan, stats in self._plans:
            if cached == slices:
                self.recent_stats.append(dataclasses.replace(stats, solve_s=time.perf_counter() - start))
                return plan
        if slices.total_q < self.cp * self.chunk_size:
            raise ValueError(f"a sequence of {slices.total_q} tokens is shorter than parallel.cp={self.cp} chunks "
                             f"of parallel.cp_chunk_size={self.chunk_size}")
        plan = solve(slices, self.cp, self.chunk_size, self.solver)
        stats = plan_stats(plan, slices)
        self._plans = [(slices, plan, stats)] + self._plans[: self._CACHE_SIZE - 1]
        self.recent_stats.append(dataclasses.replace(stats, solve_s=time.perf_counter() - start))
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


def offer_dispatch(model: nn.Module, batch) -> None:
    """Before a forward: hand ``batch.dispatch`` (solved in the loader) to ``model``'s CP forward.
    A no-op without CP or without a solved dispatch."""
    forward = getattr(model, "forward", None)
    if isinstance(forward, ContextParallelForward):
        forward.offer(getattr(batch, "dispatch", None))


def ahead_spec(model: nn.Module, block_masks: bool = False) -> AheadSpec | None:
    """The :class:`AheadSpec` a loader solves ``model``'s plans with; None without CP."""
    forward = getattr(model, "forward", None)
    return forward.ahead_spec(block_masks) if isinstance(forward, ContextParallelForward) else None


def apply_context_parallel(model: nn.Module, cp_mesh, chunk_size: int, solver: str, overlap_stages: int) -> None:
    """Install CP on ``model`` in place (its ``forward`` and every layer's ``core_attention``)."""
    model.forward = ContextParallelForward(model, cp_mesh, chunk_size, solver, overlap_stages)
