"""Streaming generation speed: seconds per chunk with the KV cache vs a cache-free sampler, and
vs window size; plus peak tensor memory vs video length with and without sliding context.

    python benchmarks/generate.py [--chunks 8] [--steps 16]

The model is the tiny config's (configs/tiny.yaml, random weights: speed does not depend on
them), latent 8x8, fp32, one thread, on CPU. "no cache" is the reference the exactness tests use:
every evaluation reruns all finished chunks at clean_t together with the window.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))

from magitrain.config import load_config  # noqa: E402
from magitrain.model import MagiDiT  # noqa: E402
from magitrain.sampler import ChunkSampler, SamplerConfig  # noqa: E402
import test_generate as reference  # noqa: E402  (the cache-free reference sampler)


def build(cfg_path: str):
    cfg = load_config(cfg_path)
    torch.manual_seed(0)
    model = MagiDiT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, model


def text(n, m):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, m.caption_max_length, m.caption_channels, generator=g), \
        torch.ones(n, m.caption_max_length, dtype=torch.bool)


def time_cached(model, cfg, n, sc: SamplerConfig) -> float:
    emb, mask = text(n, cfg.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        ChunkSampler(model, emb, mask, cfg.data.height, cfg.data.width, sc).generate()
    return (time.perf_counter() - t0) / n


def time_reference(model, cfg, n, sc: SamplerConfig) -> float:
    emb, mask = text(n, cfg.model)
    t0 = time.perf_counter()
    with torch.no_grad():
        reference.reference_generate(model, emb, mask, sc, height=cfg.data.height, width=cfg.data.width)
    return (time.perf_counter() - t0) / n


def peak_memory(model, cfg, n, sc: SamplerConfig) -> int:
    emb, mask = text(n, cfg.model)
    sampler = ChunkSampler(model, emb, mask, cfg.data.height, cfg.data.width, sc)
    with torch.no_grad():
        return reference.peak_alloc_bytes(lambda: [None for _ in sampler.stream()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    parser.add_argument("--chunks", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--only", choices=("speed", "length", "memory"), help="run one table")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg, model = build(args.config)
    n, s = args.chunks, args.steps
    time_cached(model, cfg, 2, SamplerConfig(steps=2, window=2))  # warm-up (first-call allocations)

    if args.only in (None, "speed"):
        speed_table(model, cfg, n, s)
    if args.only in (None, "length"):
        length_table(model, cfg)
    if args.only in (None, "memory"):
        memory_table(model, cfg)


def speed_table(model, cfg, n, s):
    print(f"## seconds per chunk ({n} chunks, {s} steps, tiny model, latent {cfg.data.height}x{cfg.data.width})\n")
    print("| window | CFG passes | cached s/chunk | no-cache s/chunk | speed-up |")
    print("|---|---|---|---|---|")
    for window, cfg_scale in ((1, 1.0), (2, 1.0), (4, 1.0), (4, 3.0)):
        sc = SamplerConfig(steps=s, window=window, cfg_scale=cfg_scale)
        cached, plain = time_cached(model, cfg, n, sc), time_reference(model, cfg, n, sc)
        print(f"| {window} | {sc.passes} | {cached:.3f} | {plain:.3f} | {plain / cached:.2f}x |", flush=True)


def length_table(model, cfg):
    print("\n## seconds per chunk vs video length (4 steps, window 2, 1 pass)\n")
    print("| chunks | cached s/chunk | no-cache s/chunk | speed-up |")
    print("|---|---|---|---|")
    for chunks in (8, 32):
        sc = SamplerConfig(steps=4, window=2)
        cached, plain = time_cached(model, cfg, chunks, sc), time_reference(model, cfg, chunks, sc)
        print(f"| {chunks} | {cached:.3f} | {plain:.3f} | {plain / cached:.2f}x |", flush=True)


def memory_table(model, cfg):
    print("\n## peak tensor memory while streaming (window 2, 2 CFG passes)\n")
    print("| chunks | context cap | peak MB |")
    print("|---|---|---|")
    for cap in (2, None):
        for chunks in (4, 16):
            sc = SamplerConfig(steps=2, window=2, cfg_scale=2.0, max_context_chunks=cap)
            print(f"| {chunks} | {cap or 'all'} | {peak_memory(model, cfg, chunks, sc) / 2**20:.3f} |", flush=True)


if __name__ == "__main__":
    main()
