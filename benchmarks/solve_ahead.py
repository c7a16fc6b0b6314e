"""Step-time breakdown with and without solve-ahead (CP dispatch plans solved in the loader).

    python benchmarks/solve_ahead.py [--steps 16] [--rounds 2] [--seq-tokens 1024] [--chunk 16]

Trains the tiny model (``configs/tiny.yaml``, fp32, 1 thread per rank) with ``parallel.cp=2``
on gloo (two processes) from WebDataset latent shards of varied clip shapes, so the packer
gives a different mask nearly every step, with ``data.num_workers=1``, once with
``parallel.cp_solve_ahead=false`` (the forward solves every new mask: on the critical path)
and once with ``true`` (the loader worker solves it; the forward looks it up). From the
trainer's metrics.jsonl (rank 0, after a warm-up): the median step time, data wait
(``data_time_s``) and time in ``plan_for`` inside the step (``cp_solve_s``: solving, or looking
up), and the share of distinct masks. Rounds alternate the order of the two runs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import sys
import tempfile

import numpy as np
import torch
import torch.multiprocessing as mp
import webdataset as wds
from magitrain.data_pipeline import shard_format as fmt

from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.train import train

WARMUP = 3
SHAPES = [(2, 4, 4), (4, 4, 4), (2, 2, 4), (6, 4, 4), (2, 4, 2), (4, 2, 4), (8, 4, 4), (2, 2, 2)]


def write_shards(folder: str, samples: int, per_shard: int = 16) -> str:
    rng = random.Random(0)
    g = torch.Generator().manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    n_shards = -(-samples // per_shard)
    for s in range(n_shards):
        with wds.TarWriter(os.path.join(folder, f"shard-{s:06d}.tar"), encoder=False) as w:
            for i in range(s * per_shard, min(samples, (s + 1) * per_shard)):
                t, h, wd = rng.choice(SHAPES)
                lat = torch.randn(4, t, h, wd, generator=g).half()
                meta = {"kind": "video", "latent_dtype": "float16", "frames": t * 4, "height": h * 8,
                        "width": wd * 8, "source": "bench"}
                w.write({"__key__": f"s{i:05d}", fmt.LATENT: fmt.latent_to_npy(lat.float(), "float16"),
                         fmt.CAPTION: f"clip {i}".encode(), fmt.META: json.dumps(meta).encode()})
    return os.path.join(folder, f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def _worker(rank, world, port, overrides, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    train(load_config(config_path("tiny.yaml"), overrides, world_size=world))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(shards: str, run_dir: str, ahead: bool, args) -> dict:
    overrides = [f"run.dir={run_dir}", f"train.steps={args.steps}", "ckpt.every=0", "log.progress=false",
                 "log.tensorboard=false", "data.source=webdataset", f"data.shards={shards}", "data.num_workers=1",
                 "data.shuffle_buffer=8", f"data.seq_tokens={args.seq_tokens}", "data.batch_size=1",
                 "model.in_channels=4", "model.out_channels=4", "model.patch_size=2", "model.chunk_frames=2",
                 "parallel.cp=2", f"parallel.cp_chunk_size={args.chunk}", f"parallel.cp_solve_ahead={str(ahead).lower()}",
                 "data.max_bad_fraction=0.5"]
    mp.spawn(_worker, args=(2, _free_port(), overrides, None), nprocs=2, join=True)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    records = [r for r in records if "step_time_s" in r][WARMUP:]
    masks = len({json.dumps(r.get("cp_area_per_rank")) for r in records})
    return {"step": statistics.median(r["step_time_s"] for r in records),
            "data": statistics.median(r["data_time_s"] for r in records),
            "solve": statistics.median(r["cp_solve_s"] for r in records),
            "solve_max": max(r["cp_solve_s"] for r in records),
            "distinct": masks / len(records), "steps": len(records)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--seq-tokens", type=int, default=1024)
    p.add_argument("--chunk", type=int, default=16)
    args = p.parse_args(argv)
    res: dict = {False: [], True: []}
    with tempfile.TemporaryDirectory() as tmp:
        shards = write_shards(os.path.join(tmp, "shards"), 256)
        for rnd in range(args.rounds):
            for ahead in ((False, True) if rnd % 2 == 0 else (True, False)):
                r = run(shards, os.path.join(tmp, f"run-{rnd}-{int(ahead)}"), ahead, args)
                res[ahead].append(r)
                print(f"round {rnd}: solve-ahead={ahead}: {r}, load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    print(f"tiny model, cp=2 (gloo), {args.seq_tokens} tokens per step, dispatch chunk {args.chunk}, "
          f"{args.steps} steps ({WARMUP} warm-up dropped), {args.rounds} rounds; medians over steps, "
          "then median (min..max) over rounds\n")
    print("| solve-ahead | step s | data wait s | solve in the step s (median) | solve in the step s (max) | "
          "solve share of step | distinct masks |")
    print("|---|---|---|---|---|---|---|")

    def fmt_(vals, f="{:.3f}"):
        return f"{f.format(statistics.median(vals))} ({f.format(min(vals))}..{f.format(max(vals))})"
    for ahead in (False, True):
        rs = res[ahead]
        print(f"| {'on' if ahead else 'off'} | {fmt_([r['step'] for r in rs])} | {fmt_([r['data'] for r in rs])} | "
              f"{fmt_([r['solve'] for r in rs], '{:.4f}')} | {fmt_([r['solve_max'] for r in rs], '{:.4f}')} | "
              f"{fmt_([100 * r['solve'] / r['step'] for r in rs], '{:.1f}%')} | "
              f"{fmt_([100 * r['distinct'] for r in rs], '{:.0f}%')} |")
    return 0


if __name__ == "__main__":
    np.random.seed(0)
    sys.exit(main())
