"""``magitrain demo``: procedural clips -> WebDataset shards -> 4-rank curriculum training -> a streamed mp4.

    magitrain demo [--out runs/demo] [--quick] [key.sub=value ...]

1. **media**: procedural clips (``synthetic.render_shape_video``: a coloured shape moving and
   growing or shrinking, as its caption says; 64x64 pixels, 32 frames) as ``.mp4`` + ``.txt``;
2. **shards**: ``build_shards`` turns them into WebDataset shards of PatchEncoder latents
   ``[4, 8, 8, 8]`` and hash caption embeddings;
3. **training**: ``torch.distributed.run`` starts 4 local ranks (NCCL when 4 GPUs are visible,
   gloo on CPU otherwise) that train ``configs/demo.yaml``: dp=2 x cp=2 (context-parallel
   MagiAttention on the packed block-causal masks, FSDP2 over the 4 ranks), a 3-stage curriculum
   (images -> short low-res clips -> longer clips), checkpoints;
4. **generation**: the EMA weights stream a video longer than any training clip chunk by chunk
   (``magitrain.generate``: KV-cached pipelined sampler) into an mp4, and
   ``generate.quality_check`` compares it with held-out clips.

Everything lands under ``--out``: ``media/``, ``shards/``, ``run/`` (config, metrics.jsonl,
stages.jsonl, TensorBoard, checkpoints), ``demo.mp4`` and its latents ``demo.npy``.
Exit code: 0 done, 1 training failed, 2 bad arguments/config, 3 the quality check failed.
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

WORLD = 4  # local ranks: dp x cp of configs/demo.yaml
PIXELS, FRAMES = 64, 32  # media size: PatchEncoder latents of 8x8, 8 latent frames
TEMPORAL_FACTOR = 4  # PatchEncoder: pixel frames per latent frame
SHARDS = 4  # at least dp x max(1, data.num_workers)
FPS = 8
QUICK_STEPS = 90
GEN_CHUNKS = 8  # 16 latent = 64 pixel frames: twice the longest training clip (32)
HELD_OUT_SEED = 10**6  # reference clips for the quality check: seeds the media never use
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

def demo_clip(seed: int) -> tuple[torch.Tensor, str]:
    """One procedural clip: uint8 ``[FRAMES, PIXELS, PIXELS, 3]`` and its caption."""
    from magitrain.synthetic import render_shape_video

    video, caption = render_shape_video(FRAMES, PIXELS, PIXELS, 3, torch.Generator().manual_seed(seed))
    return ((video.permute(1, 2, 3, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8), caption


def make_media(folder: str, count: int) -> list[str]:
    """``count`` clips ``clip_NNNN.mp4`` (seeds ``0..count-1``) with captions ``clip_NNNN.txt``."""
    from magitrain.data_pipeline.media import write_mp4

    os.makedirs(folder, exist_ok=True)
    captions = []
    for i in range(count):
        frames, caption = demo_clip(i)
        write_mp4(os.path.join(folder, f"clip_{i:04d}.mp4"), frames, fps=FPS)
        with open(os.path.join(folder, f"clip_{i:04d}.txt"), "w") as f:
            f.write(caption + "\n")
        captions.append(caption)
    return captions


# --- 2. shards --------------------------------------------------------------------------------

def build_shards(media: str, out: str, cfg: Config, count: int, shards: int = SHARDS) -> dict:
    """PatchEncoder latents + hash caption embeddings for ``cfg.model`` in ``shards`` shards;
    returns the manifest."""
    from magitrain.data_pipeline import build_shards as bs

    m = cfg.model
    args = bs.parser().parse_args([
        media, out, "--latent-encoder", "patch", "--latent-channels", str(m.in_channels),
        "--text-encoder", "hash", "--text-dim", str(m.caption_channels), "--text-len", str(m.caption_max_length),
        "--max-shard-samples", str(-(-count // shards)), "--patch-size", str(m.patch_size),
        "--t-patch-size", str(m.t_patch_size), "--quiet"])
    return bs.build(args)


# --- 3. training ------------------------------------------------------------------------------

def demo_config(out: str, quick: bool, overrides: list[str]) -> Config:
    """``configs/demo.yaml`` with the demo's paths; ``--quick`` scales the curriculum to
    ``QUICK_STEPS`` steps (stage boundaries keep their proportions) unless train.steps is given."""
    base = [f"run.dir={os.path.join(out, 'run')}", f"data.shards={os.path.join(out, 'shards')}"]
    cfg = load_config(config_path("demo.yaml"), base + overrides, world_size=WORLD)
    if quick and not any(o.startswith("train.steps=") for o in overrides):
        scale = QUICK_STEPS / cfg.train.steps
        for st in cfg.data.curriculum:
            st.until_step = max(1, round(st.until_step * scale)) if st.until_step else 0
        cfg.train.steps = QUICK_STEPS
        cfg.ckpt.every = QUICK_STEPS // 2
    return cfg


def launch_command(config_file: str) -> list[str]:
    """torchrun with ``WORLD`` local ranks; with fewer GPUs than ranks the ranks run on CPU (gloo)."""
    extra = [] if torch.cuda.device_count() >= WORLD else ["parallel.backend=gloo"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={WORLD}",
            "-m", "magitrain.train", "--config", config_file, *extra]


def run_training(cfg: Config, progress: Progress) -> None:
    """Save the resolved config next to the run and train it on ``WORLD`` local ranks; the ranks'
    output (rank 0's progress bar and stage summaries) goes straight to this terminal."""
    config_file = os.path.join(os.path.dirname(cfg.run.dir), "demo_config.yaml")
    save_config(cfg, config_file)
    cmd = launch_command(config_file)
    progress.say("$ python " + " ".join(cmd[1:]))
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               PYTHONWARNINGS=os.environ.get("PYTHONWARNINGS", QUIET_WARNINGS), PYTHONUNBUFFERED="1")
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


