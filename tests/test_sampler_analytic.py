"""The streaming sampler, tested independently of training: an exact denoiser in place of the model.

For data that is a finite set of videos ``X_1..X_K`` the flow-matching velocity is closed-form. With
``x_c = t_c X^c + (1 - t_c) eps`` per window chunk and the finished chunks known exactly, the posterior
over the videos is ``w_i ∝ exp(-sum_ctx |ctx_j - X_i^j|^2 / 2 sigma^2 - sum_c |x_c - t_c X_i^c|^2 /
2 (1 - t_c)^2)`` and ``v_c = (sum_i w_i X_i^c - x_c) / (1 - t_c)`` (MAGI-1's convention: t = 0 noise,
t = 1 clean). :class:`ExactDenoiser` computes it behind the model's interface: it is called like
``MagiDiT`` (tokens, per-chunk t, captions, layout, ``text_null``, ``drop_history``), and reads and
writes the sampler's KV cache through the same seam (``layers[i].self_attention.core_attention``,
swapped by :func:`~magitrain.kv_cache.kv_cache_attached`), storing a finished chunk's tokens as its
"keys". So the sampler's pipelining, cache writes and modes, context cap, prefix handling, schedule
and Euler steps are what is tested: a correct sampler lands every chunk on one data video.

An exact field lands on data under any monotone schedule, so the schedule itself is checked against
MAGI-1's closed form (``t_k = u / (s - (s - 1) u)``, ``u = (k / S)^2``, s = 3): the times the denoiser
is called with must be those, rising from noise to clean with most steps near the noise end.
"""

import pytest
import torch
from torch import nn

from magitrain import sampler as sampler_module
from magitrain.config import ModelConfig
from magitrain.kv_cache import OFF, WRITE, CachedAttention
from magitrain.layout import patchify, unpatchify
from magitrain.sampler import ChunkSampler, SamplerConfig

C, CHUNK_FRAMES, H, W, CHUNKS, VIDEOS = 4, 2, 8, 8, 4, 6
CONTEXT_SIGMA = 0.05  # how exactly finished chunks must match a data video's (absorbs Euler error)
LAND_TOL = 1e-3  # RMS distance of the generated video to its nearest data video


class _Seam(nn.Module):
    """The attention seam the KV cache replaces (``core_attention``); never called itself."""

    def forward(self, q, k, v, slices):  # pragma: no cover - replaced while sampling
        raise AssertionError("the exact denoiser does not attend")


