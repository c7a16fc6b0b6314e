"""Benchmark: context-parallel slice attention (fwd + bwd) on gloo, CPU.

For CP = 1 (baseline), 2 and 4 on the same total problem (see ``SCENARIOS``), and
overlap stages 1, 2, 3, it measures per configuration (slowest rank, best of iterations):

- ``total``: one forward + backward of :class:`CPSliceAttention` (best of ``--iters``; the
  three measurements are interleaved so that load from other jobs hits them alike);
- ``comm``: the same collectives alone (group-cast every stage, backward re-fetch and
  group-reduce), each waited for in order;
- ``compute``: the same attention work with the remote KV prefetched and no collectives;
- ``hidden`` = ``(comm + compute - total) / comm``: the share of transfer time overlap hides
  (meaningful only where comm is well above the timing noise);
- CPU time (``process_time``, all threads of the slowest rank): unlike wall time, it does not
  grow when the ranks share cores with each other or with other jobs;
- bytes each rank receives (fwd group-cast + bwd re-fetch + bwd group-reduce), against an
  all-gather baseline that moves every other rank's KV (all-gather fwd and bwd, reduce-scatter
  of dK/dV).

Run: ``python benchmarks/cp_attention.py`` (about 90 s). Each rank runs one thread. The
machine has 2 cores, shared with other jobs: CP=4 oversubscribes it and all timings are noisy.

``--link``: the same measurement over an **emulated link** (:func:`magitrain.parallel.comm.
emulate_link`: each transfer takes ``bytes / bandwidth + latency``), so that communication is a
real share of the step as on NVLink / InfiniBand clusters. The bandwidth is calibrated per
scenario so that the collectives of one stage take ``--comm-share`` of the compute-only time
(all ranks agree on it); then for overlap stages 1..4, ``--repeats`` rounds (interleaved:
total, compute-only, comm-only, stage counts in turn) give the hidden share per round, reported
as median and spread. The cost model (:mod:`magitrain.parallel.cost_model`, its compute
figures fitted to the compute-only times, its link the emulated one) predicts each
configuration's fwd+bwd time; the table shows prediction vs measurement. ``--clock thread_cpu``
(the default) times on the compute thread's CPU time plus the emulated waits (see
:class:`~magitrain.parallel.comm.EmulatedLink`): on a shared machine the wall clock also counts
the time other jobs hold the cores (+-35% on compute alone here), which swamps the overlap.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from magitrain.parallel import cost_model
from magitrain.parallel.attention import CPSliceAttention, dispatch
from magitrain.parallel.comm import Pending, emulate_link
from magitrain.parallel.dispatch import solve
from magitrain.parallel.mask import packed_videos, sliding_window_causal


# name -> (mask, dispatch solver, q heads, kv heads, head dim, CP sizes)
SCENARIOS = {
    # MAGI-1 packed videos (6 and 2 chunks of 256 tokens): compute-heavy, our default solver
    "videos": (lambda: packed_videos([[256] * 6, [256] * 2]), "default", 4, 2, 32, (1, 2, 4)),
    # sliding window 64 dispatched by MagiAttention's greedy (scattered chunks): comm-heavy,
    # little compute per token; shows whether overlap hides transfers
    "window": (lambda: sliding_window_causal(2048, 64), "area_greedy", 2, 2, 64, (1, 2)),
    # --link: a smaller packed-videos problem, so each timed call is short and best-of-N
    # finds quiet moments on a shared machine
    "link": (lambda: packed_videos([[128] * 6, [128] * 2]), "default", 4, 2, 32, (2,)),
}


class _Prefetched:
    """A CommPlan stand-in that hands out buffers fetched once: compute without collectives."""

    def __init__(self, comm, kv, group):
        self.comm = comm
        self.stages = comm.stages
        self.buffers = [comm.group_cast(s, kv, group).wait() for s in range(len(comm.stages))]

    def group_cast(self, stage, x_local, group):
        return Pending(None, self.buffers[stage])

    def group_reduce(self, stage, x_recv, group):
        return Pending(None, x_recv.new_zeros((self.stages[stage].num_send, *x_recv.shape[1:])))

    def reduce_into(self, stage, pending, accum):
        return self.comm.reduce_into(stage, pending, accum)


def _comm_only(comm, kv, group):
    """The collectives of one fwd + bwd, each waited for: fwd fetch, bwd re-fetch + reduce."""
    n = len(comm.stages)
    for s in range(n):
        comm.group_cast(s, kv, group).wait()
    reduces = []
    for s in range(n):
        buf = comm.group_cast(s, kv, group).wait()
        reduces.append(comm.group_reduce(s, buf, group))
    for p in reduces:
        p.wait()


_CLOCK = None  # --link --clock thread_cpu: the emulated link's clock replaces wall time


def _time_once(fn, group) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn``, each the maximum over ranks: the slowest rank sets the pace."""
    dist.barrier(group)
    now = _CLOCK or time.perf_counter
    w0, c0 = now(), time.process_time()
    fn()
    t = torch.tensor([now() - w0, time.process_time() - c0], dtype=torch.float64)
    dist.all_reduce(t, dist.ReduceOp.MAX, group=group)
    return t[0].item(), t[1].item()


