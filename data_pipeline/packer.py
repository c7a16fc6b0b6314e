"""Streaming packer: prepared samples -> packed sequences of at most ``seq_tokens`` tokens.

First fit over a few open bins: a sample goes into the first open bin with room; a bin that is
exactly full is emitted at once; when no bin has room and all ``max_bins`` are open, the
fullest bin is emitted (ties: the oldest) and the sample opens a new one. More bins means less
padding but more samples held back (and held in the loader state). Deterministic: the same
sample stream gives the same sequences.
"""

from __future__ import annotations

from typing import Generic, TypeVar

import torch
from magitrain.data_pipeline.buckets import Geometry
from magitrain.data_pipeline.prepare import Prepared

from magitrain.batch import Batch
from magitrain.layout import PackedLayout, patchify

T = TypeVar("T")


class Packer(Generic[T]):
    """Bins of ``(item, tokens)``; :meth:`add` returns the bins it closed (0 or 1)."""

    def __init__(self, seq_tokens: int, max_bins: int):
        if max_bins < 1:
            raise ValueError(f"data.pack_bins must be >= 1, got {max_bins}")
        self.seq_tokens, self.max_bins = seq_tokens, max_bins
        self.bins: list[list[tuple[T, int]]] = []

    @staticmethod
    def used(b: list[tuple[T, int]]) -> int:
        return sum(n for _, n in b)

    def add(self, item: T, tokens: int) -> list[list[T]]:
        if tokens > self.seq_tokens:
            raise ValueError(f"a sample of {tokens} tokens does not fit a sequence of {self.seq_tokens}")
        closed = []
        target = next((b for b in self.bins if self.used(b) + tokens <= self.seq_tokens), None)
        if target is None:
            if len(self.bins) == self.max_bins:
                fullest = max(range(len(self.bins)), key=lambda i: (self.used(self.bins[i]), -i))
                closed.append([it for it, _ in self.bins.pop(fullest)])
            target = []
            self.bins.append(target)
        target.append((item, tokens))
        if self.used(target) == self.seq_tokens:
            self.bins.remove(target)
            closed.append([it for it, _ in target])
        return closed

    def flush(self) -> list[list[T]]:
        closed = [[it for it, _ in b] for b in self.bins]
        self.bins = []
        return closed


def to_batch(samples: list[Prepared], seq_tokens: int, geo: Geometry) -> Batch:
    """One packed sequence: patch tokens of every sample end to end, zero padding to ``seq_tokens``."""
    grids = [s.grid(geo) for s in samples]
    layout = PackedLayout.pack(grids, seq_tokens, sink_chunks=geo.sink_chunks,
                               max_context_chunks=geo.max_context_chunks)
    tokens = [patchify(s.latent, geo.t_patch, geo.patch, geo.patch) for s in samples]
    n = layout.num_sample_tokens
    shape = (seq_tokens - n, geo.channels, geo.t_patch, geo.patch, geo.patch)
    latents = torch.cat(tokens + [torch.zeros(shape)])
    reps = [g[0] // g[3] for g in grids]  # chunks per sample: each chunk carries its sample's caption
    text_emb = torch.cat([s.text_emb[None].expand(r, -1, -1) for s, r in zip(samples, reps)])
    text_mask = torch.cat([s.text_mask[None].expand(r, -1) for s, r in zip(samples, reps)])
    return Batch(latents, layout, text_emb.contiguous(), text_mask.contiguous(), [s.caption for s in samples])
