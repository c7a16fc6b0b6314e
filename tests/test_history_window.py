"""Issue 17: attention sink + rolling KV window at inference, the matching training mask, and
history noise (clean-prefix chunks noised in training, ``context_t`` at sampling).

References are independent of the code under test: a cache-free sampler that reruns every
finished chunk under a dense visibility rule, masks built from the rule token by token, and
direct model calls on re-noised chunks."""

import argparse

import pytest
import torch

from magitrain.batch import Batch
from magitrain.config import ConfigError, DiffusionConfig, ModelConfig
from magitrain.diffusion import guided_velocity, noise_batch, sampling_schedule
from magitrain.kv_cache import WRITE, KVCache, kv_cache_attached
from magitrain.layout import PackedLayout, unpatchify
from magitrain.parallel.kernels import slice_attention
from magitrain.parallel.mask import AttnSlice, AttnSlices
from magitrain.sampler import ChunkSampler, SamplerConfig, chunk_noise, context_noise

from test_generate import H, W, make_model, make_text

# --- the visibility rule, stated once, token-free --------------------------------------------


def visible(c: int, j: int, sink: int, k: int) -> bool:
    """Chunk ``c`` sees chunk ``j`` (same sample) under sink ``sink`` and ``k`` recent predecessors (0: all)."""
    return j <= c and (k == 0 or j < sink or j >= c - k)


# --- 1. the rolled cache against a cache-free reference ---------------------------------------

def reference_stream(model, emb, mask, cfg: SamplerConfig):
    """Every evaluation reruns ``[every finished chunk | window]`` through the plain model with a dense-rule
    mask: finished chunk ``c`` sees ``visible(c, j)``; a window chunk sees the sink, the ``K`` finished chunks
    before the window and the window chunks up to itself (``strict_history``: every chunk sees ``visible(c, j)``).
    Finished chunks enter re-noised to ``context_t``."""
    mc = model.cfg
    p, cf = mc.patch_size, mc.chunk_frames
    h, w = H // p, W // p
    ct, n = cf * h * w, emb.shape[0]
    dtype = next(model.parameters()).dtype
    sched = sampling_schedule(cfg.steps, cfg.shift, cfg.square)
    per_stage = cfg.steps // cfg.window
    s, k = cfg.sink_chunks, cfg.max_context_chunks or 0
    level = cfg.clean_t if cfg.context_t is None else cfg.context_t
    shape = (ct, mc.in_channels, 1, p, p)
    x = {c: chunk_noise(cfg.seed, c, shape, dtype) for c in range(n)}
    finished, cached = [], []  # the outputs, and what the context sees (re-noised)

    def run(xs, ts, null_window, drop):
        f, a = len(cached), len(xs)
        layout = PackedLayout.pack([((f + a) * cf, h, w, cf)])
        meta = model.prepare(layout, torch.tensor([drop]))
        if not drop:
            rows = []
            for c in range(f + a):
                q = (c * ct, (c + 1) * ct)
                if c < f or cfg.strict_history:  # a finished chunk: what it saw when written; strict: the rule
                    rows += [AttnSlice(q, (j * ct, (j + 1) * ct)) for j in range(c + 1) if visible(c, j, s, k)]
                else:  # a window chunk: the context of the window's first chunk, then the window up to itself
                    rows += [AttnSlice(q, (j * ct, (j + 1) * ct)) for j in range(f) if visible(f, j, s, k)]
                    rows.append(AttnSlice(q, (f * ct, (c + 1) * ct)))
            meta.self_slices = AttnSlices(rows, (f + a) * ct)
        t_all = torch.cat([torch.full((f,), level), ts])
        text_null = torch.cat([torch.zeros(f, dtype=torch.bool), torch.full((a,), null_window)])
        return model.forward_tokens(torch.cat(cached + xs), t_all, emb[:f + a], mask[:f + a], meta, text_null)[f * ct:]

    for tick in range(per_stage * (n + cfg.window - 1)):
        active = [c for c in range(n) if 0 <= tick - c * per_stage < cfg.steps]
        j = [tick - c * per_stage for c in active]
        t, tn = sched[j], sched[[i + 1 for i in j]]
        dt = torch.cat([torch.full((ct, 1, 1, 1, 1), float(tn[i] - t[i])) for i in range(len(active))]).to(dtype)
        xs = [x[c] for c in active]
        v_full = run(xs, t, False, False)
        v_nt = run(xs, t, True, False) if cfg.passes >= 2 else None
        v_un = run(xs, t, True, True) if cfg.passes == 3 else None
        v = guided_velocity(v_full, v_nt, v_un, cfg.history_scale or 1.0, cfg.cfg_scale)
        for c, xn in zip(active, (torch.cat(xs) + v * dt).split(ct)):
            x[c] = xn
        if j[0] + 1 == cfg.steps:
            c = active[0]
            finished.append(x[c])
            if cfg.context_t is None:
                cached.append(x[c])
            else:
                cached.append(cfg.context_t * x[c] + (1 - cfg.context_t) * context_noise(cfg.seed, c, shape, dtype))
    return torch.cat([unpatchify(c, cf, h, w) for c in finished], dim=1)


