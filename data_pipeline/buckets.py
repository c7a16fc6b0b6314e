"""Curriculum stages and shape buckets.

A *bucket* is a latent shape ``(frames, height, width)`` (latent frames before temporal
patching, latent pixels) with a sampling weight. Every sample is cut to one bucket: latents
are cropped (never resized), raw media are resized to cover the bucket's pixel size and
centre-cropped. A sample may fit several buckets; one is drawn by weight from the sample's own
seeded RNG. A one-frame bucket holds images (and videos used as images, with probability
``image_ratio``). With no buckets a sample keeps its own size, cut to whole chunks and patches.

A cut shorter than its sample starts at a random latent frame, or at the first (``temporal_crop:
start``): a chunk-causal model reads a sample's first chunk as a video's first chunk, so data whose
captions describe the clip from its start (the demo's "growing", "shrinking") needs its cuts to start
there too.

A *stage* is one curriculum step: its buckets, token budget per packed sequence, shards, image ratio
and temporal crop, serving steps ``< until_step``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from magitrain.config import Config, ConfigError, shard_specs

TEMPORAL_CROPS = ("random", "start")


@dataclass(frozen=True)
class Bucket:
    frames: int
    height: int
    width: int
    weight: float = 1.0

    @property
    def is_image(self) -> bool:
        return self.frames == 1


@dataclass(frozen=True)
class Geometry:
    """How latents become tokens: patch sizes, chunk length (in token frames), encoder factors."""

    t_patch: int
    patch: int
    chunk_frames: int
    channels: int
    temporal_factor: int = 4
    spatial_factor: int = 8
    sink_chunks: int = 0  # the packed mask's history rule (model.sink_chunks / model.max_context_chunks)
    max_context_chunks: int = 0

    def tokens(self, frames: int, height: int, width: int) -> int:
        return frames // self.t_patch * (height // self.patch) * (width // self.patch)

    @property
    def video_frame_step(self) -> int:
        """Latent frames of one chunk: video lengths are multiples of it."""
        return self.t_patch * self.chunk_frames


@dataclass(frozen=True)
class Stage:
    index: int
    name: str
    until_step: int  # 0: no end
    seq_tokens: int
    shards: tuple[str, ...]  # the stage's shard specs (data.shards: one string or a list)
    buckets: tuple[Bucket, ...]
    image_ratio: float
    temporal_crop: str = "random"  # random | start


def _parse_bucket(raw, where: str) -> Bucket:
    if not isinstance(raw, (list, tuple)) or len(raw) not in (3, 4):
        raise ConfigError(f"{where}: a bucket is [frames, height, width] or [frames, height, width, weight], got {raw!r}")
    f, h, w = (int(x) for x in raw[:3])
    weight = float(raw[3]) if len(raw) == 4 else 1.0
    if min(f, h, w) < 1 or weight < 0:
        raise ConfigError(f"{where}: bucket {list(raw)} needs positive sizes and a weight >= 0")
    return Bucket(f, h, w, weight)


def _check_bucket(b: Bucket, geo: Geometry, seq_tokens: int, where: str) -> None:
    if b.height % geo.patch or b.width % geo.patch:
        raise ConfigError(f"{where}: bucket {b.height}x{b.width} is not a multiple of model.patch_size={geo.patch}")
    if b.is_image and geo.t_patch != 1:
        raise ConfigError(f"{where}: one-frame (image) buckets need model.t_patch_size=1")
    if not b.is_image and b.frames % geo.video_frame_step:
        raise ConfigError(f"{where}: bucket frames={b.frames} must be 1 (image) or a multiple of "
                          f"model.chunk_frames x model.t_patch_size = {geo.video_frame_step}")
    n = geo.tokens(b.frames, b.height, b.width)
    if n > seq_tokens:
        raise ConfigError(f"{where}: bucket {b.frames}x{b.height}x{b.width} has {n} tokens, more than the "
                          f"sequence budget seq_tokens={seq_tokens}")


def resolve_stages(cfg: Config, geo: Geometry) -> list[Stage]:
    """The curriculum as validated :class:`Stage` objects (one default stage when none is declared)."""
    d = cfg.data
    declared = list(d.curriculum) or [None]
    stages, prev_until = [], 0
    for i, st in enumerate(declared):
        where = f"data.curriculum[{i}]" if st is not None else "data"
        seq = (st.seq_tokens if st is not None and st.seq_tokens > 0 else d.seq_tokens)
        shards = (st.shards if st is not None and st.shards else d.shards)
        raw_buckets = (st.buckets if st is not None and st.buckets else d.buckets)
        ratio = (st.image_ratio if st is not None and st.image_ratio >= 0 else d.image_ratio)
        crop = (st.temporal_crop if st is not None and st.temporal_crop else d.temporal_crop)
        until = st.until_step if st is not None else 0
        if not shards:
            raise ConfigError(f"{where}: no shards (set data.shards or the stage's shards)")
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(f"{where}: image_ratio={ratio} must be in [0, 1]")
        if crop not in TEMPORAL_CROPS:
            raise ConfigError(f"{where}: temporal_crop={crop!r} must be one of {', '.join(TEMPORAL_CROPS)}")
        last = i == len(declared) - 1
        if (until <= prev_until and not (last and until == 0)) or until < 0:
            raise ConfigError(f"{where}: until_step={until} must increase from stage to stage "
                              f"(previous {prev_until}; only the last stage may use 0 = no end)")
        buckets = tuple(_parse_bucket(b, where) for b in raw_buckets)
        for b in buckets:
            _check_bucket(b, geo, seq, where)
        if buckets and not any(b.weight > 0 for b in buckets):
            raise ConfigError(f"{where}: every bucket has weight 0")
        stages.append(Stage(i, st.name if st is not None else "default", until, seq, tuple(shard_specs(shards)),
                            buckets, ratio, crop))
        prev_until = until
    return stages


def stage_index_at(stages: list[Stage], step: int) -> int:
    """The stage serving ``step``; after the last boundary the last stage goes on."""
    for st in stages:
        if st.until_step == 0 or step < st.until_step:
            return st.index
    return stages[-1].index


@dataclass(frozen=True)
class Cut:
    """How one sample is cut: latent shape, first latent frame, and whether it became an image."""

    frames: int
    height: int
    width: int
    start: int
    as_image: bool


def choose_cut(stage: Stage, geo: Geometry, avail: tuple[int, int, int], is_image: bool,
               can_resize: bool, rng: random.Random, seq_tokens: int) -> Cut | None:
    """Pick the bucket (or native size) for a sample with ``avail`` = (latent frames, height, width).

    ``can_resize``: raw media can be scaled to any spatial size; latents can only be cropped.
    Returns None when the sample fits no bucket (it is filtered out, not counted as bad).
    """
    frames, height, width = avail
    as_image = is_image or (stage.image_ratio > 0 and rng.random() < stage.image_ratio)
    if stage.buckets:
        fits = [b for b in stage.buckets
                if b.weight > 0 and b.is_image == as_image and b.frames <= frames
                and (can_resize or (b.height <= height and b.width <= width))]
        if not fits:
            return None
        b = rng.choices(fits, weights=[b.weight for b in fits])[0]
        f, h, w = b.frames, b.height, b.width
    else:
        h, w = height // geo.patch * geo.patch, width // geo.patch * geo.patch
        if h == 0 or w == 0:
            return None
        if as_image:
            f = 1
        else:
            per_step = geo.tokens(geo.video_frame_step, h, w)
            f = min(frames // geo.video_frame_step, seq_tokens // per_step) * geo.video_frame_step
        if f == 0 or geo.tokens(f, h, w) > seq_tokens:
            return None
    start = rng.randrange(frames - f + 1)  # drawn in either mode: the mode changes no other draw
    return Cut(f, h, w, 0 if stage.temporal_crop == "start" else start, as_image)
