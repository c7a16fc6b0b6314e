"""Data-pipeline throughput vs the tiny model's consumption rate.

    python benchmarks/data_pipeline.py [--videos 48] [--batches 30] [--workers 0 1 2]

Builds two shard sets from one generated folder (videos of 32 frames at 64x64 px): latent shards
(PatchEncoder, fp16) and raw-mp4 shards (decoded and encoded on the fly). For each shard set and
worker count it times ``next_batch()`` of the WebDataset source after a warm-up (worker start-up
excluded) and reports samples/s and tokens/s (non-padding tokens). The consumption rate is one
forward+backward of ``magitrain.model.MagiDiT`` on the tiny config per batch; without
``magitrain/model.py`` that row says so.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
from magitrain.data_pipeline.build_shards import main as build_shards
from magitrain.data_pipeline.media import encode_mp4
from magitrain.data_pipeline.source import WebDatasetSource

from magitrain.config import load_config


def make_folder(src: str, n: int) -> None:
    os.makedirs(src, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        blocks = torch.randint(0, 256, (8, 8, 8, 3), generator=g, dtype=torch.uint8)
        video = blocks.repeat_interleave(4, 0).repeat_interleave(8, 1).repeat_interleave(8, 2)
        with open(os.path.join(src, f"v{i:04d}.mp4"), "wb") as f:
            f.write(encode_mp4(video, fps=8))
        with open(os.path.join(src, f"v{i:04d}.txt"), "w") as f:
            f.write(f"a synthetic clip number {i}")


def config(shards: str, workers: int):
    return load_config(overrides=["data.source=webdataset", f"data.shards={shards}", f"data.num_workers={workers}",
                                  "data.seq_tokens=256", "data.batch_size=2", "data.shuffle_buffer=16"])


def loader_rate(shards: str, workers: int, batches: int) -> tuple[float, float]:
    src = WebDatasetSource(config(shards, workers), 0, 1)
    for _ in range(3):  # warm-up: worker start-up and the shuffle buffer fill
        src.next_batch()
    samples = tokens = 0
    t0 = time.perf_counter()
    for _ in range(batches):
        b = src.next_batch()
        samples += len(b.layout.samples)
        tokens += b.num_tokens
    dt = time.perf_counter() - t0
    src.close()
    return samples / dt, tokens / dt


def model_rate(shards: str, batches: int) -> tuple[float, float] | None:
    """Samples/s and tokens/s the tiny model consumes (forward + backward), or None without a model."""
    try:
        from magitrain.model import MagiDiT
    except ImportError:
        return None
    cfg = config(shards, 0)
    src = WebDatasetSource(cfg, 0, 1)
    data = [src.next_batch() for _ in range(batches)]
    model = MagiDiT(cfg.model)
    samples = tokens = 0
    t0 = time.perf_counter()
    for b in data:
        t = torch.rand(b.layout.num_chunks)
        out = model(b.latents, t, b.text_emb, b.text_mask, b.layout)
        out.pow(2).mean().backward()
        samples += len(b.layout.samples)
        tokens += b.num_tokens
    dt = time.perf_counter() - t0
    return samples / dt, tokens / dt


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        make_folder(src, args.videos)
        sets = {"latent": os.path.join(tmp, "latent"), "raw-mp4": os.path.join(tmp, "mp4")}
        per_shard = str(max(1, args.videos // 8))
        build_shards([src, sets["latent"], "--latent-encoder", "patch", "--text-encoder", "hash",
                      "--max-shard-samples", per_shard, "--quiet"])
        build_shards([src, sets["raw-mp4"], "--max-shard-samples", per_shard, "--quiet"])
        print("| shards | workers | samples/s | tokens/s |")
        print("|---|---|---|---|")
        for name, path in sets.items():
            for w in args.workers:
                s, t = loader_rate(path, w, args.batches)
                print(f"| {name} | {w} | {s:.1f} | {t:.0f} |", flush=True)
        rate = model_rate(sets["latent"], 10)
        if rate is None:
            print("| tiny model fwd+bwd | - | magitrain/model.py not found | - |")
        else:
            print(f"| tiny model fwd+bwd (consumption) | - | {rate[0]:.1f} | {rate[1]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