@pytest.mark.parametrize("sink, k, window, context_t, strict", [
    (0, 1, 1, None, False), (1, 1, 1, None, False), (2, 1, 2, None, False), (1, 2, 2, None, False),
    (1, 1, 1, 0.8, False), (1, 1, 3, None, True), (0, 1, 2, None, True), (2, 1, 3, 0.9, True),
])
def test_rolled_cache_equals_cache_free_reference(sink, k, window, context_t, strict):
    """fp64: the streamed video with a sink + rolling window (and a context level; and the strict window,
    where every chunk sees exactly the training rule) equals the reference."""
    model = make_model(torch.float64)
    emb, mask = make_text(6, switches=(3,), dtype=torch.float64)
    cfg = SamplerConfig(steps=window if strict else 2, window=window, cfg_scale=2.0, history_scale=1.5, seed=2,
                        sink_chunks=sink, max_context_chunks=k, context_t=context_t, strict_history=strict)
    with torch.no_grad():
        got = ChunkSampler(model, emb, mask, H, W, cfg).generate()
        want = reference_stream(model, emb, mask, cfg)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
    flips = [{"sink_chunks": 0 if sink else 1}] + ([{"strict_history": False}] if strict else [])
    for flip in flips:  # the rule matters
        with torch.no_grad():
            moved = ChunkSampler(model, emb, mask, H, W, SamplerConfig(**{**cfg.__dict__, **flip})).generate()
        assert (moved - got).abs().max() > 1e-3, flip


def peak_cache_bytes(model, chunks: int, sink: int, k: int) -> tuple[int, int]:
    emb, mask = make_text(chunks)
    sampler = ChunkSampler(model, emb, mask, H, W, SamplerConfig(steps=2, window=1, sink_chunks=sink,
                                                                  max_context_chunks=k))
    peak = 0
    with torch.no_grad():
        for _ in sampler.stream():
            peak = max(peak, sampler.cache.nbytes())
    return peak, sampler.cache.num_chunks


def test_sink_window_cache_is_flat_from_8_to_64_chunks():
    model = make_model()
    b8, n8 = peak_cache_bytes(model, 8, 1, 2)
    b64, n64 = peak_cache_bytes(model, 64, 1, 2)
    assert b8 == b64 > 0 and n8 == n64 == 3
    full, _ = peak_cache_bytes(model, 8, 0, 8)  # an 8-chunk cap: grows with the video up to it
    assert full > b8


