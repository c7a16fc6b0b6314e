"""Procedural, learnable video data: coloured shapes that move, with captions saying how.

Used by the tests (``data.source=synthetic``) and by the demo's media folder. The global
batch of step ``k`` depends only on ``(seed, k)``: every sample is drawn from its own
generator seeded by ``(seed, k, sample index in the global batch)``, so any data-parallel
split sees the same samples, and resuming at step ``k`` needs no state but ``k``.
"""

from __future__ import annotations

import torch

from magitrain.batch import Batch
from magitrain.config import Config
from magitrain.data_pipeline.text import HashTextEmbedder
from magitrain.layout import PackedLayout, patchify

COLORS = ["red", "green", "blue", "yellow", "white", "purple"]
SHAPES = ["square", "disk", "bar"]
MOTIONS = {"left": (0.0, -1.0), "right": (0.0, 1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}
RGB = {"red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1), "yellow": (1, 1, -1),
       "white": (1, 1, 1), "purple": (1, -1, 1)}


def color_vector(color: str, channels: int) -> torch.Tensor:
    """The colour's value per channel: RGB in [-1, 1] for 3 channels, a fixed code otherwise."""
    if channels == 3:
        return torch.tensor(RGB[color], dtype=torch.float32)
    code = torch.Generator().manual_seed(1000 + COLORS.index(color))
    return torch.randn(channels, generator=code).sign()


def render_shape_video(frames: int, height: int, width: int, channels: int, gen: torch.Generator,
                       color: str | None = None, shape: str | None = None, motion: str | None = None,
                       grows: bool | None = None, period: int | None = None,
                       start_spread: float = 0.5, steady: bool = False,
                       bar_across: bool = False) -> tuple[torch.Tensor, str]:
    """One clip ``[channels, frames, height, width]`` in [-1, 1] and its caption.

    A shape of one colour moves in one direction at a steady speed over a dark background
    (and grows or shrinks). Everything about the clip is stated in the caption, so a model
    can learn to follow it. ``color``, ``shape``, ``motion``, ``grows`` fix those choices (the
    generator draws them all the same, so the rest of the clip does not depend on what is fixed).
    ``period`` (default ``frames``): the clip length that speed and growth are defined over, so a
    longer render continues a ``period``-frame clip: the first ``period`` frames equal it, the shape
    keeps its speed after them and its size stays at the end of the range one period covers.
    ``start_spread``: the width, as a share of the frame, of the square around the frame's centre the
    shape starts in (uniformly); 0 starts every clip at the centre.
    ``steady``: the shape keeps its starting size in every frame and the caption says so ("keeping its
    size" for "growing"/"shrinking"), a caption whose meaning holds for any length; everything else,
    ``grows`` drawn included, is as without it.
    ``bar_across``: a bar lies across its motion (its long side perpendicular to it; default: always
    horizontal), so no clip shows an object stretched along the way it moves.
    """
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=gen))]  # noqa: E731
    drawn = pick(COLORS), pick(SHAPES), pick(list(MOTIONS)), bool(torch.randint(2, (1,), generator=gen))
    color, shape, motion, grows = (d if v is None else v for v, d in zip((color, shape, motion, grows), drawn))
    dy, dx = MOTIONS[motion]
    period = period or frames
    speed = max(height, width) / max(period, 1) * 0.5
    cy, cx = (torch.rand(2, generator=gen) * start_spread + (1 - start_spread) / 2).tolist()
    cy, cx = cy * height, cx * width
    size0 = max(height, width) * 0.18
    yy, xx = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    video = torch.full((channels, frames, height, width), -0.8)
    col = color_vector(color, channels)
    for f in range(frames):
        y, x = (cy + dy * speed * f) % height, (cx + dx * speed * f) % width
        trend = 0.0 if steady else 0.5 if grows else -0.4
        size = size0 * (1 + trend * min(f, period - 1) / max(period - 1, 1))
        ady, adx = (yy - y).abs(), (xx - x).abs()
        ady, adx = torch.minimum(ady, height - ady), torch.minimum(adx, width - adx)  # wrap around
        if shape == "square":
            inside = (ady <= size) & (adx <= size)
        elif shape == "disk":
            inside = ady**2 + adx**2 <= size**2
        elif bar_across and dx != 0:
            inside = (ady <= size * 1.5) & (adx <= size * 0.4)
        else:
            inside = (ady <= size * 0.4) & (adx <= size * 1.5)
        video[:, f][:, inside] = col[:, None]
    caption = f"a {color} {shape} moving {motion}, {size_phrase(None if steady else grows)}"
    return video, caption


