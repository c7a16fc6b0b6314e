"""PackedLayout: the one description of what a packed token sequence holds.

A training step feeds the model one (or a few) packed sequences. Each holds several samples
(videos, or images as one-frame videos) of possibly different sizes, laid end to end as
patch tokens, followed by padding up to a fixed length. Everything position-dependent is
derived from the layout: the block-causal self-attention mask (as slices), RoPE positions,
the per-token chunk index (which selects each token's timestep condition and caption), the
loss mask, and later the context-parallel dispatch.

Token order inside a sample is frame-major, then patch row, then patch column (MAGI-1's
order): token ``f * (h * w) + r * w + c``. A sample of ``frames`` latent frames (after
temporal patching) is cut into chunks of ``chunk_frames`` frames; a chunk is the unit of
noise level, caption and causality. Chunks are numbered globally across the layout in sample
order: ``chunk_id`` indexes per-chunk tensors such as ``t`` and captions.

The layout also carries the visibility rule of its mask: by default MAGI-1's (a chunk sees
every earlier chunk of its sample); a layout packed with ``sink_chunks = S`` and
``max_context_chunks = K > 0`` lets chunk ``c`` see only chunks ``[0, S)`` and ``[c - K, c]``
of its sample, what a KV cache with an attention sink and a rolling window holds at
inference (training sets it from ``model.sink_chunks`` / ``model.max_context_chunks``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from magitrain.parallel.mask import AttnRange, AttnSlice, AttnSlices


@dataclass(frozen=True)
class SampleSpan:
    """One sample inside a packed sequence.

    ``offset``: first token. ``frames``, ``height``, ``width``: the token grid (latent frames
    after temporal patching, patch rows, patch columns). ``chunk_frames``: frames per chunk;
    ``frames`` must be a multiple of it. ``frame_offset``: RoPE time position of the first
    frame (non-zero when the sample continues frames held in a KV cache).
    """

    offset: int
    frames: int
    height: int
    width: int
    chunk_frames: int
    frame_offset: int = 0

    def __post_init__(self):
        for name in ("frames", "height", "width", "chunk_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"SampleSpan.{name} must be >= 1, got {getattr(self, name)}")
        if self.frames % self.chunk_frames:
            raise ValueError(f"a sample of {self.frames} frames cannot be cut into chunks of {self.chunk_frames}")

    @property
    def frame_tokens(self) -> int:
        return self.height * self.width

    @property
    def chunk_tokens(self) -> int:
        return self.chunk_frames * self.frame_tokens

    @property
    def num_chunks(self) -> int:
        return self.frames // self.chunk_frames

    @property
    def num_tokens(self) -> int:
        return self.frames * self.frame_tokens

    @property
    def end(self) -> int:
        return self.offset + self.num_tokens


@dataclass(frozen=True)
class PackedLayout:
    """Samples packed end to end in a sequence of ``total_tokens`` (the tail is padding).

    ``sink_chunks``, ``max_context_chunks``: the mask's history rule (0, 0: all history)."""

    samples: tuple[SampleSpan, ...]
    total_tokens: int
    sink_chunks: int = 0
    max_context_chunks: int = 0

    def __post_init__(self):
        object.__setattr__(self, "samples", tuple(self.samples))
        if self.sink_chunks < 0 or self.max_context_chunks < 0 or (self.sink_chunks and not self.max_context_chunks):
            raise ValueError(f"sink_chunks={self.sink_chunks}, max_context_chunks={self.max_context_chunks}: both "
                             "must be >= 0, and a sink needs max_context_chunks > 0")
        pos = 0
        for s in self.samples:
            if s.offset != pos:
                raise ValueError(f"samples must be contiguous: expected offset {pos}, got {s.offset}")
            pos = s.end
        if self.total_tokens < pos:
            raise ValueError(f"total_tokens={self.total_tokens} is less than the {pos} sample tokens")

    @classmethod
    def pack(cls, grids: Sequence[tuple[int, int, int, int]], total_tokens: int | None = None,
             frame_offsets: Sequence[int] | None = None, sink_chunks: int = 0,
             max_context_chunks: int = 0) -> "PackedLayout":
        """Lay out samples given as ``(frames, height, width, chunk_frames)`` end to end."""
        spans, offset = [], 0
        for i, (f, h, w, cf) in enumerate(grids):
            fo = 0 if frame_offsets is None else frame_offsets[i]
            spans.append(SampleSpan(offset, f, h, w, cf, fo))
            offset = spans[-1].end
        return cls(tuple(spans), offset if total_tokens is None else total_tokens, sink_chunks, max_context_chunks)

    @property
    def num_sample_tokens(self) -> int:
        return self.samples[-1].end if self.samples else 0

    @property
    def num_chunks(self) -> int:
        return sum(s.num_chunks for s in self.samples)

    def chunk_token_ranges(self) -> list[AttnRange]:
        """Token range of every chunk, in global chunk order."""
        ranges = []
        for s in self.samples:
            for c in range(s.num_chunks):
                start = s.offset + c * s.chunk_tokens
                ranges.append(AttnRange(start, start + s.chunk_tokens))
        return ranges

    def chunk_sample_index(self) -> list[int]:
        """For every global chunk, the index of its sample."""
        return [i for i, s in enumerate(self.samples) for _ in range(s.num_chunks)]

    def chunk_index_in_sample(self) -> list[int]:
        """For every global chunk, its position inside its own sample (0 = first chunk)."""
        return [c for s in self.samples for c in range(s.num_chunks)]

    def self_attn_slices(self, window_chunks: int | None = None) -> AttnSlices:
        """Block-causal mask: each chunk sees its own and earlier chunks of its own sample, as the
        layout's history rule allows (``sink_chunks``, ``max_context_chunks``).

        Padding tokens get no slice (they see nothing and nobody sees them).
        ``window_chunks`` limits the history to the last ``window_chunks`` chunks (no sink).
        A chunk whose sink and recent history are apart gets two slices (sink first), so the
        slices are in chunk order but not always one per chunk (:meth:`chunk_self_slices`).
        """
        return AttnSlices([sl for per_chunk in self.chunk_self_slices(window_chunks) for sl in per_chunk],
                          self.total_tokens)

    def chunk_self_slices(self, window_chunks: int | None = None) -> list[list[AttnSlice]]:
        """For every global chunk, the slices of :meth:`self_attn_slices` whose queries are that chunk."""
        sink, k = (0, window_chunks - 1) if window_chunks is not None else (self.sink_chunks, self.max_context_chunks)
        rule = window_chunks is not None or k > 0
        out = []
        for s in self.samples:
            for c in range(s.num_chunks):
                q = AttnRange(s.offset + c * s.chunk_tokens, s.offset + (c + 1) * s.chunk_tokens)
                first = max(0, c - k) if rule else 0  # the oldest recent chunk it sees
                if sink and first > sink:  # the sink and the recent chunks are apart: two slices
                    out.append([AttnSlice(q, AttnRange(s.offset, s.offset + sink * s.chunk_tokens)),
                                AttnSlice(q, AttnRange(s.offset + first * s.chunk_tokens, q.end))])
                else:  # one range: from chunk 0 when the sink touches the recent chunks
                    start = 0 if first <= sink else first
                    out.append([AttnSlice(q, AttnRange(s.offset + start * s.chunk_tokens, q.end))])
        return out

    def token_chunk_ids(self, device=None) -> torch.Tensor:
        """``[total_tokens]`` long: global chunk index of every token, ``-1`` on padding."""
        ids = torch.full((self.total_tokens,), -1, dtype=torch.long, device=device)
        for chunk, r in enumerate(self.chunk_token_ranges()):
            ids[r.start:r.end] = chunk
        return ids

    def token_grid_positions(self, device=None) -> torch.Tensor:
        """``[total_tokens, 3]`` long: (frame + frame_offset, row, column) of every token.

        Padding tokens get (0, 0, 0). The model turns these into RoPE positions (it centres
        and rescales rows/columns by the sample's grid size, see :meth:`token_grid_sizes`).
        """
        pos = torch.zeros(self.total_tokens, 3, dtype=torch.long, device=device)
        for s in self.samples:
            f = torch.arange(s.frames, device=device).repeat_interleave(s.frame_tokens) + s.frame_offset
            r = torch.arange(s.height, device=device).repeat_interleave(s.width).repeat(s.frames)
            c = torch.arange(s.width, device=device).repeat(s.frames * s.height)
            pos[s.offset:s.end] = torch.stack([f, r, c], dim=1)
        return pos

    def token_grid_sizes(self, device=None) -> torch.Tensor:
        """``[total_tokens, 2]`` long: the (height, width) grid of the token's sample (1, 1 on padding)."""
        sizes = torch.ones(self.total_tokens, 2, dtype=torch.long, device=device)
        for s in self.samples:
            sizes[s.offset:s.end, 0] = s.height
            sizes[s.offset:s.end, 1] = s.width
        return sizes

    def token_valid(self, device=None) -> torch.Tensor:
        """``[total_tokens]`` bool: True on sample tokens, False on padding."""
        return self.token_chunk_ids(device) >= 0

    def to_dict(self) -> dict:
        d = {"total_tokens": self.total_tokens,
             "samples": [[s.frames, s.height, s.width, s.chunk_frames, s.frame_offset] for s in self.samples]}
        if self.max_context_chunks:  # only when set: the format of today's layouts is unchanged
            d.update(sink_chunks=self.sink_chunks, max_context_chunks=self.max_context_chunks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PackedLayout":
        grids = [tuple(x[:4]) for x in d["samples"]]
        return cls.pack(grids, d["total_tokens"], [x[4] for x in d["samples"]], d.get("sink_chunks", 0),
                        d.get("max_context_chunks", 0))


def patchify(latent: torch.Tensor, pt: int, ph: int, pw: int) -> torch.Tensor:
    """``[C, T, H, W] -> [T/pt * H/ph * W/pw, C, pt, ph, pw]`` patch tokens in layout order."""
    c, t, h, w = latent.shape
    if t % pt or h % ph or w % pw:
        raise ValueError(f"latent [{c}, {t}, {h}, {w}] is not divisible by the patch ({pt}, {ph}, {pw})")
    x = latent.reshape(c, t // pt, pt, h // ph, ph, w // pw, pw)
    return x.permute(1, 3, 5, 0, 2, 4, 6).reshape(-1, c, pt, ph, pw)


def unpatchify(tokens: torch.Tensor, frames: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: ``[frames*height*width, C, pt, ph, pw] -> [C, T, H, W]``."""
    n, c, pt, ph, pw = tokens.shape
    if n != frames * height * width:
        raise ValueError(f"{n} tokens do not form a {frames}x{height}x{width} grid")
    x = tokens.reshape(frames, height, width, c, pt, ph, pw).permute(3, 0, 4, 1, 5, 2, 6)
    return x.reshape(c, frames * pt, height * ph, width * pw)