# --- 4. generation ----------------------------------------------------------------------------

def stream_video(run_dir: str, caption: str, chunks: int, mp4: str, steps: int) -> dict:
    """Stream ``chunks`` chunks for ``caption`` from the run's EMA weights into ``mp4`` (latents
    into the same name with ``.npy``) with ``magitrain.generate``; returns its summary."""
    from magitrain import generate

    args = generate.build_parser().parse_args([
        "--ckpt", run_dir, "--prompt", caption, "--chunks", str(chunks), "--steps", str(steps),
        "--window", "4", "--fps", str(FPS), "--out", mp4])
    return generate.run(args)


def check_quality(latents_npy: str, channels: int, held_out: int = 16):
    """``generate.quality_check`` of the streamed latents against held-out demo clips, encoded
    exactly as the shards were (PatchEncoder); returns its report."""
    import numpy as np

    from magitrain.data_pipeline.encoders import PatchEncoder
    from magitrain.generate import quality_check

    enc = PatchEncoder(channels)
    reference = torch.stack([enc.encode(demo_clip(HELD_OUT_SEED + i)[0]) for i in range(held_out)])
    return quality_check(torch.from_numpy(np.load(latents_npy, allow_pickle=False)), reference)


# --- the command ------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="magitrain demo", description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo", help="output folder (default: runs/demo)")
    parser.add_argument("--quick", action="store_true", help=f"a short run ({QUICK_STEPS} steps; CI smoke test)")
    parser.add_argument("--videos", type=int, default=0, help="procedural clips to make (default 64, quick 32)")
    parser.add_argument("--caption", default="a red square moving right, growing", help="prompt of the mp4")
    parser.add_argument("overrides", nargs="*", help="key.sub=value overrides of configs/demo.yaml")
    args = parser.parse_args(argv)
    out = os.path.abspath(args.out)
    try:
        cfg = demo_config(out, args.quick, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    videos = args.videos or (32 if args.quick else 64)
    progress = Progress(4)

    progress.phase(f"media: {videos} procedural clips ({FRAMES} frames, {PIXELS}x{PIXELS}) -> {out}/media")
    make_media(os.path.join(out, "media"), videos)

    progress.phase(f"shards: build_shards (PatchEncoder latents, hash text) -> {out}/shards")
    manifest = build_shards(os.path.join(out, "media"), os.path.join(out, "shards"), cfg, videos)
    progress.say(f"  {manifest['samples']} samples in {len(manifest['shards'])} shards, latent buckets "
                 f"{', '.join(manifest['buckets'])}")

    p = cfg.parallel
    progress.phase(f"training: {WORLD} ranks (dp={p.dp} x cp={p.cp} x tp={p.tp}), {cfg.train.steps} steps, "
                   f"curriculum {' -> '.join(s.name for s in cfg.data.curriculum)}")
    try:
        run_training(cfg, progress)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for line in stage_lines(cfg.run.dir):
        progress.say(line)

    mp4 = os.path.join(out, "demo.mp4")
    gen_steps = 8 if args.quick else 16
    progress.phase(f"generation: {GEN_CHUNKS} chunks for {args.caption!r} ({gen_steps} steps, KV cache) -> {mp4}")
    torch.set_num_threads(1)  # a tiny model: more threads only contend on a busy CPU
    result = stream_video(cfg.run.dir, args.caption, GEN_CHUNKS, mp4, gen_steps)
    longest = max(b[0] for st in cfg.data.curriculum for b in st.buckets) * TEMPORAL_FACTOR
    progress.say(f"  {result['frames']} frames streamed (the longest training clip has {longest})")
    report = check_quality(result["latents"], cfg.model.in_channels)
    progress.say(f"  quality check against held-out clips: {report}")

    run_dir = cfg.run.dir
    print(f"\nrun dir:      {run_dir}")
    print(f"metrics:      {os.path.join(run_dir, 'metrics.jsonl')}  (per stage: stages.jsonl)")
    print(f"checkpoints:  {os.path.join(run_dir, 'checkpoints')}")
    print(f"TensorBoard:  tensorboard --logdir {os.path.join(run_dir, 'tensorboard')}")
    print(f"video:        {mp4}  (latents: {result['latents']})")
    return 0 if report.passed else 3


if __name__ == "__main__":
    sys.exit(main())
