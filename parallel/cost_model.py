"""Predicted CP attention time per rank, per overlap stage count, from a plan and hardware figures.

The model replays exactly what :class:`~magitrain.parallel.attention.CPSliceAttention` does on
one rank (forward and backward, see its module docstring) on a timeline:

- **compute** of a part (the local KV, or one remote stage) = ``calls x call_overhead +
  flops / attn_flops`` forward and ``bwd_factor`` times that backward. ``flops`` = 4 x work x
  head_dim x query heads, where the work of a part is its mask **area** (block-sparse kernels:
  flash / flex on GPU) or, with ``work="rect"``, the sum of its slices' ``Lq x Lk`` rectangles
  (the CPU ``torch`` backend computes each slice densely). ``calls`` = slices in the part.
- **transfers** go through one FIFO link per rank, the same semantics as
  :class:`~magitrain.parallel.comm.EmulatedLink`: a transfer issued at ``t`` starts when the link
  is free, holds it ``bytes / bandwidth`` and completes ``latency`` later. Bytes of a
  transfer = the larger of the rows this rank sends and receives x ``Hk x 2 x D x bytes``.
- forward: cast stage 0, compute local, then per stage: wait, cast the next, compute it.
  backward: fetch stage 0, local backward, per stage: wait, fetch the next, backward of the
  stage, start its dK/dV reduce; finally wait for every reduce.

:func:`predict` returns the per-rank times; the slowest rank sets the step. Figures for H100
(:data:`H100_NVLINK`, :data:`H100_IB`): ~460 TFLOP/s attention forward (MagiAttention's
published 8-GPU figure), NVLink 4 at 450 GB/s per direction, 400 Gb/s InfiniBand (NDR) = 50
GB/s per GPU. On CPU, :func:`fit_compute` calibrates ``attn_flops`` / ``call_overhead`` /
``bwd_factor`` from measured compute-only times; the link is the emulated one.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .attention import CPAttnPlan
from .dispatch import DispatchPlan
from .mask import AttnSlices


@dataclass(frozen=True)
class Hardware:
    attn_flops: float  # attention FLOP/s, forward
    bandwidth: float  # bytes/s of a rank's CP link, per direction
    latency: float = 0.0  # seconds per transfer
    bwd_factor: float = 2.5  # backward time over forward time for the same work
    call_overhead: float = 0.0  # seconds per slice-kernel call
    work: str = "area"  # "area" (block-sparse kernels) or "rect" (dense per slice: CPU torch backend)


H100_NVLINK = Hardware(attn_flops=460e12, bandwidth=450e9, latency=10e-6)
H100_IB = Hardware(attn_flops=460e12, bandwidth=50e9, latency=20e-6)


def _work(slices: AttnSlices, kind: str) -> int:
    if kind == "area":
        return int(slices.area())
    return sum(s.q_range.size * s.k_range.size for s in slices)


@dataclass(frozen=True)
class RankWork:
    """One rank's attention work and traffic, per part: ``local`` then every stage."""

    work: tuple[int, ...]  # per part: area or rectangle sum (see Hardware.work)
    calls: tuple[int, ...]  # per part: slices
    stage_rows: tuple[int, ...]  # per stage: max(rows sent, rows received)

    @classmethod
    def of(cls, rt: CPAttnPlan, kind: str = "area") -> "RankWork":
        parts = [rt.local_slices, *rt.stage_slices]
        rows = tuple(max(st.num_send, st.num_recv) for st in rt.comm.stages)
        return cls(tuple(_work(p, kind) for p in parts), tuple(len(p) for p in parts), rows)


def _part_time(work: int, calls: int, hq: int, d: int, hw: Hardware) -> float:
    return calls * hw.call_overhead + 4.0 * work * d * hq / hw.attn_flops


def simulate(rw: RankWork, hq: int, hk: int, d: int, elem_bytes: int, hw: Hardware) -> dict:
    """``{fwd, bwd, total, compute, comm}`` seconds of one rank (see the module docstring)."""
    row_bytes = hk * 2 * d * elem_bytes
    fwd_c = [_part_time(w, c, hq, d, hw) for w, c in zip(rw.work, rw.calls)]
    bwd_c = [hw.bwd_factor * t for t in fwd_c]
    link = [0.0]

    def xfer(t: float, rows: int) -> float:
        start = max(t, link[0])
        link[0] = start + rows * row_bytes / hw.bandwidth
        return link[0] + hw.latency

    n = len(rw.stage_rows)
    t = 0.0
    done = xfer(t, rw.stage_rows[0])
    t += fwd_c[0]
    for s in range(n):
        t = max(t, done)
        if s + 1 < n:
            done = xfer(t, rw.stage_rows[s + 1])
        t += fwd_c[s + 1]
    fwd = t
    done = xfer(t, rw.stage_rows[0])
    t += bwd_c[0]
    reduces = []
    for s in range(n):
        t = max(t, done)
        if s + 1 < n:
            done = xfer(t, rw.stage_rows[s + 1])
        t += bwd_c[s + 1]
        reduces.append(xfer(t, rw.stage_rows[s]))
    t = max([t, *reduces])
    comm = sum(3 * (r * row_bytes / hw.bandwidth + hw.latency) for r in rw.stage_rows)
    return {"fwd": fwd, "bwd": t - fwd, "total": t, "compute": sum(fwd_c) + sum(bwd_c), "comm": comm}


def predict(plan: DispatchPlan, slices: AttnSlices, stages: int, hq: int, hk: int, d: int, hw: Hardware,
            elem_bytes: int = 2) -> list[dict]:
    """Per rank: :func:`simulate` of its CP attention fwd + bwd with ``stages`` overlap stages."""
    return [simulate(RankWork.of(CPAttnPlan(plan, slices, r, stages), hw.work), hq, hk, d, elem_bytes, hw)
            for r in range(plan.cp)]


def fit_compute(samples: list[tuple[RankWork, float, float]], hq: int, d: int, hw: Hardware,
                fit_calls: bool = False) -> Hardware:
    """``hw`` with ``attn_flops`` and ``bwd_factor`` (and with ``fit_calls`` ``call_overhead``)
    fitted by least squares to measured ``(work, forward s, forward + backward s)`` of compute
    alone. Fit the per-call overhead only from samples whose call counts vary independently of
    their work (else the two are collinear)."""
    flops = np.array([4.0 * sum(rw.work) * d * hq for rw, _, _ in samples])
    calls = np.array([float(sum(rw.calls)) for rw, _, _ in samples])
    fwd = np.array([f for _, f, _ in samples])
    both = np.array([b for _, _, b in samples])
    if fit_calls:
        coef, *_ = np.linalg.lstsq(np.stack([flops, calls], 1), fwd, rcond=None)
        per_flop, per_call = max(float(coef[0]), 1e-30), max(float(coef[1]), 0.0)
    else:
        per_flop, per_call = max(float(flops @ fwd) / max(1e-30, float(flops @ flops)), 1e-30), hw.call_overhead
    model_fwd = flops * per_flop + calls * per_call
    bwd_factor = float(np.sum((both - model_fwd) * model_fwd) / max(1e-30, float(np.sum(model_fwd * model_fwd))))
    return replace(hw, attn_flops=1.0 / per_flop, call_overhead=per_call, bwd_factor=max(bwd_factor, 0.0))
