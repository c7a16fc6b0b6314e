"""Train the drift benchmark's methods at equal compute from one base model, then compare them.

    python benchmarks/drift_methods.py --base runs/demo/run --shards runs/demo/shards --out runs/drift
    python benchmarks/long_rollout.py ...   (the command this prints at the end)

From the base run (the demo's model: ``magitrain demo``), one process each, the demo's long stage:

1. phase 1, ``--fm-steps`` flow-matching steps: ``base`` (teacher-forced, clean history) and ``hnoise``
   (``diffusion.history_t: [0.8, 1.0]``, history noise augmentation);
2. phase 2, the same compute for every method, ``--extra-steps`` x 3 forward-equivalents (a backward
   counts as 2 forwards):
   - ``teacher_forced``: ``base`` + ``--extra-steps`` flow-matching steps;
   - ``history_noise``: ``hnoise`` + ``--extra-steps`` flow-matching steps with history noise;
   - ``self_rollout``: ``base`` + ``objective: self_rollout`` steps (teacher: ``base``);
   - ``history_noise+self_rollout``: ``hnoise`` + self-rollout steps with ``rollout.context_t: 0.9``
     (teacher: ``hnoise``).
   A self-rollout step costs its rollout's forwards (``rollout_calls`` in metrics.jsonl: ~10.7 here) + 3
   (the student's forward and backward) + 3 (the teacher's 3-pass guidance), so ``--rollout-steps``
   defaults to ``round(3 x extra / 16.7)``; the script prints the compute each method actually spent.

Every run: ``optim.lr=2e-3``, 10 warm-up steps, ``train.seed=7``, the base's EMA as init.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

HNOISE = "diffusion.history_t=[0.8,1.0]"


def train_cmd(out: str, init: str, shards: str, steps: int, extra: list[str]) -> list[str]:
    code = ("import sys, torch; from magitrain.config import load_config; from magitrain.configs import config_path; "
            "from magitrain.train import train; torch.set_num_threads(1); "
            "cfg = load_config(config_path('demo.yaml'), sys.argv[1:], world_size=1); "
            "cfg.data.curriculum = cfg.data.curriculum[-1:]; train(cfg)")
    return [sys.executable, "-c", code, f"run.dir={out}", f"data.shards={shards}", "parallel.dp=1", "parallel.cp=1",
            "parallel.tp=1", f"train.steps={steps}", "log.progress=false", "log.tensorboard=false", "run.overwrite=true",
            f"ckpt.init_from={init}", "optim.lr=2e-3", "optim.warmup_steps=10", "optim.restart_at=0", "train.seed=7",
            *extra]


def run_all(cmds: dict, jobs: int) -> None:
    def one(item):
        name, cmd = item
        run_dir = next(a for a in cmd if a.startswith("run.dir=")).split("=", 1)[1]
        with open(run_dir + ".log", "w") as log:
            return name, subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    with ThreadPoolExecutor(jobs) as pool:
        for name, rc in pool.map(one, cmds.items()):
            if rc:
                raise SystemExit(f"error: training {name} failed (exit {rc}); its log is next to its run dir")


def forward_equivalents(run_dir: str) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return sum(3 + (r["rollout_calls"] + 3 if "rollout_calls" in r else 0) for r in rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base run dir (e.g. the demo's runs/demo/run)")
    p.add_argument("--shards", required=True, help="its training shards (e.g. runs/demo/shards)")
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--fm-steps", type=int, default=600)
    p.add_argument("--extra-steps", type=int, default=300)
    p.add_argument("--rollout-steps", type=int, help="self-rollout steps of phase 2 (default: equal compute)")
    p.add_argument("--jobs", type=int, default=2)
    args = p.parse_args(argv)
    for path in (args.base, args.shards):
        if not os.path.isdir(path):
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    sr_steps = args.rollout_steps or round(3 * args.extra_steps / 16.7)
    d = lambda name: os.path.join(args.out, name)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    run_all({"base": train_cmd(d("base"), args.base, args.shards, args.fm_steps, []),
             "hnoise": train_cmd(d("hnoise"), args.base, args.shards, args.fm_steps, [HNOISE])}, args.jobs)
    sr = ["objective=self_rollout"]
    run_all({"teacher_forced": train_cmd(d("teacher_forced"), d("base"), args.shards, args.extra_steps, []),
             "history_noise": train_cmd(d("history_noise"), d("hnoise"), args.shards, args.extra_steps, [HNOISE]),
             "self_rollout": train_cmd(d("self_rollout"), d("base"), args.shards, sr_steps, sr),
             "history_noise+self_rollout": train_cmd(d("hn_self_rollout"), d("hnoise"), args.shards, sr_steps,
                                                     sr + ["rollout.context_t=0.9"])}, args.jobs)
    for name in ("teacher_forced", "history_noise", "self_rollout", "hn_self_rollout"):
        print(f"{name}: phase 2 compute {forward_equivalents(d(name)):.0f} forward-equivalents")
    one_pass = "--cfg-scale 1 --history-scale 1"  # the self-rollout students carry the teacher's guidance
    methods = (f"--method 'teacher_forced={d('teacher_forced')}' --method 'history_noise={d('history_noise')} "
               f"--context-t 0.9' --method 'self_rollout={d('self_rollout')} {one_pass}' "
               f"--method 'self_rollout_guided={d('self_rollout')}' "
               f"--method 'history_noise+self_rollout={d('hn_self_rollout')} {one_pass} --context-t 0.9'")
    print("\nthe comparison (benchmarks/README.md, issue 17): all history in the cache, 8x; a rolling window of 3, 16x")
    print(f"python benchmarks/long_rollout.py --length 8 --captions 4 --seeds 2 --jobs 2 --out {d('bench8')} {methods}")
    print(f"python benchmarks/long_rollout.py --length 16 --captions 4 --seeds 2 --jobs 2 --sampler-args "
          f"'--max-context 3' --out {d('bench16w')} {methods}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