def _timed(fns: dict, iters: int, group) -> dict:
    """Best (wall, CPU) of ``iters`` runs of each function, interleaved so load drift hits all alike."""
    best = {name: (float("inf"), float("inf")) for name in fns}
    for i in range(iters + 1):  # the first round warms up
        for name, fn in fns.items():
            wall, cpu = _time_once(fn, group)
            if i:
                best[name] = (min(best[name][0], wall), min(best[name][1], cpu))
    return best


def _worker(rank, world, port, scenario, args, out_path):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    make_mask, solver, hq, hk, d, _ = SCENARIOS[scenario]
    slices = make_mask()
    plan = solve(slices, world, args.chunk_size, solver)
    torch.manual_seed(0)
    n = slices.total_q
    q, k, v = (dispatch(torch.randn(n, h, d), plan, rank).requires_grad_() for h in (hq, hk, hk))
    dout = torch.randn(plan.local_seqlen, hq, d)
    rows = []
    for stages in (1, 2, 3) if world > 1 else (1,):
        attn = CPSliceAttention(group, plan, overlap_stages=stages, backend="torch")
        rt = attn.runtime(slices)

        kv = torch.cat([k, v], -1).detach()
        real_comm, prefetched = rt.comm, _Prefetched(rt.comm, kv, group)

        def step(comm):
            rt.comm = comm
            attn(q, k, v, slices).backward(dout)
            rt.comm = real_comm

        t = _timed({"total": lambda: step(real_comm), "compute": lambda: step(prefetched),
                    "comm": lambda: _comm_only(real_comm, kv, group)}, args.iters, group)
        (total, total_cpu), (compute, compute_cpu), (comm, _) = t["total"], t["compute"], t["comm"]

        row_bytes = hk * 2 * d * 4
        recv = torch.tensor(3 * rt.comm.bytes_moved(row_bytes), dtype=torch.float64)
        dist.all_reduce(recv, group=group)
        allgather = 3 * world * (world - 1) * plan.local_seqlen * row_bytes
        rows.append(dict(cp=world, stages=stages, total=total, comm=comm, compute=compute, total_cpu=total_cpu,
                         bytes=recv.item(), allgather_bytes=allgather))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def _link_worker(rank, world, port, scenario, args, out_path):
    """Emulated-link runs: calibrate the bandwidth, then repeats x stage counts (see module doc)."""
    global _CLOCK
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    group = dist.group.WORLD
    make_mask, solver, hq, hk, d, _ = SCENARIOS[scenario]
    slices = make_mask()
    plan = solve(slices, world, args.chunk_size, solver)
    torch.manual_seed(0)
    q, k, v = (dispatch(torch.randn(slices.total_q, h, d), plan, rank).requires_grad_() for h in (hq, hk, hk))
    dout = torch.randn(plan.local_seqlen, hq, d)
    kv = torch.cat([k, v], -1).detach()
    row_bytes = hk * 2 * d * 4
    setups = {}
    for stages in args.stages:
        attn = CPSliceAttention(group, plan, overlap_stages=stages, backend="torch")
        rt = attn.runtime(slices)
        setups[stages] = (attn, rt, rt.comm, _Prefetched(rt.comm, kv, group))

    def run(stages, what):
        attn, rt, real, pre = setups[stages]
        if what == "comm":
            return lambda: _comm_only(real, kv, group)

        def step():
            rt.comm = real if what == "total" else pre
            out = attn(q, k, v, slices)
            if what != "fwd":
                out.backward(dout)
            rt.comm = real
        return step

    # calibration: one stage's collectives (fwd cast, bwd fetch + reduce) = comm_share x compute
    if args.clock != "wall":
        _CLOCK = time.thread_time
    compute1 = _timed({"c": run(1, "compute")}, max(3, args.iters), group)["c"][0]
    rows = torch.tensor([float(max(st.num_send, st.num_recv)) for st in setups[1][1].comm.stages]).sum()
    dist.all_reduce(rows, dist.ReduceOp.MAX, group=group)
    latency = args.link_latency_us * 1e-6
    bandwidth = 3 * rows.item() * row_bytes / max(1e-6, args.comm_share * compute1 - 3 * latency)
    out = {"bandwidth": bandwidth, "latency": latency, "compute1": compute1, "rounds": []}
    with emulate_link(bandwidth, latency, args.clock) as link:
        _CLOCK = link.now if args.clock != "wall" else None
        for rnd in range(args.repeats):
            order = list(args.stages) if rnd % 2 == 0 else list(args.stages)[::-1]
            fns = {}
            for stages in order:
                for what in ("total", "compute", "fwd", "comm") if rnd % 2 == 0 else ("comm", "fwd", "compute", "total"):
                    fns[(stages, what)] = run(stages, what)
            best = _timed(fns, args.iters, group)
            out["rounds"].append({f"{st}:{what}": best[(st, what)][0] for st, what in fns})
        _CLOCK = None
    # per-rank work for the cost model, gathered on rank 0
    mine = {st: cost_model.RankWork.of(setups[st][1], "rect") for st in args.stages}
    fwd_c = {st: min(r[f"{st}:fwd"] for r in out["rounds"]) for st in args.stages}
    both_c = {st: min(r[f"{st}:compute"] for r in out["rounds"]) for st in args.stages}
    gathered = [None] * world
    dist.all_gather_object(gathered, {st: (mine[st], fwd_c[st], both_c[st]) for st in args.stages}, group=group)
    if rank == 0:
        samples = [g[st] for g in gathered for st in args.stages]
        hw = cost_model.fit_compute(samples, hq, d, cost_model.Hardware(1e9, bandwidth, latency, work="rect"),
                                    fit_calls=True)
        out["predicted"] = {st: max(cost_model.simulate(g[st][0], hq, hk, d, 4, hw)["total"] for g in gathered)
                            for st in args.stages}
        out["predicted_comm"] = {st: max(cost_model.simulate(g[st][0], hq, hk, d, 4, hw)["comm"] for g in gathered)
                                 for st in args.stages}
        out["fit"] = {"attn_flops": hw.attn_flops, "call_overhead": hw.call_overhead, "bwd_factor": hw.bwd_factor}
        with open(out_path, "w") as f:
            json.dump(out, f)
    dist.destroy_process_group()


