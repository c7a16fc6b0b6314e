"""MAGI-1's pipelined chunk sampler: a window of chunks denoised at staggered noise levels.

The video is generated chunk by chunk. With ``steps = S`` and ``window = W``, every chunk runs
the same ``S``-step schedule (:func:`~magitrain.diffusion.sampling_schedule`: linspace, square,
shift); a chunk enters the window when its predecessor has done ``S / W`` steps (one stage), so
up to ``W`` chunks are in flight, each a stage further along than the next. One model
evaluation ("tick") advances all of them by one step, the oldest finishes after ``S`` steps,
is handed out, and becomes clean context: its K/V are written into the :class:`KVCache` by one
forward at ``t = clean_t`` (seeing the cached chunks before it, as under the training mask).
A request of ``N`` chunks takes ``(S / W) * (N + W - 1)`` ticks.

Guidance (per tick, all window chunks at once): ``cfg_scale`` alone is 2-pass classifier-free
guidance against the null caption (``text_null``); with ``history_scale`` it is MAGI-1's
3-pass form (history + text, history + null text, no history + null text; see
:func:`~magitrain.diffusion.guided_velocity`). The history-free pass ignores the cache.
A step-size conditioned (shortcut + guidance distilled, ``magitrain/distill.py``) model runs one
pass per evaluation, told every window chunk's step ``t_next - t`` (finished chunks written to
the cache: 0), e.g. ``steps=8`` for a model distilled on the 8-step schedule.

Exactness contract (tests/test_generate.py): the streamed latents equal a cache-free
reference that, at every evaluation, runs ``[all finished chunks at clean_t | window chunks]``
under the block-causal mask (with ``max_context_chunks = K``: every chunk sees at most the
``K`` finished chunks before the window, or before itself for a finished chunk).

Without the KV cache (``kv_cache=False``, a diagnostic), every evaluation runs ``[finished
context chunks at clean_t | window chunks]`` through the model under the block-causal mask, as
that reference does (with ``max_context_chunks = K``: the last ``K`` finished chunks, re-encoded
together, so a context chunk sees only those before it in the window of ``K``).

Chunk noise is drawn from a generator seeded by ``(seed, chunk index)`` and a chunk never sees
later chunks, so the first ``k`` chunks of a long request equal a request of ``k`` chunks.

Attention sink + rolling window (``sink_chunks = S`` with ``max_context_chunks = K``): the cache
keeps the first ``S`` finished chunks for good and the ``K`` most recent after them, so its
memory is flat for any length; a chunk's K/V are written seeing exactly those (and itself), and
the window chunks see them plus the window chunks before them. Trained for by the same rule on
the packed mask (``model.sink_chunks`` / ``model.max_context_chunks``, :mod:`magitrain.layout`);
``strict_history`` holds every window chunk to that rule as well (the sink and its ``K``
predecessors, cached or in the window), which is the training mask exactly for any window.

History level (``context_t = T``): a finished chunk is cached from ``T * x + (1 - T) * noise``
(:func:`context_noise`, seeded by ``(seed, chunk)``) with the model told ``t = T``, matching
training with ``diffusion.history_t``; None caches the chunk as it is at ``clean_t`` (MAGI-1).
The handed-out chunk is always the clean one.

Prefix (image-to-video, continuation): clean latent frames. Whole prefix chunks are written to
the cache and handed out as they are. A chunk only partly covered (e.g. one image frame of a
2-frame chunk) is generated with its known frames replaced, before every evaluation and after
the last step, by their point on the same flow path: ``t * prefix + (1 - t) * noise`` (MAGI-1
pastes the clean frames; the noised form keeps the chunk at one noise level, as in training).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional

import torch

from magitrain.diffusion import guided_velocity, sampling_schedule
from magitrain.kv_cache import OFF, READ, WRITE, KVCache, kv_cache_attached
from magitrain.layout import PackedLayout, patchify, unpatchify
from magitrain.parallel.mask import AttnSlice, AttnSlices

SOLVERS = ("euler", "heun")


@dataclass
class SamplerConfig:
    steps: int = 32  # ODE steps per chunk
    window: int = 4  # chunks in flight; must divide steps
    solver: str = "euler"  # euler | heun (2nd order, two evaluations per step)
    shift: float = 3.0  # timestep shift of the schedule (MAGI-1: 3)
    square: bool = True  # MAGI-1's squared linspace before the shift
    cfg_scale: float = 1.0  # text guidance scale s_text (1: no guidance)
    history_scale: Optional[float] = None  # s_history of 3-pass CFG (None: 1- or 2-pass)
    clean_t: float = 1.0  # t of finished chunks when their K/V are cached (the training clean_t)
    max_context_chunks: Optional[int] = None  # sliding context: finished chunks kept in the cache
    sink_chunks: int = 0  # attention sink: the first chunks, kept in the cache besides max_context_chunks
    context_t: Optional[float] = None  # level finished chunks are re-noised to when cached (None: clean_t, as is)
    # every window chunk too sees only the sink and its max_context_chunks predecessors (the training mask's
    # rule); False: the window chunks see the whole cache plus the window chunks before them
    strict_history: bool = False
    seed: int = 0
    kv_cache: bool = True  # False: every evaluation re-encodes the finished context chunks (slow; a check)

    def validate(self) -> None:
        if self.steps < 1 or self.window < 1:
            raise ValueError(f"steps={self.steps} and window={self.window} must be >= 1")
        if self.steps % self.window:
            raise ValueError(f"window={self.window} must divide steps={self.steps} (each stage is steps/window steps)")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver={self.solver!r} is not one of {', '.join(SOLVERS)}")
        if self.shift <= 0:
            raise ValueError(f"shift={self.shift} must be > 0")
        if self.max_context_chunks is not None and self.max_context_chunks < 1:
            raise ValueError(f"max_context_chunks={self.max_context_chunks} must be >= 1 (or None: unlimited)")
        if self.sink_chunks < 0:
            raise ValueError(f"sink_chunks={self.sink_chunks} must be >= 0")
        if self.sink_chunks and self.max_context_chunks is None:
            raise ValueError(f"sink_chunks={self.sink_chunks} needs max_context_chunks (without a cap every "
                             "chunk stays in the cache: a sink means nothing)")
        if self.sink_chunks and not self.kv_cache:
            raise ValueError("sink_chunks needs the KV cache (kv_cache=False re-encodes one contiguous context)")
        if self.strict_history and (self.max_context_chunks is None or not self.kv_cache):
            raise ValueError("strict_history needs max_context_chunks and the KV cache")
        if self.context_t is not None and not 0.0 <= self.context_t <= 1.0:
            raise ValueError(f"context_t={self.context_t} must be in [0, 1] (1: clean)")

    @property
    def passes(self) -> int:
        """Model calls per evaluation: 1 (no guidance), 2 (text CFG), 3 (MAGI-1's history + text CFG)."""
        if self.history_scale is not None:
            return 3
        return 1 if self.cfg_scale == 1.0 else 2


def chunk_noise(seed: int, chunk: int, shape, dtype=torch.float32) -> torch.Tensor:
    """The starting noise of one chunk: depends only on ``(seed, chunk)``."""
    gen = torch.Generator().manual_seed((seed * 1_000_003 + chunk) * 7_919 % (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


def context_noise(seed: int, chunk: int, shape, dtype=torch.float32) -> torch.Tensor:
    """The noise a finished chunk is re-noised with before it is cached (``context_t``): depends only on
    ``(seed, chunk)`` and is independent of :func:`chunk_noise` (re-noising with the chunk's own starting
    noise would put it back on its own flow path, not at a fresh noisy point)."""
    gen = torch.Generator().manual_seed(((seed * 1_000_003 + chunk) * 7_919 + 0xC0DE) % (2**63 - 1))
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)


@dataclass
class _Chunk:
    index: int  # absolute chunk index in the video
    x: torch.Tensor  # [tokens, C, pt, p, p], current state
    noise: torch.Tensor  # its starting noise (the flow path of pinned prefix frames)
    step: int = 0


class ChunkSampler:
    """Streams a video's latent chunks from ``model`` (a :class:`~magitrain.model.MagiDiT`).

    ``text_emb [n, L, D]``, ``text_mask [n, L]``: the caption of every chunk of the video
    (``n`` = total chunks, prefix included). ``height, width``: latent size. ``prefix
    [C, T0, height, width]``: clean latent frames the video starts with (``T0`` a multiple of
    ``t_patch_size``), or None.
    """

    def __init__(self, model, text_emb: torch.Tensor, text_mask: torch.Tensor, height: int, width: int,
                 cfg: SamplerConfig, prefix: Optional[torch.Tensor] = None):
        cfg.validate()
        mc = model.cfg
        self.distilled = mc.step_size_conditioning  # shortcut-distilled: told each step's size, guidance built in
        if self.distilled and (cfg.passes != 1 or cfg.solver != "euler"):
            raise ValueError("a step-size conditioned (distilled) model samples with one pass of Euler steps: "
                             "its guidance is distilled in (use cfg_scale=1, history_scale=None, solver=euler)")
        p, pt = mc.patch_size, mc.t_patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not a multiple of patch_size={p}")
        self.model, self.cfg = model, cfg
        self.num_chunks = text_emb.shape[0]
        if text_mask.shape != text_emb.shape[:2] or text_emb.shape[2] != mc.caption_channels:
            raise ValueError(f"text_emb must be [chunks, L, {mc.caption_channels}] with text_mask [chunks, L], "
                             f"got {list(text_emb.shape)} and {list(text_mask.shape)}")
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.text_emb, self.text_mask = text_emb.to(self.device, self.dtype), text_mask.to(self.device)
        self.grid = (mc.chunk_frames, height // p, width // p)  # token frames, rows, cols per chunk
        self.channels, self.patch = mc.in_channels // (2 if mc.half_channel_vae else 1), (pt, p, p)
        self.chunk_shape = (self.grid[0] * self.grid[1] * self.grid[2], self.channels, pt, p, p)
        self.schedule = sampling_schedule(cfg.steps, cfg.shift, cfg.square).to(self.device)
        self.prefix_tokens, self.prefix_chunks, self.pinned = self._split_prefix(prefix)
        if self.num_chunks <= self.prefix_chunks:
            raise ValueError(f"the video has {self.num_chunks} chunks, all covered by the "
                             f"{self.prefix_chunks}-chunk prefix: nothing to generate")
        self.cache = KVCache(mc.num_layers, cfg.max_context_chunks, cfg.sink_chunks)
        self.context_t = cfg.clean_t if cfg.context_t is None else cfg.context_t  # the level cached chunks carry
        self.context: list[tuple[int, torch.Tensor]] = []  # (chunk, tokens) finished, when kv_cache=False
        self.evaluations = 0  # model forwards of the window (all CFG passes counted)

    # --- public -----------------------------------------------------------------------------

    def stream(self) -> Iterator[torch.Tensor]:
        """Yield every chunk's latent ``[C, chunk_frames * pt, height, width]`` in order, each as soon
        as it is final (prefix chunks first, as given)."""
        with torch.no_grad(), kv_cache_attached(self.model, self.cache):
            for c in range(self.prefix_chunks):
                x = self.prefix_tokens[c * self.chunk_shape[0]:(c + 1) * self.chunk_shape[0]]
                self._write_context(c, x)
                yield self._latent(x)
            yield from self._pipeline()

    def generate(self) -> torch.Tensor:
        """The whole video's latent ``[C, T, height, width]``."""
        return torch.cat(list(self.stream()), dim=1)

    # --- the pipeline -----------------------------------------------------------------------

    def _pipeline(self) -> Iterator[torch.Tensor]:
        steps, per_stage = self.cfg.steps, self.cfg.steps // self.cfg.window
        active: list[_Chunk] = []
        next_chunk = self.prefix_chunks
        while active or next_chunk < self.num_chunks:
            if next_chunk < self.num_chunks and (not active or active[-1].step == per_stage):
                noise = chunk_noise(self.cfg.seed, next_chunk, self.chunk_shape, self.dtype).to(self.device)
                active.append(_Chunk(next_chunk, noise.clone(), noise))
                next_chunk += 1
            self._tick(active)
            if active[0].step == steps:
                done = active.pop(0)
                self._write_context(done.index, done.x)
                yield self._latent(done.x)

    def _tick(self, active: list[_Chunk]) -> None:
        """Advance every window chunk by one step of the solver."""
        ids = torch.tensor([a.step for a in active], device=self.device)
        t, t_next = self.schedule[ids], self.schedule[ids + 1]
        per_token = lambda v: v.repeat_interleave(self.chunk_shape[0]).view(-1, 1, 1, 1, 1)  # noqa: E731
        dt = per_token(t_next - t).to(self.dtype)
        x = torch.cat([self._pin(a, a.x, t[i]) for i, a in enumerate(active)])
        v = self._velocity(active, x, t, t_next - t)
        if self.cfg.solver == "heun":
            x_pred = (x + v * dt).split(self.chunk_shape[0])
            x_pred = torch.cat([self._pin(a, xp, t_next[i]) for i, (a, xp) in enumerate(zip(active, x_pred))])
            v = 0.5 * (v + self._velocity(active, x_pred, t_next))
        for i, (a, x_new) in enumerate(zip(active, (x + v * dt).split(self.chunk_shape[0]))):
            a.step += 1
            a.x = self._pin(a, x_new, t_next[i])

    def _step_size(self, step: torch.Tensor) -> dict:
        """The ``step_size`` keyword of a distilled model (per-chunk ``step``; 0 for clean chunks), else nothing."""
        return {"step_size": step.to(self.schedule.dtype)} if self.distilled else {}

    def _velocity(self, active: list[_Chunk], x: torch.Tensor, t: torch.Tensor,
                  step: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The guided velocity of the window tokens ``x`` at per-chunk times ``t`` (``step``: the per-chunk
        step about to be taken, a distilled model's condition)."""
        idx = [a.index for a in active]
        frames = self.grid[0]
        ctx = [] if self.cfg.kv_cache else self.context  # re-encoded context chunks (cache-free mode)
        first = ctx[0][0] if ctx else idx[0]
        layout = PackedLayout.pack([((len(ctx) + len(idx)) * frames, self.grid[1], self.grid[2], frames)],
                                   frame_offsets=[first * frames])
        chunks = [c for c, _ in ctx] + idx
        emb, mask = self.text_emb[chunks], self.text_mask[chunks]
        if ctx:
            x = torch.cat([tokens for _, tokens in ctx] + [x])
            t = torch.cat([torch.full((len(ctx),), self.context_t, device=self.device, dtype=t.dtype), t])
            if step is not None:
                step = torch.cat([torch.zeros(len(ctx), device=self.device, dtype=step.dtype), step])
        window = slice(len(ctx) * self.chunk_shape[0], None)
        null = torch.cat([torch.zeros(len(ctx), dtype=torch.bool, device=self.device),
                          torch.ones(len(idx), dtype=torch.bool, device=self.device)])
        passes = self.cfg.passes
        if self.cfg.strict_history:
            layout = self._strict_window(idx)
        self.cache.mode = READ if self.cfg.kv_cache else OFF
        try:
            v_full = self.model(x, t, emb, mask, layout, **self._step_size(step))[window]
            v_no_text = self.model(x, t, emb, mask, layout, text_null=null)[window] if passes >= 2 else None
            v_uncond = None
            if passes == 3:
                self.cache.mode = OFF
                v_uncond = self.model(x, t, emb, mask, layout, text_null=null,
                                      drop_history=torch.ones(1, dtype=torch.bool, device=self.device))[window]
        finally:
            self.cache.mode, self.cache.read_slices = READ, None
        self.evaluations += passes
        return guided_velocity(v_full, v_no_text, v_uncond, self.cfg.history_scale or 1.0, self.cfg.cfg_scale)

    def _strict_window(self, idx: list[int]) -> PackedLayout:
        """``strict_history``: the window's layout under the training rule (its sink part: the window chunks
        with index < sink_chunks) and, set on the cache, the cached rows each window chunk ``j`` sees: the sink
        and the last ``max_context_chunks - j`` recent chunks (chunks ``>= idx[j] - K``)."""
        frames, ct, k = self.grid[0], self.chunk_shape[0], self.cfg.max_context_chunks
        held = self.cache.num_chunks
        sink = min(self.cfg.sink_chunks, held)
        recent, m = held - sink, self.cache.num_tokens
        slices = []
        for j in range(len(idx)):
            q = (j * ct, (j + 1) * ct)
            r = min(recent, max(0, k - j))
            if sink:
                slices.append(AttnSlice(q, (0, sink * ct)))
            if r:
                slices.append(AttnSlice(q, (m - r * ct, m)))
        self.cache.read_slices = AttnSlices(slices, len(idx) * ct, m)
        return PackedLayout.pack([(len(idx) * frames, self.grid[1], self.grid[2], frames)],
                                 frame_offsets=[idx[0] * frames], sink_chunks=max(0, self.cfg.sink_chunks - idx[0]),
                                 max_context_chunks=k)

    def _context_tokens(self, index: int, x: torch.Tensor) -> torch.Tensor:
        """A finished chunk as the cache sees it: as is (``context_t`` None), else re-noised to
        ``context_t * x + (1 - context_t) * noise`` with :func:`context_noise` (MAGI-1's clean_t, generalised)."""
        if self.cfg.context_t is None:
            return x
        noise = context_noise(self.cfg.seed, index, self.chunk_shape, self.dtype).to(self.device)
        t = torch.tensor(self.cfg.context_t, dtype=self.dtype, device=self.device)
        return t * x + (1 - t) * noise

    def _write_context(self, index: int, x: torch.Tensor) -> None:
        """One forward of a finished chunk at ``context_t`` (default ``clean_t``; its own caption) that
        appends its K/V (without the cache: the chunk joins the re-encoded context)."""
        x = self._context_tokens(index, x)
        if not self.cfg.kv_cache:
            self.context.append((index, x))
            if self.cfg.max_context_chunks is not None:
                self.context = self.context[-self.cfg.max_context_chunks:]
            return
        frames = self.grid[0]
        layout = PackedLayout.pack([(frames, self.grid[1], self.grid[2], frames)], frame_offsets=[index * frames])
        t = torch.full((1,), self.context_t, device=self.device)
        self.cache.mode = WRITE
        try:
            self.model(x, t, self.text_emb[index:index + 1], self.text_mask[index:index + 1], layout,
                       **self._step_size(torch.zeros_like(t)))
        finally:
            self.cache.mode = READ

    # --- prefix -----------------------------------------------------------------------------

    def _split_prefix(self, prefix: Optional[torch.Tensor]):
        """``(prefix tokens, whole prefix chunks, tokens pinned in the next chunk)``."""
        if prefix is None:
            return None, 0, 0
        pt, p, _ = self.patch
        c, frames, h, w = prefix.shape
        if c != self.channels or (h, w) != (self.grid[1] * p, self.grid[2] * p):
            raise ValueError(f"prefix latent must be [{self.channels}, T, {self.grid[1] * p}, {self.grid[2] * p}], "
                             f"got {list(prefix.shape)}")
        if frames == 0 or frames % pt:
            raise ValueError(f"prefix has {frames} latent frames; it needs a positive multiple of t_patch_size={pt}")
        tokens = patchify(prefix.to(self.device, self.dtype), pt, p, p)
        frame_tokens = self.grid[1] * self.grid[2]
        whole, rest = divmod(frames // pt, self.grid[0])
        return tokens, whole, rest * frame_tokens

    def _pin(self, chunk: _Chunk, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """``x`` with the chunk's known prefix frames at their flow-path point for time ``t``."""
        if not self.pinned or chunk.index != self.prefix_chunks:
            return x
        start = self.prefix_chunks * self.chunk_shape[0]
        known = self.prefix_tokens[start:start + self.pinned]
        t = t.to(self.dtype)
        return torch.cat([t * known + (1 - t) * chunk.noise[:self.pinned], x[self.pinned:]])

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        return unpatchify(x, *self.grid)
