"""Train the drift benchmark's methods at equal compute from one base model, then compare them.

    python benchmarks/drift_methods.py --base runs/demo/run --process-frames 128 --out runs/drift
    python benchmarks/long_rollout.py ...   (the commands this prints at the end)

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

``--process-frames N`` trains every method (both phases) on windows of the process the benchmark's
ground truth continues, instead of ``--shards``: the 120 seen combinations rendered for ``N`` frames
(``demo.demo_clip``: the demo's clip, then the shape keeps its speed, wraps around and holds its
size), in ``OUT/process_shards``, cut at random start frames (``data.temporal_crop=random``). Then
every state a long rollout should show (a wrapped position, a size that stopped changing) is in the
training data, and what drifts is the model's own error, not a state it never saw. With ``--steady`` those
clips keep their size and say so ("keeping its size"): past one clip a "growing" caption contradicts the held
size its ground truth shows, a "keeping its size" caption holds at any length (``long_rollout.py --steady``).
With ``--bars-across`` their bars lie across their motion (the demo's are always horizontal): then no clip
shows an object stretched along the way it moves, so a smear along the motion, which ends as a band the
motion leaves unchanged, looks like no training clip (``long_rollout.py --bars-across``).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
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


def build_process_shards(out: str, frames: int, clips: int, steady: bool = False, bar_across: bool = False) -> str:
    """``clips`` seen-caption clips of ``frames`` frames as the demo's shards (``steady``: shapes keep their
    size; ``bar_across``: bars lie across their motion); returns the shard folder."""
    from magitrain import demo
    from magitrain.config import load_config
    from magitrain.configs import config_path

    media, shards = os.path.join(out, "process_media"), os.path.join(out, "process_shards")
    demo.make_media(media, clips, frames, steady=steady, bar_across=bar_across)
    cfg = load_config(config_path("demo.yaml"), ["parallel.dp=1", "parallel.cp=1"], world_size=1)
    demo.build_shards(media, shards, cfg, clips)
    return shards


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="the base run dir (e.g. the demo's runs/demo/run)")
    p.add_argument("--shards", default="", help="its training shards (e.g. runs/demo/shards); not with --process-frames")
    p.add_argument("--out", default="runs/drift")
    p.add_argument("--fm-steps", type=int, default=600)
    p.add_argument("--extra-steps", type=int, default=300)
    p.add_argument("--rollout-steps", type=int, help="self-rollout steps of phase 2 (default: equal compute)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--process-frames", type=int, default=0,
                   help="train on random windows of clips this long (frames; 0: on --shards as given)")
    p.add_argument("--process-clips", type=int, default=120, help="clips of --process-frames")
    p.add_argument("--train-args", default="",
                   help="config overrides for every training run (e.g. 'model.num_layers=1' for a base of that model)")
    p.add_argument("--steady", action="store_true",
                   help="--process-frames clips keep their size, captioned 'keeping its size'")
    p.add_argument("--bars-across", action="store_true",
                   help="--process-frames clips' bars lie across their motion (none is stretched along it)")
    args = p.parse_args(argv)
    if bool(args.shards) == bool(args.process_frames):
        print("error: give one of --shards (the base's data) and --process-frames", file=sys.stderr)
        return 2
    for path in (args.base, args.shards or args.base):
        if not os.path.isdir(path):
            print(f"error: {path} is not a directory", file=sys.stderr)
            return 2
    if (args.steady or args.bars_across) and not args.process_frames:
        print("error: --steady and --bars-across need --process-frames (the clips they render)", file=sys.stderr)
        return 2
    if args.process_frames and args.process_frames < 32:
        print("error: --process-frames must be 0 or at least the demo's clip (32 frames)", file=sys.stderr)
        return 2
    sr_steps = args.rollout_steps or round(3 * args.extra_steps / 16.7)
    d = lambda name: os.path.join(args.out, name)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    shards, common = args.shards, []
    if args.process_frames:
        shards = build_process_shards(args.out, args.process_frames, args.process_clips, args.steady, args.bars_across)
        common = ["data.temporal_crop=random"]
    common += shlex.split(args.train_args)
    run_all({"base": train_cmd(d("base"), args.base, shards, args.fm_steps, common),
             "hnoise": train_cmd(d("hnoise"), args.base, shards, args.fm_steps, [HNOISE, *common])}, args.jobs)
    sr = ["objective=self_rollout", *common]
    run_all({"teacher_forced": train_cmd(d("teacher_forced"), d("base"), shards, args.extra_steps, common),
             "history_noise": train_cmd(d("history_noise"), d("hnoise"), shards, args.extra_steps, [HNOISE, *common]),
             "self_rollout": train_cmd(d("self_rollout"), d("base"), shards, sr_steps, sr),
             "history_noise+self_rollout": train_cmd(d("hn_self_rollout"), d("hnoise"), shards, sr_steps,
                                                     sr + ["rollout.context_t=0.9"])}, args.jobs)
    for name in ("teacher_forced", "history_noise", "self_rollout", "hn_self_rollout"):
        print(f"{name}: phase 2 compute {forward_equivalents(d(name)):.0f} forward-equivalents")
    one_pass = "--cfg-scale 1 --history-scale 1"  # the self-rollout students carry the teacher's guidance
    methods = (f"--method 'teacher_forced={d('teacher_forced')}' --method 'history_noise={d('history_noise')} "
               f"--context-t 0.9' --method 'self_rollout={d('self_rollout')} {one_pass}' "
               f"--method 'self_rollout_guided={d('self_rollout')}' "
               f"--method 'history_noise+self_rollout={d('hn_self_rollout')} {one_pass} --context-t 0.9'")
    print("\nthe comparison (benchmarks/README.md, issue 17): a rolling window of 3 (what a 4-chunk training clip shows a "
          "chunk), 8x, 32 rollouts per method; then all history in the cache")
    domain = " --steady" * args.steady + " --bars-across" * args.bars_across
    print(f"python benchmarks/long_rollout.py --length 8 --captions 8 --seeds 4 --jobs 2{domain} --sampler-args "
          f"'--max-context 3' --out {d('bench8w3')} {methods}")
    print(f"python benchmarks/long_rollout.py --length 8 --captions 8 --seeds 2 --jobs 2{domain} --out {d('bench8')} "
          f"{methods}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