def size_phrase(grows: bool | None) -> str:
    """The caption's size words: "growing", "shrinking", or "keeping its size" (``None``)."""
    return "keeping its size" if grows is None else "growing" if grows else "shrinking"


def steady_caption(caption: str) -> str:
    """``caption`` with its size words replaced by "keeping its size"."""
    head, sep, _ = caption.rpartition(", ")
    if not sep:
        raise ValueError(f"caption {caption!r} has no ', SIZE' ending")
    return f"{head}, {size_phrase(None)}"


class SyntheticSource:
    """Packed batches of procedural latent clips (a :class:`magitrain.batch.DataSource`)."""

    def __init__(self, cfg: Config, dp_rank: int = 0, dp_size: int = 1):
        self.cfg, self.dp_rank, self.dp_size = cfg, dp_rank, dp_size
        self.micro_step = 0  # micro-batches handed out so far
        m = cfg.model
        self.text = HashTextEmbedder(m.caption_channels, m.caption_max_length)
        self.grad_accum = cfg.train.grad_accum
        self.seqs_per_micro = cfg.data.batch_size // (dp_size * self.grad_accum)

    def _sequence(self, step: int, seq_index: int) -> Batch:
        d, m = self.cfg.data, self.cfg.model
        grid = (d.frames // m.t_patch_size, d.height // m.patch_size, d.width // m.patch_size, m.chunk_frames)
        tokens, text_emb, text_mask, captions, ids = [], [], [], [], []
        for i in range(d.samples_per_seq):
            sample_id = seq_index * d.samples_per_seq + i
            gen = torch.Generator().manual_seed(hash_seed(self.cfg.train.seed, step, sample_id))
            channels = m.in_channels // (2 if m.half_channel_vae else 1)  # half_channel_vae: the model duplicates them
            video, caption = render_shape_video(d.frames, d.height, d.width, channels, gen)
            tokens.append(patchify(video, m.t_patch_size, m.patch_size, m.patch_size))
            emb, mask = self.text.embed(caption)
            n_chunks = grid[0] // m.chunk_frames
            text_emb.append(emb.expand(n_chunks, -1, -1))
            text_mask.append(mask.expand(n_chunks, -1))
            captions.append(caption)
            ids.append(sample_id)
        layout = PackedLayout.pack([grid] * d.samples_per_seq, d.seq_tokens, sink_chunks=m.sink_chunks,
                                   max_context_chunks=m.max_context_chunks)
        x = torch.cat(tokens)
        pad = torch.zeros(d.seq_tokens - x.shape[0], *x.shape[1:])
        return Batch(torch.cat([x, pad]), layout, torch.cat(text_emb), torch.cat(text_mask), captions, ids)

    def next_batch(self) -> Batch:
        """This rank's next micro-batch: global sequences of step ``k`` split over (micro, dp)."""
        step, micro = divmod(self.micro_step, self.grad_accum)
        first = (micro * self.dp_size + self.dp_rank) * self.seqs_per_micro
        batch = Batch.concat([self._sequence(step, first + j) for j in range(self.seqs_per_micro)])
        self.micro_step += 1
        return batch

    def state_dict(self) -> dict:
        return {"micro_step": self.micro_step}

    def load_state_dict(self, state: dict) -> None:
        self.micro_step = int(state["micro_step"])

    def stats(self) -> dict:
        d = self.cfg.data
        m = self.cfg.model
        used = d.samples_per_seq * (d.frames // m.t_patch_size) * (d.height // m.patch_size) * (d.width // m.patch_size)
        return {"data_skipped": 0, "padding_frac": 1 - used / d.seq_tokens, "stage": "synthetic"}


def hash_seed(seed: int, step: int, index: int) -> int:
    """A 63-bit seed from (seed, step, index), distinct from the diffusion noise seeds."""
    return ((seed * 7_919 + 17) * 1_000_003 + step) * 999_983 + index + 0x5EED
