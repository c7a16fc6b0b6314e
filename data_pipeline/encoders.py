"""Pluggable encoders: pixels -> latents (and back), captions -> embeddings.

A real run plugs in its VAE and T5 through ``module.path:factory`` names (config keys
``data.latent_encoder`` / ``data.text_encoder``, or the ``build_shards`` flags); the factory
loads weights from a local path the user supplies. The built-ins need no weights:
:class:`PatchEncoder` (a fixed average-pool + projection "VAE" with a matching decoder, used by
tests, the demo and generation) and :class:`~magitrain.data_pipeline.text.HashTextEmbedder`.
"""

from __future__ import annotations

import importlib
from typing import Protocol

import torch
import torch.nn.functional as F
from magitrain.data_pipeline.text import HashTextEmbedder, TextEncoder


class LatentEncoder(Protocol):
    channels: int
    temporal_factor: int  # pixel frames per latent frame
    spatial_factor: int  # pixels per latent pixel (each side)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """uint8 ``[T, H, W, 3]`` -> float32 latent ``[C, ceil(T / tf), H / sf, W / sf]``."""

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        """float latent ``[C, T', H', W']`` -> uint8 video ``[T' * tf, H' * sf, W' * sf, 3]``."""


class PatchEncoder:
    """Deterministic stand-in VAE with MAGI-1's compression (4x in time, 8x8 in space).

    encode: pixels scaled to [-1, 1], the last frame repeated up to a multiple of
    ``temporal_factor``, average-pooled over ``tf x sf x sf`` blocks to 3 colour values, then
    mapped to ``channels`` by a fixed ``[C, 3]`` matrix with orthonormal columns. decode inverts the
    projection and repeats each value over its block, so ``decode(encode(v))`` is the block mean of
    ``v`` (exact on block-constant videos). Needs ``channels >= 3``.
    """

    def __init__(self, channels: int, temporal_factor: int = 4, spatial_factor: int = 8, seed: int = 0):
        if channels < 3:
            raise ValueError(f"PatchEncoder needs >= 3 latent channels to keep RGB, got {channels}")
        self.channels, self.temporal_factor, self.spatial_factor = channels, temporal_factor, spatial_factor
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(channels, 3, generator=g, dtype=torch.float64))
        self.proj = q.float()  # [C, 3], orthonormal columns

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        t, h, w, c = video.shape
        tf, sf = self.temporal_factor, self.spatial_factor
        if c != 3 or video.dtype != torch.uint8:
            raise ValueError(f"PatchEncoder.encode wants uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
        if h % sf or w % sf:
            raise ValueError(f"frame size {h}x{w} is not a multiple of the spatial factor {sf}")
        pad = -t % tf
        if pad:
            video = torch.cat([video, video[-1:].expand(pad, h, w, 3)])
        x = video.permute(3, 0, 1, 2).float() / 127.5 - 1.0  # [3, T, H, W]
        pooled = F.avg_pool3d(x[None], (tf, sf, sf))[0]  # [3, T', H', W']
        return torch.einsum("ck,kthw->cthw", self.proj, pooled)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.shape[0] != self.channels:
            raise ValueError(f"latent has {latent.shape[0]} channels, the encoder {self.channels}")
        rgb = torch.einsum("ck,cthw->kthw", self.proj, latent.float())
        tf, sf = self.temporal_factor, self.spatial_factor
        rgb = rgb.repeat_interleave(tf, 1).repeat_interleave(sf, 2).repeat_interleave(sf, 3)
        return ((rgb + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous()


BUILTIN_LATENT = ("patch",)  # names, not module paths
BUILTIN_TEXT = ("hash",)


def _load_factory(spec: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"encoder {spec!r}: use a built-in name or 'module.path:factory'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder {spec!r} cannot be loaded: {e}") from None


def build_latent_encoder(spec: str, channels: int, weights: str = "") -> LatentEncoder:
    """``"patch"`` or ``"module:factory"`` called as ``factory(channels=..., weights=...)``."""
    if spec == "patch":
        return PatchEncoder(channels)
    enc = _load_factory(spec)(channels=channels, weights=weights)
    if enc.channels != channels:
        raise ValueError(f"latent encoder {spec!r} gives {enc.channels} channels, model.in_channels is {channels}")
    return enc


def build_text_encoder(spec: str, dim: int, max_len: int, weights: str = "") -> TextEncoder:
    """``"hash"`` or ``"module:factory"`` called as ``factory(dim=..., max_len=..., weights=...)``."""
    if spec == "hash":
        return HashTextEmbedder(dim, max_len)
    return _load_factory(spec)(dim=dim, max_len=max_len, weights=weights)
