"""Attention sink + rolling KV window: cache memory and speed vs video length (issue 17).

    python benchmarks/sink_window.py [--sink 1] [--window-chunks 4] [--chunks 8,16,32,64] [--latent 16]

For every length it streams a video with ``--sink-chunks S --max-context K`` and, for contrast,
with an unlimited cache, each run in a fresh process (so peak RSS is that run's own), and prints
one markdown table: peak bytes held by the KV cache's tensors, peak live tensor bytes (torch
profiler memory events; only with ``--profile``, slow), peak RSS growth over the process's state
after the model was built and warmed up, and seconds per chunk. The model is the tiny config's
(configs/tiny.yaml, random weights: memory and speed do not depend on them), fp32, one thread,
on CPU; latent ``--latent`` x ``--latent`` (16: 128 tokens a chunk). Sampler: 4 steps, window 2,
2-pass CFG. The cache holds at most ``S + K`` chunks, so its bytes are the same at every length.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_one(chunks: int, sink: int, cap: int | None, latent: int, profile: bool) -> dict:
    """Stream one video in this process; its figures."""
    from magitrain.config import load_config
    from magitrain.model import MagiDiT
    from magitrain.sampler import ChunkSampler, SamplerConfig

    torch.set_num_threads(1)
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"))
    torch.manual_seed(0)
    model = MagiDiT(cfg.model).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(chunks, m.caption_max_length, m.caption_channels, generator=g)
    mask = torch.ones(chunks, m.caption_max_length, dtype=torch.bool)
    sc = SamplerConfig(steps=4, window=2, cfg_scale=2.0, max_context_chunks=cap, sink_chunks=sink)

    def stream(n):
        sampler = ChunkSampler(model, emb[:n], mask[:n], latent, latent, sc)
        peak = 0
        with torch.no_grad():
            for _ in sampler.stream():  # consumed as it streams, as the CLI does
                peak = max(peak, sampler.cache.nbytes())
        return peak

    stream(min(chunks, 2))  # warm-up: first-call allocations are not the cache's
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    cache_peak = stream(chunks)
    seconds = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0
    out = {"chunks": chunks, "sink": sink, "cap": cap, "cache_bytes": cache_peak, "rss_delta_kib": rss,
           "s_per_chunk": seconds / chunks}
    if profile:
        sys.path.insert(0, os.path.join(REPO, "tests"))
        from test_generate import peak_alloc_bytes

        out["peak_tensor_bytes"] = peak_alloc_bytes(lambda: stream(chunks))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sink", type=int, default=1, help="sink chunks S")
    parser.add_argument("--window-chunks", type=int, default=4, help="most recent finished chunks K (--max-context)")
    parser.add_argument("--chunks", default="8,16,32,64")
    parser.add_argument("--latent", type=int, default=16, help="latent height = width")
    parser.add_argument("--profile", action="store_true", help="also the profiler's peak live tensor bytes (slow)")
    parser.add_argument("--row", help=argparse.SUPPRESS)  # internal: one run, JSON on stdout
    args = parser.parse_args()
    if args.row:
        chunks, sink, cap = json.loads(args.row)
        print(json.dumps(run_one(chunks, sink, cap, args.latent, args.profile)))
        return
    lengths = [int(c) for c in args.chunks.split(",")]
    print(f"latent {args.latent}x{args.latent} ({args.latent ** 2 // 2} tokens a chunk), 4 steps, window 2, "
          f"2-pass CFG, tiny model, fp32, 1 thread\n")
    head = "| cache | chunks | KV cache MiB (peak) | peak RSS growth MiB | s / chunk |"
    if args.profile:
        head += " peak live tensors MiB |"
    print(head)
    print("|---" * (head.count("|") - 1) + "|")
    for sink, cap, name in ((args.sink, args.window_chunks, f"sink {args.sink} + last {args.window_chunks}"),
                            (0, None, "all history")):
        for n in lengths:
            cmd = [sys.executable, os.path.abspath(__file__), "--row", json.dumps([n, sink, cap]),
                   "--latent", str(args.latent)] + (["--profile"] if args.profile else [])
            r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            row = (f"| {name} | {n} | {r['cache_bytes'] / 2**20:.2f} | {r['rss_delta_kib'] / 1024:.1f} | "
                   f"{r['s_per_chunk']:.3f} |")
            if args.profile:
                row += f" {r['peak_tensor_bytes'] / 2**20:.2f} |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
