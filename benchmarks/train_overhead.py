"""Framework overhead: tokens/s of ``magitrain.train`` vs a bare PyTorch loop, same model and data.

    python benchmarks/train_overhead.py [--steps 60] [--rounds 3]

Both loops run in this process on ``configs/tiny.yaml`` (synthetic data, fp32, 1 thread), in
alternating rounds so machine noise hits both alike. The bare loop does only what any training
loop must: fetch the batch, noise it, forward, loss, backward, clip, AdamW step. The trainer adds
EMA, LR schedule, metrics.jsonl, TensorBoard and the progress bar. Reported: the median of the
per-round medians of per-step tokens/s (first 5 steps of each round dropped), and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.diffusion import masked_sq_error, noise_batch
from magitrain.model import MagiDiT
from magitrain.synthetic import SyntheticSource
from magitrain.train import train

WARMUP = 5


def bare_loop(cfg) -> list[float]:
    """Tokens/s of each step of the simplest loop over the same model and data."""
    torch.manual_seed(cfg.train.seed)
    model = MagiDiT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    data = SyntheticSource(cfg)
    rates = []
    for step in range(cfg.train.steps):
        t0 = time.perf_counter()
        batch = data.next_batch()
        nb = noise_batch(batch, cfg.diffusion, cfg.train.seed, step)
        pred = model(nb.x_t, nb.t, batch.text_emb, batch.text_mask, batch.layout,
                     text_null=nb.text_null, drop_history=nb.drop_history)
        sq, count = masked_sq_error(pred, nb.target, nb.loss_mask)
        (sq / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        rates.append(batch.num_tokens / (time.perf_counter() - t0))
    return rates[WARMUP:]


def framework_loop(cfg) -> list[float]:
    train(cfg)
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        return [json.loads(line)["tokens_per_s"] for line in f][WARMUP:]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bare, framework = [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            cfg = load_config(config_path("tiny.yaml"), [f"run.dir={tmp}/run", f"train.steps={args.steps}",
                                                        "ckpt.every=0", "log.progress=false"])
            bare.append(statistics.median(bare_loop(cfg)))
            framework.append(statistics.median(framework_loop(cfg)))
        print(f"round {r}: bare {bare[-1]:.0f} tok/s, magitrain.train {framework[-1]:.0f} tok/s", file=sys.stderr)
    b, f = statistics.median(bare), statistics.median(framework)
    print(f"| tiny, {args.steps} steps x {args.rounds} rounds | bare loop {b:.0f} tok/s | magitrain.train {f:.0f} tok/s "
          f"| ratio {f / b:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
