"""Does a video do what its caption says? A segmenter and scorer for the procedural shape domain.

The demo's clips (:func:`magitrain.synthetic.render_shape_video`) show one shape of one colour on a
flat dark background, moving in one direction at a steady speed (wrapping around the frame edges)
while it grows or shrinks; the caption ``"a {colour} {shape} moving {direction}, {growing|shrinking}"``
states all of it. This module reads those facts back from decoded frames, so a generated video can
be scored against its caption, per caption field:

- **object present** (per frame): the frame has a flat background (the median colour; at most
  ``MAX_CLUTTER`` of the pixels away from it outside the object) and exactly one compact object:
  the largest 4-connected (wrap-around) component of off-background pixels holds at least
  ``MIN_OBJECT_SHARE`` of them, covers ``MIN_AREA``..``MAX_AREA_FRAC`` of the frame, and is compact
  (its second moment over area^2 is at most ``MAX_SPREAD``; a bar scores 0.33, a square 0.17) and
  does not wrap around the frame (a component in every column or every row is a band, with no
  position to move: the widest shape the renderer draws, a grown bar, spans 52 of 64 columns).
- **colour** (per frame): the object's mean offset from the background points to the caption's
  palette colour (cosine at least ``MIN_COLOUR_COS``; the palette's directions are at most 0.77
  apart). A frame with no object counts as wrong.
- **motion** (per window of frames): the summed frame-to-frame displacement of the object's
  circular (wrap-around) centroid points the caption's way along its dominant axis, by at least
  ``MIN_MOTION_PX``. Windows with fewer than two object frames count as wrong.
- **size trend** (per window): the object's area at the window's end over its start is > 1 for
  "growing", < 1 for "shrinking", within ``STEADY_TOL`` of 1 for "keeping its size".

Every figure is a share in [0, 1]. Scores are computed on RGB frames ``uint8 [T, H, W, 3]`` (what a
user sees), so they apply to any decoder; windows default to one latent chunk of frames.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from magitrain.synthetic import RGB

CAPTION_RE = re.compile(r"^a (\w+) (\w+) moving (left|right|up|down), (growing|shrinking|keeping its size)$")

FG_DIST = 0.4  # |pixel - background| (RGB in [-1, 1], L2) above which a pixel is off-background
DILATE_PX = 4  # the object's region: its component grown by this much (its faint, blended edge)
MIN_OBJECT_SHARE = 0.85  # the object's share of all off-background pixels
MAX_CLUTTER = 0.03  # share of the frame off-background outside the object
MIN_AREA = 12  # pixels
MAX_AREA_FRAC = 0.6  # of the frame
MAX_SPREAD = 0.5  # second moment / area^2 (a disk 0.16, a square 0.17, a bar 0.33)
MIN_COLOUR_COS = 0.9  # cosine of the object's offset from the background to its palette colour's
MIN_MOTION_PX = 1.0  # net displacement over a window, pixels
STEADY_TOL = 0.1  # "keeping its size": |area at a window's end / at its start - 1| at most this (8 frames of
#   the demo's growing clips, decoded: +8-36%, of its shrinking ones: -16-22%; a steady one: 0)


@dataclass
class Caption:
    colour: str
    shape: str
    direction: str
    growing: bool | None  # None: "keeping its size"

    @classmethod
    def parse(cls, text: str) -> "Caption":
        m = CAPTION_RE.match(text.strip())
        if not m or m.group(1) not in RGB:
            raise ValueError(f"caption {text!r} is not of the form "
                             "'a COLOUR SHAPE moving DIRECTION, growing|shrinking|keeping its size'")
        return cls(m.group(1), m.group(2), m.group(3), {"growing": True, "shrinking": False}.get(m.group(4)))


@dataclass
class FrameReading:
    """What one frame shows: ``present``; the object's colour name and the cosine of its offset from
    the background to that palette colour's; its area (alpha-weighted pixels), wrap-around
    centroid (y, x) and elongation: the log of its second moment along y over that along x (0 for a
    square or a disk; a bar lying flat -2.5 sharp, -1.6 through the PatchEncoder round trip)."""

    present: bool
    colour: Optional[str] = None
    colour_cos: float = 0.0
    area: float = 0.0
    centroid: tuple[float, float] = (math.nan, math.nan)
    elongation: float = 0.0


def _components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """4-connected components of ``mask [H, W]`` on a torus (the domain wraps); labels 1..n."""
    h, w = mask.shape
    labels = np.zeros((h, w), dtype=np.int32)
    n = 0
    for y0, x0 in zip(*np.nonzero(mask)):
        if labels[y0, x0]:
            continue
        n += 1
        labels[y0, x0] = n
        stack = [(y0, x0)]
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y - 1) % h, x), ((y + 1) % h, x), (y, (x - 1) % w), (y, (x + 1) % w):
                if mask[yy, xx] and not labels[yy, xx]:
                    labels[yy, xx] = n
                    stack.append((yy, xx))
    return labels, n


def _circular_mean(coords: np.ndarray, weights: np.ndarray, size: int) -> float:
    """Weighted mean of positions on a circle of ``size`` pixels (the domain wraps)."""
    ang = 2 * math.pi * (coords + 0.5) / size
    c, s = (weights * np.cos(ang)).sum(), (weights * np.sin(ang)).sum()
    return (math.atan2(s, c) % (2 * math.pi)) * size / (2 * math.pi) - 0.5


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """``mask`` grown by ``steps`` pixels (4-neighbourhood, wrapping)."""
    out = mask.copy()
    for _ in range(steps):
        out = out | np.roll(out, 1, 0) | np.roll(out, -1, 0) | np.roll(out, 1, 1) | np.roll(out, -1, 1)
    return out


def read_frame(frame: np.ndarray) -> FrameReading:
    """Segment one RGB frame ``uint8 [H, W, 3]``.

    A pixel is modelled as a blend ``alpha * colour + (1 - alpha) * background`` (what a decoder's
    block averaging or blur makes of the shape's edge): the object's colour is the palette colour
    whose direction from the background best matches the object's mean offset (cosine), and its
    area, centroid and spread are weighted by ``alpha``. Block averaging preserves the alpha mass and
    its centre, so the readings hold for a coarse decoder as for the renderer's sharp frames.
    """
    rgb = frame.astype(np.float32) / 127.5 - 1.0
    h, w, _ = rgb.shape
    background = np.median(rgb.reshape(-1, 3), axis=0)
    offset = rgb - background
    off = np.linalg.norm(offset, axis=-1) > FG_DIST
    total = int(off.sum())
    if total < MIN_AREA:
        return FrameReading(False)
    labels, n = _components(off)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    inside = labels == int(sizes.argmax()) + 1
    core_share = float(sizes.max()) / total
    names = list(RGB)
    directions = np.array([RGB[c] for c in names], dtype=np.float32) - background  # [6, 3]
    mean_offset = offset[inside].mean(0)
    cos = directions @ mean_offset / (np.linalg.norm(directions, axis=1) * np.linalg.norm(mean_offset) + 1e-9)
    best = int(cos.argmax())
    region = _dilate(inside, DILATE_PX) & ~(off & ~inside)  # the object and its faint edge, not other blobs
    d = directions[best]
    alpha = np.clip(offset @ d / float(d @ d), 0.0, 1.0) * region
    area = float(alpha.sum())
    if area < MIN_AREA:
        return FrameReading(False)
    ys, xs = np.nonzero(region)
    wts = alpha[ys, xs]
    cy, cx = _circular_mean(ys, wts, h), _circular_mean(xs, wts, w)
    dy = (ys - cy + h / 2) % h - h / 2
    dx = (xs - cx + w / 2) % w - w / 2
    spread = float((wts * (dy**2 + dx**2)).sum() / area**2)
    elongation = math.log((float((wts * dy**2).sum()) + 1e-6) / (float((wts * dx**2).sum()) + 1e-6))
    clutter = float((off & ~region).sum()) / (h * w)
    band = bool(inside.any(axis=0).all() or inside.any(axis=1).all())
    present = (area <= MAX_AREA_FRAC * h * w and core_share >= MIN_OBJECT_SHARE and clutter <= MAX_CLUTTER
               and spread <= MAX_SPREAD and not band)
    return FrameReading(bool(present), names[best], float(cos[best]), area, (cy, cx), elongation)


@dataclass
class CaptionScore:
    """Shares in [0, 1] (see the module doc); ``frames`` and ``windows`` scored."""

    object_present: float
    colour: float
    motion: float
    size_trend: float
    frames: int
    windows: int

    def passes(self, present: float = 0.9, colour: float = 0.9, motion: float = 0.75, size: float = 0.65) -> bool:
        return (self.object_present >= present and self.colour >= colour and self.motion >= motion
                and self.size_trend >= size)

    def __str__(self) -> str:
        return (f"object present {self.object_present:.0%}, colour {self.colour:.0%}, motion {self.motion:.0%}, "
                f"size trend {self.size_trend:.0%} ({self.frames} frames, {self.windows} windows)")

    def as_dict(self) -> dict:
        return asdict(self)


def _window_motion(readings: Sequence[FrameReading], h: int, w: int) -> Optional[tuple[float, float]]:
    """Net (dy, dx) of the object's centroid over consecutive present frames; None with < 2."""
    pts = [r.centroid for r in readings if r.present]
    if len(pts) < 2:
        return None
    dy = dx = 0.0
    for (y0, x0), (y1, x1) in zip(pts[:-1], pts[1:]):
        dy += (y1 - y0 + h / 2) % h - h / 2
        dx += (x1 - x0 + w / 2) % w - w / 2
    return dy, dx


def direction_of(dy: float, dx: float) -> Optional[str]:
    """The caption word for a displacement along its dominant axis; None when under MIN_MOTION_PX."""
    if max(abs(dy), abs(dx)) < MIN_MOTION_PX:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def windows_of(frames: int, window: int) -> list[tuple[int, int]]:
    """``[start, end]`` frame index pairs (inclusive) of consecutive windows sharing their boundary
    frame, so motion across a window boundary is counted once."""
    out, start = [], 0
    while start + 1 < frames:
        end = min(start + window, frames - 1)
        out.append((start, end))
        start = end
    return out


def size_follows(start: float, end: float, growing: bool | None) -> bool:
    """Does an area going from ``start`` to ``end`` follow the caption's size words?"""
    if growing is None:
        return abs(end / start - 1) <= STEADY_TOL
    return end != start and (end > start) == growing


def score_video(frames: torch.Tensor | np.ndarray, caption: str, window: int = 8) -> CaptionScore:
    """Score ``frames uint8 [T, H, W, 3]`` against ``caption`` (windows of ``window`` frames)."""
    frames = frames.numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"want uint8 frames [T, H, W, 3], got {frames.dtype} {list(frames.shape)}")
    _, h, w, _ = frames.shape
    return score_readings([read_frame(f) for f in frames], caption, h, w, window)


