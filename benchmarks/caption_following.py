"""Caption following: does a trained model's video show what its caption says?

    python benchmarks/caption_following.py --run runs/demo/run [--chunks 8] [--out runs/bench_captions]
    python benchmarks/caption_following.py --run runs/demo/run --chunks 4 --sampler-sweep 7:32 3:32 1:32

Scores, with :mod:`magitrain.caption_score`, per caption field (object present, colour, motion,
size trend), on the demo's captions (``magitrain.demo.SEEN_CAPTIONS`` and the held-out
(colour, direction) pairs of ``HELD_OUT_CAPTIONS``):

- the procedural clips themselves (sharp, and through the PatchEncoder round trip every generated
  video goes through): the metric's ceiling, ~1.0;
- pure latent noise decoded the same way, and an untrained model of the run's config sampled with
  the demo's settings: the floor, must be ~0;
- the run's EMA model (``--run``) sampled as the demo samples (``magitrain.generate`` with the demo's
  steps, window, guidance), ``--chunks`` chunks per caption.

Prints a Markdown table for benchmarks/README.md and writes ``OUT/results.json``. ``--sampler-sweep
CFG:STEPS[:WINDOW] ...`` scores only the trained run, once per sampler setting (guidance scale, steps,
window), with the same captions and seeds: the table of docs/design.md, issue 13.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from magitrain import demo
from magitrain.caption_score import mean_score, score_video
from magitrain.data_pipeline.encoders import PatchEncoder

FIELDS = ("object_present", "colour", "motion", "size_trend")


def clip_rows(captions: list[str], chunks: int) -> dict:
    """The procedural clips of ``captions`` (seeds the demo media never use), sharp and round-tripped."""
    enc = PatchEncoder(4)
    sharp, trip = [], []
    for i, caption in enumerate(captions):
        video = demo.caption_clip(10**6 + i, caption)[:chunks * 8]
        sharp.append(score_video(video, caption))
        trip.append(score_video(enc.decode(enc.encode(video)), caption))
    return {"procedural clips (sharp)": mean_score(sharp), "procedural clips (PatchEncoder round trip)": mean_score(trip)}


def noise_row(captions: list[str], chunks: int) -> dict:
    enc, g = PatchEncoder(4), torch.Generator().manual_seed(0)
    scores = [score_video(enc.decode(torch.randn(4, 2 * chunks, 8, 8, generator=g) * 0.5), c) for c in captions]
    return {"latent noise": mean_score(scores)}


def untrained_row(run_dir: str, captions: list[str], chunks: int, out: str) -> dict:
    """An untrained model of the run's config, saved as a one-step checkpoint and sampled the same way."""
    from magitrain.config import config_from_yaml_text
    from magitrain.train import train

    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = config_from_yaml_text(f.read())
    cfg.run.dir = os.path.join(out, "untrained")
    cfg.parallel.dp = cfg.parallel.cp = cfg.parallel.tp = 1
    cfg.train.steps, cfg.optim.lr, cfg.ckpt.every = 1, 1e-12, 0  # one step at lr ~0: the initial weights
    cfg.optim.restart_at = 0
    cfg.log.progress = cfg.log.tensorboard = False
    cfg.data.curriculum = cfg.data.curriculum[:1]
    train(cfg)
    return {"untrained model": sample_rows(cfg.run.dir, captions, chunks, os.path.join(out, "untrained_videos"))}


def sample_rows(run_dir: str, captions: list[str], chunks: int, out: str, seeds: int = 1, **sampler):
    """Mean score of one video per caption and seed (caption ``i``, seed ``k``: ``i + 1 + 100 k``; seed 0
    is the demo's own)."""
    os.makedirs(out, exist_ok=True)
    scores = []
    for k in range(seeds):
        for i, caption in enumerate(captions):
            summary = demo.stream_video(run_dir, caption, os.path.join(out, f"{i}_{k}.mp4"), chunks,
                                        seed=i + 1 + 100 * k, **sampler)
            scores.append(demo.score_latents(summary["latents"], caption, 4))
    return mean_score(scores)


def sweep(args) -> int:
    print(f"{args.seeds} seed(s) per caption\n"
          "| cfg scale | history scale | steps | window | seen: present / colour / motion / size | "
          "held out: present / motion |\n|---|---|---|---|---|---|")
    for spec in args.sampler_sweep:
        parts = spec.split(":")
        cfg_scale, steps, window = float(parts[0]), int(parts[1]), int(parts[2]) if len(parts) > 2 else 4
        history = float(parts[3]) if len(parts) > 3 and parts[3] != "-" else None
        got = {group: sample_rows(args.run, captions, args.chunks, os.path.join(args.out, f"{spec}_{group}"),
                                  seeds=args.seeds, steps=steps, cfg_scale=cfg_scale, window=window,
                                  history_scale=history)
               for group, captions in (("seen", demo.SEEN_CAPTIONS), ("held", demo.HELD_OUT_CAPTIONS))}
        seen = " / ".join(f"{getattr(got['seen'], k):.0%}" for k in FIELDS)
        print(f"| {cfg_scale:g} | {history if history is not None else '- (2-pass)'} | {steps} | {window} | {seen} | "
              f"{got['held'].object_present:.0%} / {got['held'].motion:.0%} |", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a trained run dir (e.g. the demo's runs/demo/run)")
    p.add_argument("--chunks", type=int, default=demo.GEN_CHUNKS)
    p.add_argument("--out", default="runs/bench_captions")
    p.add_argument("--sampler-sweep", nargs="+", metavar="CFG:STEPS[:WINDOW[:HISTORY]]",
                   help="score the trained run once per sampler setting (default window 4; HISTORY: MAGI-1's "
                        "history guidance scale, '-' or absent: 2-pass)")
    p.add_argument("--seeds", type=int, default=1, help="videos per caption in the sweep (seeds i+1+100k)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    if args.sampler_sweep:
        return sweep(args)
    rows = {}
    for group, captions in (("seen", demo.SEEN_CAPTIONS), ("held-out", demo.HELD_OUT_CAPTIONS)):
        rows.update({f"{k} [{group}]": v for k, v in clip_rows(captions, min(args.chunks, 4)).items()})
        rows.update({f"{k} [{group}]": v for k, v in noise_row(captions, args.chunks).items()})
        rows[f"trained: {args.run} [{group}]"] = sample_rows(args.run, captions, args.chunks,
                                                             os.path.join(args.out, group))
    rows.update({f"{k} [seen]": v for k, v in
                 untrained_row(args.run, demo.SEEN_CAPTIONS, args.chunks, args.out).items()})
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({k: v.as_dict() for k, v in rows.items()}, f, indent=1)
    print(f"\n| videos ({args.chunks} chunks generated; clips <= 4 chunks) | object present | colour | motion | "
          "size trend |\n|---|---|---|---|---|")
    for name, s in rows.items():
        print(f"| {name} | " + " | ".join(f"{getattr(s, k):.0%}" for k in FIELDS) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
