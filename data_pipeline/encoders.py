"""Pluggable encoders: pixels -> latents (and back), captions -> embeddings.

Names (config keys ``data.latent_encoder`` / ``data.text_encoder``, the ``build_shards`` flags and
``generate --decoder``) select one of the built-ins or a user's ``module.path:factory``:

* ``patch``: :class:`PatchEncoder`, a fixed average-pool + projection "VAE" with a matching decoder
  (tests, the demo); ``hash``: :class:`~magitrain.data_pipeline.text.HashTextEmbedder`. No weights.
* ``magi1-vae`` / ``magi1-vae-tiled``: MAGI-1's own VAE (:mod:`magi1_vae`) from the local folder given as
  the weights (MAGI-1's ``vae`` download), untiled or tiled as MAGI-1's pipeline tiles. Latents are
  ``encode(x) * 0.18215``, what MAGI-1's DiT sees; decode divides by it.
* ``t5``: MAGI-1's T5 caption path (:mod:`t5_text`) from the local folder given as the weights.
"""

from __future__ import annotations

import importlib
import os
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


class MagiVAELatents:
    """:class:`LatentEncoder` over MAGI-1's VAE, with MAGI-1's pipeline conventions around it.

    encode: uint8 ``[T, H, W, 3]`` -> ``u8 / 127.5 - 1`` -> ``MagiVAE.encode`` -> ``* scale_factor`` ->
    float32 ``[16, T // 4, H // 8, W // 8]`` (MAGI-1's frame rules: trailing ``T mod 4`` frames dropped, an
    image gives one latent frame). decode: ``/ scale_factor`` -> ``MagiVAE.decode`` -> ``x * 127.5 + 127.5``,
    clamped, truncated to uint8 (as MAGI-1's ``VaeHelper.decode``). Runs on ``cuda:LOCAL_RANK`` in bf16 when
    a GPU is there (MAGI-1's setting), else on the CPU in fp32.
    """

    def __init__(self, folder: str, tiled: bool = False, device: str | None = None, dtype: torch.dtype | None = None):
        from magitrain.data_pipeline.magi1_vae import MagiVAE

        if device is None:
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        if dtype is None:
            dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
        self.vae = MagiVAE.from_pretrained(folder, dtype=dtype, device=device)
        self.tiled, self.device = tiled, device
        self.channels = self.vae.z_channels
        self.temporal_factor, self.spatial_factor = self.vae.temporal_factor, self.vae.spatial_factor
        self.scale_factor = self.vae.scale_factor

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 4 or video.shape[-1] != 3 or video.dtype != torch.uint8:
            raise ValueError(f"magi1-vae encode wants uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}")
        x = video.permute(3, 0, 1, 2)[None].to(self.device).float() / 127.5 - 1.0
        return (self.vae.encode(x, tiled=self.tiled).float() * self.scale_factor)[0].cpu()

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.ndim != 4 or latent.shape[0] != self.channels:
            raise ValueError(f"magi1-vae decode wants [{self.channels}, T', H', W'], got {list(latent.shape)}")
        z = latent[None].to(self.device).float() / self.scale_factor
        x = self.vae.decode(z, tiled=self.tiled).float()[0]
        return (x * 127.5 + 127.5).clamp(0, 255).to(torch.uint8).permute(1, 2, 3, 0).cpu().contiguous()


MAGI1_VAE = {"magi1-vae": False, "magi1-vae-tiled": True}  # name -> tiled
BUILTIN_LATENT = ("patch", *MAGI1_VAE)  # names, not module paths
BUILTIN_TEXT = ("hash", "t5")


def _load_factory(spec: str):
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"encoder {spec!r}: use a built-in name or 'module.path:factory'")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"encoder {spec!r} cannot be loaded: {e}") from None


def build_latent_encoder(spec: str, channels: int | None, weights: str = "") -> LatentEncoder:
    """The latent encoder/decoder named ``spec``: a built-in (``patch``, ``magi1-vae``, ``magi1-vae-tiled``;
    the MAGI-1 ones load the folder ``weights``) or ``"module:factory"`` called as
    ``factory(channels=..., weights=...)``. Also what ``generate`` decodes with. ``channels`` (None: the
    encoder's own) must match what the encoder gives."""
    if spec == "patch":
        return PatchEncoder(channels)
    if spec in MAGI1_VAE:
        if not weights:
            raise ValueError(f"latent encoder {spec} needs the MAGI-1 VAE folder (--encoder-weights / "
                             "data.latent_encoder_weights / --decoder-weights)")
        enc = MagiVAELatents(weights, tiled=MAGI1_VAE[spec])
    else:
        enc = _load_factory(spec)(channels=channels, weights=weights)
    if channels is not None and enc.channels != channels:
        raise ValueError(f"latent encoder {spec!r} gives {enc.channels} channels, model.in_channels is {channels}")
    return enc


def build_text_encoder(spec: str, dim: int, max_len: int, weights: str = "") -> TextEncoder:
    """``"hash"`` or ``"module:factory"`` called as ``factory(dim=..., max_len=..., weights=...)``."""
    if spec == "hash":
        return HashTextEmbedder(dim, max_len)
    if spec == "t5":
        from magitrain.data_pipeline.t5_text import T5TextEncoder

        return T5TextEncoder(weights, dim=dim, max_len=max_len)
    return _load_factory(spec)(dim=dim, max_len=max_len, weights=weights)


def latent_factors(spec: str, channels: int, weights: str = "") -> tuple[int, int]:
    """``(temporal_factor, spatial_factor)`` of the encoder ``spec``, reading only a MAGI-1 VAE's config."""
    if spec == "patch":
        return 4, 8
    if spec in MAGI1_VAE:
        from magitrain.data_pipeline.magi1_vae import VAEConfig

        cfg = VAEConfig.from_json(os.path.join(weights, "config.json"))
        return cfg.patch_length, cfg.patch_size
    enc = build_latent_encoder(spec, channels, weights)
    return enc.temporal_factor, enc.spatial_factor
