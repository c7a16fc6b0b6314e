"""``train.compile`` speed-up: the trainer's step (``magitrain.train.train_step``: forward, backward,
clip, AdamW) with eager blocks vs ``torch.compile``d blocks (inductor), same model, same batches.

    python benchmarks/compile.py [--steps 8] [--rounds 3] [--only tiny|mid]

Configs: ``tiny`` = configs/tiny.yaml (2 x 64, 512 tokens per step); ``mid`` = 4 layers x 256 wide,
head dim 64, FFN 1024, 2 x 1024-token sequences per step. Synthetic data with caption and history
dropout 0.5 (the masks and caption lengths change every step). One process, fp32, 1 thread. The
compiled model is compiled on its first step (that step's time is reported as compile time); then
the rounds alternate eager and compiled, ``--steps`` steps each; per-step time is the median of a
round, reported as median and spread (min..max) over rounds, and the speed-up per round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.model import MagiDiT
from magitrain.parallel.compile import apply_compile
from magitrain.parallel.mesh import init_parallel
from magitrain.synthetic import SyntheticSource
from magitrain.train import build_optimizer, train_step

CONFIGS = {
    "tiny": [],
    "mid": ["model.num_layers=4", "model.hidden_size=256", "model.num_heads=4", "model.num_kv_heads=2",
            "model.head_dim=64", "model.ffn_hidden_size=1024", "data.height=16", "data.width=16",
            "data.frames=8", "data.samples_per_seq=2", "data.seq_tokens=1024"],
}
DROPOUT = ["diffusion.caption_dropout=0.5", "diffusion.history_dropout=0.5"]


class Trainer:
    def __init__(self, cfg, compiled: bool):
        self.cfg, self.env = cfg, init_parallel(cfg)
        torch.manual_seed(0)
        self.model = MagiDiT(cfg.model)
        apply_compile(self.model, compiled)
        self.opt = build_optimizer(self.model, cfg)
        self.data = SyntheticSource(cfg)
        self.step = 0

    def timed_step(self) -> float:
        batch = self.data.next_batch()
        t0 = time.perf_counter()
        train_step(self.model, [batch], self.cfg, self.env, self.step, self.opt)
        self.step += 1
        return time.perf_counter() - t0


def spread(values, fmt):
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def bench(name: str, steps: int, rounds: int) -> str:
    cfg = load_config(config_path("tiny.yaml"), CONFIGS[name] + DROPOUT)
    params = sum(p.numel() for p in MagiDiT(cfg.model).parameters())
    eager, compiled = Trainer(cfg, False), Trainer(cfg, True)
    eager.timed_step()
    compile_s = compiled.timed_step()
    times = {"eager": [], "compiled": []}
    for r in range(rounds):
        order = [("eager", eager), ("compiled", compiled)]
        for mode, trainer in (order if r % 2 == 0 else order[::-1]):
            times[mode].append(statistics.median(trainer.timed_step() for _ in range(steps)))
        print(f"{name} round {r}: eager {1e3 * times['eager'][-1]:.1f} ms, compiled {1e3 * times['compiled'][-1]:.1f} ms,"
              f" load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    speedup = [e / c for e, c in zip(times["eager"], times["compiled"])]
    tokens = cfg.data.batch_size * cfg.data.seq_tokens
    return (f"| {name} ({params / 1e6:.2f}M params, {tokens} tokens/step) | {steps} x {rounds} | "
            f"{spread([1e3 * t for t in times['eager']], '{:.1f}')} | {spread([1e3 * t for t in times['compiled']], '{:.1f}')} | "
            f"{spread(speedup, '{:.2f}x')} | {compile_s:.0f} s |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", choices=sorted(CONFIGS))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = [bench(name, args.steps, args.rounds) for name in CONFIGS if args.only in (None, name)]
    print("| config | steps x rounds | eager ms/step, median (min..max) | compiled ms/step | speed-up | first step (compile) |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