def score_readings(readings: Sequence[FrameReading], caption: str, h: int, w: int, window: int = 8) -> CaptionScore:
    """:func:`score_video` of frames already read (``read_frame``; ``h`` x ``w`` pixels)."""
    cap = Caption.parse(caption)
    t = len(readings)
    present = [r.present for r in readings]
    colour_ok = [r.present and r.colour == cap.colour and r.colour_cos >= MIN_COLOUR_COS for r in readings]
    wins = windows_of(t, window)
    motion_ok, size_ok = [], []
    for a, b in wins:
        part = readings[a:b + 1]
        mv = _window_motion(part, h, w)
        motion_ok.append(mv is not None and direction_of(*mv) == cap.direction)
        areas = [r.area for r in part if r.present]
        size_ok.append(len(areas) >= 2 and size_follows(areas[0], areas[-1], cap.growing))
    share = lambda xs: float(np.mean(xs)) if len(xs) else 0.0  # noqa: E731
    return CaptionScore(share(present), share(colour_ok), share(motion_ok), share(size_ok), t, len(wins))


def mean_score(scores: Sequence[CaptionScore]) -> CaptionScore:
    """Field-wise mean over videos (each video weighs the same)."""
    if not scores:
        raise ValueError("no scores to average")
    f = lambda name: float(np.mean([getattr(s, name) for s in scores]))  # noqa: E731
    return CaptionScore(f("object_present"), f("colour"), f("motion"), f("size_trend"),
                        sum(s.frames for s in scores), sum(s.windows for s in scores))
