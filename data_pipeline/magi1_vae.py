"""MAGI-1's video VAE (``ViTVAE``): the same function, loading MAGI-1's released VAE folder.

Public contract (relied on by other tools)::

    from magitrain.data_pipeline.magi1_vae import MagiVAE
    vae = MagiVAE.from_pretrained(folder)        # config.json + diffusion_pytorch_model.safetensors
    z = vae.encode(x, tiled=False)                # x float [N, 3, T, H, W] in [-1, 1] -> mean [N, z, T', H', W']
    x = vae.decode(z, tiled=False)                # [N, z, T', H', W'] -> [N, 3, T' * pt, H' * p, W' * p]
    vae.scale_factor                              # 0.18215: the DiT sees encode(x) * scale_factor

Invariants (MAGI-1 commit 6ff822e, read off its code and checked against
``shared/data/magi1_vae_reference``):

* ``encode`` returns the posterior **mean** (MAGI-1's pipeline ``VaeHelper.patch_vae_encode``), unscaled.
* Frames: T' = floor(T / pt) (trailing frames dropped), no causal first frame; T = 1 is encoded as 4 repeated
  frames and latent frame 0 is kept; T = 2, 3 are an error. ``decode`` of a 1-frame latent keeps frame 0.
* The scale factor is never applied inside ``encode`` / ``decode``.
* ``bf16_attention=True`` (the default) reproduces MAGI-1's numerics in an fp32 model: its attention rounds
  q, k, v to bf16 before the flash-attn call and gets a bf16 result back. In a bf16 model both are no-ops.
* ``tiled=True`` is MAGI-1's pipeline ``TileProcessor`` (tiles of ``video_size`` px, 25% spatial overlap,
  12-frame temporal tiles without overlap; the encode-side blend is in place, the decode side is not).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

SCALE_FACTOR = 0.18215  # MAGI-1 runtime_config.scale_factor; applied by the data pipeline and generate
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors",
                "diffusion_pytorch_model.bin", "pytorch_model.bin")
TILE_FRAMES = 12  # MAGI-1's pipeline: fps // 2 at 24 fps
TILE_OVERLAP = 0.25  # MAGI-1's pipeline: spatial_tile_overlap_factor (temporal overlap 0)
IMAGE_REPEAT = 4  # MAGI-1 hard-codes 4 (not patch_length) when encoding a single frame


class MagiVAEError(ValueError):
    """A VAE folder or an input MAGI-1's VAE cannot take (one line, names the cause)."""


