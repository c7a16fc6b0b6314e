"""``python -m magitrain.generate``: stream a video chunk by chunk from a trained checkpoint.

    python -m magitrain.generate --ckpt runs/demo --prompt "a red disk moving right, growing" \\
        --chunks 8 --steps 16 --window 4 --cfg-scale 3 --out video.mp4

Loads the model (EMA weights when the checkpoint has them) with :func:`magitrain.weights.load_run_weights`,
embeds one caption per chunk (``--prompt``, switched at chunk boundaries by ``--prompt-schedule``),
runs the pipelined, KV-cached :class:`~magitrain.sampler.ChunkSampler`, and as each chunk is final
decodes it (the built-in patch decoder, or ``module:factory``) into the mp4 and writes its latent
into ``OUT.npy`` (``[C, T, H, W]`` float32, memory-mapped), so memory stays flat however long the
video. ``--prefix`` starts from clean frames (image-to-video, continuation): a latent ``.npy``
``[C, T, H, W]`` or an image / video file encoded with the model's latent encoder.

Prompt schedule file: ``.json`` ``{"0": "a red square ...", "4": "emb.npy"}`` or text lines
``CHUNK: PROMPT``; each entry holds from its chunk until the next; an entry ending in ``.npy``
is a precomputed caption embedding ``[L, D]`` (valid rows only, as in shards), relative to the
schedule file. ``--chunks`` is the whole video's length in chunks, prefix included.

Many ranks (a model too big for one GPU): ``torchrun --nproc_per_node 4 -m magitrain.generate --ckpt RUN
... parallel.tp=2 parallel.cp=2`` (``parallel.*`` dotlist overrides as in training; dp must be 1) loads
the checkpoint, of any training layout, into the TP shards and samples with
:class:`~magitrain.parallel_generate.ParallelChunkSampler` (heads over tp, window and KV cache over cp);
every rank samples the same video, rank 0 writes the outputs.

Long videos: ``--sink-chunks S --max-context K`` keep the first ``S`` finished chunks in the KV cache
for good plus the ``K`` most recent (flat memory); both default to the checkpoint's
``model.sink_chunks`` / ``model.max_context_chunks`` (the mask it was trained with). ``--context-t T``
caches each finished chunk re-noised to level ``T`` (seeded), as training with ``diffusion.history_t``.
``--strict-history`` also limits each window chunk to the sink and its ``K`` predecessors (the training
mask exactly, for ``--window > 1``).

``--contact-sheet PATH`` also writes a PNG with one row per chunk (its frames left to right), to look
at without a video player. Whether a video follows its caption is scored by :mod:`magitrain.caption_score`
(the demo's check).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import fields
from typing import Optional

import numpy as np
import torch

from magitrain.config import Config, ConfigError, ModelConfig, load_config
from magitrain.checkpoint import CheckpointError
from magitrain.data_pipeline.encoders import BUILTIN_LATENT, BUILTIN_TEXT, build_latent_encoder, build_text_encoder
from magitrain.model import MagiDiT
from magitrain.parallel.mesh import launched
from magitrain.sampler import SOLVERS, ChunkSampler, SamplerConfig

# --- model and conditions ---------------------------------------------------------------------


def load_model(ckpt: str, prefer_ema: bool = True, expected: Optional[ModelConfig] = None,
               device: str = "cpu") -> tuple[Config, MagiDiT]:
    """The checkpoint's config and its model (eval mode) with the EMA weights when present.
    ``expected``: refuse a checkpoint whose model config differs, naming the fields."""
    from magitrain.weights import load_run_weights

    cfg, weights = load_run_weights(ckpt, prefer_ema=prefer_ema)
    if expected is not None:
        diff = [f"{f.name}={getattr(cfg.model, f.name)!r} (expected {getattr(expected, f.name)!r})"
                for f in fields(ModelConfig) if getattr(cfg.model, f.name) != getattr(expected, f.name)]
        if diff:
            raise ValueError(f"checkpoint {ckpt} was trained with a different model config: {', '.join(diff)}")
    model = MagiDiT(cfg.model)
    model.load_state_dict(weights, strict=True)
    return cfg, model.to(device).eval()


def read_prompt_schedule(path: str) -> dict[int, str]:
    """``{chunk: prompt or .npy path}`` from a ``.json`` object or ``CHUNK: PROMPT`` lines."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        raise ValueError(f"prompt schedule {path}: {e.strerror}") from None
    if path.endswith(".json"):
        try:
            raw = json.loads(text)
        except ValueError as e:
            raise ValueError(f"prompt schedule {path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"prompt schedule {path}: want an object {{\"chunk\": \"prompt\"}}")
        items = list(raw.items())
    else:
        items = [line.split(":", 1) for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if any(len(i) != 2 for i in items):
            raise ValueError(f"prompt schedule {path}: every line must be 'CHUNK: PROMPT'")
    schedule = {}
    for key, value in items:
        try:
            chunk = int(str(key).strip())
        except ValueError:
            raise ValueError(f"prompt schedule {path}: chunk index {key!r} is not an integer") from None
        if chunk < 0 or not isinstance(value, str) or not value.strip():
            raise ValueError(f"prompt schedule {path}: entry {key!r} needs a chunk >= 0 and a non-empty prompt")
        value = value.strip()
        if value.endswith(".npy") and not os.path.isabs(value):
            value = os.path.join(os.path.dirname(os.path.abspath(path)), value)
        schedule[chunk] = value
    return schedule


def chunk_captions(num_chunks: int, prompt: Optional[str], schedule: dict[int, str], text_encoder,
                   model_cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-chunk ``(text_emb [n, L, D], text_mask [n, L])``: ``prompt`` until the schedule's first entry."""
    entries = dict(schedule)
    if 0 not in entries:
        if prompt is None:
            raise ValueError("no caption for chunk 0: give --prompt or a schedule entry for chunk 0")
        entries[0] = prompt
    beyond = [c for c in entries if c >= num_chunks]
    if beyond:
        raise ValueError(f"prompt schedule names chunk {min(beyond)}, but the video has {num_chunks} chunks")
    embedded = {c: _embed(p, text_encoder, model_cfg) for c, p in entries.items()}
    starts = sorted(embedded)
    current = [max(s for s in starts if s <= c) for c in range(num_chunks)]
    return (torch.stack([embedded[s][0] for s in current]), torch.stack([embedded[s][1] for s in current]))


def _embed(prompt: str, text_encoder, m: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompt.endswith(".npy"):
        return text_encoder.embed(prompt)
    try:
        emb = np.load(prompt, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"caption embedding {prompt}: cannot be read ({e})") from None
    if emb.ndim != 2 or emb.shape[1] != m.caption_channels or not 0 < emb.shape[0] <= m.caption_max_length:
        raise ValueError(f"caption embedding {prompt}: want [L <= {m.caption_max_length}, {m.caption_channels}], "
                         f"got {list(emb.shape)}")
    out = torch.zeros(m.caption_max_length, m.caption_channels)
    out[:emb.shape[0]] = torch.from_numpy(emb.astype(np.float32))
    return out, torch.arange(m.caption_max_length) < emb.shape[0]


def load_prefix(path: str, encoder, height: int, width: int) -> torch.Tensor:
    """Clean latent frames ``[C, T, height, width]``: a latent ``.npy``, or an image / video file
    resized to the decoder's pixel size and encoded with ``encoder``."""
    from magitrain.data_pipeline.media import decode_media, resize_crop
    from magitrain.data_pipeline.shard_format import BadSample

    if path.endswith(".npy"):
        try:
            latent = torch.from_numpy(np.load(path, allow_pickle=False).astype(np.float32))
        except (OSError, ValueError) as e:
            raise ValueError(f"prefix {path}: cannot be read ({e})") from None
        if latent.dim() != 4:
            raise ValueError(f"prefix {path}: a latent prefix is [C, T, H, W], got {list(latent.shape)}")
        return latent
    try:
        with open(path, "rb") as f:
            data = f.read()
        video = decode_media(data, os.path.splitext(path)[1].lstrip(".").lower())
    except (OSError, BadSample) as e:
        raise ValueError(f"prefix {path}: {e}") from None
    sf = encoder.spatial_factor
    return encoder.encode(resize_crop(video, height * sf, width * sf))


# --- output -----------------------------------------------------------------------------------

class Mp4Stream:
    """Appends uint8 ``[T, H, W, 3]`` frames to an H.264 mp4 as they come (PyAV)."""

    def __init__(self, path: str, fps: int):
        import av

        self.container = av.open(path, mode="w")
        self.stream = self.container.add_stream("libx264", rate=fps)
        self.stream.pix_fmt = "yuv420p"
        self.stream.options = {"crf": "10", "preset": "veryfast"}
        self.frames = 0

    def write(self, frames: torch.Tensor) -> None:
        import av

        if self.frames == 0:
            self.stream.height, self.stream.width = int(frames.shape[1]), int(frames.shape[2])
        for frame in frames.numpy():
            self.container.mux(self.stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        self.frames += frames.shape[0]

    def close(self) -> None:
        if self.frames:
            self.container.mux(self.stream.encode())  # flush the encoder
        self.container.close()


# --- CLI --------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magitrain.generate", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="run dir, checkpoint folder or release folder")
    p.add_argument("--prompt", help="caption of every chunk the schedule does not cover")
    p.add_argument("--prompt-schedule", help="per-chunk prompts: .json or 'CHUNK: PROMPT' lines")
    p.add_argument("--chunks", type=int, required=True, help="video length in chunks (prefix included)")
    p.add_argument("--steps", type=int, help="ODE steps per chunk (default 32; a distilled checkpoint: the fewest "
                   "steps it was distilled for, e.g. 8, one pass per step)")
    p.add_argument("--window", type=int, default=4, help="chunks denoised at once; must divide --steps (default 4)")
    p.add_argument("--cfg-scale", type=float, default=1.0, help="text guidance scale (1: off)")
    p.add_argument("--history-scale", type=float, help="3-pass CFG history scale (MAGI-1: 1.5); default 2-pass")
    p.add_argument("--solver", choices=SOLVERS, default="euler")
    p.add_argument("--shift", type=float, help="timestep shift of the schedule (default 3 as MAGI-1; a distilled "
                   "checkpoint: its distillation schedule's)")
    p.add_argument("--max-context", type=int, help="finished chunks kept in the KV cache, the most recent (default: "
                   "the checkpoint's model.max_context_chunks, else all)")
    p.add_argument("--sink-chunks", type=int, help="attention sink: the first S finished chunks stay in the KV cache "
                   "besides the --max-context most recent, so memory is flat (default: the checkpoint's "
                   "model.sink_chunks, else 0); needs --max-context")
    p.add_argument("--strict-history", action="store_true", help="every window chunk too sees only the sink and its "
                   "--max-context predecessors, exactly the training mask of model.max_context_chunks (default: the "
                   "window chunks also see the whole cache; one process only)")
    p.add_argument("--context-t", type=float, help="level finished chunks are re-noised to (seeded noise) before their "
                   "K/V are cached, told t=T (default: the run's diffusion.clean_t, the chunk as is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefix", help="clean start: latent .npy [C, T, H, W], or an image / video file")
    p.add_argument("--height", type=int, help="latent height (default: the training data's)")
    p.add_argument("--width", type=int, help="latent width (default: the training data's)")
    p.add_argument("--decoder", help="patch | module:factory (default: the run's data.latent_encoder; a module "
                   "named there is imported only with --trust-config-code)")
    p.add_argument("--text-encoder", help="hash | module:factory (default: the run's data.text_encoder; a module "
                   "named there is imported only with --trust-config-code)")
    p.add_argument("--trust-config-code", action="store_true",
                   help="import the encoder modules that the checkpoint's config.yaml names")
    p.add_argument("--decoder-weights", default="", help="local weights for a custom decoder factory")
    p.add_argument("--config", help="refuse the checkpoint unless its model config equals this YAML's")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    p.add_argument("--device", default="cpu")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--out", required=True, help="output mp4; the latents go to OUT with .npy")
    p.add_argument("--contact-sheet", help="also write a PNG of every chunk's frames (one row per chunk) here")
    p.add_argument("--no-kv-cache", action="store_true",
                   help="re-encode the finished context at every evaluation instead of caching its K/V (a check)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", help="parallel.* dotlist overrides under torchrun, as in training: "
                   "parallel.tp=2 parallel.cp=2 (dp must be 1; parallel.cp_chunk_size, cp_solver, overlap_stages)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """Refuse values that would silently mean something else (0 steps, NaN scales, a folder as --out)."""
    import math

    if args.chunks < 1:
        raise ValueError(f"--chunks={args.chunks} must be >= 1")
    for flag, value in (("--steps", args.steps), ("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise ValueError(f"{flag}={value} must be >= 1")
    if args.max_context is not None and args.max_context < 0:
        raise ValueError(f"--max-context={args.max_context} must be >= 0")
    if getattr(args, "sink_chunks", None) is not None and args.sink_chunks < 0:
        raise ValueError(f"--sink-chunks={args.sink_chunks} must be >= 0")
    context_t = getattr(args, "context_t", None)
    if context_t is not None and not (math.isfinite(context_t) and 0.0 <= context_t <= 1.0):
        raise ValueError(f"--context-t={context_t} must be in [0, 1] (1: clean)")
    if args.window < 1 or args.fps < 1:
        raise ValueError(f"--window={args.window} and --fps={args.fps} must be >= 1")
    for flag, value in (("--cfg-scale", args.cfg_scale), ("--history-scale", args.history_scale),
                        ("--shift", args.shift)):
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{flag}={value} must be a finite number")
    if args.shift is not None and args.shift <= 0:
        raise ValueError(f"--shift={args.shift} must be > 0")
    if os.path.isdir(args.out):
        raise ValueError(f"--out {args.out} is a directory; give the .mp4 file to write")


def _encoder_spec(flag_value: Optional[str], config_value: str, key: str, flag: str, builtins, trusted: bool) -> str:
    """The encoder to build: the command line's, else the checkpoint config's if it is a built-in name
    or the user passed --trust-config-code (a module path in a downloaded config is code)."""
    if flag_value:
        return flag_value
    if config_value in builtins or trusted:
        return config_value
    raise ValueError(f"the checkpoint's config names {key}={config_value!r}, a module that would be imported and "
                     f"run; pass {flag} {config_value} or --trust-config-code if you trust it")


def history_window(args: argparse.Namespace, m: ModelConfig) -> tuple[Optional[int], int]:
    """``(max_context_chunks, sink_chunks)`` of the sampler: the flags where given, else the visibility the
    checkpoint was trained with (``model.max_context_chunks``, 0 = all history; ``model.sink_chunks``)."""
    max_context = args.max_context
    if max_context is None and m.max_context_chunks > 0:
        max_context = m.max_context_chunks
    sink = getattr(args, "sink_chunks", None)
    if sink is None:
        sink = m.sink_chunks
    return max_context, sink


def run(args: argparse.Namespace) -> dict:
    """Generate as ``args`` say; returns a summary (paths, chunks, frames)."""
    from tqdm import tqdm

    check_args(args)
    expected = load_config(args.config).model if args.config else None
    env = None
    if args.overrides or launched():  # torchrun: the parallel.* layout, weights loaded into its shards
        from magitrain.parallel_generate import load_parallel_model

        cfg, model, env = load_parallel_model(args.ckpt, args.overrides, prefer_ema=not args.no_ema,
                                              expected=expected)
    else:
        cfg, model = load_model(args.ckpt, prefer_ema=not args.no_ema, expected=expected, device=args.device)
    m, d = cfg.model, cfg.data
    height = args.height if args.height is not None else d.height
    width = args.width if args.width is not None else d.width
    if height % m.patch_size or width % m.patch_size:
        raise ValueError(f"--height {height} / --width {width} must be multiples of the model's patch size {m.patch_size}")
    trusted = getattr(args, "trust_config_code", False)
    decoder_spec = _encoder_spec(args.decoder, d.latent_encoder, "data.latent_encoder", "--decoder", BUILTIN_LATENT,
                                 trusted)
    text_spec = _encoder_spec(getattr(args, "text_encoder", None), d.text_encoder, "data.text_encoder",
                              "--text-encoder", BUILTIN_TEXT, trusted)
    decoder = build_latent_encoder(decoder_spec, m.in_channels, args.decoder_weights or d.latent_encoder_weights)
    text = build_text_encoder(text_spec, m.caption_channels, m.caption_max_length, d.text_encoder_weights)
    schedule = read_prompt_schedule(args.prompt_schedule) if args.prompt_schedule else {}
    emb, mask = chunk_captions(args.chunks, args.prompt, schedule, text, m)
    prefix = load_prefix(args.prefix, decoder, height, width) if args.prefix else None
    steps, shift = args.steps, args.shift
    if m.step_size_conditioning:  # shortcut + guidance distilled: its own schedule, one pass (no guidance flags)
        steps, shift = steps or min(cfg.distill.step_counts), cfg.distill.schedule_shift if shift is None else shift
    max_context, sink = history_window(args, m)
    sampler_cfg = SamplerConfig(steps=steps or 32, window=args.window, solver=args.solver,
                                shift=3.0 if shift is None else shift,
                                cfg_scale=args.cfg_scale, history_scale=args.history_scale,
                                clean_t=cfg.diffusion.clean_t, max_context_chunks=max_context, seed=args.seed,
                                kv_cache=not args.no_kv_cache, sink_chunks=sink,
                                context_t=getattr(args, "context_t", None),
                                strict_history=getattr(args, "strict_history", False))
    if env is None:
        sampler = ChunkSampler(model, emb, mask, height, width, sampler_cfg, prefix)
    else:
        from magitrain.parallel_generate import ParallelChunkSampler

        p = cfg.parallel
        sampler = ParallelChunkSampler(model, emb, mask, height, width, sampler_cfg, prefix,
                                       cp_group=env.group("cp") if env.cp > 1 else None, chunk_size=p.cp_chunk_size,
                                       solver=p.cp_solver, overlap_stages=p.overlap_stages)
    if env is not None and not env.is_main:  # every rank samples; rank 0 writes
        for _ in sampler.stream():
            pass
        return {"video": args.out, "chunks": args.chunks, "evaluations": sampler.evaluations, "writer": False}

    chunk_frames = m.chunk_frames * m.t_patch_size
    latents_path = os.path.splitext(args.out)[0] + ".npy"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    latents = np.lib.format.open_memmap(latents_path, mode="w+", dtype=np.float32,
                                        shape=(sampler.channels, args.chunks * chunk_frames, height, width))
    video = Mp4Stream(args.out, args.fps)
    sheet_rows = []
    try:
        for i, chunk in enumerate(tqdm(sampler.stream(), total=args.chunks, unit="chunk", disable=args.quiet)):
            chunk = chunk.float().cpu()
            latents[:, i * chunk_frames:(i + 1) * chunk_frames] = chunk.numpy()
            frames = decoder.decode(chunk)
            video.write(frames)
            if args.contact_sheet:
                sheet_rows.append(frames)
    finally:
        video.close()
        latents.flush()
    summary = {"video": args.out, "latents": latents_path, "chunks": args.chunks, "frames": video.frames,
               "evaluations": sampler.evaluations}
    if args.contact_sheet:
        from magitrain.contact_sheet import write_contact_sheet

        summary["contact_sheet"] = write_contact_sheet(args.contact_sheet, sheet_rows)
    return summary


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = run(args)
    except (ValueError, ConfigError, CheckpointError, OSError) as e:  # WeightsError is a ValueError
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    finally:
        import torch.distributed as dist

        if dist.is_initialized() and launched():
            dist.destroy_process_group()
    if not summary.get("writer", True):
        return 0
    print(f"wrote {summary['video']} ({summary['frames']} frames, {summary['chunks']} chunks) "
          f"and {summary['latents']}" + (f"; contact sheet {summary['contact_sheet']}" if "contact_sheet" in summary
                                         else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
