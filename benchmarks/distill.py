"""Distillation benchmark: does an 8-step, 1-pass student match the teacher's 32-step, 3-pass samples?

    python benchmarks/distill.py [--out runs/bench_distill] [--teacher-steps 200] [--distill-steps 600] \
        [--set distill.self_target=teacher ...]

1. trains the tiny teacher (``configs/tiny.yaml``) unless ``OUT/teacher`` already has a checkpoint;
2. distils it with ``configs/distill_tiny.yaml`` (``ckpt.init_from`` = the teacher run) into ``OUT/student``;
3. samples ``--videos`` captions of held-out synthetic clips with the streaming sampler from the same
   noise (seed = video index): the teacher at 32 steps with 3-pass guidance (the reference), the teacher
   at 8 steps (3-pass), the student at 8 steps (1 pass), and reports each one's latent MSE to the
   reference and its model calls (window evaluations x passes + one cache write per chunk).

Writes ``OUT/results.json`` and prints a Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

from magitrain.checkpoint import Checkpointer
from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.data_pipeline.text import HashTextEmbedder
from magitrain.model import MagiDiT
from magitrain.sampler import ChunkSampler, SamplerConfig
from magitrain.synthetic import render_shape_video
from magitrain.train import train
from magitrain.weights import load_run_weights

QUIET = ["log.progress=false", "log.tensorboard=false"]


def trained(run_dir: str, yaml: str, overrides: list[str]) -> float:
    """Train ``yaml`` into ``run_dir`` unless it already holds a checkpoint; returns the seconds spent."""
    if Checkpointer(run_dir).latest():
        print(f"reusing {run_dir}")
        return 0.0
    t0 = time.perf_counter()
    train(load_config(config_path(yaml), [f"run.dir={run_dir}"] + QUIET + overrides))
    return time.perf_counter() - t0


def load_model(run_dir: str) -> MagiDiT:
    cfg, state = load_run_weights(run_dir, prefer_ema=True)
    model = MagiDiT(cfg.model)
    model.load_state_dict(state)
    return model.eval()


def captions(n: int, cfg) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``n`` held-out captions (clips drawn from a generator the training data never uses), embedded."""
    d, m = cfg.data, cfg.model
    gen = torch.Generator().manual_seed(424242)
    text = HashTextEmbedder(m.caption_channels, m.caption_max_length)
    return [text.embed(render_shape_video(d.frames, d.height, d.width, m.in_channels, gen)[1]) for _ in range(n)]


def sample(model, emb, mask, chunks: int, size: int, sampler_cfg: SamplerConfig) -> tuple[torch.Tensor, int]:
    s = ChunkSampler(model, emb.expand(chunks, -1, -1), mask.expand(chunks, -1), size, size, sampler_cfg)
    video = s.generate()
    return video, s.evaluations + chunks  # every chunk is also written to the KV cache once


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/bench_distill")
    ap.add_argument("--teacher-steps", type=int, default=200)
    ap.add_argument("--distill-steps", type=int, default=600)
    ap.add_argument("--videos", type=int, default=8)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value overrides of configs/distill_tiny.yaml")
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))

    teacher_dir, student_dir = os.path.join(args.out, "teacher"), os.path.join(args.out, "student")
    t_teacher = trained(teacher_dir, "tiny.yaml", [f"train.steps={args.teacher_steps}"])
    t_student = trained(student_dir, "distill_tiny.yaml",
                        [f"ckpt.init_from={teacher_dir}", f"train.steps={args.distill_steps}"] + args.set)
    dcfg = load_config(config_path("distill_tiny.yaml"), [f"ckpt.init_from={teacher_dir}"] + QUIET + args.set)
    teacher, student = load_model(teacher_dir), load_model(student_dir)
    guidance = dict(cfg_scale=dcfg.distill.text_scale, history_scale=dcfg.distill.history_scale)
    rows = {"teacher 32 steps, 3-pass (reference)": (teacher, dict(steps=32, **guidance)),
            "teacher 8 steps, 3-pass": (teacher, dict(steps=8, **guidance)),
            "teacher 16 steps, 3-pass": (teacher, dict(steps=16, **guidance)),
            "student 8 steps, 1 pass": (student, dict(steps=8)),
            "student 16 steps, 1 pass": (student, dict(steps=16))}
    results = {name: {"mse": 0.0, "calls": 0, "seconds": 0.0} for name in rows}
    size = dcfg.data.height
    with torch.no_grad():
        for v, (emb, mask) in enumerate(captions(args.videos, dcfg)):
            ref = None
            for name, (model, kw) in rows.items():
                t0 = time.perf_counter()
                video, calls = sample(model, emb, mask, args.chunks, size, SamplerConfig(window=4, seed=v, **kw))
                r = results[name]
                r["seconds"] += time.perf_counter() - t0
                r["calls"] = calls
                ref = video if ref is None else ref
                r["mse"] += float((video - ref).pow(2).mean()) / args.videos
    ref_calls = results["teacher 32 steps, 3-pass (reference)"]["calls"]
    print(f"\nteacher: {args.teacher_steps} steps ({t_teacher:.0f} s), student: {args.distill_steps} distillation steps "
          f"({t_student:.0f} s); {args.videos} videos x {args.chunks} chunks, latent {size}x{size}\n")
    print("| sampler | latent MSE to reference | model calls / video | calls vs reference | s / video |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mse']:.5f} | {r['calls']} | {r['calls'] / ref_calls:.3f} | "
              f"{r['seconds'] / args.videos:.2f} |")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "teacher_train_s": t_teacher, "student_train_s": t_student,
                   "results": results}, f, indent=1)
    student_8, teacher_8 = results["student 8 steps, 1 pass"], results["teacher 8 steps, 3-pass"]
    ok = student_8["mse"] < teacher_8["mse"] and student_8["calls"] < ref_calls / 4
    print(f"\nstudent 8-step beats teacher 8-step and costs < 1/4 of the reference's calls: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
