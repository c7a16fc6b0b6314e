"""``magitrain demo``: train the tiny model on procedural clips and show where everything is.

Single-process version: trains ``configs/tiny.yaml`` on the synthetic source (coloured shapes
that move as their captions say), checkpoints, and prints the run dir, the TensorBoard command
and the loss curve summary.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from magitrain.config import ConfigError, load_config
from magitrain.configs import config_path
from magitrain.train import train


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magitrain demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="run directory (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help="a short run (CI smoke test)")
    parser.add_argument("overrides", nargs="*", help="extra key.sub=value config overrides")
    args = parser.parse_args(argv)
    overrides = [f"run.dir={args.out}"] + (["train.steps=20", "ckpt.every=10"] if args.quick else []) + args.overrides
    try:
        cfg = load_config(config_path("tiny.yaml"), overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"magitrain demo: training the tiny model for {cfg.train.steps} steps on procedural clips")
    train(cfg)
    with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    k = max(1, len(losses) // 10)
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"\nloss: {first:.4f} (first {k} steps) -> {last:.4f} (last {k} steps)")
    print(f"run dir:      {os.path.abspath(cfg.run.dir)}")
    print(f"metrics:      {os.path.abspath(os.path.join(cfg.run.dir, 'metrics.jsonl'))}")
    print(f"checkpoints:  {os.path.abspath(os.path.join(cfg.run.dir, 'checkpoints'))}")
    print(f"TensorBoard:  tensorboard --logdir {os.path.abspath(os.path.join(cfg.run.dir, 'tensorboard'))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
