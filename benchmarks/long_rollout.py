"""Drift in long autoregressive rollouts: per-chunk caption following and distance to the ground truth.

    python benchmarks/long_rollout.py --method "baseline=runs/a/run" \\
        --method "history_noise=runs/b/run --context-t 0.9" --length 8 --out runs/bench_rollout

The procedural domain (:mod:`magitrain.synthetic`) has a ground truth for any length: a caption's clip
rendered past its 32 frames keeps the shape's speed (it wraps around the frame) and holds its size at
the end of one clip's range (past the clip, "growing" and "shrinking" no longer hold: ``--steady`` scores the
captions' "keeping its size" versions instead, whose meaning holds at any length, for models trained on
them: ``drift_methods.py --steady``; ``--bars-across`` renders bars across their motion, for models
trained with ``drift_methods.py --bars-across``). For every caption and seed the benchmark renders that
ground truth over ``--length`` training clips (x4 chunks each), gives its first chunk to every method as a clean prefix
(``generate --prefix``), streams the rest, and scores every chunk on its own:

- caption following per chunk (:func:`magitrain.caption_score.score_video` on the chunk's 8 frames):
  object present, colour, motion, size trend;
- shape per chunk: the share of frames whose object has the ground truth's elongation (a bar lying the way
  the ground truth's does, a square or disk not stretched into a bar; the caption score does not read shape);
- distance to the ground truth: the RMS pixel difference (0-1 scale) of the chunk's frames and the
  ground truth's, decoded the same way (PatchEncoder round trip), so a perfect model scores 0.

Every method sees the same captions (``--captions`` of the demo's seen ones), seeds, prefixes and
sampler (the demo's: ``demo.DEMO_CFG_SCALE``, history guidance 1.5, 32 steps, window 4, unless ``--sampler-args`` or a
method's own flags say otherwise; later flags win). ``--max-context`` / ``--sink-chunks`` in
``--sampler-args`` keep the cache bounded. Quarters: the mean of the first and last quarter of the
chunks after the prefix; drift = first quarter minus last quarter. ``--length 8`` also reports the
first half of each rollout as the 4x figures (the sampler is causal: the first 16 chunks of a 32-chunk
rollout are a 16-chunk rollout, to float rounding: 7e-7 measured on the demo model).

Writes ``OUT/results.json`` (the mean curves, the quarters, and every rollout's own per-chunk figures under
``per_rollout``, which ``drift_pooled.py`` pools over bases), ``OUT/drift.png`` (one panel per figure, a line per method) and prints a
Markdown table for benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

import numpy as np
import torch

from magitrain import demo
from magitrain.caption_score import read_frame, score_readings
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.synthetic import steady_caption

FIELDS = ("object_present", "colour", "motion", "size_trend")
CHUNK_FRAMES = demo.FRAMES // 4  # pixel frames per chunk (2 latent frames x 4)
CLIP_CHUNKS = 4  # chunks of one training clip
SHAPE_TOL = 1.0  # |elongation - the ground truth's| at most this (decoded: a bar lying the wrong way is 3.2
#   off, a bar against a square or disk 1.4-1.7, a square against a disk at most 0.2: it tells bars apart only)
PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def ground_truth(caption: str, seed: int, chunks: int, bar_across: bool = False) -> torch.Tensor:
    """uint8 ``[chunks * 8, 64, 64, 3]``: the caption's clip continued to ``chunks`` chunks (``bar_across``:
    the renderer's, a bar lies across its motion)."""
    return demo.caption_clip(seed, caption, chunks * CHUNK_FRAMES, bar_across=bar_across)


def bench_captions(count: int, steady: bool) -> list[str]:
    """The first ``count`` of the demo's seen captions; ``steady``: their "keeping its size" versions."""
    captions = demo.SEEN_CAPTIONS[:count]
    return [steady_caption(c) for c in captions] if steady else captions


