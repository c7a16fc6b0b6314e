"""Build WebDataset shards from a folder of videos/images with sidecar captions.

    python -m magitrain.data_pipeline.build_shards SRC_DIR OUT_DIR [--max-shard-size 1GB]
        [--size 256x256] [--max-frames 48] [--latent-encoder patch] [--text-encoder hash] ...

Every ``*.mp4|webm|mkv|mov|avi|jpg|jpeg|png`` under SRC_DIR becomes one sample; its caption is
the ``.txt`` file with the same stem (empty when absent). Media are resized to cover ``--size``
and centre-cropped; with ``--latent-encoder`` they are encoded to ``KEY.latent.npy``, otherwise
stored as media (the original bytes when neither resized nor cut). A file that fails is
reported and skipped. Writes ``shard-NNNNNN.tar`` files and ``manifest.json`` (samples and
token counts per shard and per shape bucket). The format is described in ``shard_format``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

import numpy as np
import torch
import webdataset as wds
from magitrain.data_pipeline import shard_format as fmt
from magitrain.data_pipeline.encoders import build_latent_encoder, build_text_encoder
from magitrain.data_pipeline.media import decode_image, decode_video, encode_mp4, probe_video, resize_crop
from tqdm import tqdm

SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "K": 10**3, "M": 10**6, "G": 10**9}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMG]?B?)\s*", text.upper())
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 500MB, 2GB, 1000000)")
    return int(float(m.group(1)) * SIZE_UNITS[m.group(2)])


def parse_hw(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"not HEIGHTxWIDTH: {text!r}")
    return int(m.group(1)), int(m.group(2))


def find_media(src: str) -> list[str]:
    out = []
    for root, _, files in os.walk(src):
        out += [os.path.join(root, f) for f in files if f.rsplit(".", 1)[-1].lower() in fmt.MEDIA_EXTS]
    return sorted(out)


def sample_key(rel: str, used: set) -> str:
    """A tar-safe key (no dots: webdataset splits the extension at the first dot)."""
    base = re.sub(r"[^A-Za-z0-9_-]", "_", os.path.splitext(rel)[0])
    key, i = base, 1
    while key in used:
        key, i = f"{base}_{i}", i + 1
    used.add(key)
    return key


class ShardBuilder:
    def __init__(self, args):
        self.args = args
        self.latent_encoder = (None if args.latent_encoder == "none" else
                               build_latent_encoder(args.latent_encoder, args.latent_channels, args.encoder_weights))
        self.text_encoder = (None if args.text_encoder == "none" else
                             build_text_encoder(args.text_encoder, args.text_dim, args.text_len, args.text_weights))

    def sample(self, path: str, key: str) -> tuple[dict, tuple[int, int, int]]:
        """The shard entries for one media file, and its token-grid shape ``(frames, h, w)`` in latents."""
        a, enc = self.args, self.latent_encoder
        ext = path.rsplit(".", 1)[-1].lower()
        ext = "jpg" if ext == "jpeg" else ext
        is_image = ext in fmt.IMAGE_EXTS
        with open(path, "rb") as f:
            data = f.read()
        cap_path = os.path.splitext(path)[0] + ".txt"
        caption = ""
        if os.path.exists(cap_path):
            with open(cap_path, encoding="utf-8") as f:
                caption = f.read().strip()
        meta = {"kind": "image" if is_image else "video", "source": os.path.relpath(path, a.src)}
        video = decode_image(data) if is_image else decode_video(data, a.max_frames)
        fps = 0.0 if is_image else probe_video(data)["fps"]
        changed = a.size is not None or (not is_image and a.max_frames is not None)
        if a.size is not None:
            video = resize_crop(video, *a.size)
        elif enc is not None:  # crop to whole latent pixels
            sf = enc.spatial_factor
            h, w = video.shape[1] // sf * sf, video.shape[2] // sf * sf
            if (h, w) != tuple(video.shape[1:3]):
                video = resize_crop(video, h, w)
        meta.update(frames=int(video.shape[0]), fps=fps, height=int(video.shape[1]), width=int(video.shape[2]))
        out = {"__key__": key, fmt.CAPTION: caption.encode("utf-8")}
        if enc is not None:
            latent = enc.encode(video)
            meta.update(latent_dtype=a.latent_dtype, latent_shape=list(latent.shape))
            out[fmt.LATENT] = fmt.latent_to_npy(latent, a.latent_dtype)
            shape = tuple(latent.shape[1:])
        else:
            if changed:
                ext, data = ("png", _png(video)) if is_image else ("mp4", encode_mp4(video, fps=round(fps) or 8))
            out[ext] = data
            shape = (1 if is_image else video.shape[0] // 4, video.shape[1] // 8, video.shape[2] // 8)
        if self.text_encoder is not None:
            emb, mask = self.text_encoder.embed(caption)
            out[fmt.TEXT_EMB] = fmt.npy_bytes(emb[mask].numpy().astype(np.float16))
        out[fmt.META] = json.dumps(meta).encode("utf-8")
        return out, shape


def _png(video: torch.Tensor) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(video[0].numpy()).save(buf, format="PNG")
    return buf.getvalue()


class BuildError(ValueError):
    """The build cannot start (no media, an output folder that already holds files)."""


def build(args) -> dict:
    """Write the shard set into a fresh temporary sibling of ``args.out`` and move it into place when
    complete: ``args.out`` must be empty or absent, or ``--overwrite`` replaces the old set as a whole
    (no stale ``shard-*.tar`` of an earlier build can survive next to the new manifest)."""
    out = os.path.abspath(args.out).rstrip(os.sep)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)) and not getattr(args, "overwrite", False):
        raise BuildError(f"{args.out} is not empty; pass --overwrite to replace its shard set, or pick a new folder")
    files = find_media(args.src)
    if not files:
        raise BuildError(f"no media files under {args.src}")
    tmp = f"{out}.tmp-build-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        manifest = _build_into(args, files, tmp)
        old = f"{out}.old-{os.getpid()}"
        if os.path.exists(out):
            os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _build_into(args, files: list[str], folder: str) -> dict:
    builder = ShardBuilder(args)
    shards: dict[str, dict] = {}
    buckets: dict[str, dict] = {}
    skipped, used = [], set()
    pattern = os.path.join(folder, "shard-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=args.max_shard_samples, maxsize=args.max_shard_size,
                         encoder=False, verbose=0) as writer:
        for path in tqdm(files, desc="build_shards", unit="file", disable=args.quiet):
            try:
                sample, (f, h, w) = builder.sample(path, sample_key(os.path.relpath(path, args.src), used))
            except Exception as e:  # one bad file never aborts the build  # noqa: BLE001
                print(f"build_shards: skipped {path}: {type(e).__name__}: {e}", file=sys.stderr)
                skipped.append({"file": os.path.relpath(path, args.src), "error": f"{type(e).__name__}: {e}"})
                continue
            writer.write(sample)
            tokens = f // args.t_patch_size * (h // args.patch_size) * (w // args.patch_size)
            entry = shards.setdefault(os.path.basename(writer.fname), {"samples": 0, "tokens": 0})
            entry["samples"] += 1
            entry["tokens"] += tokens
            bucket = buckets.setdefault(f"{f}x{h}x{w}", {"samples": 0, "tokens": 0})
            bucket["samples"] += 1
            bucket["tokens"] += tokens
    manifest = {"format": "magitrain-webdataset-1",
                "content": "latent" if builder.latent_encoder is not None else "media",
                "latent_dtype": args.latent_dtype if builder.latent_encoder is not None else None,
                "token_grid": {"patch_size": args.patch_size, "t_patch_size": args.t_patch_size,
                               "note": "buckets are latent (frames, height, width)"},
                "samples": sum(s["samples"] for s in shards.values()),
                "shards": [{"name": k, **v} for k, v in sorted(shards.items())],
                "buckets": dict(sorted(buckets.items())), "skipped": skipped}
    with open(os.path.join(folder, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magitrain.data_pipeline.build_shards", description=__doc__.split("\n")[0])
    p.add_argument("src", help="folder of videos/images (+ sidecar .txt captions)")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("1GB"), help="bytes per shard (e.g. 500MB)")
    p.add_argument("--max-shard-samples", type=int, default=100000, help="samples per shard")
    p.add_argument("--size", type=parse_hw, default=None, help="resize+centre-crop to HEIGHTxWIDTH pixels")
    p.add_argument("--max-frames", type=int, default=None, help="keep the first N frames of a video")
    p.add_argument("--latent-encoder", default="none", help="none (store media) | patch | module.path:factory")
    p.add_argument("--latent-channels", type=int, default=4)
    p.add_argument("--latent-dtype", choices=fmt.LATENT_DTYPES, default="float16")
    p.add_argument("--encoder-weights", default="", help="local weights for a custom latent encoder")
    p.add_argument("--text-encoder", default="none", help="none (captions only) | hash | module.path:factory")
    p.add_argument("--text-dim", type=int, default=32)
    p.add_argument("--text-len", type=int, default=8)
    p.add_argument("--text-weights", default="")
    p.add_argument("--patch-size", type=int, default=2, help="for the manifest's token counts")
    p.add_argument("--t-patch-size", type=int, default=1, help="for the manifest's token counts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace the shard set already in OUT (as a whole)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.latent_encoder == "none" and args.latent_dtype != "float16":
        print("build_shards: --latent-dtype needs --latent-encoder", file=sys.stderr)
        return 2
    try:
        manifest = build(args)
    except (BuildError, OSError) as e:
        print(f"error: build_shards: {e}", file=sys.stderr)
        return 2
    print(f"build_shards: {manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['skipped'])} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
