"""Streaming generation speed: seconds per chunk with the KV cache vs a cache-free sampler, and
vs window size; plus peak tensor memory vs video length with and without sliding context; and
(``--only latency``) time to first chunk and steady-state seconds per chunk per TP x CP layout on
1, 2 and 4 ranks (gloo processes on this machine, or GPUs with ``--device cuda``), with what the
fused K/V writes and the staged remote-K/V fetch hide.

    python benchmarks/generate.py [--chunks 8] [--steps 16]
    python benchmarks/generate.py --only latency [--chunks 8] [--steps 16] [--repeats 3]

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

import test_generate as reference

from magitrain.config import load_config
from magitrain.model import MagiDiT
from magitrain.sampler import ChunkSampler, SamplerConfig


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
    parser.add_argument("--only", choices=("speed", "length", "memory", "latency"), help="run one table")
    parser.add_argument("--repeats", type=int, default=3, help="latency: runs per layout (median, spread)")
    parser.add_argument("--ranks", default="1,2,4", help="latency: world sizes to run")
    parser.add_argument("--device", default="cpu", help="latency: cpu (gloo) or cuda (nccl, one GPU per rank)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.only == "latency":
        return latency_table(args)
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


# --- latency per layout (multi-rank) ----------------------------------------------------------

LAYOUTS = {1: [(1, 1)], 2: [(2, 1), (1, 2)], 4: [(4, 1), (2, 2)]}  # (cp, tp)


def _latency_worker(rank, world, port, args, out_dir):
    import json

    import torch.distributed as dist
    from magitrain.parallel.tensor_parallel import apply_tensor_parallel
    from torch.distributed.device_mesh import init_device_mesh

    from magitrain.parallel_generate import ParallelChunkSampler

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    device = torch.device(args.device, rank) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    cfg, _ = build(args.config)
    sc = SamplerConfig(steps=args.steps, window=4, cfg_scale=3.0)
    emb, mask = text(args.chunks, cfg.model)
    rows = []
    variants = [("fused", True, True), ("unfused", False, True), ("no overlap", True, False)]
    for cp, tp in LAYOUTS[world]:
        mesh = init_device_mesh(device.type, (cp, tp), mesh_dim_names=("cp", "tp"))
        _, model = build(args.config)
        model = model.to(device)
        if tp > 1:
            apply_tensor_parallel(model, mesh["tp"])
        for rep in range(args.repeats + 1):  # run 0 warms up (allocations, plans of the solver not cached across runs)
            for name, fuse, overlap in variants if cp > 1 else variants[:2]:
                sampler = ParallelChunkSampler(model, emb, mask, cfg.data.height, cfg.data.width, sc,
                                               cp_group=mesh["cp"].get_group() if cp > 1 else None,
                                               chunk_size=cfg.parallel.cp_chunk_size, overlap_stages=2,
                                               fuse_writes=fuse, overlap=overlap)
                dist.barrier()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                stamps = []
                for chunk in sampler.stream():
                    chunk.sum().item()  # the chunk is on the host side of the stream
                    stamps.append(time.perf_counter() - t0)
                if rep:
                    gaps = [b - a for a, b in zip(stamps[sc.window - 1:], stamps[sc.window:])]
                    rows.append(dict(cp=cp, tp=tp, variant=name, first=stamps[0], steady=sorted(gaps)[len(gaps) // 2],
                                     total=stamps[-1], exposed=sampler.comm_times.exposed_s,
                                     attention=sampler.comm_times.attention_s, forwards=sampler.forwards,
                                     cache_mib=sampler.cache.nbytes() / 2**20))
    if rank == 0:
        with open(os.path.join(out_dir, f"world{world}.json"), "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def latency_table(args) -> None:
    import json
    import socket
    import statistics
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in map(int, args.ranks.split(",")):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            mp.spawn(_latency_worker, args=(world, port, args, tmp), nprocs=world)
            with open(os.path.join(tmp, f"world{world}.json")) as f:
                rows += [dict(r, world=world) for r in json.load(f)]
    print(f"## latency per layout ({args.chunks} chunks, {args.steps} steps, window 4, 2 CFG passes batched, "
          f"tiny model, {args.device}, median of {args.repeats} runs [min-max])\n")
    print("| ranks | cp | tp | writes / fetch | time to first chunk s | steady s/chunk | forwards | "
          "exposed comm s | attention s | cache MiB/rank |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    seen = []
    for r in rows:
        key = (r["world"], r["cp"], r["tp"], r["variant"])
        if key in seen:
            continue
        seen.append(key)
        same = [x for x in rows if (x["world"], x["cp"], x["tp"], x["variant"]) == key]

        def fmt(k, nd=3, same=same):
            v = [x[k] for x in same]
            return f"{statistics.median(v):.{nd}f} [{min(v):.{nd}f}-{max(v):.{nd}f}]"
        print(f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {fmt('first')} | {fmt('steady')} | "
              f"{same[0]['forwards']} | {fmt('exposed')} | {fmt('attention')} | {same[0]['cache_mib']:.3f} |",
              flush=True)


if __name__ == "__main__":
    main()