def _run_link(scenario, args):
    make_mask, solver, hq, hk, d, _ = SCENARIOS[scenario]
    slices = make_mask()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "link.json")
        mp.spawn(_link_worker, args=(args.link_cp, _free_port(), scenario, args, path), nprocs=args.link_cp, join=True)
        with open(path) as f:
            res = json.load(f)
    print(f"\n{scenario}, emulated link: {slices.total_q} tokens, cp={args.link_cp}, solver {solver}, heads {hq}/{hk}, "
          f"head dim {d}, fp32; link {res['bandwidth'] / 1e6:.1f} MB/s + {1e6 * res['latency']:.0f} us per transfer "
          f"(one stage's comm = {args.comm_share:.0%} of compute); {args.repeats} rounds, best of {args.iters} each; "
          f"clock {args.clock}; load {os.getloadavg()[0]:.1f}")
    fit = res["fit"]
    print(f"cost model fitted compute: {fit['attn_flops'] / 1e9:.2f} GFLOP/s dense, {1e3 * fit['call_overhead']:.3f} ms "
          f"per slice call, backward {fit['bwd_factor']:.2f}x forward")
    print("| stages | fwd+bwd ms | compute-only ms | comm-only ms | comm / compute | hidden share, median "
          "(min..max) | predicted fwd+bwd ms | prediction error |")
    print("|---|---|---|---|---|---|---|---|")
    for st in args.stages:
        rounds = res["rounds"]
        tot = [r[f"{st}:total"] for r in rounds]
        comp = [r[f"{st}:compute"] for r in rounds]
        comm = [r[f"{st}:comm"] for r in rounds]
        hidden = sorted((c + p - t) / c for t, p, c in zip(tot, comp, comm))
        med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        pred = res["predicted"][str(st)]
        print(f"| {st} | {1e3 * med(tot):.0f} | {1e3 * med(comp):.0f} | {1e3 * med(comm):.0f} | "
              f"{med(comm) / med(comp):.2f} | {med(hidden):.2f} ({hidden[0]:.2f}..{hidden[-1]:.2f}) | "
              f"{1e3 * pred:.0f} | {100 * (pred - med(tot)) / med(tot):+.0f}% |")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scenario", choices=sorted(SCENARIOS) + ["all"], default="all")
    ap.add_argument("--chunk-size", type=int, default=64, help="dispatch chunk size")
    ap.add_argument("--iters", type=int, default=3, help="timed rounds (best is kept) after one warm-up")
    ap.add_argument("--link", action="store_true", help="emulated-link overlap measurement (see module doc)")
    ap.add_argument("--link-cp", type=int, default=2, help="CP size of the --link runs")
    ap.add_argument("--comm-share", type=float, default=0.45, help="--link: one stage's comm over compute")
    ap.add_argument("--link-latency-us", type=float, default=200.0, help="--link: latency per transfer")
    ap.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3, 4], help="--link: overlap stage counts")
    ap.add_argument("--repeats", type=int, default=3, help="--link: rounds (hidden share spread over them)")
    ap.add_argument("--clock", choices=["wall", "thread_cpu"], default="thread_cpu",
                    help="--link: time on the wall clock, or on the compute thread's CPU time plus the emulated "
                         "waits (a dedicated-core clock, immune to other jobs on a shared machine)")
    args = ap.parse_args()
    if args.link:
        _run_link("link" if args.scenario == "all" else args.scenario, args)
        return
    for scenario in sorted(s for s in SCENARIOS if s != "link") if args.scenario == "all" else [args.scenario]:
        _run_scenario(scenario, args)


