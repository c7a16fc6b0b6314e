"""The data loader's share of training step time, with the tiny model training in the same process.

    python benchmarks/data_pipeline.py [--videos 48] [--steps 40] [--rounds 2] [--workers 0 1 2]

Builds two shard sets from one generated folder (videos of 32 frames at 64x64 px): latent shards
(PatchEncoder, fp16) and raw-mp4 shards (decoded and encoded on the fly by the reader). For each
shard set and loader worker count it trains ``configs/tiny.yaml`` on them (``data.source=webdataset``,
fp32, 1 thread, the trainer's own loop: ``magitrain.train.train``), so loader workers and the model
share the machine's cores as in a real run, and reads the trainer's per-step ``data_time_s`` (the
wait for ``next_batch()``) and ``step_time_s`` from metrics.jsonl. Reported: the loader's share of
step time (sum of data_time_s / sum of step_time_s over the steps after a warm-up), the trainer's
tokens/s, each as median and spread (min..max) over rounds; the rounds alternate the order of the
configurations.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch
from magitrain.data_pipeline.build_shards import main as build_shards
from magitrain.data_pipeline.media import encode_mp4

from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.train import train

WARMUP = 5  # steps dropped: worker start-up, the shuffle buffer filling, first-call allocations


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


def train_on(shards: str, workers: int, steps: int, run_dir: str) -> tuple[float, float]:
    """(loader share of step time, tokens/s) of one tiny training run on ``shards``."""
    cfg = load_config(config_path("tiny.yaml"), [
        f"run.dir={run_dir}", f"train.steps={steps}", "ckpt.every=0", "log.progress=false", "log.tensorboard=false",
        "data.source=webdataset", f"data.shards={shards}", f"data.num_workers={workers}", "data.shuffle_buffer=16"])
    train(cfg)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f][WARMUP:]
    data_s = sum(r["data_time_s"] for r in records)
    step_s = sum(r["step_time_s"] for r in records)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in records)
    return data_s / step_s, tokens / step_s


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--videos", type=int, default=48)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "src")
        make_folder(src, args.videos)
        sets = {"latent": os.path.join(tmp, "latent"), "raw-mp4 (decode + encode on the fly)": os.path.join(tmp, "mp4")}
        per_shard = str(max(1, args.videos // 8))
        build_shards([src, sets["latent"], "--latent-encoder", "patch", "--text-encoder", "hash",
                      "--max-shard-samples", per_shard, "--quiet"])
        build_shards([src, list(sets.values())[1], "--max-shard-samples", per_shard, "--quiet"])
        runs = [(name, w) for name in sets for w in args.workers]
        share: dict = {r: [] for r in runs}
        rate: dict = {r: [] for r in runs}
        for rnd in range(args.rounds):
            for name, w in (runs if rnd % 2 == 0 else runs[::-1]):
                s, t = train_on(sets[name], w, args.steps, os.path.join(tmp, f"run-{rnd}-{runs.index((name, w))}"))
                share[(name, w)].append(s)
                rate[(name, w)].append(t)
                print(f"round {rnd}: {name}, {w} workers: loader {100 * s:.1f}% of step time, {t:.0f} tokens/s, "
                      f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
        print("| shards | workers | loader share of step time, median (min..max) | trainer tokens/s, median (min..max) |")
        print("|---|---|---|---|")
        for name, w in runs:
            pct = [100 * v for v in share[(name, w)]]
            print(f"| {name} | {w} | {spread(pct, '{:.1f}%')} | {spread(rate[(name, w)], '{:.0f}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
