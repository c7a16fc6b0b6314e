"""Dispatch: which context-parallel rank holds which tokens.

The sequence (``total_seqlen`` tokens, mask given as :class:`AttnSlices`) is padded to a
multiple of ``chunk_size * cp`` and cut into equal chunks of ``chunk_size`` tokens. Every rank
gets the same number of chunks; a rank's local tensor is its chunks concatenated in
ascending chunk order. A solver decides the assignment (see ``SOLVERS``).

Two figures judge an assignment:

- **area balance**: ``max_over_mean_area``, the largest per-rank attention area (the mask
  area of the rank's query rows) over the mean. 1.0 is perfect.
- **remote KV**: per rank, the number of key/value tokens its queries need that another rank
  holds. That is what context parallelism must move.

This module knows nothing about torch.distributed; ``python -m magitrain.parallel.dispatch``
prints a plan as JSON.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .mask import AttnRange, AttnSlices


@dataclass(frozen=True)
class DispatchPlan:
    """The assignment of chunks to ranks (JSON-serialisable through :meth:`to_json`)."""

    total_seqlen: int  # tokens before padding
    chunk_size: int
    cp: int
    ranks: tuple[tuple[int, ...], ...]  # chunk ids of each rank, ascending
    solver: str = "contiguous"

    @property
    def padded_seqlen(self) -> int:
        return self.num_chunks * self.chunk_size

    @property
    def num_chunks(self) -> int:
        return sum(len(r) for r in self.ranks)

    @property
    def local_seqlen(self) -> int:
        return self.padded_seqlen // self.cp

    def chunk_owner(self) -> list[int]:
        """For every chunk id, the rank that holds it."""
        owner = [0] * self.num_chunks
        for rank, chunks in enumerate(self.ranks):
            for c in chunks:
                owner[c] = rank
        return owner

    def local_token_ranges(self, rank: int) -> list[AttnRange]:
        """Global (padded) token ranges held by ``rank``, in local order, adjacent chunks merged."""
        return merge_ranges(AttnRange(c * self.chunk_size, (c + 1) * self.chunk_size) for c in self.ranks[rank])

    def local_positions(self, rank: int, device=None) -> torch.Tensor:
        """``[local_seqlen]`` long: global (padded) token index of each local token of ``rank``."""
        return torch.cat([torch.arange(r.start, r.end, device=device) for r in self.local_token_ranges(rank)])

    def to_json(self) -> dict:
        return {"solver": self.solver, "chunk_size": self.chunk_size, "cp": self.cp,
                "total_seqlen": self.total_seqlen, "ranks": [list(r) for r in self.ranks]}


def merge_ranges(ranges) -> list[AttnRange]:
    """Sort ranges and merge those that touch or overlap."""
    out: list[AttnRange] = []
    for r in sorted(r for r in ranges if not r.is_empty()):
        if out and r.start <= out[-1].end:
            out[-1] = AttnRange(out[-1].start, max(out[-1].end, r.end))
        else:
            out.append(r)
    return out


def subtract_ranges(ranges: list[AttnRange], holes: list[AttnRange]) -> list[AttnRange]:
    """``ranges`` minus ``holes`` (both sorted and merged)."""
    out = []
    for r in ranges:
        start = r.start
        for h in holes:
            if h.end <= start or h.start >= r.end:
                continue
            if h.start > start:
                out.append(AttnRange(start, h.start))
            start = max(start, h.end)
        if start < r.end:
            out.append(AttnRange(start, r.end))
    return out


def needed_kv_ranges(slices: AttnSlices, q_ranges: list[AttnRange]) -> list[AttnRange]:
    """Key ranges that queries in ``q_ranges`` may attend to under ``slices`` (merged).

    Exact per slice type: a causal slice's rows see only a prefix of its k range, an
    inv-causal slice's rows only a suffix.
    """
    needed = []
    for s in slices:
        for q in q_ranges:
            part = s.q_range.intersect(q)
            if part.is_empty():
                continue
            rows = torch.tensor([part.start - s.q_range.start, part.end - 1 - s.q_range.start])
            lo, hi = s.row_bounds(rows)
            # bounds are monotone in the row index, so the first and last row bound the union
            k_lo, k_hi = int(lo[0]), int(hi[1])
            if k_hi > k_lo:
                needed.append(AttnRange(s.k_range.start + k_lo, s.k_range.start + k_hi))
    return merge_ranges(needed)


def remote_kv_ranges(plan: DispatchPlan, slices: AttnSlices, rank: int) -> list[AttnRange]:
    """Global KV token ranges ``rank`` needs and does not hold (what it must fetch)."""
    local = plan.local_token_ranges(rank)
    return subtract_ranges(needed_kv_ranges(slices, local), local)


def _contiguous(chunk_areas: list[int], cp: int, slices: AttnSlices, chunk_size: int) -> list[list[int]]:
    per_rank = len(chunk_areas) // cp
    return [list(range(r * per_rank, (r + 1) * per_rank)) for r in range(cp)]


SOLVERS = {"contiguous": _contiguous}


def chunk_areas(slices: AttnSlices, chunk_size: int, num_chunks: int) -> list[int]:
    """Attention area of the query rows of every chunk."""
    areas = [0] * num_chunks
    for s in slices:
        for c in range(s.q_range.start // chunk_size, min(num_chunks, -(-s.q_range.end // chunk_size))):
            part = s.q_range.intersect(AttnRange(c * chunk_size, (c + 1) * chunk_size))
            if part.is_empty():
                continue
            rows = torch.arange(part.start - s.q_range.start, part.end - s.q_range.start)
            lo, hi = s.row_bounds(rows)
            areas[c] += int((hi - lo).clamp(min=0).sum())
    return areas


def solve(slices: AttnSlices, cp: int, chunk_size: int, solver: str = "contiguous") -> DispatchPlan:
    """Pad, cut into chunks and assign them to ``cp`` ranks with the named solver."""
    if solver not in SOLVERS:
        raise ValueError(f"unknown dispatch solver {solver!r}; available: {', '.join(sorted(SOLVERS))}")
    if slices.total_q != slices.total_k:
        raise ValueError("dispatch is for self-attention masks (total_q == total_k)")
    unit = chunk_size * cp
    num_chunks = -(-max(slices.total_q, 1) // unit) * cp
    areas = chunk_areas(slices, chunk_size, num_chunks)
    ranks = SOLVERS[solver](areas, cp, slices, chunk_size)
    return DispatchPlan(slices.total_q, chunk_size, cp, tuple(tuple(sorted(r)) for r in ranks), solver)
