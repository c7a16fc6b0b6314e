"""Solve-ahead: a batch's dispatch plan computed in the data loader, not in the step.

The plan depends only on the batch's mask, and the mask (block-causal over the packed layout)
is known as soon as the loader has packed the sequence. So the loader workers, which run
ahead of the step, solve it there (:func:`solve_for_batch`) and the result rides along with
the batch (``Batch.dispatch``). The forward only looks it up
(:meth:`~magitrain.parallel.context_parallel.ContextParallelForward.offer`): the step's
critical path spends no time solving.

What travels (:class:`SolvedDispatch`, plain picklable data):

- the mask it was solved for, the :class:`DispatchPlan` and its :class:`PlanStats`;
- for this CP rank: the :class:`~magitrain.parallel.attention.CPAttnPlan` (the comm plan of
  every overlap stage and the local pieces of the mask);
- with ``block_masks`` (CUDA runs, where the flex backend is used): the flex block counts of
  those local pieces (:func:`~magitrain.parallel.block_mask.block_counts`, the costly part of a
  block mask; the ``BlockMask`` itself holds a closure and is assembled in the step).

Every CP rank of a data-parallel group reads the same batches and solves with the same
deterministic solver, so all ranks hold the same plan without communicating, as before.
A forward whose mask differs from the solved one (history dropout makes some chunks see only
themselves: a subset of the solved mask) reuses the solved plan, which is valid for any mask
of the same length, and only rebuilds the per-rank comm plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .attention import CPAttnPlan
from .block_mask import block_counts
from .dispatch import DispatchPlan, PlanStats, plan_stats, solve
from .mask import AttnSlices


@dataclass(frozen=True)
class AheadSpec:
    """What the loader needs to solve like the step would (plain data: it goes to the workers)."""

    cp: int
    cp_rank: int
    chunk_size: int
    solver: str
    overlap_stages: int = 1
    block_masks: bool = False


@dataclass
class SolvedDispatch:
    """One batch's dispatch, solved ahead (see the module docstring)."""

    spec: AheadSpec
    slices: AttnSlices
    plan: DispatchPlan
    stats: PlanStats
    runtime: CPAttnPlan
    block_counts: dict = field(default_factory=dict)  # id in runtime ("local", stage s) -> counts
    solve_s: float = 0.0  # loader time spent (off the critical path)


def solve_for_batch(slices: AttnSlices, spec: AheadSpec) -> SolvedDispatch:
    """Solve ``slices`` as :class:`ContextParallelForward` would, plus this rank's runtime."""
    import time

    start = time.perf_counter()
    plan = solve(slices, spec.cp, spec.chunk_size, spec.solver)
    stats = plan_stats(plan, slices)
    runtime = CPAttnPlan(plan, slices, spec.cp_rank, spec.overlap_stages)
    counts = {}
    if spec.block_masks:
        counts["local"] = block_counts(runtime.local_slices)
        for s, st in enumerate(runtime.stage_slices):
            counts[s] = block_counts(st)
    return SolvedDispatch(spec, slices, plan, stats, runtime, counts, time.perf_counter() - start)
