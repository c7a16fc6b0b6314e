"""Streaming generation on many ranks: the pipelined window sampler under TP and CP.

:class:`ParallelChunkSampler` is :class:`~magitrain.sampler.ChunkSampler` (same pipeline, same
schedule, same prefix handling, same output) with three things changed:

1. **Context parallelism over a sharded KV cache.** Each CP rank keeps the K/V of the cached
   tokens it owns (:class:`ShardedKVCache`), so cache memory divides by ``cp``. One forward
   sees a *combined* sequence ``[cache segment of rank 0 | ... | rank cp-1 | written chunk |
   window passes]``: every window query attends FULL to the cached context, so the context's
   order is free and rank ``r``'s own cached tokens form segment ``r`` (padded to a whole
   number of dispatch chunks). The window passes are dispatched by the training solver
   (``parallel.cp_solver``) on their block-causal mask; the attention itself is the training
   CP machinery: :class:`~magitrain.parallel.comm.CommPlan` (group-cast of exactly the remote
   K/V each rank's queries need, in ``overlap_stages`` stages, stage ``s + 1`` in flight while
   stage ``s`` is computed), :func:`~magitrain.parallel.attention.restrict_slices` (the local
   masks) and the LSE merge. Plans are cached per window shape (:class:`InferencePlan`).
2. **Writes fused into the next tick.** A finished chunk's K/V write (its forward at
   ``clean_t``, or re-noised to ``context_t``) is not a forward of its own: it rides along in
   the next tick's forward as one more sample (the "written chunk"), which the window passes attend to as context. Per layer
   its K/V depend only on what it sees (the cache and itself), so this is exact, and the
   chunk is handed out before its write runs (time to first chunk is unchanged). Its tokens
   are dealt round-robin, one dispatch chunk per rank, so each rank caches ``1/cp`` of it.
3. **Guidance passes batched.** The 2 or 3 CFG passes are samples of one packed forward
   (text; null text; null text without history), not 2-3 forwards.

Tensor parallelism needs nothing here: the model's attention projections are sharded by heads
(:func:`~magitrain.parallel.tensor_parallel.apply_tensor_parallel`), so each rank's attention,
cache and K/V traffic hold its local heads only.

The sampler runs on a model already parallelized for *training* too (:func:`sample_video`,
what validation calls): it swaps each layer's ``core_attention`` and the model's ``forward``
for the time of the sampling and restores them after, and it calls the model through
``model(...)`` so FSDP2's unshard hooks run (every rank of the job must call it together).

Exactness: every rank computes the same undispatched velocity, so the state stays replicated;
the result equals the one-process sampler up to float summation order (tests:
``tests/test_generate_parallel.py``, 1e-5 relative in fp32 on gloo).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from magitrain.diffusion import guided_velocity
from magitrain.layout import PackedLayout
from magitrain.model import TokenMeta
from magitrain.parallel.attention import restrict_slices
from magitrain.parallel.comm import CommPlan
from magitrain.parallel.dispatch import DispatchPlan, solve
from magitrain.parallel.kernels import merge_partials, slice_attention
from magitrain.parallel.mask import AttnRange, AttnSlice, AttnSlices
from magitrain.sampler import ChunkSampler, SamplerConfig

# torch >= 2.13 renamed all_gather_into_tensor (the old name warns)
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# --- the sharded cache ------------------------------------------------------------------------


class ShardedKVCache:
    """This rank's K/V rows of every cached chunk, per layer, plus every rank's row counts.

    ``lengths[c][r]``: rows of cached chunk ``c`` (oldest first) held by rank ``r``; the same
    on every rank (it follows from the dispatch plans, which every rank computes alike).
    Writes are staged per layer during a forward and committed after it (:meth:`commit`), so
    every layer of one forward sees the same cache. ``max_chunks`` drops the oldest chunk;
    with ``sink_chunks = S`` the first ``S`` chunks stay and the cap applies to the rest.

    Chunk order (the window attends FULL to the cache, so order is free): ``[recent chunks,
    oldest first | sink chunks]``, so the chunk a write drops is always each rank's first rows
    (what the window's ``skip_rows`` skip).
    """

    def __init__(self, num_layers: int, cp: int, max_chunks: int | None = None, sink_chunks: int = 0):
        if sink_chunks < 0 or (sink_chunks and max_chunks is None):
            raise ValueError(f"sink_chunks={sink_chunks} must be >= 0, and > 0 only with a max_chunks cap")
        self.num_layers, self.cp, self.max_chunks, self.sink_chunks = num_layers, cp, max_chunks, sink_chunks
        self._k: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._v: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._seg: list[tuple[int, torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self._staged: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * num_layers
        self.lengths: list[tuple[int, ...]] = []
        self.chunks_written = 0

    @property
    def num_chunks(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        """Bytes of K/V this rank holds (the per-chunk tensors)."""
        return sum(t.numel() * t.element_size() for layer in self._k + self._v for t in layer)

    def rank_lengths(self, skip_oldest: int = 0) -> tuple[int, ...]:
        """Rows each rank holds, without the ``skip_oldest`` oldest chunks."""
        return tuple(sum(c[r] for c in self.lengths[skip_oldest:]) for r in range(self.cp))

    def segment(self, layer: int, padded: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's cached ``(k, v)`` of ``layer``, oldest first, zero-padded to ``padded`` rows."""
        cached = self._seg[layer]
        if cached is None or cached[0] != padded:
            ks, vs = self._k[layer], self._v[layer]
            k, v = torch.cat(ks), torch.cat(vs)
            pad = padded - k.shape[0]
            if pad:
                k = torch.cat([k, k.new_zeros((pad, *k.shape[1:]))])
                v = torch.cat([v, v.new_zeros((pad, *v.shape[1:]))])
            cached = self._seg[layer] = (padded, k, v)
        return cached[1], cached[2]

    def drops_on_commit(self) -> bool:
        """Whether the next commit drops a chunk (the oldest recent one: index 0)."""
        recent = self.num_chunks - min(self.num_chunks, self.sink_chunks)
        return self.max_chunks is not None and self.num_chunks >= self.sink_chunks and recent + 1 > self.max_chunks

    def stage(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self._staged[layer] = (k.detach(), v.detach())

    def commit(self, lengths: tuple[int, ...]) -> None:
        """Append the staged rows of every layer as one new chunk (``lengths``: rows per rank)."""
        if any(s is None for s in self._staged):
            raise RuntimeError("a cache write must stage every layer before it is committed")
        n = self.num_chunks
        drop = self.drops_on_commit()
        pos = n if n < self.sink_chunks else n - self.sink_chunks  # a sink chunk last, a recent one before the sink
        for layer, (k, v) in enumerate(self._staged):
            self._k[layer].insert(pos, k)
            self._v[layer].insert(pos, v)
            if drop:
                del self._k[layer][0], self._v[layer][0]
            self._seg[layer] = None
        self.lengths.insert(pos, tuple(lengths))
        if drop:
            del self.lengths[0]
        self._staged = [None] * self.num_layers
        self.chunks_written += 1


# --- one forward's plan ------------------------------------------------------------------------


@dataclass
class InferencePlan:
    """Dispatch and attention plan of one forward on one rank (cached per window shape).

    ``rows``: for each local window row, its row in the real (unpadded) window sequence, -1 for
    dispatch padding. ``write_rows``: local rows that belong to the written chunk (their K/V
    are staged into the cache); ``write_lengths``: how many such rows every rank has.
    """

    cp: int
    segment_rows: int  # Lc: rows of every rank's (padded) cache segment in the local KV tensor
    rows: torch.Tensor
    all_rows: list[torch.Tensor]  # ``rows`` of every rank (to undispatch)
    write_rows: torch.Tensor
    write_lengths: tuple[int, ...]
    comm: CommPlan
    local_slices: AttnSlices
    stage_slices: list[AttnSlices]
    dispatch: DispatchPlan


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def build_plan(window_slices: AttnSlices, write_tokens: int, context_slices, seg_lengths: tuple[int, ...],
               cp: int, rank: int, chunk_size: int, solver: str, overlap_stages: int,
               solved: dict | None = None) -> InferencePlan:
    """The plan of one forward.

    The real window sequence is ``[written chunk (write_tokens, may be 0) | passes]``;
    ``window_slices`` is its mask (real rows). ``context_slices``: ``[(q_start, q_end,
    skip_rows)]`` real-row ranges that attend FULL to the cached context, each rank's rows
    from ``skip_rows[r]`` on (a sliding context drops the oldest chunk for the window).
    ``seg_lengths[r]``: cached rows on rank ``r``. ``solved``: a dict caching the solver's plans
    of the passes' mask (the same window shape recurs while the context grows).
    """
    seg = _ceil_to(max(seg_lengths), chunk_size) if seg_lengths and max(seg_lengths) else 0
    kc = seg // chunk_size
    n_real = window_slices.total_q
    n_pass = n_real - write_tokens
    # dispatch chunks: context segments (owner fixed), the written chunk (one chunk per rank), passes (solver)
    ws = -(-write_tokens // cp) if write_tokens else 0  # written-chunk rows per rank
    kw = -(-ws // chunk_size)  # dispatch chunks each rank gets of it
    w_chunks = cp * kw
    base_w, base_p = cp * seg, cp * seg + w_chunks * chunk_size
    pass_slices = AttnSlices([AttnSlice(s.q_range.shift(-write_tokens), s.k_range.shift(-write_tokens), s.mask_type)
                              for s in window_slices if s.q_range.start >= write_tokens
                              and s.k_range.start >= write_tokens], n_pass)
    pass_plan = None
    if n_pass:
        key = (tuple((s.q_range.start, s.q_range.end, s.k_range.start, s.k_range.end, s.mask_type.value)
                     for s in pass_slices), cp, chunk_size, solver)
        pass_plan = None if solved is None else solved.get(key)
        if pass_plan is None:
            pass_plan = solve(pass_slices, cp, chunk_size, solver if cp > 1 else "contiguous")
            if solved is not None:
                solved[key] = pass_plan
    ranks = []
    for r in range(cp):
        chunks = list(range(r * kc, (r + 1) * kc))
        chunks += [cp * kc + r * kw + j for j in range(kw)]
        if pass_plan is not None:
            chunks += [cp * kc + w_chunks + c for c in pass_plan.ranks[r]]
        ranks.append(tuple(chunks))
    pass_padded = pass_plan.padded_seqlen if pass_plan is not None else 0
    total = base_p + pass_padded
    plan = DispatchPlan(total, chunk_size, cp, tuple(ranks), pass_plan.solver if pass_plan else "contiguous")

    def to_combined(i: int) -> int:  # real window row -> combined position
        if i < write_tokens:
            return base_w + (i // ws) * kw * chunk_size + i % ws
        return base_p + (i - write_tokens)

    # real window row of every combined position (-1: context or padding)
    real_of = torch.full((total,), -1, dtype=torch.long)
    real = torch.arange(n_real)
    real_of[torch.tensor([to_combined(i) for i in range(n_real)], dtype=torch.long)] = real

    def shift_range(a: int, b: int) -> list[AttnRange]:  # real rows [a, b) -> combined ranges
        out, i = [], a
        while i < b:
            j = min(b, (i // ws + 1) * ws) if i < write_tokens else b
            out.append(AttnRange(to_combined(i), to_combined(j - 1) + 1))
            i = j
        return out

    slices = []
    for s in window_slices:
        for q in shift_range(s.q_range.start, s.q_range.end):
            for k in shift_range(s.k_range.start, s.k_range.end):
                if s.mask_type.value != "full" and (q.size, k.size) != (s.q_range.size, s.k_range.size):
                    raise ValueError("internal: only FULL slices may span the written chunk's dispatch chunks")
                slices.append(AttnSlice(q, k, s.mask_type))
    for q0, q1, skip in context_slices:
        for q in shift_range(q0, q1):
            for r in range(cp):
                if seg_lengths[r] > skip[r]:
                    slices.append(AttnSlice(q, AttnRange(r * seg + skip[r], r * seg + seg_lengths[r])))
    combined = AttnSlices(slices, total)
    comm = CommPlan.build(plan, combined, rank, overlap_stages)
    q_layout = []  # the window part of the local tensor (context rows first; cp=1 merges them into one range)
    for g, off in comm.local_ranges:
        if g.end > base_w:
            cut = max(0, base_w - g.start)
            q_layout.append((AttnRange(g.start + cut, g.end), off + cut - seg))
    q_layout = tuple(q_layout)
    n_q = plan.local_seqlen - seg
    local_slices = restrict_slices(combined, q_layout, comm.local_ranges, n_q, plan.local_seqlen)
    stage_slices = [restrict_slices(combined, q_layout, st.recv_ranges, n_q, st.num_recv) for st in comm.stages]
    all_rows = [real_of[plan.local_positions(r)[seg:]] for r in range(cp)]
    rows = all_rows[rank]
    write_lengths = tuple(int(((rw >= 0) & (rw < write_tokens)).sum()) for rw in all_rows)
    write_rows = torch.nonzero((rows >= 0) & (rows < write_tokens)).flatten()
    return InferencePlan(cp, seg, rows, all_rows, write_rows, write_lengths, comm, local_slices, stage_slices, plan)


# --- the attention seam ------------------------------------------------------------------------


@dataclass
class CommTimes:
    """Seconds the attention spent blocked on remote K/V (``exposed``) and in all, per forward."""

    exposed_s: float = 0.0
    attention_s: float = 0.0
    bytes_received: int = 0
    forwards: int = 0
    per_forward: list = field(default_factory=list)


class _ForwardState:
    """What the layers of the current forward share: its plan, the cache, the group, the timers."""

    def __init__(self, cache: ShardedKVCache, group, overlap: bool):
        self.cache, self.group, self.overlap = cache, group, overlap
        self.plan: InferencePlan | None = None
        self.times = CommTimes()


class ShardedCachedAttention(nn.Module):
    """``core_attention`` of layer ``layer`` under :class:`ParallelChunkSampler`: local window
    queries over ``[this rank's cache segment | local window K/V]`` and the remote K/V the plan
    group-casts, merged by log-sum-exp; stages the written chunk's K/V into the cache."""

    def __init__(self, state: _ForwardState, layer: int):
        super().__init__()
        self.state, self.layer = state, layer

    def forward(self, q, k, v, slices):
        st, rt = self.state, self.state.plan
        t0 = time.perf_counter()
        if rt.segment_rows:
            ck, cv = st.cache.segment(self.layer, rt.segment_rows)
            k_all, v_all = torch.cat([ck.to(k.dtype), k]), torch.cat([cv.to(v.dtype), v])
        else:
            k_all, v_all = k, v
        d = k.shape[-1]
        stages = rt.comm.stages
        kv = torch.cat([k_all, v_all], dim=-1) if any(s.active for s in stages) else None
        exposed = 0.0
        pending = rt.comm.group_cast(0, kv, st.group) if kv is not None else None
        if pending is not None and not st.overlap:  # measuring: the same traffic, nothing computed under it
            w0 = time.perf_counter()
            pending.wait()
            exposed += time.perf_counter() - w0
        parts = [slice_attention(q, k_all, v_all, rt.local_slices)]
        for s in range(len(stages) if kv is not None else 0):
            w0 = time.perf_counter()
            buf = pending.wait()
            exposed += time.perf_counter() - w0
            if s + 1 < len(stages):
                pending = rt.comm.group_cast(s + 1, kv, st.group)
                if not st.overlap:
                    w0 = time.perf_counter()
                    pending.wait()
                    exposed += time.perf_counter() - w0
            st.times.bytes_received += buf.numel() * buf.element_size()
            if len(rt.stage_slices[s]):
                parts.append(slice_attention(q, buf[..., :d], buf[..., d:], rt.stage_slices[s]))
        out, _ = merge_partials([(0, o, lse) for o, lse in parts], q.shape[0], q.shape[1], v.shape[-1],
                                q.device, q.dtype)
        if rt.write_lengths and sum(rt.write_lengths):
            idx = rt.write_rows.to(k.device)
            st.cache.stage(self.layer, k.index_select(0, idx), v.index_select(0, idx))
        st.times.exposed_s += exposed
        st.times.attention_s += time.perf_counter() - t0
        return out


class _TokensForward:
    """Installed as ``model.forward`` while sampling: ``model(x_local, t, ...)`` runs
    ``forward_tokens`` on the local rows (the metadata rides in ``self.meta``, not in the
    arguments, so FSDP's input casting never touches the RoPE positions)."""

    def __init__(self, model):
        self.model, self.meta = model, None

    def __call__(self, x, t, text_emb, text_mask, text_null=None, step_size=None):
        return self.model.forward_tokens(x, t, text_emb, text_mask, self.meta, text_null, step_size)


@contextlib.contextmanager
def sampling_attached(model: nn.Module, state: _ForwardState):
    """Swap every layer's ``core_attention`` and the model's ``forward``; restore both on exit."""
    attns = [layer.self_attention for layer in model.layers]
    saved_cores = [a.core_attention for a in attns]
    had_forward = "forward" in model.__dict__
    saved_forward = model.__dict__.get("forward")
    forward = _TokensForward(model)
    try:
        for i, a in enumerate(attns):
            a.core_attention = ShardedCachedAttention(state, i)
        model.forward = forward
        yield forward
    finally:
        for a, core in zip(attns, saved_cores):
            a.core_attention = core
        if had_forward:
            model.forward = saved_forward
        else:
            del model.forward


# --- the sampler -------------------------------------------------------------------------------


class ParallelChunkSampler(ChunkSampler):
    """:class:`~magitrain.sampler.ChunkSampler` over TP x CP ranks (see the module docstring).

    ``model``: a :class:`~magitrain.model.MagiDiT`, tensor-parallel already if ``tp > 1``
    (FSDP-wrapped too, when it comes from training). ``cp_group``: the CP process group (None:
    one CP rank). Every rank of the job calls :meth:`stream` with the same arguments and gets
    the same chunks. ``fuse_writes=False`` writes each finished chunk in a forward of its own
    (to measure what fusing hides); ``overlap=False`` waits for each remote K/V stage before
    computing anything (to measure what the staging hides).
    """

    def __init__(self, model, text_emb, text_mask, height: int, width: int, cfg: SamplerConfig,
                 prefix: torch.Tensor | None = None, cp_group=None, chunk_size: int = 16,
                 solver: str = "default", overlap_stages: int = 1, fuse_writes: bool = True, overlap: bool = True):
        if not cfg.kv_cache:
            raise ValueError("the parallel sampler always caches K/V (kv_cache=False is a one-process check)")
        if cfg.strict_history:
            raise ValueError("strict_history (--strict-history) is not supported by the multi-rank sampler; "
                             "generate on one process")
        super().__init__(model, text_emb, text_mask, height, width, cfg, prefix)
        self.group = cp_group
        self.cp = 1 if cp_group is None else dist.get_world_size(cp_group)
        self.rank = 0 if cp_group is None else dist.get_rank(cp_group)
        self.tokens = self.chunk_shape[0]
        # dispatch chunks never exceed a written chunk's share, so every rank caches ~1/cp of each chunk
        self.chunk_size = max(1, min(chunk_size, -(-self.tokens // self.cp)))
        self.solver, self.overlap_stages, self.fuse_writes = solver, overlap_stages, fuse_writes
        self.cache = ShardedKVCache(model.cfg.num_layers, self.cp, cfg.max_context_chunks, cfg.sink_chunks)
        self.state = _ForwardState(self.cache, cp_group, overlap)
        self._pending: tuple[int, torch.Tensor] | None = None
        self._plans: dict = {}  # window shape and cache row counts -> InferencePlan (LRU of 8)
        self._solved: dict = {}  # the passes' mask -> the solver's DispatchPlan
        self.forwards = 0
        self._forward = None

    @property
    def comm_times(self) -> CommTimes:
        return self.state.times

    def stream(self) -> Iterator[torch.Tensor]:
        with torch.no_grad(), sampling_attached(self.model, self.state) as fwd:
            self._forward = fwd
            for c in range(self.prefix_chunks):
                x = self.prefix_tokens[c * self.tokens:(c + 1) * self.tokens]
                self._write_context(c, x)
                yield self._latent(x)
            yield from self._pipeline()

    # --- overrides of the one-process sampler -----------------------------------------------

    def _write_context(self, index: int, x: torch.Tensor) -> None:
        """Keep the finished chunk for the next forward (fused), flushing an older one first."""
        if self._pending is not None:
            self._run(None, None, None, None)
        self._pending = (index, self._context_tokens(index, x))
        if not self.fuse_writes:
            self._run(None, None, None, None)

    def _velocity(self, active, x, t, step=None):
        idx = [a.index for a in active]
        passes = self.cfg.passes
        out = self._run(idx, x, t, step)
        a = len(idx) * self.tokens
        v = [out[i * a:(i + 1) * a] for i in range(passes)]
        self.evaluations += passes
        return guided_velocity(v[0], v[1] if passes >= 2 else None, v[2] if passes == 3 else None,
                               self.cfg.history_scale or 1.0, self.cfg.cfg_scale)

    # --- one forward ------------------------------------------------------------------------

    def _run(self, idx, x, t, step) -> torch.Tensor | None:
        """One forward of ``[pending written chunk | guidance passes of the window]``; returns the
        passes' velocity ``[passes * window tokens, ...]`` (None for a write-only forward)."""
        write, self._pending = self._pending, None
        frames, (_, h, w) = self.grid[0], self.grid
        grids, offsets, ts, chunks, nulls, steps = [], [], [], [], [], []
        xs = []
        if write is not None:
            grids.append((frames, h, w, frames))
            offsets.append(write[0] * frames)
            ts.append(torch.full((1,), self.context_t, device=self.device, dtype=self.schedule.dtype))
            chunks.append(write[0])
            nulls.append(False)
            steps.append(torch.zeros(1, device=self.device, dtype=self.schedule.dtype))
            xs.append(write[1])
        passes = 0 if idx is None else self.cfg.passes
        for p in range(passes):
            grids.append((len(idx) * frames, h, w, frames))
            offsets.append(idx[0] * frames)
            ts.append(t)
            chunks += idx
            nulls += [p >= 1] * len(idx)
            steps.append(step if step is not None else torch.zeros_like(t))
            xs.append(x)
        layout = PackedLayout.pack(grids, frame_offsets=offsets)
        drop = [False] * (1 if write is not None else 0) + [p == 2 for p in range(passes)]
        meta = self.model.prepare(layout, torch.tensor(drop, device=self.device))
        wt = self.tokens if write is not None else 0
        plan = self._plan(meta.self_slices, wt, len(idx) if idx else 0, passes)
        rows = plan.rows.to(self.device)
        x_all = torch.cat(xs)
        keep = (rows >= 0)
        safe = rows.clamp(min=0)
        x_local = torch.where(keep.view(-1, 1, 1, 1, 1), x_all[safe], torch.zeros((), dtype=x_all.dtype,
                                                                                 device=self.device))
        rope = torch.where(keep.view(-1, 1), meta.rope_pos[safe], torch.zeros((), device=self.device))
        chunk_ids = torch.where(keep, meta.chunk_ids[safe], torch.full_like(safe, -1))
        self._forward.meta = TokenMeta(rope, chunk_ids, meta.self_slices)
        self.state.plan = plan
        chunk_t = torch.tensor(chunks, device=self.device)
        text_null = torch.tensor(nulls, device=self.device)
        kw = {"step_size": torch.cat(steps).to(self.schedule.dtype)} if self.distilled else {}
        out_local = self.model(x_local, torch.cat(ts), self.text_emb[chunk_t], self.text_mask[chunk_t],
                               text_null=text_null if bool(text_null.any()) else None, **kw)
        self.forwards += 1
        if write is not None:
            self.cache.commit(plan.write_lengths)
        if idx is None:
            return None
        out = self._undispatch(out_local, plan, meta.num_tokens)
        return out[wt:]

    def _undispatch(self, out_local: torch.Tensor, plan: InferencePlan, n_real: int) -> torch.Tensor:
        if self.cp == 1:
            gathered, rows = out_local, plan.rows
        else:
            buf = out_local.new_empty((self.cp * out_local.shape[0], *out_local.shape[1:]))
            _all_gather(buf, out_local.contiguous(), group=self.group)
            gathered, rows = buf, torch.cat(plan.all_rows)
        rows = rows.to(out_local.device)
        keep = rows >= 0
        out = out_local.new_empty((n_real, *out_local.shape[1:]))
        out[rows[keep]] = gathered[keep]
        return out

    def _plan(self, window_slices: AttnSlices, write_tokens: int, window_chunks: int, passes: int) -> InferencePlan:
        """The (cached) plan: keyed by the window shape and the cache's per-rank row counts."""
        # the window sees the chunks that remain after the write (a sliding context drops the oldest recent one)
        skip_window = 1 if write_tokens and self.cache.drops_on_commit() else 0
        full = self.cache.rank_lengths()
        window_skip = tuple(a - b for a, b in zip(full, self.cache.rank_lengths(skip_window)))
        mask = tuple((s.q_range.start, s.q_range.end, s.k_range.start, s.k_range.end, s.mask_type.value)
                     for s in window_slices)
        key = (mask, write_tokens, window_chunks, passes, full, window_skip)
        plan = self._plans.get(key)
        if plan is None:
            ctx = []
            if write_tokens:
                ctx.append((0, write_tokens, (0,) * self.cp))
                if passes:  # the history passes also see the written chunk
                    window_slices = self._with_written(window_slices, write_tokens, window_chunks, passes)
            a = window_chunks * self.tokens
            for p in range(min(passes, 2)):  # pass 3 (no history) sees no context
                ctx.append((write_tokens + p * a, write_tokens + (p + 1) * a, window_skip))
            plan = build_plan(window_slices, write_tokens, ctx, full, self.cp, self.rank, self.chunk_size,
                              self.solver, self.overlap_stages, self._solved)
            if len(self._plans) >= 8:
                self._plans.pop(next(iter(self._plans)))
            self._plans[key] = plan
        return plan

    @staticmethod
    def _with_written(slices: AttnSlices, write_tokens: int, window_chunks: int, passes: int) -> AttnSlices:
        a = (slices.total_q - write_tokens) // passes
        extra = [AttnSlice(AttnRange(write_tokens + p * a, write_tokens + (p + 1) * a), AttnRange(0, write_tokens))
                 for p in range(min(passes, 2))]
        return AttnSlices(list(slices) + extra, slices.total_q)


# --- entry point for validation and the CLI ----------------------------------------------------


def sample_video(model, text_emb, text_mask, height: int, width: int, cfg: SamplerConfig,
                 prefix: torch.Tensor | None = None, env=None, parallel=None) -> torch.Tensor:
    """The whole video's latent ``[C, T, height, width]`` sampled with ``model`` on its current layout.

    ``model``: as the trainer holds it (tensor-parallel, FSDP-wrapped, with CP attention
    installed: all of it is fine). ``env``: the :class:`~magitrain.parallel.mesh.ParallelEnv`
    (None: one process); ``parallel``: the :class:`~magitrain.config.ParallelConfig` (dispatch
    chunk size, solver, overlap stages). Collective: EVERY rank of the job calls it with the
    same arguments (FSDP's all-gathers span dp x cp); every rank gets the same latent, rank 0
    writes it. Data-parallel replicas sample the same video.
    """
    group = env.group("cp") if env is not None and env.distributed and env.cp > 1 else None
    kw = {}
    if parallel is not None:
        kw = dict(chunk_size=parallel.cp_chunk_size, solver=parallel.cp_solver, overlap_stages=parallel.overlap_stages)
    was_training = model.training
    model.eval()
    try:
        sampler = ParallelChunkSampler(model, text_emb, text_mask, height, width, cfg, prefix, cp_group=group, **kw)
        return sampler.generate()
    finally:
        model.train(was_training)


def overlap_summary(times: CommTimes) -> dict:
    return {"attention_s": round(times.attention_s, 4), "exposed_comm_s": round(times.exposed_s, 4),
            "received_mib": round(times.bytes_received / 2**20, 3)}


__all__ = ["ParallelChunkSampler", "ShardedKVCache", "build_plan", "overlap_summary", "sample_video"]


# --- the generation layout and its weights (the CLI under torchrun) ---------------------------


def generation_config(cfg, overrides: list[str], world: int):
    """The checkpoint's config with the generation job's layout: ``parallel`` reset to its defaults
    (the training layout is not the generation's; any saved layout loads), then the ``parallel.*``
    dotlist overrides (``parallel.tp=2``), checked for this job of ``world`` processes. Only
    ``parallel.*`` keys: the model is the checkpoint's."""
    import dataclasses

    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from magitrain.config import ConfigError, ParallelConfig
    from magitrain.parallel.mesh import validate_layout

    bad = [o for o in overrides if "=" not in o or not o.startswith("parallel.")]
    if bad:
        raise ConfigError(f"generation takes parallel.* overrides only (key=value), got: {' '.join(bad)}")
    try:
        base = dataclasses.replace(cfg, parallel=ParallelConfig())
        merged = OmegaConf.merge(OmegaConf.structured(base), OmegaConf.from_dotlist(list(overrides)))
        out = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(" ".join(str(e).split())) from None
    p = out.parallel
    if p.dp != 1:
        raise ConfigError(f"parallel.dp={p.dp}: generation runs one video on tp x cp ranks (set parallel.dp=1)")
    # the training check of data.seq_tokens >= cp x cp_chunk_size does not apply: the sampler picks its own
    out.data.seq_tokens = max(out.data.seq_tokens, p.cp * p.cp_chunk_size)
    validate_layout(out, world)
    return out


def load_sharded_weights(model: nn.Module, src) -> None:
    """Fill ``model`` (TP-sharded or not) from a :class:`~magitrain.weights.WeightSource` of any
    layout. A DCP checkpoint is read by DCP into the current shards (each rank reads only the
    byte ranges of its own shards: a reshard, no export, no full copy); a release or legacy
    file is read tensor by tensor and each rank keeps its shard."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    from magitrain.weights import DCPSource, WeightsError, check_keys

    params = model.state_dict(keep_vars=True)
    check_keys({k: tuple(v.shape) for k, v in params.items()}, {k: v.shape for k, v in src.info.items()}, src.path)
    if isinstance(src, DCPSource) and dist.is_initialized():
        import torch.distributed.checkpoint as dcp

        from magitrain.checkpoint import SafeFileSystemReader, SafeLoadPlanner
        from magitrain.parallel import collectives

        keys = src._keys  # name -> DCP key of the chosen weights (EMA or raw)
        # DCP copies each stored piece into the target shard (converting dtype), reading only what it needs
        targets = {keys[name]: p.detach() for name, p in params.items()}
        try:
            dcp.load(targets, storage_reader=SafeFileSystemReader(os.path.join(src.path, "tensors")),
                     planner=SafeLoadPlanner(), process_group=collectives.cpu_group())
        except Exception as e:  # noqa: BLE001 - DCP wraps I/O errors per rank
            raise WeightsError(f"{src.path}: cannot be loaded into this layout ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:300]})") from None
        return
    with torch.no_grad():
        for name, full in src.items():
            p = params[name]
            if isinstance(p, DTensor):
                shard = distribute_tensor(full.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                p.to_local().copy_(shard.to_local())
            else:
                p.copy_(full)


def load_parallel_model(ckpt: str, overrides: list[str], prefer_ema: bool = True, expected=None):
    """``(config, model, env)`` for a generation job under torchrun: starts the process groups of
    the ``parallel.*`` layout, builds the model (TP-sharded), loads the checkpoint into it."""
    from dataclasses import fields

    from magitrain.config import ModelConfig
    from magitrain.model import MagiDiT
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.tensor_parallel import apply_tensor_parallel
    from magitrain.weights import open_weights

    src = open_weights(ckpt, ema=None if prefer_ema else False)
    src.check_against_config()
    cfg = generation_config(src.config, overrides, int(os.environ.get("WORLD_SIZE", "1")))
    if expected is not None:
        diff = [f"{f.name}={getattr(cfg.model, f.name)!r} (expected {getattr(expected, f.name)!r})"
                for f in fields(ModelConfig) if getattr(cfg.model, f.name) != getattr(expected, f.name)]
        if diff:
            raise ValueError(f"checkpoint {ckpt} was trained with a different model config: {', '.join(diff)}")
    env = init_parallel(cfg)
    model = MagiDiT(cfg.model).to(env.device)
    if env.tp > 1:
        apply_tensor_parallel(model, env.submesh("tp"))
    load_sharded_weights(model, src)
    return cfg, model.eval(), env