def test_kv_cache_keeps_the_sink_and_the_most_recent():
    cache = KVCache(1, max_chunks=2, sink_chunks=2)
    for c in range(7):
        cache.append(0, torch.full((1, 1, 1), float(c)), torch.zeros(1, 1, 1))
    assert cache.kv(0)[0].flatten().tolist() == [0.0, 1.0, 5.0, 6.0]
    with pytest.raises(ValueError, match="sink_chunks"):
        KVCache(1, None, 1)


# --- 2. the training mask -----------------------------------------------------------------

@pytest.mark.parametrize("sink, k", [(0, 0), (0, 1), (1, 1), (2, 1), (1, 3), (3, 2)])
def test_layout_history_rule_equals_dense_mask(sink, k):
    grids = [(12, 1, 2, 2), (4, 2, 1, 1), (2, 1, 1, 2)]  # 6, 4 and 1 chunks of 4, 2 and 2 tokens
    layout = PackedLayout.pack(grids, 40, sink_chunks=sink, max_context_chunks=k)
    dense = torch.zeros(40, 40, dtype=torch.bool)
    for sp in layout.samples:
        for c in range(sp.num_chunks):
            for j in range(sp.num_chunks):
                if visible(c, j, sink, k):
                    q, kk = sp.offset + c * sp.chunk_tokens, sp.offset + j * sp.chunk_tokens
                    dense[q:q + sp.chunk_tokens, kk:kk + sp.chunk_tokens] = True
    slices = layout.self_attn_slices()
    assert torch.equal(slices.to_dense(), dense)
    assert slices.area() == int(dense.sum())
    assert PackedLayout.from_dict(layout.to_dict()) == layout


def test_default_rule_leaves_the_mask_unchanged():
    from magitrain.parallel.mask import packed_videos

    layout = PackedLayout.pack([(6, 1, 2, 2), (2, 1, 1, 1)], 20)
    assert layout.self_attn_slices() == packed_videos([[4, 4, 4], [1, 1]], total=20)
    assert layout.to_dict() == {"total_tokens": 20, "samples": [[6, 1, 2, 2, 0], [2, 1, 1, 1, 0]]}
    win = layout.self_attn_slices(window_chunks=2)
    assert win == packed_videos([[4, 4, 4], [1, 1]], total=20, window_chunks=2)