@dataclass(frozen=True)
class VAEConfig:
    """MAGI-1's ``ddconfig`` (field names as in its ``config.json``)."""

    video_size: int = 256
    video_length: int = 16
    patch_size: int = 8
    patch_length: int = 4
    in_chans: int = 3
    z_chans: int = 16
    double_z: bool = True
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    qk_scale: float | None = None  # accepted, never used by MAGI-1
    drop_rate: float = 0.0  # inactive in eval
    attn_drop_rate: float = 0.0
    drop_path_rate: float = 0.0  # accepted, never used by MAGI-1
    with_cls_token: bool = True
    norm_code: bool = False
    ln_in_attn: bool = True
    conv_last_layer: bool = True
    use_rope: bool = False
    use_final_proj: bool = False

    @classmethod
    def from_json(cls, path: str) -> VAEConfig:
        try:
            with open(path) as f:
                raw = json.load(f)
        except (OSError, ValueError) as e:
            raise MagiVAEError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
        if raw.get("_class_name", "ViTVAE") != "ViTVAE" or raw.get("model_type", "vit") != "vit":
            raise MagiVAEError(f"{path}: not a MAGI-1 ViTVAE config (_class_name={raw.get('_class_name')!r}, "
                               f"model_type={raw.get('model_type')!r})")
        dd = raw.get("ddconfig")
        if not isinstance(dd, dict):
            raise MagiVAEError(f"{path}: no 'ddconfig' object")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(dd) - known)
        if unknown:
            raise MagiVAEError(f"{path}: unknown ddconfig fields {unknown}")
        cfg = cls(**dd)
        cfg.check(path)
        return cfg

    def check(self, where: str = "config") -> None:
        """Refuse the options whose MAGI-1 code path is not reproduced here (rather than guess)."""
        unsupported = {"use_rope": self.use_rope, "use_final_proj": self.use_final_proj,
                       "norm_code": self.norm_code, "with_cls_token": not self.with_cls_token,
                       "ln_in_attn": not self.ln_in_attn, "conv_last_layer": not self.conv_last_layer,
                       "double_z": not self.double_z, "attn_drop_rate": self.attn_drop_rate != 0}
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise MagiVAEError(f"{where}: MAGI-1 VAE options not supported here: "
                               + ", ".join(f"{k}={getattr(self, k)!r}" for k in bad))
        if self.embed_dim % self.num_heads or self.embed_dim % (self.patch_length * self.patch_size ** 2):
            raise MagiVAEError(f"{where}: embed_dim {self.embed_dim} must divide by num_heads and by pt*p*p")

    @property
    def native_grid(self) -> tuple[int, int, int]:
        return (self.video_length // self.patch_length, self.video_size // self.patch_size,
                self.video_size // self.patch_size)


# ----------------------------------------------------------------------------------------------- modules
# Attribute names are MAGI-1's, so the state_dict keys are MAGI-1's and load strictly.

class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


def _head_norm(x: torch.Tensor) -> torch.Tensor:
    """MAGI-1's parameter-free per-head norm: eps added to the biased std (not ``layer_norm``)."""
    mean = x.mean(dim=-1, keepdim=True)
    std = x.std(dim=-1, keepdim=True, unbiased=False)
    return (x - mean) / (std + 1e-5)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool, bf16_attention: bool):
        super().__init__()
        self.heads, self.bf16_attention = heads, bf16_attention
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        qkv = _head_norm(self.qkv(x).view(n, length, 3, self.heads, dim // self.heads))  # q, k AND v
        if self.bf16_attention:  # MAGI-1: qkv.bfloat16() before flash-attn, which returns bf16
            qkv = qkv.bfloat16().to(x.dtype)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # [n, heads, L, head_dim]
        out = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(head_dim), MAGI-1 ignores qk_scale
        if self.bf16_attention:
            out = out.bfloat16().to(x.dtype)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class Block(nn.Module):
    """``ln_in_attn``: no LayerNorm before attention; ``h + attn(h)`` then ``h + mlp(norm2(h))``."""

    def __init__(self, cfg: VAEConfig, bf16_attention: bool):
        super().__init__()
        d = cfg.embed_dim
        self.attn = Attention(d, cfg.num_heads, cfg.qkv_bias, bf16_attention)
        self.norm2 = nn.LayerNorm(d)
        self.mlp = Mlp(d, int(d * cfg.mlp_ratio))

    def forward(self, x):
        x = x + self.attn(x)
        return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        k = (cfg.patch_length, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_chans, cfg.embed_dim, kernel_size=k, stride=k)


def _position_table(table: torch.Tensor, native: tuple, grid: tuple) -> torch.Tensor:
    """cls row + the learned grid table, trilinearly resized (align_corners False) when ``grid`` differs."""
    if tuple(grid) == tuple(native):
        return table
    d = table.shape[-1]
    cells = table[:, 1:].reshape(1, *native, d).permute(0, 4, 1, 2, 3)
    cells = F.interpolate(cells, size=tuple(grid), mode="trilinear", align_corners=False)
    return torch.cat([table[:, :1], cells.permute(0, 2, 3, 4, 1).reshape(1, -1, d)], dim=1)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig, bf16_attention: bool):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(cfg.native_grid), d))
        self.blocks = nn.ModuleList(Block(cfg, bf16_attention) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.last_layer = nn.Linear(d, 2 * cfg.z_chans)

    def forward(self, x):
        """[N, 3, T, H, W] -> moments [N, 2z, T // pt, H // p, W // p] (mean, logvar)."""
        x = self.patch_embed.proj(x)
        n, _, *grid = x.shape
        x = torch.cat([self.cls_token.expand(n, -1, -1), x.flatten(2).transpose(1, 2)], dim=1)
        x = x + _position_table(self.pos_embed, self.cfg.native_grid, grid)
        for blk in self.blocks:
            x = blk(x)
        x = self.last_layer(self.norm(x))[:, 1:]
        return x.transpose(1, 2).reshape(n, -1, *grid)


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig, bf16_attention: bool):
        super().__init__()
        self.cfg = cfg
        d = cfg.embed_dim
        self.unpatch_channels = d // (cfg.patch_length * cfg.patch_size ** 2)
        self.proj_in = nn.Linear(cfg.z_chans, d)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + math.prod(cfg.native_grid), d))
        self.blocks = nn.ModuleList(Block(cfg, bf16_attention) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.last_layer = nn.Conv3d(self.unpatch_channels, cfg.in_chans, kernel_size=3, stride=1, padding=1)

    def forward(self, z):
        """[N, z, T', H', W'] -> [N, 3, T' * pt, H' * p, W' * p]."""
        n, _, t, h, w = z.shape
        x = self.proj_in(z.flatten(2).transpose(1, 2))
        x = torch.cat([self.cls_token.expand(n, -1, -1), x], dim=1)
        x = x + _position_table(self.pos_embed, self.cfg.native_grid, (t, h, w))
        for blk in self.blocks:
            x = blk(x)
        x = self.norm(x)[:, 1:]
        pt, p, cu = self.cfg.patch_length, self.cfg.patch_size, self.unpatch_channels
        x = x.reshape(n, t, h, w, pt, p, p, cu).permute(0, 7, 1, 4, 2, 5, 3, 6)  # each token: (pt, p, p, C_u)
        return self.last_layer(x.reshape(n, cu, t * pt, h * p, w * p))


# ----------------------------------------------------------------------------------------------- tiling

def _blend(prev: torch.Tensor, cur: torch.Tensor, extent: int, dim: int) -> torch.Tensor:
    """MAGI-1's blend_{t,v,h}: the first ``e`` slices of ``cur`` along ``dim`` fade in from ``prev``'s last ``e``
    (written into ``cur`` in place, as MAGI-1 does, row by row with Python-float weights)."""
    e = min(prev.shape[dim], cur.shape[dim], extent)
    for j in range(e):
        cur.select(dim, j).copy_(prev.select(dim, prev.shape[dim] - e + j) * (1 - j / e) + cur.select(dim, j) * (j / e))
    return cur


def _starts(size: int, stride: int) -> range:
    return range(0, size, stride)


class MagiVAE(nn.Module):
    """MAGI-1's ``ViTVAE`` with its pipeline's encode (posterior mean) and decode, untiled or tiled."""

    scale_factor = SCALE_FACTOR

    def __init__(self, cfg: VAEConfig, bf16_attention: bool = True):
        super().__init__()
        cfg.check()
        self.cfg = cfg
        self.encoder = Encoder(cfg, bf16_attention)
        self.decoder = Decoder(cfg, bf16_attention)
        self.temporal_factor, self.spatial_factor, self.z_channels = cfg.patch_length, cfg.patch_size, cfg.z_chans

    @classmethod
    def from_pretrained(cls, folder: str, dtype: torch.dtype = torch.float32, device="cpu",
                        bf16_attention: bool = True) -> MagiVAE:
        """Load MAGI-1's VAE folder (``config.json`` + weights under MAGI-1's key names), strictly."""
        if not os.path.isdir(folder):
            raise MagiVAEError(f"MAGI-1 VAE folder not found: {folder}")
        cfg = VAEConfig.from_json(os.path.join(folder, "config.json"))
        weights = next((os.path.join(folder, f) for f in WEIGHT_FILES if os.path.isfile(os.path.join(folder, f))), None)
        if weights is None:
            raise MagiVAEError(f"{folder}: no weights file (one of {', '.join(WEIGHT_FILES)})")
        state = _read_state_dict(weights)
        with torch.device("meta"):
            vae = cls(cfg, bf16_attention)
        expected = set(vae.state_dict())
        missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
        if missing or unexpected:
            raise MagiVAEError(f"{weights}: not MAGI-1 VAE weights for this config: missing {missing[:4]}"
                               f"{'...' if len(missing) > 4 else ''}, unexpected {unexpected[:4]}"
                               f"{'...' if len(unexpected) > 4 else ''}")
        shapes = vae.state_dict()
        wrong = [k for k in expected if tuple(state[k].shape) != tuple(shapes[k].shape)]
        if wrong:
            k = min(wrong)
            raise MagiVAEError(f"{weights}: {k} has shape {list(state[k].shape)}, the config needs "
                               f"{list(shapes[k].shape)} ({len(wrong)} tensors differ)")
        vae.load_state_dict(state, strict=True, assign=True)
        return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)

    # ------------------------------------------------------------------ pipeline encode / decode
    def encode(self, x: torch.Tensor, tiled: bool = False, tile_size: int | None = None,
               tile_frames: int = TILE_FRAMES, overlap: float = TILE_OVERLAP) -> torch.Tensor:
        """float ``[N, 3, T, H, W]`` in [-1, 1] -> posterior mean ``[N, z, T', H', W']`` (unscaled)."""
        self._check_video(x)
        x = x.to(self._dtype)
        with torch.no_grad():
            if tiled:
                return self._tiled_encode(x, tile_size or self.cfg.video_size, tile_frames, overlap)
            return self._encode(x)

    def decode(self, z: torch.Tensor, tiled: bool = False, tile_size: int | None = None,
               tile_frames: int = TILE_FRAMES, overlap: float = TILE_OVERLAP) -> torch.Tensor:
        """``[N, z, T', H', W']`` (unscaled) -> ``[N, 3, T, H, W]`` (T = T' * pt; 1 when T' = 1; tiled: each
        1-latent-frame temporal tile gives 1 frame, as in MAGI-1's pipeline)."""
        if z.ndim != 5 or z.shape[1] != self.z_channels:
            raise MagiVAEError(f"MagiVAE.decode wants [N, {self.z_channels}, T', H', W'], got {list(z.shape)}")
        z = z.to(self._dtype)
        with torch.no_grad():
            if tiled:
                return self._tiled_decode(z, tile_size or self.cfg.video_size, tile_frames, overlap)
            return self._decode(z)

    @property
    def _dtype(self) -> torch.dtype:
        return self.decoder.proj_in.weight.dtype

    def _check_video(self, x: torch.Tensor) -> None:
        if x.ndim != 5 or x.shape[1] != self.cfg.in_chans or not x.is_floating_point():
            raise MagiVAEError(f"MagiVAE.encode wants float [N, 3, T, H, W] in [-1, 1], got {x.dtype} {list(x.shape)}")
        t, h, w = x.shape[2:]
        pt, p = self.cfg.patch_length, self.cfg.patch_size
        if 1 < t < pt or h < p or w < p:
            raise MagiVAEError(f"MagiVAE.encode: a {t}x{h}x{w} clip is smaller than one {pt}x{p}x{p} patch "
                               "(T = 1 is an image; otherwise T >= patch_length)")

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        """MAGI-1's ``patch_vae_encode``: the mean; an image is encoded as 4 repeated frames, frame 0 kept."""
        if x.shape[2] == 1:
            return self.encoder(x.expand(-1, -1, IMAGE_REPEAT, -1, -1))[:, :self.z_channels, :1]
        return self.encoder(x)[:, :self.z_channels]

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        out = self.decoder(z)
        return out[:, :, :1] if z.shape[2] == 1 else out

    def _tiled_encode(self, x, size: int, frames: int, overlap: float) -> torch.Tensor:
        p, pt = self.cfg.patch_size, self.cfg.patch_length
        stride = int(size * (1 - overlap))
        extent = int(size / p * overlap)
        row_limit, time_limit = size // p - extent, frames // pt
        tiles = {}
        _, _, t, h, w = x.shape
        for ti, t0 in enumerate(_starts(t, frames)):
            for hi, h0 in enumerate(_starts(h, stride)):
                for wi, w0 in enumerate(_starts(w, stride)):
                    tile = self._encode(x[:, :, t0:t0 + frames, h0:h0 + size, w0:w0 + size])
                    if ti:  # temporal overlap is 0 in MAGI-1's pipeline: a no-op kept for the rule's sake
                        _blend(tiles[ti - 1, hi, wi], tile, 0, 2)
                    if hi:
                        _blend(tiles[ti, hi - 1, wi], tile, extent, 3)
                    if wi:
                        _blend(tiles[ti, hi, wi - 1], tile, extent, 4)
                    tiles[ti, hi, wi] = tile  # blended in place: later neighbours see the blended values
        return _assemble(tiles, time_limit, row_limit, row_limit)

    def _tiled_decode(self, z, size: int, frames: int, overlap: float) -> torch.Tensor:
        p, pt = self.cfg.patch_size, self.cfg.patch_length
        tile, tile_t = size // p, frames // pt
        stride = int(tile * (1 - overlap))
        extent = int(tile * p * overlap)
        raw = {}
        _, _, t, h, w = z.shape
        for ti, t0 in enumerate(_starts(t, tile_t)):
            for hi, h0 in enumerate(_starts(h, stride)):
                for wi, w0 in enumerate(_starts(w, stride)):
                    raw[ti, hi, wi] = self._decode(z[:, :, t0:t0 + tile_t, h0:h0 + tile, w0:w0 + tile])
        blended = {}
        for (ti, hi, wi), out in raw.items():
            out = out.clone()  # MAGI-1's decode blends with its neighbours' unblended outputs
            if ti:
                _blend(raw[ti - 1, hi, wi], out, 0, 2)
            if hi:
                _blend(raw[ti, hi - 1, wi], out, extent, 3)
            if wi:
                _blend(raw[ti, hi, wi - 1], out, extent, 4)
            blended[ti, hi, wi] = out
        return _assemble(blended, tile_t * pt, tile * p - extent, tile * p - extent)


def _assemble(tiles: dict, t_keep: int, h_keep: int, w_keep: int) -> torch.Tensor:
    """Crop each tile to its first ``(t_keep, h_keep, w_keep)`` and concatenate (w, then h, then t)."""
    nt, nh, nw = (max(k[i] for k in tiles) + 1 for i in range(3))
    return torch.cat([torch.cat([torch.cat([tiles[ti, hi, wi][:, :, :t_keep, :h_keep, :w_keep] for wi in range(nw)],
                                           dim=4) for hi in range(nh)], dim=3) for ti in range(nt)], dim=2)


def _read_state_dict(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001  (a damaged file: one line naming it)
        raise MagiVAEError(f"{path}: cannot be read ({type(e).__name__}: {e})") from None