def _run_scenario(scenario, args):
    make_mask, solver, hq, hk, d, cps = SCENARIOS[scenario]
    slices = make_mask()
    print(f"\n{scenario}: {slices.total_q} tokens, mask area {slices.area():,}, solver {solver}, heads {hq}/{hk}, "
          f"head dim {d}, fp32, gloo, 1 thread per rank, best of {args.iters}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for cp in cps:
            path = os.path.join(tmp, f"cp{cp}.json")
            mp.spawn(_worker, args=(cp, _free_port(), scenario, args, path), nprocs=cp, join=True)
            with open(path) as f:
                rows += json.load(f)
    base = next(r for r in rows if r["cp"] == 1)
    print("| CP | stages | fwd+bwd wall ms | vs CP=1 | fwd+bwd CPU ms (max rank) | vs CP=1 | comm-only ms "
          "| compute-only ms | exposed comm ms | hidden share | MB received (all ranks) | vs all-gather |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        head = (f"| {r['cp']} | {r['stages'] if r['cp'] > 1 else '-'} | {1e3 * r['total']:.0f} | "
                f"{base['total'] / r['total']:.2f}x | {1e3 * r['total_cpu']:.0f} | "
                f"{base['total_cpu'] / r['total_cpu']:.2f}x |")
        if r["cp"] == 1:
            print(f"{head} - | {1e3 * r['compute']:.0f} | - | - | 0 | - |")
            continue
        hidden = (r["comm"] + r["compute"] - r["total"]) / r["comm"]
        print(f"{head} {1e3 * r['comm']:.1f} | {1e3 * r['compute']:.0f} | {1e3 * (r['total'] - r['compute']):.1f} | "
              f"{hidden:.2f} | {r['bytes'] / 1e6:.2f} | {r['bytes'] / r['allgather_bytes']:.2f} |")


if __name__ == "__main__":
    main()