def per_chunk(frames: torch.Tensor, truth: torch.Tensor, caption: str) -> dict:
    """Per-chunk fields ``{field: [chunks]}`` of decoded ``frames`` against the decoded ``truth``: the caption's
    (:data:`FIELDS`), ``shape`` (the share of frames whose object has the ground truth's elongation, within
    ``SHAPE_TOL``: a bar lying the right way, a square or disk not stretched; the caption score does not read
    the shape) and ``distance``."""
    out = {k: [] for k in FIELDS + ("shape", "distance")}
    h, w = frames.shape[1:3]
    for a in range(0, frames.shape[0], CHUNK_FRAMES):
        part = frames[a:a + CHUNK_FRAMES]
        got = [read_frame(f) for f in part.numpy()]
        want = [read_frame(f) for f in truth[a:a + CHUNK_FRAMES].numpy()]
        s = score_readings(got, caption, h, w, window=CHUNK_FRAMES)
        for k in FIELDS:
            out[k].append(getattr(s, k))
        out["shape"].append(float(np.mean([g.present and abs(g.elongation - t.elongation) <= SHAPE_TOL
                                           for g, t in zip(got, want)])))
        diff = (part.float() - truth[a:a + CHUNK_FRAMES].float()) / 255.0
        out["distance"].append(float(diff.pow(2).mean().sqrt()))
    return out


def rollout(method: str, run: str, extra: list[str], caption: str, seed: int, chunks: int, out: str,
            bar_across: bool = False) -> dict:
    """One method's rollout of ``caption`` from the ground truth's first chunk; its per-chunk figures."""
    from magitrain import generate

    os.makedirs(os.path.join(out, method), exist_ok=True)
    prefix = os.path.join(out, method, f"prefix_{seed}.npy")  # per method: parallel jobs never share a file
    first = ground_truth(caption, seed, 1, bar_across)  # a longer render's first chunk (the renderer is per frame)
    np.save(prefix, PatchEncoder(4).encode(first).numpy())
    mp4 = latents_path(method, seed, out)[:-4] + ".mp4"
    args = demo.generation_args(run, caption, mp4, chunks=chunks, seed=seed) + ["--prefix", prefix] + extra
    summary = generate.run(generate.build_parser().parse_args(args))
    return score_rollout(summary["latents"], caption, seed, chunks, bar_across)


def latents_path(method: str, seed: int, out: str) -> str:
    """Where :func:`rollout` leaves a rollout's latents (``generate``'s ``.npy`` beside its mp4)."""
    return os.path.join(out, method, f"{seed}.npy")


def score_rollout(latents_npy: str, caption: str, seed: int, chunks: int, bar_across: bool = False) -> dict:
    """Per-chunk figures of a saved rollout against its ground truth (``--rescore`` reads them again)."""
    enc = PatchEncoder(4)
    latents = torch.from_numpy(np.load(latents_npy, allow_pickle=False))
    if latents.shape[1] * demo.TEMPORAL_FACTOR != chunks * CHUNK_FRAMES:
        raise ValueError(f"{latents_npy} holds {latents.shape[1]} latent frames, not {chunks} chunks")
    truth = ground_truth(caption, seed, chunks, bar_across)
    return per_chunk(enc.decode(latents), enc.decode(enc.encode(truth)), caption)


