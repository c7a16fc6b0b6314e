"""The shard format: what one sample of a magitrain WebDataset shard holds, and safe codecs.

A shard is a plain tar file; the files of one sample share a key (``KEY.ext``):

- ``KEY.latent.npy``: the latent ``[C, T, H, W]`` (float16 npy; or a uint16 npy holding the bits of
  bfloat16 with ``"latent_dtype": "bfloat16"`` in ``KEY.json``, since numpy has no bfloat16), or
  raw media instead: ``KEY.mp4`` (any container PyAV decodes) / ``KEY.jpg`` / ``KEY.png``;
- ``KEY.txt``: the caption (UTF-8);
- ``KEY.text_emb.npy`` (optional): precomputed caption embedding ``[L, D]`` (valid rows only);
- ``KEY.json``: metadata ``{"kind": "video"|"image", "frames", "fps", "height", "width",
  "source", "latent_dtype"?, "latent_shape"?}`` (frames/height/width of the media in pixels).

Decoding never unpickles: npy goes through ``np.load(..., allow_pickle=False)``, json and text
through their own parsers, media through PyAV / Pillow. Any problem with one sample raises
:class:`BadSample` (the reader logs, counts and skips it).
"""

from __future__ import annotations

import io
import json

import numpy as np
import torch

LATENT = "latent.npy"
TEXT_EMB = "text_emb.npy"
CAPTION = "txt"
META = "json"
VIDEO_EXTS = ("mp4", "webm", "mkv", "mov", "avi")
IMAGE_EXTS = ("jpg", "jpeg", "png")
MEDIA_EXTS = VIDEO_EXTS + IMAGE_EXTS
LATENT_DTYPES = ("float16", "bfloat16")


class BadSample(Exception):
    """One sample cannot be used (missing field, corrupt payload); the reader skips it."""


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def load_npy(data: bytes, what: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # numpy raises ValueError/OSError/EOFError on corrupt payloads  # noqa: BLE001
        raise BadSample(f"corrupt {what}: {type(e).__name__}: {e}") from None


def latent_to_npy(latent: torch.Tensor, dtype: str) -> bytes:
    """``[C, T, H, W]`` tensor -> npy bytes in the shard dtype (``float16`` or ``bfloat16`` bits)."""
    if dtype == "float16":
        return npy_bytes(latent.to(torch.float16).numpy())
    if dtype == "bfloat16":
        return npy_bytes(latent.to(torch.bfloat16).view(torch.uint16).numpy())
    raise ValueError(f"latent dtype must be one of {LATENT_DTYPES}, got {dtype!r}")


def latent_from_npy(data: bytes, dtype: str) -> torch.Tensor:
    """Inverse of :func:`latent_to_npy`: returns the ``[C, T, H, W]`` latent as float32."""
    arr = load_npy(data, LATENT)
    if arr.ndim != 4:
        raise BadSample(f"{LATENT} must be [C, T, H, W], got shape {list(arr.shape)}")
    if dtype == "bfloat16":
        if arr.dtype != np.uint16:
            raise BadSample(f"bfloat16 latents are stored as uint16 bits, got {arr.dtype}")
        return torch.from_numpy(arr.astype(np.uint16)).view(torch.bfloat16).float()
    if dtype != "float16" or arr.dtype not in (np.float16, np.float32):
        raise BadSample(f"latent dtype {dtype!r} with npy dtype {arr.dtype} is not a supported combination")
    return torch.from_numpy(arr.astype(np.float32))


def load_json(data: bytes) -> dict:
    try:
        meta = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadSample(f"corrupt {META}: {e}") from None
    if not isinstance(meta, dict):
        raise BadSample(f"{META} must hold an object, got {type(meta).__name__}")
    return meta


def load_text(data: bytes) -> str:
    try:
        return data.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise BadSample(f"caption is not UTF-8: {e}") from None


def media_field(sample: dict) -> str | None:
    """The raw-media extension present in a sample, if any."""
    return next((ext for ext in MEDIA_EXTS if ext in sample), None)


def check_fields(sample: dict) -> None:
    """Raise :class:`BadSample` naming the first required field a raw sample lacks."""
    if LATENT not in sample and media_field(sample) is None:
        raise BadSample(f"missing field: neither {LATENT} nor media ({'/'.join(MEDIA_EXTS)})")
    if META not in sample:
        raise BadSample(f"missing field: {META}")
    if CAPTION not in sample and TEXT_EMB not in sample:
        raise BadSample(f"missing field: {CAPTION} (or {TEXT_EMB})")
