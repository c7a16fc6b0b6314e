"""A PNG contact sheet of a streamed video: one row per chunk, its frames left to right.

So a user can look at what a model generated without a video player (and a reviewer can open
it next to the mp4). Frames are ``uint8 [T, H, W, 3]``; rows are separated by a grey line and
the sheet is scaled up ``scale`` times with nearest-neighbour (small latents stay crisp).
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

SEPARATOR = 128  # grey between frames and rows


def contact_sheet(chunks: Sequence[torch.Tensor | np.ndarray], scale: int = 2, gap: int = 2,
                  max_columns: int = 16) -> np.ndarray:
    """``uint8 [rows * (H + gap), cols * (W + gap), 3]``: each chunk's frames in a row (at most
    ``max_columns`` evenly spaced frames per row), scaled by ``scale``."""
    if not chunks:
        raise ValueError("a contact sheet needs at least one chunk of frames")
    rows = [np.asarray(c.numpy() if isinstance(c, torch.Tensor) else c) for c in chunks]
    for r in rows:
        if r.ndim != 4 or r.shape[-1] != 3 or r.dtype != np.uint8:
            raise ValueError(f"want uint8 frames [T, H, W, 3] per chunk, got {r.dtype} {list(r.shape)}")
    h, w = rows[0].shape[1:3]
    cols = min(max(r.shape[0] for r in rows), max_columns)
    sheet = np.full((len(rows) * (h + gap), cols * (w + gap), 3), SEPARATOR, dtype=np.uint8)
    for i, r in enumerate(rows):
        pick = np.linspace(0, r.shape[0] - 1, min(cols, r.shape[0])).round().astype(int)
        for j, f in enumerate(r[pick]):
            sheet[i * (h + gap):i * (h + gap) + h, j * (w + gap):j * (w + gap) + w] = f
    return sheet.repeat(scale, 0).repeat(scale, 1)


def write_contact_sheet(path: str, chunks: Sequence[torch.Tensor | np.ndarray], **kwargs) -> str:
    """Save :func:`contact_sheet` of ``chunks`` as a PNG at ``path``; returns the path."""
    from PIL import Image

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(contact_sheet(chunks, **kwargs)).save(path)
    return path
