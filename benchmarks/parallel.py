"""Step time per DP x CP x TP layout against one process, at equal global batch; comm share.

    python benchmarks/parallel.py [--steps 8] [--layouts 111,211,121,112,221,122,212,141]

Every layout trains the same model on the same global batch (``data.batch_size`` sequences per
step whatever dp is) with the real ``train_step`` (forward, backward, sharded clip, AdamW),
one thread per rank, gloo. Per layout: the median step time of rank 0 after 3 warm-up steps,
and the share of that time spent inside collectives (profiled over 2 more steps: the time of
every collective event on the training thread, ``c10d::*`` / ``_c10d_functional::*`` calls and
waits, synchronous gloo collectives in full, waiting for slower peers included, divided by the
wall time of those steps, averaged over ranks; the ``.wait()`` of FSDP2's async collectives
records no event, so the share is a lower bound). Prints one
markdown table row per layout.

On a CPU machine with fewer cores than ranks the processes share cores, so step times say more
about oversubscription than about scaling; the comm share is the steadier figure.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WARMUP, PROFILED = 3, 2
MODEL = ["model.num_layers=4", "data.batch_size=4", "train.grad_accum=1", "parallel.cp_chunk_size=32",
         "optim.warmup_steps=2"]  # configs/tiny.yaml with 4 layers: 4 x 256 tokens per step
COMM_PREFIXES = ("c10d::", "_c10d_functional::", "gloo:", "nccl:")  # eager, DTensor, backend events


def _config(run_dir: str, layout: tuple[int, int, int], steps: int):
    from magitrain.config import load_config

    dp, cp, tp = layout
    return load_config(os.path.join(REPO, "configs", "tiny.yaml"),
                       [f"run.dir={run_dir}", "log.progress=false", "log.tensorboard=false", "ckpt.every=0",
                        f"train.steps={steps}", f"parallel.dp={dp}", f"parallel.cp={cp}", f"parallel.tp={tp}",
                        *MODEL])


def _comm_seconds(prof) -> float:
    """CPU seconds of top-level collective events (nested ones are not counted twice)."""
    events = sorted((e for e in prof.events() if e.name.startswith(COMM_PREFIXES)),
                    key=lambda e: e.time_range.start)
    total, end = 0.0, -1.0
    for e in events:
        if e.time_range.start >= end:
            total += e.time_range.elapsed_us() / 1e6
            end = e.time_range.end
    return total


def measure(layout: tuple[int, int, int], steps: int, run_dir: str) -> tuple[float, float]:
    """(median step seconds, comm share) of this rank for ``layout``."""
    from torch.profiler import ProfilerActivity, profile

    from magitrain.data import build_data_source
    from magitrain.model import MagiDiT
    from magitrain.parallel import collectives
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.parallelize import parallelize_model
    from magitrain.train import build_optimizer, train_step

    cfg = _config(run_dir, layout, steps)
    env = init_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    model = parallelize_model(MagiDiT(cfg.model), env, cfg)
    optimizer = build_optimizer(model, cfg)
    data = build_data_source(cfg, env.dp_rank, env.dp)

    def step(i):
        train_step(model, [data.next_batch() for _ in range(cfg.train.grad_accum)], cfg, env, i, optimizer)

    times = []
    for i in range(WARMUP + steps):
        collectives.barrier()  # host-side: the CPU group
        t0 = time.perf_counter()
        step(i)
        times.append(time.perf_counter() - t0)
    collectives.barrier()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        for i in range(PROFILED):
            step(WARMUP + steps + i)
        wall = time.perf_counter() - t0
    return statistics.median(times[WARMUP:]), _comm_seconds(prof) / wall if env.distributed else 0.0


def _worker(rank, world, port, layouts, steps, root, queue):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for layout in layouts:
        step_s, share = measure(layout, steps, os.path.join(root, "".join(map(str, layout))))
        queue.put((layout, rank, step_s, share))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--layouts", default="111,211,121,112,221,122,212,141",
                        help="dp cp tp digits, comma separated")
    args = parser.parse_args(argv)
    layouts = [tuple(int(c) for c in s) for s in args.layouts.split(",")]
    results: dict = {}
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as root:
        for world in sorted({dp * cp * tp for dp, cp, tp in layouts}):
            group = [lay for lay in layouts if lay[0] * lay[1] * lay[2] == world]
            if world == 1:
                torch.set_num_threads(1)
                for lay in group:
                    results[lay] = [measure(lay, args.steps, os.path.join(root, "111"))]
                continue
            queue = ctx.Queue()
            mp.spawn(_worker, args=(world, _free_port(), group, args.steps, root, queue), nprocs=world)
            for _ in range(world * len(group)):
                lay, rank, step_s, share = queue.get()
                results.setdefault(lay, []).append((step_s, share) if rank == 0 else (None, share))
    base = results[(1, 1, 1)][0][0] if (1, 1, 1) in results else None
    print("| dp x cp x tp | ranks | step ms (rank 0, median) | vs 1 process | comm share (mean over ranks) |")
    print("|---|---|---|---|---|")
    for lay in layouts:
        rows = results[lay]
        step_s = next(s for s, _ in rows if s is not None)
        share = statistics.mean(sh for _, sh in rows)
        speed = f"{base / step_s:.2f}x" if base else "-"
        print(f"| {lay[0]}x{lay[1]}x{lay[2]} | {lay[0] * lay[1] * lay[2]} | {step_s * 1e3:.0f} | {speed} | "
              f"{share:.0%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
