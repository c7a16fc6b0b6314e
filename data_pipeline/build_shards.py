"""Build WebDataset shards from a folder of videos/images with sidecar captions.

    python -m magitrain.data_pipeline.build_shards SRC_DIR OUT_DIR [--max-shard-size 1GB]
        [--size 256x256] [--max-frames 48] [--latent-encoder patch] [--text-encoder hash] ...

Every ``*.mp4|webm|mkv|mov|avi|jpg|jpeg|png`` under SRC_DIR becomes one sample; its caption is
the ``.txt`` file with the same stem (empty when absent). Media are resized to cover ``--size``
and centre-cropped; with ``--latent-encoder`` they are encoded to ``KEY.latent.npy``, otherwise
stored as media (the original bytes when neither resized nor cut). A file that fails is
reported and skipped. Writes ``shard-NNNNNN.tar`` files and ``manifest.json`` (samples and
token counts per shard and per shape bucket). The format is described in ``shard_format``.

``--latent-encoder magi1-vae --encoder-weights DIR`` encodes with MAGI-1's own VAE (``magi1-vae-tiled``:
as MAGI-1's pipeline tiles); the shards hold ``encode(x) * 0.18215``. ``--text-encoder t5 --text-weights
DIR`` stores MAGI-1's T5 caption embeddings (see ``encoders``).

Distributed / resumable precompute (``torchrun --nproc_per_node N -m magitrain.data_pipeline.build_shards
...``, or one SLURM array task per rank with ``--rank $SLURM_ARRAY_TASK_ID --world-size
$SLURM_ARRAY_TASK_COUNT``, or ``--resumable`` in one process): the sorted media list is cut into parts of
``--part-files`` files; part ``p`` is built by rank ``p % world`` into ``shard-PPPPPP-KKK.tar`` and is done
once its record ``parts/part-PPPPPP.json`` exists (written after its shards are in place). A rerun (after a
kill, with any world size) skips done parts and rebuilds the others; whichever rank finishes last merges
the records into ``manifest.json``. ``build.json`` pins the inputs and options: a rerun with others is
refused. Sample keys are assigned over the whole list, so every world size gives the same samples.
"""

from __future__ import annotations

import argparse
import hashlib
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


def resolve_defaults(args) -> None:
    """Fill the width/length flags left unset: the built-in encoders' own sizes (idempotent)."""
    from magitrain.data_pipeline.encoders import MAGI1_VAE

    if args.latent_channels is None and args.latent_encoder not in MAGI1_VAE:
        args.latent_channels = 4
    if args.text_encoder != "t5":
        args.text_dim = 32 if args.text_dim is None else args.text_dim
    if args.text_len is None:
        args.text_len = 800 if args.text_encoder == "t5" else 8


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
    resolve_defaults(args)
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


def assign_keys(args, files: list[str]) -> list[str]:
    """Sample keys over the whole sorted list (the same in every process, whatever part it builds)."""
    used: set = set()
    return [sample_key(os.path.relpath(path, args.src), used) for path in files]


def _write_samples(builder: ShardBuilder, args, files: list[str], keys: list[str], pattern: str,
                   desc: str = "build_shards") -> dict:
    """Encode ``files`` into shards named by ``pattern``; their per-shard and per-bucket counts and skips."""
    shards: dict[str, dict] = {}
    buckets: dict[str, dict] = {}
    skipped = []
    # a fixed integer mtime: a float one (webdataset's default, the build time) costs every member a PAX
    # header that the training reader parses again on every pass (about half its tar time); the shards are
    # also byte-for-byte reproducible
    with wds.ShardWriter(pattern, maxcount=args.max_shard_samples, maxsize=args.max_shard_size,
                         encoder=False, verbose=0, mtime=0) as writer:
        for path, key in tqdm(list(zip(files, keys)), desc=desc, unit="file", disable=args.quiet):
            try:
                sample, (f, h, w) = builder.sample(path, key)
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
    return {"shards": shards, "buckets": buckets, "skipped": skipped}


def _manifest(args, records: list[dict]) -> dict:
    shards: dict[str, dict] = {}
    buckets: dict[str, dict] = {}
    skipped = []
    for rec in records:
        shards.update(rec["shards"])
        for name, b in rec["buckets"].items():
            into = buckets.setdefault(name, {"samples": 0, "tokens": 0})
            into["samples"] += b["samples"]
            into["tokens"] += b["tokens"]
        skipped += rec["skipped"]
    latent = args.latent_encoder != "none"
    return {"format": "magitrain-webdataset-1",
            "content": "latent" if latent else "media",
            "latent_dtype": args.latent_dtype if latent else None,
            "token_grid": {"patch_size": args.patch_size, "t_patch_size": args.t_patch_size,
                           "note": "buckets are latent (frames, height, width)"},
            "samples": sum(s["samples"] for s in shards.values()),
            "shards": [{"name": k, **v} for k, v in sorted(shards.items())],
            "buckets": dict(sorted(buckets.items())), "skipped": skipped}


