"""Group-cast and group-reduce: moving exactly the remote KV a CP rank needs.

Given a :class:`~magitrain.parallel.dispatch.DispatchPlan` and the global mask, every rank
knows (without communicating) which KV tokens every other rank needs from it:
``remote_kv_ranges(plan, slices, r)`` cut by chunk owner. A :class:`CommPlan` turns that into
``all_to_all_single`` calls with uneven splits, one per overlap stage:

- **group-cast** (forward, and the backward's re-fetch): each rank sends the local rows other
  ranks need and receives the rows it needs, nothing else (no all-gather).
- **group-reduce** (backward): the mirror image. Partial dK/dV computed for received rows go
  back to their owners, which sum them into their local dK/dV.

Stages: a rank's remote tokens, sorted by global position, are cut into ``stages`` groups of
(nearly) equal token count, so stage ``s + 1`` can be in flight while stage ``s`` is computed.
Every rank issues the same collectives in the same order (the plan is computed identically
everywhere), and a stage that moves nothing on any rank is skipped by all of them.

Works over any process group: gloo on CPU, NCCL on GPU. Collectives are issued with
``async_op=True``; callers get a :class:`Pending` handle and ``wait()`` for the result.

**Emulated link** (:class:`EmulatedLink`, :func:`emulate_link`): on CPU the collectives take
a few percent of the attention time, so overlap cannot be measured. With a link installed,
every group-cast / group-reduce of this process takes at least ``bytes / bandwidth +
latency`` from the moment it is issued: ``wait()`` sleeps away whatever the real transfer
left of that time (compute done in between counts, as with a real comm stream). ``bytes`` is
the larger of what the rank sends and receives (a full-duplex link); transfers queue on the
link in issue order (one uses the bandwidth at a time, latencies overlap). Off by default.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .dispatch import DispatchPlan, remote_kv_ranges
from .mask import AttnRange, AttnSlices


@dataclass(frozen=True)
class StageComm:
    """One stage of one rank's traffic.

    ``send_idx`` lists the local rows to send, grouped by destination rank (``send_splits[r]``
    rows go to rank ``r``). The receive buffer holds ``recv_splits[p]`` rows from each source
    rank ``p`` in rank order; ``recv_ranges`` maps it: ``(global token range, buffer offset)``.
    """

    send_idx: torch.Tensor
    send_splits: tuple[int, ...]
    recv_splits: tuple[int, ...]
    recv_ranges: tuple[tuple[AttnRange, int], ...]
    active: bool  # False: no rank moves anything in this stage, so no rank calls the collective

    @property
    def num_send(self) -> int:
        return sum(self.send_splits)

    @property
    def num_recv(self) -> int:
        return sum(self.recv_splits)


class EmulatedLink:
    """A link of ``bandwidth`` bytes/s and ``latency`` s: a FIFO of transfers (see module doc).

    ``schedule(nbytes)`` books a transfer issued now and returns the time (on :meth:`now`) at
    which it completes: it starts when the link is free, holds it ``nbytes / bandwidth`` and
    completes ``latency`` later. ``busy_s`` sums the booked transfer times.

    ``clock``: ``"wall"`` (``time.perf_counter``; waits really sleep) or ``"thread_cpu"``: a
    dedicated-core clock, the calling thread's CPU time plus the emulated waiting, where a wait
    adds its remainder to the clock instead of sleeping. On a shared machine the second does not
    count the time the compute thread is descheduled by other jobs, so overlap measured on it
    is what a dedicated core would see.
    """

    def __init__(self, bandwidth: float, latency: float = 0.0, clock: str = "wall"):
        if not bandwidth > 0 or latency < 0:
            raise ValueError(f"an emulated link needs bandwidth > 0 and latency >= 0, got {bandwidth}, {latency}")
        if clock not in ("wall", "thread_cpu"):
            raise ValueError(f"clock must be 'wall' or 'thread_cpu', got {clock!r}")
        self.bandwidth, self.latency, self.clock = float(bandwidth), float(latency), clock
        self.free_at = 0.0
        self.busy_s = 0.0
        self.transfers = 0
        self.waited = 0.0  # thread_cpu clock: emulated waiting so far

    def now(self) -> float:
        return time.perf_counter() if self.clock == "wall" else time.thread_time() + self.waited

    def wait_until(self, t: float) -> None:
        left = t - self.now()
        if left > 0:
            if self.clock == "wall":
                time.sleep(left)
            else:
                self.waited += left

    def duration(self, nbytes: int) -> float:
        return nbytes / self.bandwidth + self.latency

    def schedule(self, nbytes: int) -> float:
        start = max(self.now(), self.free_at)
        self.free_at = start + nbytes / self.bandwidth
        self.busy_s += self.duration(nbytes)
        self.transfers += 1
        return self.free_at + self.latency


_LINK: EmulatedLink | None = None


@contextlib.contextmanager
def emulate_link(bandwidth: float, latency: float = 0.0, clock: str = "wall"):
    """Within the block, this process's CP collectives run over an :class:`EmulatedLink`
    (``bandwidth`` bytes/s, ``latency`` s, ``clock``); yields the link (its counters and clock)."""
    global _LINK
    previous, _LINK = _LINK, EmulatedLink(bandwidth, latency, clock)
    try:
        yield _LINK
    finally:
        _LINK = previous


class Pending:
    """An in-flight collective (``work`` None: nothing to wait for); :meth:`wait` returns its result.

    ``done_at``: with an emulated link, the time the transfer completes; ``wait()`` sleeps until then.
    """

    def __init__(self, work, result: torch.Tensor, done_at: float | None = None, link: EmulatedLink | None = None):
        self._work, self._result, self._done_at, self._link = work, result, done_at, link

    def wait(self) -> torch.Tensor:
        if self._work is not None:
            self._work.wait()
            self._work = None
        if self._done_at is not None:
            if self._link is not None:
                self._link.wait_until(self._done_at)
            else:
                left = self._done_at - time.perf_counter()
                if left > 0:
                    time.sleep(left)
            self._done_at = None
        return self._result


def _booked(nbytes: int) -> float | None:
    return _LINK.schedule(nbytes) if _LINK is not None else None


@dataclass(frozen=True)
class CommPlan:
    """The traffic of one rank for one (DispatchPlan, mask): build once per batch.

    ``local_ranges`` maps the rank's local tensor: ``(global token range, local offset)``.
    """

    rank: int
    cp: int
    local_ranges: tuple[tuple[AttnRange, int], ...]
    stages: tuple[StageComm, ...]

    @classmethod
    def build(cls, plan: DispatchPlan, slices: AttnSlices, rank: int, num_stages: int = 1) -> "CommPlan":
        if not 0 <= rank < plan.cp:
            raise ValueError(f"rank {rank} is outside the plan's {plan.cp} ranks")
        if num_stages < 1:
            raise ValueError(f"overlap stages must be >= 1, got {num_stages}")
        if slices.total_q != plan.total_seqlen:
            raise ValueError(f"mask has {slices.total_q} tokens, the dispatch plan {plan.total_seqlen}")
        owner = plan.chunk_owner()
        # wanted[r][s]: the (source rank, global range) pieces rank r fetches in stage s
        wanted = [_split_stages(_by_owner(remote_kv_ranges(plan, slices, r), owner, plan.chunk_size), num_stages)
                  for r in range(plan.cp)]
        to_local = _global_to_local(plan, rank)
        stages = []
        for s in range(num_stages):
            send_rows, send_splits = [], []
            for r in range(plan.cp):
                mine = [g for src, g in wanted[r][s] if src == rank]
                send_splits.append(sum(g.size for g in mine))
                send_rows.extend(to_local[g.start:g.end] for g in mine)
            recv_ranges, recv_splits, offset = [], [], 0
            for p in range(plan.cp):
                from_p = [g for src, g in wanted[rank][s] if src == p]
                for g in from_p:
                    recv_ranges.append((g, offset))
                    offset += g.size
                recv_splits.append(sum(g.size for g in from_p))
            send_idx = torch.cat(send_rows) if send_rows else torch.zeros(0, dtype=torch.long)
            active = any(wanted[r][s] for r in range(plan.cp))
            stages.append(StageComm(send_idx, tuple(send_splits), tuple(recv_splits), tuple(recv_ranges), active))
        local = []
        offset = 0
        for g in plan.local_token_ranges(rank):
            local.append((g, offset))
            offset += g.size
        return cls(rank, plan.cp, tuple(local), tuple(stages))

    def bytes_moved(self, row_bytes: int) -> int:
        """Bytes this rank receives in one group-cast of all stages (rows of ``row_bytes``)."""
        return sum(st.num_recv for st in self.stages) * row_bytes

    def group_cast(self, stage: int, x_local: torch.Tensor, group) -> Pending:
        """Start sending stage ``stage``'s rows of ``x_local [N_local, ...]``; ``wait()`` gives
        the receive buffer ``[num_recv, ...]`` laid out as ``recv_ranges``."""
        st = self.stages[stage]
        out = x_local.new_empty((st.num_recv, *x_local.shape[1:]))
        if not st.active:
            return Pending(None, out)
        send = x_local.index_select(0, st.send_idx.to(x_local.device)).contiguous()
        done_at = _booked(max(send.numel(), out.numel()) * x_local.element_size())
        work = dist.all_to_all_single(out, send, list(st.recv_splits), list(st.send_splits),
                                      group=group, async_op=True)
        return Pending(work, out, done_at, _LINK)

    def group_reduce(self, stage: int, x_recv: torch.Tensor, group) -> Pending:
        """Start returning ``x_recv [num_recv, ...]`` (e.g. partial dK/dV of received rows) to
        their owners. ``wait()`` gives the ``[num_send, ...]`` rows others computed for this
        rank's ``send_idx`` rows; :meth:`reduce_into` adds them into a local accumulator.
        """
        st = self.stages[stage]
        out = x_recv.new_empty((st.num_send, *x_recv.shape[1:]))
        if not st.active:
            return Pending(None, out)
        done_at = _booked(max(out.numel(), x_recv.numel()) * x_recv.element_size())
        work = dist.all_to_all_single(out, x_recv.contiguous(), list(st.send_splits), list(st.recv_splits),
                                      group=group, async_op=True)
        return Pending(work, out, done_at, _LINK)

    def reduce_into(self, stage: int, pending: Pending, accum: torch.Tensor) -> torch.Tensor:
        """Wait for a :meth:`group_reduce` and add the returned rows into ``accum [N_local, ...]``."""
        rows = pending.wait()
        return accum.index_add_(0, self.stages[stage].send_idx.to(accum.device), rows.to(accum.dtype))


def _by_owner(ranges: list[AttnRange], owner: list[int], chunk_size: int) -> list[tuple[int, AttnRange]]:
    """Cut global ranges at chunk-owner changes: ``[(owner rank, range), ...]`` in global order."""
    pieces: list[tuple[int, AttnRange]] = []
    for g in ranges:
        start = g.start
        while start < g.end:
            src = owner[start // chunk_size]
            end = min(g.end, (start // chunk_size + 1) * chunk_size)
            while end < g.end and owner[end // chunk_size] == src:
                end = min(g.end, end + chunk_size)
            pieces.append((src, AttnRange(start, end)))
            start = end
    return pieces


def _split_stages(pieces: list[tuple[int, AttnRange]], num_stages: int) -> list[list[tuple[int, AttnRange]]]:
    """Cut the pieces (in order) into ``num_stages`` groups of nearly equal token count."""
    total = sum(g.size for _, g in pieces)
    bounds = [total * (s + 1) // num_stages for s in range(num_stages)]
    stages: list[list[tuple[int, AttnRange]]] = [[] for _ in range(num_stages)]
    seen, s = 0, 0
    for src, g in pieces:
        start = g.start
        while start < g.end:
            while seen >= bounds[s]:
                s += 1
            take = min(g.end - start, bounds[s] - seen)
            stages[s].append((src, AttnRange(start, start + take)))
            start += take
            seen += take
    return stages


def _global_to_local(plan: DispatchPlan, rank: int) -> torch.Tensor:
    """``[padded_seqlen]`` long: local row of each global token held by ``rank`` (-1 elsewhere)."""
    to_local = torch.full((plan.padded_seqlen,), -1, dtype=torch.long)
    pos = plan.local_positions(rank)
    to_local[pos] = torch.arange(pos.numel())
    return to_local