def test_training_mask_sees_what_the_rolled_cache_holds():
    """A teacher-forced forward of a clean video under the (sink, K) layout rule gives every chunk the same
    output as streaming it: chunks written one by one into a KVCache(K, sink), each then read alone."""
    sink, k, n = 1, 2, 6
    model = make_model(torch.float64)
    emb, _ = make_text(n, switches=(2, 4), dtype=torch.float64)
    mask = torch.ones(n, 6, dtype=torch.bool)
    ct = 8
    x = torch.randn(n * ct, 4, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((n,), 1.0, dtype=torch.float64)
    with torch.no_grad():
        full = model(x, t, emb, mask, PackedLayout.pack([(n * 2, 2, 2, 2)], sink_chunks=sink, max_context_chunks=k))
        plain = model(x, t, emb, mask, PackedLayout.pack([(n * 2, 2, 2, 2)]))
        cache = KVCache(model.cfg.num_layers, k, sink)
        with kv_cache_attached(model, cache):
            for c in range(n):
                cache.mode = WRITE
                lay = PackedLayout.pack([(2, 2, 2, 2)], frame_offsets=[2 * c])
                out = model(x[c * ct:(c + 1) * ct], t[c:c + 1], emb[c:c + 1], mask[c:c + 1], lay)
                torch.testing.assert_close(out, full[c * ct:(c + 1) * ct], rtol=0, atol=1e-10)
    assert (full[-ct:] - plain[-ct:]).abs().max() > 1e-3  # the rule changes the last chunks


def test_drop_history_with_a_sink_sees_only_itself():
    model = make_model()
    layout = PackedLayout.pack([(8, 1, 2, 2)], sink_chunks=1, max_context_chunks=1)
    meta = model.prepare(layout, torch.tensor([True]))
    assert meta.self_slices == PackedLayout.pack([(8, 1, 2, 2)]).self_attn_slices(window_chunks=1)
    meta = model.prepare(layout, torch.tensor([False]))
    assert meta.self_slices == layout.self_attn_slices()


def test_model_config_keys_reach_training_batches(tmp_path):
    from conftest import tiny_config
    from magitrain.synthetic import SyntheticSource

    cfg = tiny_config(tmp_path, "model.sink_chunks=1", "model.max_context_chunks=1")
    batch = SyntheticSource(cfg, 0, 1).next_batch()
    assert (batch.layout.sink_chunks, batch.layout.max_context_chunks) == (1, 1)
    for bad, needle in (("model.sink_chunks=1", "model.sink_chunks"), ("model.max_context_chunks=-1", "max_context"),
                        ("diffusion.history_t=[0.9,0.5]", "history_t"), ("diffusion.history_t=[0.5]", "history_t")):
        with pytest.raises(ConfigError, match=needle):
            tiny_config(tmp_path, bad)


def test_webdataset_batches_carry_the_rule(tmp_path):
    """The shard reader's packer (through ``Geometry``) and the loader's CP solve-ahead see the rule."""
    from magitrain.data_pipeline.source import WebDatasetSource
    from test_data_common import tiny_cfg, write_latent_shards

    write_latent_shards(str(tmp_path), [[(8, 4, 4)] * 2])  # 4 chunks of 2 latent frames
    cfg = tiny_cfg(str(tmp_path), "data.num_workers=0", "data.seq_tokens=64", "data.batch_size=1",
                   "model.sink_chunks=1", "model.max_context_chunks=1")
    batch = WebDatasetSource(cfg, 0, 1, epochs=1).next_batch()
    assert (batch.layout.sink_chunks, batch.layout.max_context_chunks) == (1, 1)
    assert batch.layout.self_attn_slices() != PackedLayout.pack(
        [(s.frames, s.height, s.width, s.chunk_frames) for s in batch.layout.samples],
        batch.layout.total_tokens).self_attn_slices()


def test_generate_defaults_to_the_trained_rule_and_flags_override():
    from magitrain.generate import history_window

    m = ModelConfig(sink_chunks=1, max_context_chunks=3)
    ns = lambda **kw: argparse.Namespace(**{"max_context": None, "sink_chunks": None, **kw})  # noqa: E731
    assert history_window(ns(), m) == (3, 1)
    assert history_window(ns(max_context=5, sink_chunks=0), m) == (5, 0)
    assert history_window(ns(), ModelConfig()) == (None, 0)


def test_magi1_release_config_keeps_the_trained_rule():
    from magitrain.weights import magi1_config, model_config_from_json

    m = ModelConfig(sink_chunks=1, max_context_chunks=3)
    back = model_config_from_json(magi1_config(m, torch.float32), "x")
    assert (back.sink_chunks, back.max_context_chunks) == (1, 3)
    old = magi1_config(ModelConfig(), torch.float32)
    for key in ("sink_chunks", "max_context_chunks"):
        del old["magitrain"][key]  # a release written before issue 17
    assert model_config_from_json(old, "x") == ModelConfig()


def test_cli_defaults_to_the_checkpoints_rule(tmp_path):
    """A checkpoint trained with (sink 1, K 1): generate without flags equals the explicit flags, and
    the flags override it (all history differs)."""
    import numpy as np
    from conftest import tiny_config
    from magitrain.checkpoint import Checkpointer, ModelState
    from magitrain.config import to_yaml
    from magitrain.generate import main
    from magitrain.model import MagiDiT

    cfg = tiny_config(tmp_path, "model.sink_chunks=1", "model.max_context_chunks=1", "data.height=4", "data.width=4")
    torch.manual_seed(0)
    model = MagiDiT(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    Checkpointer(cfg.run.dir).save(1, {"model": ModelState(model)}, to_yaml(cfg))
    base = ["--ckpt", cfg.run.dir, "--steps", "2", "--window", "1", "--quiet", "--chunks", "5", "--prompt", "x"]
    out = {}
    for name, extra in (("default", []), ("explicit", ["--sink-chunks", "1", "--max-context", "1"]),
                        ("all", ["--sink-chunks", "0", "--max-context", "8"]), ("strict", ["--strict-history"]),
                        ("w2", ["--window", "2"]), ("w2_strict", ["--window", "2", "--strict-history"])):
        assert main(base + ["--out", str(tmp_path / f"{name}.mp4")] + extra) == 0
        out[name] = np.load(tmp_path / f"{name}.npy")
    assert np.array_equal(out["default"], out["explicit"])
    assert np.abs(out["default"] - out["all"]).max() > 1e-3
    assert np.array_equal(out["default"], out["strict"])  # --window 1: the strict window is the same rule
    assert np.abs(out["w2"] - out["w2_strict"]).max() > 1e-3


def test_cli_refuses_bad_sink_and_context_flags(random_ckpt, tmp_path, capsys):
    from magitrain.generate import main

    base = ["--ckpt", random_ckpt, "--out", str(tmp_path / "v.mp4"), "--steps", "2", "--window", "1", "--quiet",
            "--chunks", "3", "--prompt", "x"]
    for extra, message in ((["--sink-chunks", "-1"], "--sink-chunks"), (["--sink-chunks", "1"], "max_context"),
                           (["--context-t", "1.5"], "--context-t"), (["--strict-history"], "strict_history")):
        assert main(base + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


from test_generate import random_ckpt  # noqa: E402,F401 - the module-scoped checkpoint fixture


# --- 3. history noise ---------------------------------------------------------------------

class Recorder(torch.nn.Module):
    """A ``core_attention`` that records each call's K/V."""

    def __init__(self, log):
        super().__init__()
        self.log = log

    def forward(self, q, k, v, slices):
        self.log.append((k.clone(), v.clone()))
        return slice_attention(q, k, v, slices)[0]


@pytest.mark.parametrize("context_t", [None, 0.7])
def test_cached_kv_equal_a_direct_call_on_the_renoised_chunk(context_t):
    model = make_model()
    emb, mask = make_text(3)
    prefix = torch.randn(4, 2, H, W, generator=torch.Generator().manual_seed(1))  # one whole clean chunk
    cfg = SamplerConfig(steps=2, window=1, seed=4, context_t=context_t)
    sampler = ChunkSampler(model, emb, mask, H, W, cfg, prefix)
    with torch.no_grad():
        next(iter(sampler.stream()))  # the prefix chunk, written to the cache
        tokens = sampler.prefix_tokens
        level = 1.0 if context_t is None else context_t
        x = tokens if context_t is None else level * tokens + (1 - level) * context_noise(4, 0, tokens.shape)
        log = []
        saved = [layer.self_attention.core_attention for layer in model.layers]
        for layer in model.layers:
            layer.self_attention.core_attention = Recorder(log)
        try:
            model(x, torch.full((1,), level), emb[:1], mask[:1], PackedLayout.pack([(2, 2, 2, 2)]))
        finally:
            for layer, core in zip(model.layers, saved):
                layer.self_attention.core_attention = core
    for layer, (k, v) in enumerate(log):
        ck, cv = sampler.cache.kv(layer)
        assert torch.equal(ck, k) and torch.equal(cv, v)


def make_batch(samples: int, chunks: int = 3) -> Batch:
    layout = PackedLayout.pack([(chunks, 1, 1, 1)] * samples)
    g = torch.Generator().manual_seed(0)
    return Batch(torch.randn(layout.total_tokens, 4, 1, 1, 1, generator=g), layout,
                 torch.randn(layout.num_chunks, 2, 3, generator=g), torch.ones(layout.num_chunks, 2, dtype=torch.bool))


def test_history_t_draws_follow_the_configured_distribution():
    batch = make_batch(400)
    base = DiffusionConfig(clean_prefix_prob=1.0, max_clean_prefix_chunks=2)
    noised = DiffusionConfig(clean_prefix_prob=1.0, max_clean_prefix_chunks=2, history_t=[0.8, 1.0])
    a, b = noise_batch(batch, base, 3, 5), noise_batch(batch, noised, 3, 5)
    clean = ~a.loss_mask.view(400, 3)  # one token per chunk: the context chunks
    assert torch.equal(a.loss_mask, b.loss_mask) and torch.equal(a.noise, b.noise)  # nothing else moves
    assert torch.equal(a.text_null, b.text_null) and torch.equal(a.drop_history, b.drop_history)
    assert torch.equal(a.t.view(400, 3)[~clean], b.t.view(400, 3)[~clean])
    assert bool((a.t.view(400, 3)[clean] == 1.0).all())  # today: clean_t
    levels = b.t.view(400, 3)
    first = levels[:, 0]  # every sample has >= 1 context chunk; one level per sample
    assert bool((levels[clean] == first.repeat_interleave(clean.sum(1))).all())
    assert 0.8 <= float(first.min()) and float(first.max()) <= 1.0
    for q in (0.25, 0.5, 0.75):  # U(0.8, 1.0) quantiles, 400 draws: standard error ~0.005
        assert abs(float(first.quantile(q)) - (0.8 + 0.2 * q)) < 0.02, q
    x = b.x_t.view(400, 3, -1)[clean]
    x0, nz = batch.latents.view(400, 3, -1)[clean], b.noise.view(400, 3, -1)[clean]
    lv = levels[clean].view(-1, 1)
    torch.testing.assert_close(x, lv * x0 + (1 - lv) * nz)
    assert torch.equal(noise_batch(batch, noised, 3, 5).t, b.t)  # seeded
    assert not torch.equal(noise_batch(batch, noised, 3, 6).t, b.t)


def test_history_noise_training_resumes_bitwise(tmp_path):
    import shutil

    from magitrain.checkpoint import Checkpointer
    from magitrain.train import train
    from conftest import tiny_config
    from test_train import _losses

    keys = ["train.steps=4", "diffusion.history_t=[0.7,0.95]", "diffusion.clean_prefix_prob=1.0",
            "model.sink_chunks=1", "model.max_context_chunks=1", "data.batch_size=1", "data.samples_per_seq=1",
            "data.seq_tokens=128", "optim.ema_decay=0"]
    straight = tiny_config(tmp_path / "a", *keys, "ckpt.every=0")
    train(straight)
    train(tiny_config(tmp_path / "b", *keys, "ckpt.every=2"))
    ck = Checkpointer(str(tmp_path / "b" / "run"))
    shutil.rmtree(ck.path_for(4))
    train(tiny_config(tmp_path / "b", *keys, "ckpt.every=2", "ckpt.resume=auto"))
    a, b = _losses(straight.run.dir), _losses(str(tmp_path / "b" / "run"))
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b]
    assert [r["grad_norm"] for r in a] == [r["grad_norm"] for r in b]
    plain = tiny_config(tmp_path / "c", *[k for k in keys if "history_t" not in k], "ckpt.every=0")
    train(plain)
    assert [r["loss"] for r in _losses(plain.run.dir)] != [r["loss"] for r in a]  # the noise is used


SINK_CASE = (2, dict(steps=2, cfg_scale=2.0, history_scale=1.5, max_context_chunks=1, sink_chunks=1, context_t=0.9), 3)


def test_multi_rank_sampler_on_one_rank_with_sink_and_context_t():
    """The multi-rank sampler on one rank (fused and unfused writes, batched passes, its own sharded cache
    order) streams the one-process video with a sink, a rolling window and a context level."""
    from magitrain.parallel_generate import ParallelChunkSampler
    from test_generate_parallel import _inputs

    model = make_model()
    emb, mask, sc, prefix = _inputs(SINK_CASE)
    with torch.no_grad():
        want = ChunkSampler(model, emb, mask, H, W, sc, prefix).generate()
        plain = ChunkSampler(model, emb, mask, H, W, SamplerConfig(**{**sc.__dict__, "context_t": None}),
                             prefix).generate()
        for fuse in (True, False):
            sampler = ParallelChunkSampler(model, emb, mask, H, W, sc, prefix, chunk_size=3, fuse_writes=fuse)
            torch.testing.assert_close(sampler.generate(), want, rtol=1e-5, atol=1e-5)
            assert sampler.cache.num_chunks == 2
    assert (plain - want).abs().max() > 1e-3


def _cp2_worker(rank, port, out_dir, cases):
    import os

    import torch.distributed as dist
    from magitrain.parallel_generate import ParallelChunkSampler
    from test_generate_parallel import _inputs

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    results = {}
    for i, case in enumerate(cases):
        emb, mask, sc, prefix = _inputs(case)
        sampler = ParallelChunkSampler(make_model(), emb, mask, H, W, sc, prefix, cp_group=dist.group.WORLD,
                                       chunk_size=4, overlap_stages=2)
        results[f"121_{i}"] = sampler.generate()
        results[f"121_{i}_cache"] = torch.tensor([sampler.cache.nbytes(), sampler.cache.num_chunks])
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow
def test_cp2_sampler_with_sink_equals_one_process(tmp_path):
    """cp=2 over gloo (2 processes): each rank caches half of every chunk, sink kept, oldest recent dropped;
    and the sliding context without a sink (test_generate_parallel's first case) as before."""
    import os

    import torch.multiprocessing as mp
    from test_generate_parallel import CASES, _free_port, _inputs

    cases = [SINK_CASE, CASES[0]]
    mp.spawn(_cp2_worker, args=(_free_port(), str(tmp_path), cases), nprocs=2)
    model = make_model()
    got = [torch.load(os.path.join(tmp_path, f"rank{rank}.pt"), weights_only=True) for rank in range(2)]
    for i, case in enumerate(cases):
        emb, mask, sc, prefix = _inputs(case)
        with torch.no_grad():
            sampler = ChunkSampler(model, emb, mask, H, W, sc, prefix)
            want = sampler.generate()
        for rank in range(2):
            torch.testing.assert_close(got[rank][f"121_{i}"], want, rtol=1e-5, atol=1e-5)
            nbytes, chunks = got[rank][f"121_{i}_cache"].tolist()
            assert chunks == sampler.cache.num_chunks and nbytes == sampler.cache.nbytes() / 2


def test_validation_samples_with_the_trained_rule(tmp_path):
    from conftest import tiny_config
    from magitrain.model import MagiDiT
    from magitrain.validation import stream_sample

    keys = ["eval.sample_steps=2", "eval.sample_window=1", "eval.sample_chunks=5", "data.height=4", "data.width=4"]
    ruled = tiny_config(tmp_path, *keys, "model.sink_chunks=1", "model.max_context_chunks=1")
    torch.manual_seed(0)
    model = MagiDiT(ruled.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    m = ruled.model
    emb = torch.randn(1, m.caption_max_length, m.caption_channels, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(1, m.caption_max_length, dtype=torch.bool)
    with torch.no_grad():
        got = torch.cat(list(stream_sample(model, ruled, emb, mask)), dim=1)
        e = ruled.eval
        sc = SamplerConfig(steps=2, window=1, cfg_scale=e.cfg_scale, seed=e.sample_seed, sink_chunks=1,
                           max_context_chunks=1)
        want = ChunkSampler(model, emb.expand(5, -1, -1), mask.expand(5, -1), 4, 4, sc).generate()
        plain = torch.cat(list(stream_sample(model, tiny_config(tmp_path, *keys), emb, mask)), dim=1)
    assert torch.equal(got, want)
    assert (plain - got).abs().max() > 1e-3