def _write_json(path: str, obj) -> None:
    """Atomically (a reader or a kill never sees half a file)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


def _build_into(args, files: list[str], folder: str) -> dict:
    builder = ShardBuilder(args)
    record = _write_samples(builder, args, files, assign_keys(args, files), os.path.join(folder, "shard-%06d.tar"))
    manifest = _manifest(args, [record])
    _write_json(os.path.join(folder, "manifest.json"), manifest)
    return manifest


# ------------------------------------------------------------------ distributed / resumable build

BUILD_RECORD = "build.json"
PARTS_DIR = "parts"
CONTENT_ARGS = ("size", "max_frames", "latent_encoder", "latent_channels", "latent_dtype", "encoder_weights",
                "text_encoder", "text_dim", "text_len", "text_weights", "patch_size", "t_patch_size",
                "max_shard_size", "max_shard_samples", "part_files")


def world_position(args) -> tuple[int, int] | None:
    """``(rank, world)`` for a parts build: the flags (SLURM arrays), else torchrun's environment; None for
    the classic one-process build."""
    if args.rank is not None or args.world_size is not None:
        rank, world = args.rank or 0, args.world_size or 1
    elif "WORLD_SIZE" in os.environ and "RANK" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    elif args.resumable:
        rank, world = 0, 1
    else:
        return None
    if not 0 <= rank < world:
        raise BuildError(f"--rank {rank} is not in [0, --world-size {world})")
    return rank, world


def build_fingerprint(args, files: list[str]) -> dict:
    """What a part's content depends on: the media list (paths, sizes, caption sizes) and the options."""
    h = hashlib.sha256()
    for path in files:
        cap = os.path.splitext(path)[0] + ".txt"
        cap_size = os.path.getsize(cap) if os.path.exists(cap) else -1
        h.update(f"{os.path.relpath(path, args.src)}\0{os.path.getsize(path)}\0{cap_size}\n".encode())
    opts = {k: getattr(args, k) for k in CONTENT_ARGS}
    for k in ("encoder_weights", "text_weights"):
        opts[k] = os.path.abspath(opts[k]) if opts[k] else ""
    opts["size"] = list(opts["size"]) if opts["size"] else None
    return {"format": "magitrain-build-parts-1", "files": len(files), "media_sha256": h.hexdigest(), "options": opts}


def _claim_folder(args, out: str, fingerprint: dict, world: int) -> None:
    """Create ``out`` with its build record, or check that it holds this same build (to resume)."""
    record = os.path.join(out, BUILD_RECORD)
    if os.path.exists(out) and not os.path.exists(record) and os.listdir(out):
        if not (getattr(args, "overwrite", False) and world == 1):
            raise BuildError(f"{args.out} is not empty and holds no resumable build; pick a new folder"
                             + ("" if world > 1 else " or pass --overwrite"))
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, PARTS_DIR), exist_ok=True)
    tmp = f"{record}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(fingerprint, f, indent=1)
    try:
        os.link(tmp, record)  # exclusive create: the first rank's record wins, the others compare
    except FileExistsError:
        pass
    finally:
        os.unlink(tmp)
    with open(record) as f:
        held = json.load(f)
    if held != fingerprint:
        if getattr(args, "overwrite", False) and world == 1:
            shutil.rmtree(out)
            return _claim_folder(args, out, fingerprint, world)
        changed = sorted(k for k in fingerprint["options"] if held.get("options", {}).get(k) != fingerprint["options"][k])
        what = f"options {changed}" if changed else "the media files"
        raise BuildError(f"{args.out} holds a build of other inputs ({what} differ); remove it or pick a new folder")


def _part_record(out: str, part: int) -> str:
    return os.path.join(out, PARTS_DIR, f"part-{part:06d}.json")


