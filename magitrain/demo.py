"""``magitrain demo``: procedural clips -> WebDataset shards -> curriculum training over all three
parallel axes -> streamed videos scored against their captions.

    magitrain demo [--out runs/demo] [--quick] [key.sub=value ...]

1. **media**: procedural clips (``synthetic.render_shape_video``: a coloured shape starting at the
   frame's centre, moving and growing or shrinking, as its caption says; 64x64 pixels, 32 frames) as
   ``.mp4`` + ``.txt``.
   Some (colour, direction) pairs (``HELD_OUT``) never occur in them: the model has seen each
   colour and each direction, never those together.
2. **shards**: ``build_shards`` turns them into WebDataset shards of PatchEncoder latents
   ``[4, 8, 8, 8]`` and hash caption embeddings, and a second set of the clips downscaled to 32x32
   (latents ``[4, 8, 4, 4]``) for the low-res stage. (Cropping the full-size latents instead would
   show the model shapes that fill the frame: RoPE positions are normalised to the grid, so a crop
   and a whole frame look alike to it, and the crops taught it to draw frame-filling shapes.)
3. **training** (NCCL when enough GPUs are visible, gloo on CPU otherwise), a 3-stage curriculum
   (images -> short low-res clips -> longer clips) in three launches (:func:`training_phases`): the
   images and short clips (one or two chunks: nothing for context parallelism to split) on 4 ranks as
   dp=2 x tp=2 (tensor-parallel heads and MLP); the first ``CP_STEPS`` long-clip steps resumed from that
   checkpoint, resharded by DCP, on dp=2 x cp=2 (context-parallel MagiAttention on the packed
   block-causal masks); the rest on dp=2 alone, one rank per core (4 ranks of a tiny model on 2 cores
   mostly wait in collectives). FSDP2 shards parameters over the data-parallel ranks throughout.
4. **generation and scoring**: the EMA weights stream the demo caption's video (longer than any
   training clip) chunk by chunk into ``demo.mp4`` + a contact sheet ``demo.png``, and a video for
   each caption of ``SEEN_CAPTIONS`` and ``HELD_OUT_CAPTIONS``; :mod:`magitrain.caption_score`
   reads each frame's object, colour, motion and size back and scores them against the caption.

Everything lands under ``--out``: ``media/``, ``shards/``, ``run/`` (config, metrics.jsonl,
stages.jsonl, TensorBoard, checkpoints), ``demo.mp4`` / ``demo.npy`` / ``demo.png``, ``eval/`` (one
mp4 + contact sheet per scored caption) and ``scores.json``.
Exit code: 0 done, 1 training failed, 2 bad arguments/config, 3 the caption-following check failed
(``--quick`` reports the scores without the check).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

from magitrain.config import Config, ConfigError, load_config, save_config
from magitrain.configs import config_path

WORLD = 4  # local ranks of the tp and cp launches (dp=2 x tp=2, dp=2 x cp=2)
DP = 2  # data-parallel ranks: the same in every launch (a resumed data stream keeps its dp split)
CP_STEPS = 10  # long-stage steps on dp=2 x cp=2 before the rest runs on dp=2 alone
PIXELS, FRAMES = 64, 32  # media size: PatchEncoder latents of 8x8, 8 latent frames
LOW_RES = 32  # the low-res shard set: the same clips downscaled, latents of 4x4
TEMPORAL_FACTOR = 4  # PatchEncoder: pixel frames per latent frame
SHARDS = 4  # at least dp x max(1, data.num_workers)
FPS = 8
VIDEOS, QUICK_VIDEOS = 120, 48
START_SPREAD = 0.0  # every clip starts at the frame's centre (the renderer's default: anywhere in the middle half),
#   so a first chunk from pure noise need not break a symmetry of positions: docs/design.md, issue 13, sixth round
QUICK_SCALE = 0.15  # --quick: this share of the curriculum's steps
GEN_CHUNKS = 8  # demo.mp4: 16 latent = 64 pixel frames, twice the longest training clip (32)
EVAL_CHUNKS = 4  # each scored caption: 32 frames
GEN_STEPS = 32
DEMO_CFG_SCALE = 1.25  # text guidance (1.5 over-grows a "growing" bar into a band on the sixth round's models) ...
DEMO_HISTORY_SCALE = 1.5  # ... and MAGI-1's history guidance (3-pass): the best of sweeps on the demo models
#   (design.md, issue 13, third and sixth rounds); None: 2-pass
# (colour, direction) pairs no training clip shows; every colour and direction is seen otherwise
HELD_OUT = {("red", "left"), ("green", "down"), ("blue", "up"), ("purple", "right")}
SEEN_CAPTIONS = [
    "a red square moving right, growing", "a green disk moving left, shrinking",
    "a blue bar moving down, growing", "a yellow square moving up, shrinking",
    "a white disk moving right, shrinking", "a purple bar moving left, growing",
    "a yellow disk moving down, growing", "a white square moving up, growing",
]
HELD_OUT_CAPTIONS = [
    "a red disk moving left, growing", "a green square moving down, shrinking",
    "a blue disk moving up, growing", "a purple square moving right, shrinking",
]
# pass marks of the caption-following check (issue 13). The --quick smoke run reports its scores
# without them: it is too short to meet them (tests/test_demo.py trains a smaller model that must
# clear marks noise cannot reach)
THRESHOLDS = {"object_present": 0.9, "colour": 0.9, "motion": 0.75, "size_trend": 0.65, "held_out_motion": 0.6}
# known, harmless warnings of torch 2.13 that would otherwise repeat on every rank
QUIET_WARNINGS = "ignore:FSDP2-wrapped module:UserWarning,ignore:Slicing a flattened dim:UserWarning"


class Progress:
    """Numbered phase headers and lines with the elapsed wall time, flushed at once."""

    def __init__(self, phases: int):
        self.phases, self.done, self.start = phases, 0, time.perf_counter()

    def phase(self, text: str) -> None:
        self.done += 1
        self.say(f"[{self.done}/{self.phases}] {text}")

    def say(self, text: str) -> None:
        print(f"demo {time.perf_counter() - self.start:6.1f}s | {text}", flush=True)


# --- 1. media ---------------------------------------------------------------------------------

def demo_clip(seed: int, frames: int = FRAMES, **fixed) -> tuple[torch.Tensor, str]:
    """One procedural clip: uint8 ``[frames, PIXELS, PIXELS, 3]`` and its caption (``fixed``: the
    renderer's colour/shape/motion/grows choices). ``frames`` past ``FRAMES`` continue the same
    clip (the renderer's ``period``): the first ``FRAMES`` are the demo's clip, then the shape keeps
    its speed, wraps around the frame and holds its size."""
    from magitrain.synthetic import render_shape_video

    video, caption = render_shape_video(frames, PIXELS, PIXELS, 3, torch.Generator().manual_seed(seed),
                                        **{"start_spread": START_SPREAD, "period": FRAMES, **fixed})
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), caption


def caption_clip(seed: int, caption: str, frames: int = FRAMES, **fixed) -> torch.Tensor:
    """uint8 ``[frames, PIXELS, PIXELS, 3]``: :func:`demo_clip` of what ``caption`` says (its colour, shape,
    direction and size words; "keeping its size" renders ``steady``); ``fixed``: the renderer's other options."""
    from magitrain.caption_score import Caption

    c = Caption.parse(caption)
    return demo_clip(seed, frames, color=c.colour, shape=c.shape, motion=c.direction, grows=c.growing,
                     steady=c.growing is None, **fixed)[0]


def is_held_out(caption: str) -> bool:
    from magitrain.caption_score import Caption

    c = Caption.parse(caption)
    return (c.colour, c.direction) in HELD_OUT


def seen_combinations() -> list[dict]:
    """Every (colour, shape, direction, growing) the renderer draws, minus the held-out (colour,
    direction) pairs: 6 x 3 x 4 x 2 - 24 = 120, in a fixed shuffled order (so a shorter prefix, as a
    smaller test's data, still mixes every colour, shape and direction)."""
    from magitrain.synthetic import COLORS, MOTIONS, SHAPES

    combos = [dict(color=c, shape=s, motion=m, grows=g) for c in COLORS for s in SHAPES for m in MOTIONS
              for g in (False, True) if (c, m) not in HELD_OUT]
    order = torch.randperm(len(combos), generator=torch.Generator().manual_seed(0)).tolist()
    return [combos[i] for i in order]


def make_media(folder: str, count: int, frames: int = FRAMES, steady: bool = False,
               bar_across: bool = False) -> list[str]:
    """``count`` clips ``clip_NNNN.mp4`` with captions ``clip_NNNN.txt``: clip ``i`` shows seen
    combination ``i mod 120`` (:func:`seen_combinations`), at a start position drawn from seed ``i``,
    so every seen caption is in the data (a random draw of 96 clips missed 5 of the 8 scored ones).
    ``frames``: each clip's length (:func:`demo_clip`); ``steady``, ``bar_across``: the renderer's (shapes
    keep their size, "keeping its size" captions; bars lie across their motion)."""
    from magitrain.data_pipeline.media import write_mp4

    os.makedirs(folder, exist_ok=True)
    combos, captions = seen_combinations(), []
    for i in range(count):
        video, caption = demo_clip(i, frames, steady=steady, bar_across=bar_across, **combos[i % len(combos)])
        name = os.path.join(folder, f"clip_{i:04d}")
        write_mp4(name + ".mp4", video, fps=FPS)
        with open(name + ".txt", "w") as f:
            f.write(caption + "\n")
        captions.append(caption)
    return captions


# --- 2. shards --------------------------------------------------------------------------------

def build_shards(media: str, out: str, cfg: Config, count: int, shards: int = SHARDS, size: int = PIXELS) -> dict:
    """PatchEncoder latents + hash caption embeddings for ``cfg.model`` in ``shards`` shards, of the
    media resized to ``size`` x ``size`` pixels; returns the manifest."""
    from magitrain.data_pipeline import build_shards as bs

    m = cfg.model
    args = bs.parser().parse_args([
        media, out, "--latent-encoder", "patch", "--latent-channels", str(m.in_channels),
        "--text-encoder", "hash", "--text-dim", str(m.caption_channels), "--text-len", str(m.caption_max_length),
        "--max-shard-samples", str(-(-count // shards)), "--patch-size", str(m.patch_size),
        "--t-patch-size", str(m.t_patch_size), "--size", f"{size}x{size}", "--quiet",
        "--overwrite"])  # the demo's own set, rebuilt
    return bs.build(args)


# --- 3. training ------------------------------------------------------------------------------

def demo_config(out: str, quick: bool, overrides: list[str]) -> Config:
    """``configs/demo.yaml`` with the demo's paths; ``--quick`` scales the curriculum to
    ``QUICK_SCALE`` of its steps (stage boundaries keep their proportions) unless train.steps is given."""
    base = [f"run.dir={os.path.join(out, 'run')}", f"data.shards={os.path.join(out, 'shards')}"]
    cfg = load_config(config_path("demo.yaml"), base + overrides, world_size=WORLD)
    for st in cfg.data.curriculum:  # a stage naming the low-res set reads the downscaled shards
        if st.shards == "low_res":
            st.shards = os.path.join(out, "shards_low_res")
    if quick and not any(o.startswith("train.steps=") for o in overrides):
        for st in cfg.data.curriculum:
            st.until_step = max(1, round(st.until_step * QUICK_SCALE)) if st.until_step else 0
        cfg.train.steps = round(cfg.train.steps * QUICK_SCALE)
        cfg.optim.restart_at = round(cfg.optim.restart_at * QUICK_SCALE)
        cfg.optim.warmup_steps = max(1, round(cfg.optim.warmup_steps * QUICK_SCALE))
    return cfg


def training_phases(cfg: Config) -> list[tuple[str, int, list[str]]]:
    """The launches: ``(description, ranks, overrides)``. The stages before the last (images, short
    clips: one or two chunks, nothing for CP to split) on dp=2 x tp=2; the first ``CP_STEPS`` of the
    long stage resumed (resharded) on dp=2 x cp=2; the rest on dp=2 alone, one rank per core: on
    a 2-core CPU, 4 ranks of a 2-layer model spend most of a step waiting in collectives
    (docs/design.md, issue 13), so the bulk of the steps run where they are cheapest."""
    split = cfg.data.curriculum[-2].until_step if len(cfg.data.curriculum) > 1 else 0
    tp_layout = [f"parallel.dp={DP}", "parallel.cp=1", "parallel.tp=2"]
    cp_layout = [f"parallel.dp={DP}", "parallel.cp=2", "parallel.tp=1"]
    dp_layout = [f"parallel.dp={DP}", "parallel.cp=1", "parallel.tp=1"]
    fresh = ["run.overwrite=true"]  # a rerun of the demo moves its previous run aside (run.dir.replaced-TIME)
    resume = ["ckpt.resume=auto"]
    end = cfg.train.steps
    if not 0 < split < end:
        return [(f"steps 1-{end} on dp=2 x cp=2", WORLD, cp_layout + fresh)]
    names = " -> ".join(s.name for s in cfg.data.curriculum[:-1])
    long = cfg.data.curriculum[-1].name
    cp_end = min(end, split + CP_STEPS)
    phases = [(f"{names}: steps 1-{split} on dp=2 x tp=2", WORLD, tp_layout + [f"train.stop_at={split}"] + fresh),
              (f"{long}: steps {split + 1}-{cp_end} resumed (resharded) on dp=2 x cp=2", WORLD,
               cp_layout + resume + ([f"train.stop_at={cp_end}"] if cp_end < end else []))]
    if cp_end < end:
        phases.append((f"{long}: steps {cp_end + 1}-{end} resumed (resharded) on dp=2", DP, dp_layout + resume))
    return phases


def launch_command(config_file: str, overrides: list[str] = (), ranks: int = WORLD) -> list[str]:
    """torchrun with ``ranks`` local ranks; with fewer GPUs than ranks the ranks run on CPU (gloo)."""
    extra = [] if torch.cuda.device_count() >= ranks else ["parallel.backend=gloo"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
            "-m", "magitrain.train", "--config", config_file, *extra, *overrides]


def run_training(cfg: Config, progress: Progress) -> None:
    """Save the resolved config next to the run and train it in :func:`training_phases`; the ranks'
    output (rank 0's progress bar and stage summaries) goes straight to this terminal."""
    config_file = os.path.join(os.path.dirname(cfg.run.dir), "demo_config.yaml")
    save_config(cfg, config_file)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", QUIET_WARNINGS), PYTHONUNBUFFERED="1")
    for what, ranks, overrides in training_phases(cfg):
        cmd = launch_command(config_file, overrides, ranks)
        progress.say(f"  {what}")
        progress.say("  $ python " + " ".join(cmd[1:]))
        rc = subprocess.call(cmd, env=env)
        if rc != 0:
            raise RuntimeError(f"training failed (torchrun exit code {rc}); its output is above")


def stage_lines(run_dir: str) -> list[str]:
    """Per-stage lines from ``stages.jsonl`` and the loss at the start and end of training."""
    lines = []
    with open(os.path.join(run_dir, "stages.jsonl")) as f:
        for row in map(json.loads, f):
            remote = "/".join(f"{r:.0f}" for r in row["cp_remote_kv_tokens_per_step"])
            lines.append(f"  {row['stage']:7s} {row['steps']:4d} steps {row['time_s']:7.1f} s "
                         f"{row['tokens_per_s']:7.0f} tok/s  area imbalance {row['cp_area_imbalance']:.3f}  "
                         f"remote KV/step per CP rank {remote}  data {100 * row['data_time_frac']:.1f}%  "
                         f"skipped {row['data_skipped']}")
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    k = max(1, len(losses) // 10)
    lines.append(f"  loss {sum(losses[:k]) / k:.4f} (first {k} steps) -> {sum(losses[-k:]) / k:.4f} (last {k})")
    return lines


# --- 4. generation and scoring ----------------------------------------------------------------

def generation_args(run_dir: str, caption: str, mp4: str, chunks: int = GEN_CHUNKS, steps: int = GEN_STEPS,
                    seed: int = 0, cfg_scale: float = DEMO_CFG_SCALE, window: int = 4,
                    history_scale: float | None = DEMO_HISTORY_SCALE) -> list[str]:
    """The ``magitrain.generate`` command line the demo uses (its sampler defaults)."""
    history = [] if history_scale is None else ["--history-scale", str(history_scale)]
    return ["--ckpt", run_dir, "--prompt", caption, "--chunks", str(chunks), "--steps", str(steps),
            "--window", str(window), "--cfg-scale", str(cfg_scale), *history, "--fps", str(FPS), "--seed", str(seed),
            "--out", mp4, "--contact-sheet", os.path.splitext(mp4)[0] + ".png", "--quiet"]


def stream_video(run_dir: str, caption: str, mp4: str, chunks: int = GEN_CHUNKS, steps: int = GEN_STEPS,
                 seed: int = 0, cfg_scale: float = DEMO_CFG_SCALE, window: int = 4,
                 history_scale: float | None = DEMO_HISTORY_SCALE) -> dict:
    """Stream ``chunks`` chunks for ``caption`` from the run's EMA weights into ``mp4`` (latents into
    ``.npy``, contact sheet into ``.png`` beside it) with ``magitrain.generate``; returns its summary."""
    from magitrain import generate

    return generate.run(generate.build_parser().parse_args(
        generation_args(run_dir, caption, mp4, chunks, steps, seed, cfg_scale, window, history_scale)))


def score_latents(latents_npy: str, caption: str, channels: int):
    """:func:`~magitrain.caption_score.score_video` of saved latents, decoded as the shards were encoded."""
    import numpy as np

    from magitrain.caption_score import score_video
    from magitrain.data_pipeline.encoders import PatchEncoder

    frames = PatchEncoder(channels).decode(torch.from_numpy(np.load(latents_npy, allow_pickle=False)))
    return score_video(frames, caption, window=FRAMES // 4)


def evaluate(run_dir: str, out: str, channels: int, progress: Progress, chunks: int = EVAL_CHUNKS) -> dict:
    """Generate and score one video per caption of ``SEEN_CAPTIONS`` and ``HELD_OUT_CAPTIONS`` into
    ``out/``; returns ``{"seen": CaptionScore, "held_out": CaptionScore, "videos": [...]}``."""
    from magitrain.caption_score import mean_score

    os.makedirs(out, exist_ok=True)
    groups, videos = {"seen": [], "held_out": []}, []
    for group, captions in (("seen", SEEN_CAPTIONS), ("held_out", HELD_OUT_CAPTIONS)):
        for i, caption in enumerate(captions):
            mp4 = os.path.join(out, f"{group}_{i}.mp4")
            summary = stream_video(run_dir, caption, mp4, chunks, seed=i + 1)
            score = score_latents(summary["latents"], caption, channels)
            groups[group].append(score)
            videos.append({"group": group, "caption": caption, "video": mp4, "contact_sheet": summary["contact_sheet"],
                           **score.as_dict()})
            progress.say(f"  {group:8s} {caption!r:42s} {score}")
    return {"seen": mean_score(groups["seen"]), "held_out": mean_score(groups["held_out"]), "videos": videos}


def verdict(scores: dict, thresholds: dict) -> list[str]:
    """The failed pass marks, as lines (empty: passed)."""
    seen, held = scores["seen"], scores["held_out"]
    checks = [(f"object present {seen.object_present:.0%}", seen.object_present, thresholds["object_present"]),
              (f"colour {seen.colour:.0%}", seen.colour, thresholds["colour"]),
              (f"motion {seen.motion:.0%}", seen.motion, thresholds["motion"]),
              (f"size trend {seen.size_trend:.0%}", seen.size_trend, thresholds["size_trend"]),
              (f"held-out motion {held.motion:.0%}", held.motion, thresholds["held_out_motion"])]
    return [f"{what} < {need:.0%}" for what, got, need in checks if got < need]


# --- the command ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magitrain demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true",
                        help=f"a short run ({QUICK_SCALE:.0%} of the steps, {QUICK_VIDEOS} clips; CI smoke test)".replace("%", "%%"))
    parser.add_argument("--videos", type=int, default=0, help=f"procedural clips to make (default {VIDEOS}, "
                        f"quick {QUICK_VIDEOS})")
    parser.add_argument("--caption", default="a red square moving right, growing", help="prompt of demo.mp4")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        cfg = demo_config(out, args.quick, args.overrides)
        from magitrain.caption_score import Caption

        Caption.parse(args.caption)
    except (ConfigError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    videos = args.videos or (QUICK_VIDEOS if args.quick else VIDEOS)
    progress = Progress(4)

    progress.phase(f"media: {videos} procedural clips ({FRAMES} frames, {PIXELS}x{PIXELS}; held out: "
                   f"{', '.join(f'{c} moving {d}' for c, d in sorted(HELD_OUT))}) -> {out}/media")
    torch.set_num_threads(1)  # tiny tensors: more threads only contend on a busy 2-core CPU
    make_media(os.path.join(out, "media"), videos)

    progress.phase(f"shards: build_shards (PatchEncoder latents, hash text) -> {out}/shards, and of the clips "
                   f"downscaled to {LOW_RES}x{LOW_RES} -> {out}/shards_low_res")
    for folder, size in (("shards", PIXELS), ("shards_low_res", LOW_RES)):
        manifest = build_shards(os.path.join(out, "media"), os.path.join(out, folder), cfg, videos, size=size)
        progress.say(f"  {folder}: {manifest['samples']} samples in {len(manifest['shards'])} shards, latent "
                     f"buckets {', '.join(manifest['buckets'])}")

    progress.phase(f"training: {WORLD} then {DP} ranks, {cfg.train.steps} steps, curriculum "
                   f"{' -> '.join(s.name for s in cfg.data.curriculum)}, over dp, tp and cp")
    try:
        run_training(cfg, progress)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in stage_lines(cfg.run.dir):
        progress.say(line)

    mp4 = os.path.join(out, "demo.mp4")
    progress.phase(f"generation: demo.mp4 ({GEN_CHUNKS} chunks) and {EVAL_CHUNKS} chunks per scored caption "
                   f"({GEN_STEPS} steps, window 4, KV cache, cfg {DEMO_CFG_SCALE:g}, history guidance {DEMO_HISTORY_SCALE}), "
                   "scored against the caption")
    result = stream_video(cfg.run.dir, args.caption, mp4)
    longest = max(b[0] for st in cfg.data.curriculum for b in st.buckets) * TEMPORAL_FACTOR
    demo_score = score_latents(result["latents"], args.caption, cfg.model.in_channels)
    progress.say(f"  demo.mp4: {result['frames']} frames (the longest training clip has {longest}) for "
                 f"{args.caption!r}: {demo_score}")
    scores = evaluate(cfg.run.dir, os.path.join(out, "eval"), cfg.model.in_channels, progress)
    failed = [] if args.quick else verdict(scores, THRESHOLDS)
    summary = {"seen": scores["seen"].as_dict(), "held_out": scores["held_out"].as_dict(),
               "demo": {"caption": args.caption, **demo_score.as_dict()}, "videos": scores["videos"],
               "thresholds": None if args.quick else THRESHOLDS, "passed": None if args.quick else not failed}
    with open(os.path.join(out, "scores.json"), "w") as f:
        json.dump(summary, f, indent=1)
    progress.say(f"  caption following, {len(SEEN_CAPTIONS)} seen captions:     {scores['seen']}")
    progress.say(f"  caption following, {len(HELD_OUT_CAPTIONS)} held-out captions: {scores['held_out']}")
    if args.quick:
        progress.say("  check: not applied to a --quick run (too short to meet the marks; scores above)")
    else:
        progress.say("  check: " + ("PASS" if not failed else "FAIL (" + "; ".join(failed) + ")"))

    run_dir = cfg.run.dir
    print(f"\nrun dir:       {run_dir}")
    print(f"metrics:       {os.path.join(run_dir, 'metrics.jsonl')}  (per stage: stages.jsonl)")
    print(f"checkpoints:   {os.path.join(run_dir, 'checkpoints')}")
    print(f"TensorBoard:   tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"video:         {mp4}  (latents: {result['latents']})")
    print(f"contact sheet: {result['contact_sheet']}  (one row per chunk)")
    print(f"scores:        {os.path.join(out, 'scores.json')}  (videos and sheets: {os.path.join(out, 'eval')})")
    return 0 if not failed else 3


if __name__ == "__main__":
    sys.exit(main())