class _Layer(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attention = nn.Module()
        self.self_attention.core_attention = _Seam()


class ExactDenoiser(nn.Module):
    """The exact flow-matching velocity of a finite set of videos ``data [K, C, T, H, W]``."""

    def __init__(self, data: torch.Tensor):
        super().__init__()
        self.cfg = ModelConfig(num_layers=1, hidden_size=8, num_heads=1, num_kv_heads=1, head_dim=8,
                               ffn_hidden_size=8, in_channels=C, out_channels=C, patch_size=2,
                               caption_channels=4, caption_max_length=2, chunk_frames=CHUNK_FRAMES)
        p, pt = self.cfg.patch_size, self.cfg.t_patch_size
        self.chunk_tokens = CHUNK_FRAMES * (H // p) * (W // p)
        tokens = torch.stack([patchify(v, pt, p, p) for v in data.double()])  # [K, N, C, pt, p, p]
        self.data = tokens.reshape(tokens.shape[0], -1, self.chunk_tokens, *tokens.shape[2:])  # [K, chunks, ...]
        self.anchor = nn.Parameter(torch.zeros(()))  # the sampler reads device and dtype from a parameter
        self.layers = nn.ModuleList([_Layer()])
        self.calls: list[tuple[list[int], list[float]]] = []  # (chunk indices, t) of every velocity call

    def _cache(self):
        seam = self.layers[0].self_attention.core_attention
        return seam.cache if isinstance(seam, CachedAttention) else None

    def forward(self, x, t, text_emb, text_mask, layout, text_null=None, drop_history=None, step_size=None):
        (span,) = layout.samples
        first = span.frame_offset // span.chunk_frames
        chunks = list(range(first, first + span.num_chunks))
        xs = x.double().split(self.chunk_tokens)
        cache = self._cache()
        history = drop_history is None or not bool(drop_history.any())
        logw = torch.zeros(self.data.shape[0], dtype=torch.float64)
        if cache is not None and cache.mode != OFF and history and cache.num_chunks:
            cached = cache.kv(0)[0].double().view(-1, self.chunk_tokens, *self.data.shape[3:])
            for j, ctx in zip(range(first - len(cached), first), cached):
                logw -= ((self.data[:, j] - ctx) ** 2).flatten(1).sum(1) / (2 * CONTEXT_SIGMA**2)
        for c, xc, tc in zip(chunks, xs, t.double().tolist()):
            if tc >= 1.0:  # a finished chunk re-encoded as context (cache-free mode), or one being cached
                if history:
                    logw -= ((self.data[:, c] - xc) ** 2).flatten(1).sum(1) / (2 * CONTEXT_SIGMA**2)
            else:
                logw -= ((xc - tc * self.data[:, c]) ** 2).flatten(1).sum(1) / (2 * (1 - tc) ** 2)
        w = torch.softmax(logw, 0)
        v = []
        for c, xc, tc in zip(chunks, xs, t.double().tolist()):
            mean = torch.einsum("k,k...->...", w, self.data[:, c])
            v.append(torch.zeros_like(xc) if tc >= 1.0 else (mean - xc) / (1 - tc))
        if cache is not None and cache.mode == WRITE:
            flat = x.reshape(x.shape[0], 1, -1)
            cache.append(0, flat, flat)
        else:
            self.calls.append((chunks, t.tolist()))
        return torch.cat(v).to(x.dtype)


def make_data(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(VIDEOS, C, CHUNKS * CHUNK_FRAMES, H, W, generator=g) * 0.6


def generate(model, cfg, prefix=None):
    emb, mask = torch.zeros(CHUNKS, 2, 4), torch.ones(CHUNKS, 2, dtype=torch.bool)
    return ChunkSampler(model, emb, mask, H, W, cfg, prefix).generate()


def nearest(video, data):
    """(index, RMS distance) of the data video nearest to ``video``."""
    d = ((data - video[None]) ** 2).flatten(1).mean(1).sqrt()
    return int(d.argmin()), float(d.min())


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_exact_denoiser_lands_on_data(window, kv_cache):
    data = make_data()
    model = ExactDenoiser(data)
    landed = set()
    for seed in range(4):
        out = generate(model, SamplerConfig(steps=16, window=window, seed=seed, kv_cache=kv_cache))
        i, dist = nearest(out, data)
        assert dist < LAND_TOL, f"seed {seed}: {dist:.2e} from the nearest data video"
        landed.add(i)
    assert len(landed) >= 2  # different noise lands on different videos: not a collapse onto one


@pytest.mark.parametrize("kv_cache", [True, False])
@pytest.mark.parametrize("window", [1, 2, 4])
def test_exact_denoiser_continues_a_prefix(window, kv_cache):
    """A prefix of video 3 (one whole chunk and one frame of the next) must be continued as video 3."""
    data = make_data()
    model = ExactDenoiser(data)
    prefix = data[3, :, :CHUNK_FRAMES + 1]
    for seed in range(3):
        out = generate(model, SamplerConfig(steps=16, window=window, seed=seed, kv_cache=kv_cache), prefix)
        i, dist = nearest(out, data)
        assert (i, dist < LAND_TOL) == (3, True), f"seed {seed}: landed on video {i} at {dist:.2e}"


def test_exact_denoiser_with_sliding_context():
    """``max_context_chunks=1``: each chunk sees only its predecessor; data videos differ in every
    chunk, so one chunk of context still pins the video."""
    data = make_data()
    model = ExactDenoiser(data)
    out = generate(model, SamplerConfig(steps=16, window=2, max_context_chunks=1))
    assert nearest(out, data)[1] < LAND_TOL


def magi1_schedule(steps, shift=3.0):
    """MAGI-1's inference times written out independently: u = (k/S)^2, t = u / (s - (s - 1) u)."""
    u = (torch.arange(steps + 1, dtype=torch.float64) / steps) ** 2
    return u / (shift - (shift - 1) * u)


def test_sampler_times_follow_magi1_schedule():
    model = ExactDenoiser(make_data())
    generate(model, SamplerConfig(steps=16, window=4))
    times = {}
    for chunks, ts in model.calls:
        for c, t in zip(chunks, ts):
            times.setdefault(c, []).append(t)
    expected = magi1_schedule(16)[:-1].float()
    for c in range(CHUNKS):
        torch.testing.assert_close(torch.tensor(times[c]), expected, rtol=0, atol=1e-6)
    assert (expected < 0.25).sum() > len(expected) // 2  # most steps at the noise end


def test_flipped_time_direction_fails(monkeypatch):
    """The landing check is sharp: integrating from clean to noise (t reversed) misses the data."""
    real = sampler_module.sampling_schedule
    monkeypatch.setattr(sampler_module, "sampling_schedule", lambda *a, **k: 1 - real(*a, **k))
    data = make_data()
    out = generate(ExactDenoiser(data), SamplerConfig(steps=16, window=2))
    assert not nearest(out, data)[1] < LAND_TOL


def test_flipped_shift_fails(monkeypatch):
    """A shift applied the wrong way round (towards the clean end) breaks the schedule check."""
    real = sampler_module.sampling_schedule
    monkeypatch.setattr(sampler_module, "sampling_schedule", lambda steps, shift=3.0, square=True:
                        real(steps, 1 / shift, square))
    with pytest.raises(AssertionError):
        test_sampler_times_follow_magi1_schedule()


def test_unshared_context_fails():
    """Sharpness of the cache path: a sampler whose window never sees the finished chunks (cache off)
    generates chunks from different videos, which the landing check catches."""
    data = make_data()
    model = ExactDenoiser(data)


    misses = 0
    for seed in range(4):
        cfg = SamplerConfig(steps=16, window=1, seed=seed)
        s = ChunkSampler(model, torch.zeros(CHUNKS, 2, 4), torch.ones(CHUNKS, 2, dtype=torch.bool), H, W, cfg)
        s._write_context = lambda index, x: None  # finished chunks never reach the cache
        out = s.generate()
        misses += nearest(out, data)[1] >= LAND_TOL
    assert misses >= 3


def test_unpatchify_roundtrip_of_data():
    data = make_data()
    model = ExactDenoiser(data)
    tokens = model.data[2].reshape(-1, *model.data.shape[3:])
    torch.testing.assert_close(unpatchify(tokens.float(), CHUNKS * CHUNK_FRAMES, H // 2, W // 2), data[2])