def build_parts(args, rank: int, world: int) -> dict | None:
    """Build this rank's unfinished parts; the merged manifest if this rank saw the last part done."""
    out = os.path.abspath(args.out).rstrip(os.sep)
    files = find_media(args.src)
    if not files:
        raise BuildError(f"no media files under {args.src}")
    resolve_defaults(args)
    _claim_folder(args, out, build_fingerprint(args, files), world)
    keys = assign_keys(args, files)
    k = args.part_files
    n_parts = -(-len(files) // k)
    mine = [p for p in range(rank, n_parts, world) if not os.path.exists(_part_record(out, p))]
    if not args.quiet:
        print(f"build_shards: rank {rank}/{world}: {len(mine)} of {len(range(rank, n_parts, world))} parts to build "
              f"({n_parts} parts in all)", file=sys.stderr)
    builder = ShardBuilder(args) if mine else None
    for p in mine:
        _build_part(builder, args, out, p, files[p * k:(p + 1) * k], keys[p * k:(p + 1) * k], rank)
    records = []
    for p in range(n_parts):
        try:
            with open(_part_record(out, p)) as f:
                records.append(json.load(f))
        except FileNotFoundError:
            return None  # another rank is still building; the last one merges
    manifest = _manifest(args, records)
    _write_json(os.path.join(out, "manifest.json"), manifest)
    return manifest


def _build_part(builder: ShardBuilder, args, out: str, part: int, files: list[str], keys: list[str],
                rank: int) -> None:
    prefix = f"shard-{part:06d}-"
    for name in os.listdir(out):  # shards an interrupted run left of this part
        if name.startswith(prefix) and name.endswith(".tar"):
            os.unlink(os.path.join(out, name))
    work = os.path.join(out, ".tmp", f"part-{part:06d}")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    record = _write_samples(builder, args, files, keys, os.path.join(work, prefix + "%03d.tar"),
                            desc=f"build_shards part {part}")
    for name in record["shards"]:
        os.replace(os.path.join(work, name), os.path.join(out, name))
    shutil.rmtree(work, ignore_errors=True)
    record["built_by"] = {"rank": rank, "host": os.uname().nodename, "files": len(files)}
    _write_json(_part_record(out, part), record)  # last: the part is done once this exists


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m magitrain.data_pipeline.build_shards", description=__doc__.split("\n")[0])
    p.add_argument("src", help="folder of videos/images (+ sidecar .txt captions)")
    p.add_argument("out", help="output folder for shard-NNNNNN.tar and manifest.json")
    p.add_argument("--max-shard-size", type=parse_size, default=parse_size("1GB"), help="bytes per shard (e.g. 500MB)")
    p.add_argument("--max-shard-samples", type=int, default=100000, help="samples per shard")
    p.add_argument("--size", type=parse_hw, default=None, help="resize+centre-crop to HEIGHTxWIDTH pixels")
    p.add_argument("--max-frames", type=int, default=None, help="keep the first N frames of a video")
    p.add_argument("--latent-encoder", default="none",
                   help="none (store media) | patch | magi1-vae | magi1-vae-tiled | module.path:factory")
    p.add_argument("--latent-channels", type=int, default=None,
                   help="latent channels (default: 4 for patch, the VAE's own for magi1-vae)")
    p.add_argument("--latent-dtype", choices=fmt.LATENT_DTYPES, default="float16")
    p.add_argument("--encoder-weights", default="",
                   help="local weights: MAGI-1's VAE folder for magi1-vae, or a custom encoder's")
    p.add_argument("--text-encoder", default="none", help="none (captions only) | hash | t5 | module.path:factory")
    p.add_argument("--text-dim", type=int, default=None, help="embedding width (default: 32 for hash, T5's own for t5)")
    p.add_argument("--text-len", type=int, default=None, help="tokens per caption (default: 8 for hash, 800 for t5)")
    p.add_argument("--text-weights", default="", help="local folder: MAGI-1's T5 (t5-v1_1-xxl) for t5")
    p.add_argument("--patch-size", type=int, default=2, help="for the manifest's token counts")
    p.add_argument("--t-patch-size", type=int, default=1, help="for the manifest's token counts")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace the shard set already in OUT (as a whole)")
    p.add_argument("--part-files", type=int, default=64, help="media files per resumable part (parts builds)")
    p.add_argument("--rank", type=int, default=None, help="this process's rank (SLURM arrays: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--world-size", type=int, default=None, help="processes in all ($SLURM_ARRAY_TASK_COUNT)")
    p.add_argument("--resumable", action="store_true", help="one process, but as a resumable parts build")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.latent_encoder == "none" and args.latent_dtype != "float16":
        print("build_shards: --latent-dtype needs --latent-encoder", file=sys.stderr)
        return 2
    if args.part_files < 1:
        print("error: build_shards: --part-files must be >= 1", file=sys.stderr)
        return 2
    try:
        position = world_position(args)
        if position is None:
            manifest = build(args)
        else:
            manifest = build_parts(args, *position)
            if manifest is None:
                print(f"build_shards: rank {position[0]} done; the last rank to finish writes the manifest")
                return 0
    except (ValueError, OSError) as e:  # BuildError, a missing/unloadable encoder folder, a bad option
        print(f"error: build_shards: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(f"build_shards: {manifest['samples']} samples in {len(manifest['shards'])} shards, "
          f"{len(manifest['skipped'])} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
