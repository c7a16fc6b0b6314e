"""What one training step consumes: packed latent tokens, their layout and captions.

Every data source (synthetic, WebDataset) yields :class:`Batch` objects; the diffusion
objective and the model read only this. A batch is one packed token sequence: several packed
sequences of a step are concatenated into one (their layouts concatenated), which the
block-causal mask keeps apart exactly like samples inside one sequence.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from magitrain.layout import PackedLayout


@dataclass
class Batch:
    """One packed sequence of ``N = layout.total_tokens`` patch tokens.

    - ``latents``: ``[N, C, pt, ph, pw]`` clean latent patch tokens (zeros on padding).
    - ``layout``: where each sample and chunk lies.
    - ``text_emb``: ``[num_chunks, L, D]`` caption embeddings, one row per chunk in global
      chunk order (every chunk of a sample usually carries the sample's caption).
    - ``text_mask``: ``[num_chunks, L]`` bool, True on valid caption tokens.
    - ``captions``: the caption strings per sample, when known (for logging).
    - ``sample_ids``: per sample, an id unique within the global batch of the step (e.g. the
      sample's index in the global batch). Diffusion noise is seeded by it, so a sample gets
      the same noise whichever rank holds it. Defaults to ``0..num_samples-1``.
    - ``dispatch``: the context-parallel dispatch solved ahead for this batch's mask (a
      :class:`magitrain.parallel.solve_ahead.SolvedDispatch`, set by the loader), or None:
      the forward then solves it itself. Concatenating batches drops it (a new mask).
    """

    latents: torch.Tensor
    layout: PackedLayout
    text_emb: torch.Tensor
    text_mask: torch.Tensor
    captions: list[str] = field(default_factory=list)
    sample_ids: list[int] = field(default_factory=list)
    dispatch: object = None

    def __post_init__(self):
        if not self.sample_ids:
            self.sample_ids = list(range(len(self.layout.samples)))
        if len(self.sample_ids) != len(self.layout.samples):
            raise ValueError(f"{len(self.sample_ids)} sample ids for {len(self.layout.samples)} samples")
        n, nc = self.layout.total_tokens, self.layout.num_chunks
        if self.latents.shape[0] != n:
            raise ValueError(f"latents hold {self.latents.shape[0]} tokens, the layout {n}")
        if self.text_emb.shape[0] != nc or self.text_mask.shape[0] != nc:
            raise ValueError(f"text rows ({self.text_emb.shape[0]}, {self.text_mask.shape[0]}) != chunks ({nc})")

    @property
    def num_tokens(self) -> int:
        """Tokens that carry data (padding excluded)."""
        return self.layout.num_sample_tokens

    def to(self, device) -> "Batch":
        return Batch(self.latents.to(device), self.layout, self.text_emb.to(device),
                     self.text_mask.to(device), self.captions, self.sample_ids, self.dispatch)

    @staticmethod
    def concat(batches: list["Batch"]) -> "Batch":
        """Concatenate packed sequences: all sample tokens in order, then all padding."""
        if len(batches) == 1:
            return batches[0]
        return _concat_with_inner_padding(batches)


def _concat_with_inner_padding(batches: list[Batch]) -> Batch:
    data_parts, pad_parts, grids, offsets = [], [], [], []
    for b in batches:
        n = b.layout.num_sample_tokens
        data_parts.append(b.latents[:n])
        pad_parts.append(b.latents[n:])
        for s in b.layout.samples:
            grids.append((s.frames, s.height, s.width, s.chunk_frames))
            offsets.append(s.frame_offset)
    total = sum(b.layout.total_tokens for b in batches)
    rules = {(b.layout.sink_chunks, b.layout.max_context_chunks) for b in batches}
    if len(rules) != 1:
        raise ValueError(f"cannot concatenate batches packed with different history rules {sorted(rules)}")
    layout = PackedLayout.pack(grids, total, offsets, *rules.pop())
    return Batch(torch.cat(data_parts + pad_parts), layout,
                 torch.cat([b.text_emb for b in batches]), torch.cat([b.text_mask for b in batches]),
                 [c for b in batches for c in b.captions], [i for b in batches for i in b.sample_ids])


class DataSource(Protocol):
    """What the trainer needs from a data source (all sources are checkpointable)."""

    def next_batch(self) -> Batch:
        """The next local batch of this data-parallel rank."""

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...

    def stats(self) -> dict:
        """Counters for metrics.jsonl (e.g. ``data_skipped``, ``padding_frac``)."""