def quarters(curve: list[float]) -> tuple[float, float]:
    """Means of the first and last quarter of ``curve`` (the chunks after the prefix)."""
    body = curve[1:]
    q = max(1, len(body) // 4)
    return float(np.mean(body[:q])), float(np.mean(body[-q:]))


def summarise(curves: dict, chunks: int) -> dict:
    """``{field: (first quarter, last quarter, drift)}`` of the mean curves cut to ``chunks``."""
    rows = {}
    for k, curve in curves.items():
        first, last = quarters(curve[:chunks])
        rows[k] = (first, last, first - last)
    return rows


def last_quarter_presence(jobs: list[tuple], figures: list[dict], captions: list[str],
                          field: str = "object_present") -> dict:
    """``{caption: {method: [last-quarter object presence per seed]}}``: each rollout's own figure, which
    the mean curves hide (a rollout tends to hold its object to the end or lose it for good); ``field``:
    another per-chunk figure's instead."""
    table = {c: {} for c in captions}
    for job, fig in zip(jobs, figures):
        table[job[3]].setdefault(job[0], []).append(quarters(fig[field])[1])
    return table


def chart(path: str, results: dict, chunks: int) -> None:
    """One panel per figure (mean over captions and seeds, per chunk), a line per method; PIL only."""
    from PIL import Image, ImageDraw

    panels = FIELDS + ("shape", "distance")
    pw, ph, margin = 360, 220, 40
    img = Image.new("RGB", (pw * 3, ph * 2 + 30), "white")
    draw = ImageDraw.Draw(img)
    for p, field in enumerate(panels):
        ox, oy = (p % 3) * pw, (p // 3) * ph
        top = 1.0 if field != "distance" else max(max(r["curves"][field][:chunks]) for r in results.values()) * 1.1
        x0, y0, x1, y1 = ox + margin, oy + 20, ox + pw - 10, oy + ph - 25
        draw.rectangle([x0, y0, x1, y1], outline=(120, 120, 120))
        draw.text((x0, oy + 4), f"{field} per chunk (top {top:.2f})", fill="black")
        for q in (1, 2, 3):  # quarter marks
            x = x0 + (x1 - x0) * q / 4
            draw.line([x, y0, x, y1], fill=(225, 225, 225))
        draw.text((x0, y1 + 4), "0", fill="black")
        draw.text((x1 - 16, y1 + 4), str(chunks - 1), fill="black")
        for m, (name, r) in enumerate(results.items()):
            curve = r["curves"][field][:chunks]
            pts = [(x0 + (x1 - x0) * i / max(1, chunks - 1), y1 - (y1 - y0) * min(v / top, 1.0))
                   for i, v in enumerate(curve)]
            draw.line(pts, fill=PALETTE[m % len(PALETTE)], width=2)
    lx = 10
    for m, name in enumerate(results):
        draw.rectangle([lx, ph * 2 + 8, lx + 14, ph * 2 + 20], fill=PALETTE[m % len(PALETTE)])
        draw.text((lx + 18, ph * 2 + 8), name, fill="black")
        lx += 20 + 7 * len(name) + 20
    img.save(path)


def parse_method(spec: str) -> tuple[str, str, list[str]]:
    """``NAME=RUN_DIR [generate flags...]`` -> (name, run dir, flags)."""
    head, *flags = shlex.split(spec)
    name, sep, run = head.partition("=")
    if not sep or not name or not run:
        raise ValueError(f"--method {spec!r}: want NAME=RUN_DIR [generate flags]")
    if not os.path.isdir(run):
        raise ValueError(f"--method {spec!r}: {run} is not a run dir")
    return name, run, flags


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", action="append", required=True, metavar="'NAME=RUN [FLAGS]'",
                   help="a trained run and its own generate flags (repeat per method)")
    p.add_argument("--length", type=int, default=8, help="rollout length in training clips (4 chunks each)")
    p.add_argument("--captions", type=int, default=4, help="how many of the demo's seen captions")
    p.add_argument("--seeds", type=int, default=2, help="rollouts per caption (ground-truth seeds 10^6 + 100 k + i)")
    p.add_argument("--sampler-args", default="", help="generate flags for every method (before its own)")
    p.add_argument("--out", default="runs/bench_rollout")
    p.add_argument("--jobs", type=int, default=1, help="rollouts run at once (processes, one thread each)")
    p.add_argument("--steady", action="store_true",
                   help="the captions' 'keeping its size' versions (their meaning holds at any length)")
    p.add_argument("--bars-across", action="store_true",
                   help="bars lie across their motion in the ground truth (models trained with drift_methods.py "
                        "--bars-across)")
    p.add_argument("--rescore", action="store_true",
                   help="score the rollouts an earlier run with the same flags left in --out, without generating")
    args = p.parse_args(argv)
    try:
        methods = [parse_method(m) for m in args.method]
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.length < 1 or not 1 <= args.captions <= len(demo.SEEN_CAPTIONS) or args.seeds < 1:
        print("error: --length, --seeds must be >= 1 and --captions in [1, 8]", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    chunks = args.length * CLIP_CHUNKS
    common = shlex.split(args.sampler_args)
    jobs = [(name, run, common + flags, caption, 10**6 + 100 * k + i, chunks, os.path.join(args.out, f"c{i}"),
             args.bars_across)
            for name, run, flags in methods for k in range(args.seeds)
            for i, caption in enumerate(bench_captions(args.captions, args.steady))]
    for job in jobs:
        os.makedirs(job[6], exist_ok=True)
    start = time.time()
    if args.rescore:
        saved = [latents_path(j[0], j[4], j[6]) for j in jobs]
        missing = [path for path in saved if not os.path.isfile(path)]
        if missing:
            print(f"error: --rescore: {len(missing)} rollouts are not in {args.out} (first: {missing[0]})",
                  file=sys.stderr)
            return 2
        try:
            figures = [score_rollout(path, *j[3:6], j[7]) for path, j in zip(saved, jobs)]
        except ValueError as e:
            print(f"error: --rescore: {e}", file=sys.stderr)
            return 2
    elif args.jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            figures = list(pool.map(rollout, *zip(*jobs)))
    else:
        figures = [rollout(*job) for job in jobs]
    results = {}
    for name, run, flags in methods:
        runs = [f for job, f in zip(jobs, figures) if job[0] == name]
        curves = {f: [float(np.mean([r[f][c] for r in runs])) for c in range(chunks)] for f in runs[0]}
        results[name] = {"run": run, "flags": common + flags, "curves": curves, "rollouts": len(runs)}
    verb = "rescored" if args.rescore else f"in {time.time() - start:.0f} s ({args.jobs} at a time)"
    print(f"{len(jobs)} rollouts of {chunks} chunks {verb}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    lengths = [args.length] + ([args.length // 2] if args.length >= 2 else [])
    table = {}
    print(f"\n{args.captions} captions x {args.seeds} seeds; quarters of the chunks after the prefix\n"
          "| method | length | present first / last / drift | motion first / last / drift | colour drift | "
          "size drift | shape first / last | distance first / last |\n|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        for length in lengths:
            s = summarise(r["curves"], length * CLIP_CHUNKS)
            table[f"{name} {length}x"] = s
            pr, mo, sh, di = s["object_present"], s["motion"], s["shape"], s["distance"]
            print(f"| {name} | {length}x | {pr[0]:.0%} / {pr[1]:.0%} / {pr[2]:+.0%} | {mo[0]:.0%} / {mo[1]:.0%} / "
                  f"{mo[2]:+.0%} | {s['colour'][2]:+.0%} | {s['size_trend'][2]:+.0%} | {sh[0]:.0%} / {sh[1]:.0%} | "
                  f"{di[0]:.3f} / {di[1]:.3f} |")
    captions = bench_captions(args.captions, args.steady)
    per_caption = {f: last_quarter_presence(jobs, figures, captions, f) for f in ("object_present", "shape")}
    for field, what in (("object_present", "object present"), ("shape", "shape as the ground truth's")):
        print(f"\n{what} in the last quarter ({args.length}x), per rollout, seed by seed\n"
              f"| caption | {' | '.join(results)} |\n|---|{'---|' * len(results)}")
        for caption in captions:
            cells = [" / ".join(f"{v:.0%}" for v in per_caption[field][caption][name]) for name in results]
            print(f"| {caption} | {' | '.join(cells)} |")
    chart(os.path.join(args.out, "drift.png"), results, chunks)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"args": vars(args), "methods": results, "quarters": table,
                   "last_quarter_presence": per_caption["object_present"],
                   "last_quarter_shape": per_caption["shape"],
                   "per_rollout": [{"method": j[0], "caption": j[3], "seed": j[4], "curves": fig}
                                   for j, fig in zip(jobs, figures)]}, f, indent=1)
    print(f"\nchart: {os.path.join(args.out, 'drift.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
