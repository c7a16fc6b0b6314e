"""Step time while an asynchronous checkpoint is written, vs a synchronous one and none.

    python benchmarks/async_checkpoint.py [--steps 16] [--every 5] [--world 2]

``--world`` gloo ranks (dp, FSDP2) train a model larger than tiny (4 layers, hidden 384: ~110 MB
of model + AdamW + EMA state per checkpoint, split over the ranks) three times on synthetic data:
``ckpt.every=0`` (no saves but the final one), synchronous saves, ``ckpt.async_save=true``. On rank
0 the script times every training step (``train_step``), every ``Checkpointer.save`` call (the
time the loop is blocked: the whole write when synchronous, the copy to host memory when
asynchronous) and the moment each asynchronous checkpoint completes. Reported per mode: the median
step time of steps with no write in flight, of steps that ran while a background write was in
flight, and the median time ``save`` blocked the loop. The final save (after the last step) is
left out.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import time

import torch
import torch.multiprocessing as mp

MODEL = ["model.num_layers=4", "model.hidden_size=384", "model.num_heads=6", "model.num_kv_heads=2",
         "model.head_dim=64", "model.ffn_hidden_size=1536"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, root, mode, steps, every, out):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import magitrain.train as train_mod
    from magitrain.checkpoint import Checkpointer
    from magitrain.config import load_config
    from magitrain.configs import config_path

    events = {"steps": [], "saves": [], "completed": []}
    real_step, real_save, real_complete = train_mod.train_step, Checkpointer.save, Checkpointer._complete

    def timed_step(*args, **kwargs):
        t0 = time.perf_counter()
        out = real_step(*args, **kwargs)
        events["steps"].append((t0, time.perf_counter()))
        return out

    def timed_save(self, *args, **kwargs):
        t0 = time.perf_counter()
        out = real_save(self, *args, **kwargs)
        events["saves"].append((t0, time.perf_counter()))
        return out

    def timed_complete(self, *args, **kwargs):
        out = real_complete(self, *args, **kwargs)
        events["completed"].append(time.perf_counter())
        return out

    train_mod.train_step, Checkpointer.save, Checkpointer._complete = timed_step, timed_save, timed_complete
    overrides = [f"run.dir={root}/{mode}", "log.progress=false", "log.tensorboard=false", f"train.steps={steps}",
                 f"parallel.dp={world}", f"data.batch_size={world}", "ckpt.keep_last=2",
                 f"ckpt.every={0 if mode == 'none' else every}", f"ckpt.async_save={mode == 'async'}", *MODEL]
    train_mod.train(load_config(config_path("tiny.yaml"), overrides))
    if rank == 0:
        with open(out, "w") as f:
            json.dump(events, f)


def summarise(events: dict, steps: int) -> dict:
    saves = events["saves"][:-1] if len(events["saves"]) > 1 else []  # the last one follows the last step
    # a background write is in flight from the end of its save() call to its completion
    windows = list(zip([end for _, end in saves], events["completed"][: len(saves)])) if saves else []
    during, quiet = [], []
    for i, (t0, t1) in enumerate(events["steps"]):
        if i < 2:  # warm-up
            continue
        overlaps = any(t0 < w1 and t1 > w0 for w0, w1 in windows)
        (during if overlaps else quiet).append(t1 - t0)
    med = lambda xs: statistics.median(xs) if xs else None
    return {"step_s_quiet": med(quiet), "step_s_during_write": med(during), "steps_during_write": len(during),
            "save_blocked_s": med([t1 - t0 for t0, t1 in saves]), "saves": len(saves)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--world", type=int, default=2)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for mode in ("none", "sync", "async"):
            out = os.path.join(root, f"{mode}.json")
            mp.spawn(_worker, args=(args.world, _free_port(), root, mode, args.steps, args.every, out),
                     nprocs=args.world)
            with open(out) as f:
                rows[mode] = summarise(json.load(f), args.steps)
    print(json.dumps(rows, indent=1))
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    print("| mode | step s, no write in flight | step s, write in flight (n) | save() blocks the loop s (n) |")
    print("|---|---|---|---|")
    for mode, r in rows.items():
        print(f"| {mode} | {fmt(r['step_s_quiet'])} | {fmt(r['step_s_during_write'])} ({r['steps_during_write']}) "
              f"| {fmt(r['save_blocked_s'])} ({r['saves']}) |")


if __name__ == "__main__":
    main()
