"""Caption text encoders: caption string -> ``(embedding [L, D], mask [L])``.

A real run uses precomputed T5 embeddings (``KEY.text_emb.npy`` in shards) or a user-supplied
encoder loading local weights. :class:`HashTextEmbedder` is the built-in deterministic
encoder for tests and the demo: each word maps to a fixed pseudo-random unit vector derived
from a stable hash of the word, so equal words give equal vectors in every process and run,
and a model can learn what words mean.
"""

from __future__ import annotations

import hashlib
from typing import Protocol

import numpy as np
import torch


class TextEncoder(Protocol):
    dim: int
    max_len: int

    def embed(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(emb [max_len, dim] float32, mask [max_len] bool)``; padding rows are zero."""


class HashTextEmbedder:
    """Word-level deterministic embedder (no weights, no downloads)."""

    def __init__(self, dim: int, max_len: int):
        self.dim, self.max_len = dim, max_len
        self._cache: dict[str, np.ndarray] = {}

    def word_vector(self, word: str) -> np.ndarray:
        if word not in self._cache:
            seed = int.from_bytes(hashlib.sha256(word.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            self._cache[word] = v / np.linalg.norm(v) * np.sqrt(self.dim)
        return self._cache[word]

    def embed(self, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
        words = caption.lower().replace(",", " ").replace(".", " ").split()[: self.max_len]
        emb = np.zeros((self.max_len, self.dim), dtype=np.float32)
        for i, w in enumerate(words):
            emb[i] = self.word_vector(w)
        mask = torch.zeros(self.max_len, dtype=torch.bool)
        mask[: len(words)] = True
        return torch.from_numpy(emb), mask
