"""Framework overhead: wall time of a whole ``magitrain.train`` process vs a bare loop process.

    python benchmarks/train_overhead.py [--steps 60] [--rounds 5] [--config configs/tiny.yaml]

Each round starts two fresh processes, one after the other (the order alternates between rounds, so
a load change on the machine hits both alike), both with ``OMP_NUM_THREADS=1``:

- ``magitrain.train``: ``python -m magitrain.train --config CONFIG train.steps=N`` with everything a user
  gets: metrics.jsonl, the progress bar, TensorBoard, EMA, LR schedule, FLOPs/MFU accounting and
  checkpoints (``ckpt.every=N/2``: one in the middle, one at the end);
- the bare loop: ``python benchmarks/train_overhead.py --bare ...``: the same model, data and steps with
  only what any loop must do (fetch the batch, noise it, forward, loss, backward, clip, AdamW step).

The figure is the wall time of each process from start to exit (imports and start-up included,
measured by this parent). Reported per round and as median and spread (min..max) over rounds; the
ratio is bare / framework per round (1.0: no overhead).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bare_loop(config: str, steps: int) -> None:
    """The simplest loop over the same model and data (the child process of ``--bare``)."""
    import torch

    from magitrain.config import load_config
    from magitrain.diffusion import masked_sq_error, noise_batch
    from magitrain.model import MagiDiT
    from magitrain.synthetic import SyntheticSource

    cfg = load_config(config, [f"train.steps={steps}"])
    torch.manual_seed(cfg.train.seed)
    model = MagiDiT(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    data = SyntheticSource(cfg)
    for step in range(steps):
        batch = data.next_batch()
        nb = noise_batch(batch, cfg.diffusion, cfg.train.seed, step)
        pred = model(nb.x_t, nb.t, batch.text_emb, batch.text_mask, batch.layout,
                     text_null=nb.text_null, drop_history=nb.drop_history)
        sq, count = masked_sq_error(pred, nb.target, nb.loss_mask)
        (sq / count).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)


def timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}..{fmt.format(max(values))})"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.yaml"))
    parser.add_argument("--bare", action="store_true", help=argparse.SUPPRESS)  # the child process
    args = parser.parse_args(argv)
    if args.bare:
        bare_loop(args.config, args.steps)
        return 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    bare_s, framework_s, ratios = [], [], []
    for r in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            framework = [sys.executable, "-m", "magitrain.train", "--config", args.config, f"run.dir={tmp}/run",
                         f"train.steps={args.steps}", f"ckpt.every={max(1, args.steps // 2)}", "log.every=1",
                         "log.progress=true", "log.tensorboard=true"]
            bare = [sys.executable, os.path.abspath(__file__), "--bare", "--config", args.config,
                    "--steps", str(args.steps)]
            order = [("bare", bare), ("framework", framework)]
            times = {name: timed(cmd, env) for name, cmd in (order if r % 2 == 0 else order[::-1])}
        bare_s.append(times["bare"])
        framework_s.append(times["framework"])
        ratios.append(times["bare"] / times["framework"])
        print(f"round {r} ({'bare first' if r % 2 == 0 else 'framework first'}): bare {times['bare']:.1f} s, "
              f"magitrain.train {times['framework']:.1f} s, ratio {ratios[-1]:.3f}, "
              f"load {os.getloadavg()[0]:.1f}", file=sys.stderr, flush=True)
    name = os.path.basename(args.config)
    print("| config | steps x rounds | bare loop process s, median (min..max) | magitrain.train process s | "
          "ratio bare/train, median (min..max) |")
    print("|---|---|---|---|---|")
    print(f"| {name} | {args.steps} x {args.rounds} | {spread(bare_s)} | {spread(framework_s)} | "
          f"{spread(ratios, '{:.3f}')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
