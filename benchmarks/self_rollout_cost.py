"""Cost of ``objective: self_rollout`` against base flow matching: the trainer's step
(``magitrain.train.train_step``) with the same model, the same batches, one process.

    python benchmarks/self_rollout_cost.py [--steps 6] [--rounds 3] [rollout.steps=4 ...]

configs/tiny.yaml (2 x 64, 2 packed sequences of 2 four-chunk clips per step) with the rollout defaults
(``context_chunks 2``, ``steps 4``, 3-pass teacher guidance 1.5 / 1.5); extra ``key=value`` arguments
override the config. The teacher is a frozen copy of the student (the cost does not depend on its
weights). Rounds alternate flow matching and self-rollout, ``--steps`` steps each (the same step
numbers, so the same draws); per-step time is the median of a round, reported as median and spread
(min..max) over rounds, with the ratio per round; model forwards per step are counted with a forward
hook on the student and the teacher (backwards are not forwards: each objective has one).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from magitrain.config import load_config
from magitrain.model import MagiDiT
from magitrain.parallel.mesh import init_parallel
from magitrain.self_rollout import SelfRollout
from magitrain.synthetic import SyntheticSource
from magitrain.train import FlowMatching, build_optimizer, train_step

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                      ["run.dir=/tmp/self_rollout_cost", "objective=self_rollout", "ckpt.init_from=unused",
                       "log.progress=false", "log.tensorboard=false"] + args.overrides)
    env = init_parallel(cfg)
    torch.manual_seed(0)
    model = MagiDiT(cfg.model)
    teacher = copy.deepcopy(model).requires_grad_(False)
    calls = [0]
    for m in (model, teacher):
        m.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    optimizer = build_optimizer(model, cfg)
    batches = [SyntheticSource(cfg).next_batch() for _ in range(args.steps)]
    objectives = {"flow_matching": FlowMatching(cfg), "self_rollout": SelfRollout(cfg, teacher)}
    train_step(model, [batches[0]], cfg, env, 0, optimizer, objectives["self_rollout"])  # warm-up
    times = {name: [] for name in objectives}
    forwards = {name: 0.0 for name in objectives}
    rollout_calls = []
    for _ in range(args.rounds):
        for name, objective in objectives.items():
            per_step = []
            calls[0] = 0
            for step, batch in enumerate(batches):
                start = time.perf_counter()
                out = train_step(model, [batch], cfg, env, step, optimizer, objective)
                per_step.append(time.perf_counter() - start)
                if name == "self_rollout":
                    rollout_calls.append(out["figures"]["rollout_calls"])
            times[name].append(statistics.median(per_step))
            forwards[name] = calls[0] / len(batches)
    ratios = [b / a for a, b in zip(times["flow_matching"], times["self_rollout"])]
    r = cfg.rollout
    print(f"tiny, rollout.context_chunks={r.context_chunks} steps={r.steps} text_scale={r.text_scale} "
          f"history_scale={r.history_scale}; {args.rounds} rounds x {args.steps} steps")
    print("| objective | s / step (median, min..max over rounds) | model forwards / step |")
    print("|---|---|---|")
    for name in objectives:
        t = times[name]
        print(f"| {name} | {statistics.median(t):.4f} ({min(t):.4f}..{max(t):.4f}) | {forwards[name]:.2f} |")
    print(f"self_rollout / flow_matching step time: {statistics.median(ratios):.2f}x "
          f"({min(ratios):.2f}..{max(ratios):.2f}); rollout_calls per step: mean "
          f"{statistics.mean(rollout_calls):.2f}, min {min(rollout_calls):.0f}, max {max(rollout_calls):.0f}")


if __name__ == "__main__":
    main()
