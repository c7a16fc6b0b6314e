"""End-to-end demo benchmark: per-stage times and tokens/s, and where the training time goes.

    python benchmarks/end_to_end.py [--out /tmp/e2e] [--quick]

Builds the demo's media and shards, then trains ``configs/demo.yaml`` on 4 local ranks exactly
as ``magitrain demo`` does, except that every rank runs under ``cProfile``. Prints a markdown
table: per curriculum stage (from ``stages.jsonl``): steps, wall time, tokens/s, data share;
and for the whole run on rank 0 (from its profile): the share of the training loop spent in

- attention: the context-parallel attention autograd function, forward + backward (its compute
  and its KV exchange: group-cast / group-reduce, waits included);
- comm: every call into the c10d process group (FSDP2 all-gather / reduce-scatter, the CP KV
  exchange, loss/grad-norm all-reduces, the dispatch undispatch all-gather), waits included;
- data: ``WebDatasetSource.next_batch``.

attention and comm overlap (the KV exchange counts in both). cProfile slows Python-heavy code,
so the shares are indicative; the stage times come from a separate run without the profiler
(pass ``--no-timing-run`` to skip it).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import subprocess
import sys

from magitrain import demo

PROFILED_ENTRY = r'''
import cProfile, os, sys
from magitrain.train import main

prof = cProfile.Profile()
rc = prof.runcall(main, sys.argv[1:])
prof.dump_stats(os.path.join(os.environ["E2E_PROFILE_DIR"], f"rank{os.environ['RANK']}.pstats"))
sys.exit(rc)
'''


def train(out: str, shards: str, quick: bool, profile: bool) -> str:
    """Train the demo config on ``shards`` with its run under ``out``; returns the run dir."""
    cfg = demo.demo_config(out, quick, [f"data.shards={shards}"])
    config_file = os.path.join(out, "demo_config.yaml")
    demo.save_config(cfg, config_file)
    cmd = demo.launch_command(config_file)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS=demo.QUIET_WARNINGS)
    if profile:
        entry = os.path.join(out, "profiled_entry.py")
        with open(entry, "w") as f:
            f.write(PROFILED_ENTRY)
        i = cmd.index("-m", cmd.index("--standalone"))
        cmd = cmd[:i] + [entry] + cmd[i + 2:]  # the entry script instead of "-m magitrain.train"
        env["E2E_PROFILE_DIR"] = out
    subprocess.run(cmd + ["log.progress=false", "log.tensorboard=false"], env=env, check=True)
    return cfg.run.dir


def shares(profile_file: str) -> dict:
    """Seconds in ``train()`` and the shares of attention, comm and data in it (module doc)."""
    from magitrain.data_pipeline.source import WebDatasetSource
    from magitrain.parallel.attention import _CPAttnFunction

    from magitrain.train import train as train_fn

    st = pstats.Stats(profile_file).stats

    def cumulative(*functions) -> float:
        codes = {(os.path.realpath(f.__code__.co_filename), f.__code__.co_firstlineno) for f in functions}
        return sum(v[3] for (file, line, _), v in st.items() if (os.path.realpath(file), line) in codes)

    total = cumulative(train_fn)
    attention = cumulative(_CPAttnFunction.forward, _CPAttnFunction.backward)
    comm = sum(v[2] for (_, _, name), v in st.items() if "_distributed_c10d" in name)
    data = cumulative(WebDatasetSource.next_batch)
    return {"train_s": total, "attention": attention / total, "comm": comm / total, "data": data / total}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/magitrain_e2e")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-timing-run", action="store_true")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    cfg = demo.demo_config(out, args.quick, [])
    videos = 32 if args.quick else 64
    shards = os.path.join(out, "shards")
    demo.make_media(os.path.join(out, "media"), videos)
    demo.build_shards(os.path.join(out, "media"), shards, cfg, videos)
    rows = []
    if not args.no_timing_run:
        run_dir = train(os.path.join(out, "timing"), shards, args.quick, profile=False)
        with open(os.path.join(run_dir, "stages.jsonl")) as f:
            rows = [json.loads(line) for line in f]
    prof_out = os.path.join(out, "profiled")
    os.makedirs(prof_out, exist_ok=True)
    train(prof_out, shards, args.quick, profile=True)
    s = shares(os.path.join(prof_out, "rank0.pstats"))
    print("\n| stage | steps | wall s | tokens/s | data share | attention-area imbalance | remote KV tokens/step per CP rank |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        remote = " / ".join(f"{x:.0f}" for x in r["cp_remote_kv_tokens_per_step"])
        print(f"| {r['stage']} | {r['steps']} | {r['time_s']:.1f} | {r['tokens_per_s']:.0f} | "
              f"{100 * r['data_time_frac']:.1f}% | {r['cp_area_imbalance']:.3f} | {remote} |")
    print(f"\nrank 0 under cProfile, whole run ({s['train_s']:.1f} s in train()): attention "
          f"{100 * s['attention']:.1f}%, comm {100 * s['comm']:.1f}%, data {100 * s['data']:.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
