"""KV cache of finished (clean) chunks for streaming generation.

A finished chunk's keys and values are computed once, in a forward at ``t = clean_t`` in which
the chunk sees the cached chunks before it and itself (exactly what it would see under the
block-causal training mask), and stored per layer. Later forwards of the denoising window
attend to ``[cached chunks | window tokens]`` without recomputing the cached part.

The model is not edited: :func:`kv_cache_attached` swaps every layer's ``core_attention``
(the self-attention seam, ``(q, k, v, slices) -> out`` with post-RoPE q/k) for a
:class:`CachedAttention` that reads and writes the shared :class:`KVCache`. The window's own
mask is untouched; the cache is one more FULL key block merged by log-sum-exp
(:func:`~magitrain.parallel.kernels.merge_partials`), so the cache is never concatenated to
the window's keys.

``max_chunks`` caps the chunks kept (sliding context): the oldest chunk is dropped when a new
one is written, so memory stays flat however long the video. A chunk written under the cap saw
only the ``max_chunks`` chunks before it, so the cache stays self-consistent.

``sink_chunks = S`` (attention sink, with a cap): the first ``S`` chunks ever written are never
dropped; the cap applies to the chunks after them, so the cache holds at most ``S + max_chunks``
chunks, oldest first: ``[sink chunks | the max_chunks most recent]``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
from torch import nn

from magitrain.parallel.kernels import merge_partials, slice_attention
from magitrain.parallel.mask import AttnSlice, AttnSlices

READ, WRITE, OFF = "read", "write", "off"


class KVCache:
    """Per-layer K/V ``[tokens, Hk, D]`` of the first ``sink_chunks`` and the last ``max_chunks``
    clean chunks (all when ``max_chunks`` is None).

    ``mode`` says what the next forward does: ``read`` (window tokens attend to the cache),
    ``write`` (also append this forward's K/V as one new chunk), ``off`` (ignore the cache:
    the history-free CFG pass).
    """

    def __init__(self, num_layers: int, max_chunks: Optional[int] = None, sink_chunks: int = 0):
        if max_chunks is not None and max_chunks < 1:
            raise ValueError(f"max_chunks={max_chunks} must be >= 1 (or None for an unlimited cache)")
        if sink_chunks < 0 or (sink_chunks and max_chunks is None):
            raise ValueError(f"sink_chunks={sink_chunks} must be >= 0, and > 0 only with a max_chunks cap "
                             "(an unlimited cache keeps every chunk anyway)")
        self.max_chunks, self.sink_chunks = max_chunks, sink_chunks
        self.mode = READ
        self._k: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._v: list[list[torch.Tensor]] = [[] for _ in range(num_layers)]
        self._kv: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * num_layers  # concatenated, lazily
        self.chunks_written = 0  # every chunk ever written (dropped ones included)
        # READ: which cached rows each query row sees ([queries, cached rows] slices); None: all of them
        self.read_slices: Optional[AttnSlices] = None

    @property
    def num_chunks(self) -> int:
        """Chunks held now (at most ``sink_chunks + max_chunks``)."""
        return len(self._k[0])

    def nbytes(self) -> int:
        """Bytes of K/V held (the per-chunk tensors; the concatenated views add the same again)."""
        return sum(t.numel() * t.element_size() for layer in self._k + self._v for t in layer)

    @property
    def num_tokens(self) -> int:
        """Cached rows (tokens) held now."""
        return sum(t.shape[0] for t in self._k[0])

    def kv(self, layer: int) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The cached ``(k, v)`` of ``layer``, oldest chunk first, or None when empty."""
        if not self._k[layer]:
            return None
        if self._kv[layer] is None:
            self._kv[layer] = (torch.cat(self._k[layer]), torch.cat(self._v[layer]))
        return self._kv[layer]

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store one chunk's ``k, v`` for ``layer``, dropping the oldest non-sink chunk beyond the cap."""
        self._k[layer].append(k.detach())
        self._v[layer].append(v.detach())
        if self.max_chunks is not None and len(self._k[layer]) > self.sink_chunks + self.max_chunks:
            del self._k[layer][self.sink_chunks], self._v[layer][self.sink_chunks]
        self._kv[layer] = None
        if layer == len(self._k) - 1:
            self.chunks_written += 1


class CachedAttention(nn.Module):
    """Drop-in ``core_attention`` for layer ``layer`` that also attends to ``cache``."""

    def __init__(self, cache: KVCache, layer: int):
        super().__init__()
        self.cache, self.layer = cache, layer

    def forward(self, q, k, v, slices: AttnSlices):
        out, lse = slice_attention(q, k, v, slices)
        cached = self.cache.kv(self.layer) if self.cache.mode != OFF else None
        if cached is not None:
            ck, cv = cached
            n, m = q.shape[0], ck.shape[0]
            sl = self.cache.read_slices if self.cache.mode == READ else None
            sl = AttnSlices([AttnSlice((0, n), (0, m))], n, m) if sl is None else sl
            if len(sl):
                out_c, lse_c = slice_attention(q, ck, cv, sl)
                out, _ = merge_partials([(0, out, lse), (0, out_c, lse_c)], n, q.shape[1], q.shape[2], q.device,
                                        q.dtype)
        if self.cache.mode == WRITE:
            self.cache.append(self.layer, k, v)
        return out


@contextlib.contextmanager
def kv_cache_attached(model: nn.Module, cache: KVCache) -> Iterator[KVCache]:
    """Swap every layer's ``core_attention`` for a :class:`CachedAttention` on ``cache``; restore on exit."""
    attns = [layer.self_attention for layer in model.layers]
    if len(attns) != len(cache._k):
        raise ValueError(f"the cache has {len(cache._k)} layers, the model {len(attns)}")
    saved = [a.core_attention for a in attns]
    try:
        for i, a in enumerate(attns):
            a.core_attention = CachedAttention(cache, i)
        yield cache
    finally:
        for a, orig in zip(attns, saved):
            a.core_attention = orig
