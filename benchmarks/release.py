"""Release conversion throughput and peak memory: ``python benchmarks/release.py [--layers 8] [--hidden 1024]``.

Writes a training checkpoint (model + EMA, fp32, DCP) of a mid-sized MagiDiT with random weights,
then runs each CLI step in a fresh process and reports wall time, MB/s of model data and the peak
RSS (``ru_maxrss``) above that of a process that only imported torch and magitrain.release:
export magi1 bf16 (1 GB shards), export magitrain fp32, verify, import.
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

import torch

from magitrain.checkpoint import Checkpointer
from magitrain.config import Config, ModelConfig, to_yaml
from magitrain.model import MagiDiT


def peak_rss_mb(cmd: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of ``cmd`` run in a child process (one child per call)."""
    code = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
            "rc = subprocess.run(sys.argv[1:]).returncode; dt = time.perf_counter() - t; "
            "print(dt, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, rc)")
    out = subprocess.run([sys.executable, "-c", code, *cmd], capture_output=True, text=True, check=True)
    seconds, mb, rc = out.stdout.split()[-3:]
    if rc != "0":
        raise RuntimeError(f"{cmd} failed: {out.stdout}")
    return float(seconds), float(mb)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="release_bench_")
    m = ModelConfig(num_layers=args.layers, hidden_size=args.hidden, num_heads=args.hidden // 128, num_kv_heads=2,
                    head_dim=128, ffn_hidden_size=4 * args.hidden, in_channels=16, out_channels=16,
                    caption_channels=4096, caption_max_length=800)
    cfg = Config(model=m)
    cfg.run.dir = os.path.join(root, "run")
    torch.manual_seed(0)
    model = MagiDiT(m)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    params = sum(v.numel() for v in state.values())
    largest = max(v.numel() * 4 for v in state.values()) / 1e6
    Checkpointer(cfg.run.dir).save(1, {"model": state, "ema": {"decay": 0.99, "shadow": {k: v + 1 for k, v in state.items()}},
                                       "trainer": {"step": 1, "tokens_seen": 0}}, to_yaml(cfg))
    with open(os.path.join(cfg.run.dir, "config.yaml"), "w") as f:
        f.write(to_yaml(cfg))
    del model, state
    print(f"model: {params / 1e6:.1f}M parameters = {params * 4 / 1e6:.0f} MB fp32; largest tensor {largest:.1f} MB fp32")

    py = [sys.executable, "-m", "magitrain.release"]
    _, base = peak_rss_mb([sys.executable, "-c", "import torch, magitrain.release, magitrain.model"])
    steps = [("export magi1 bf16, 1GB shards", py + ["export", cfg.run.dir, f"{root}/magi1", "--max-shard-size", "1GB"], 2),
             ("export magitrain fp32", py + ["export", cfg.run.dir, f"{root}/mt", "--format", "magitrain"], 4),
             ("verify (magitrain fp32)", py + ["verify", f"{root}/mt"], 4),
             ("import (magi1 bf16 -> run)", py + ["import", f"{root}/magi1", f"{root}/imported"], 2)]
    print(f"baseline process (imports only): {base:.0f} MB peak RSS")
    print("| step | model data | time | throughput | peak RSS above baseline |")
    print("|---|---|---|---|---|")
    for name, cmd, bytes_per_param in steps:
        seconds, mb = peak_rss_mb(cmd)
        data = params * bytes_per_param / 1e6
        print(f"| {name} | {data:.0f} MB | {seconds:.1f} s | {data / seconds:.0f} MB/s | {mb - base:.0f} MB |")
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
