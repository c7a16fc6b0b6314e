"""MAGI-1-style chunk-causal video DiT. Parameter names are MAGI-1's released names, so
``load_state_dict(magi1_state_dict, strict=True)`` works as is (tests/test_magi1_reference.py
checks the forward against MAGI-1's own code). One forward:

1. patch tokens ``[N, C, pt, ph, pw]`` -> ``x_embedder`` (MAGI-1's Conv3d, kernel = stride =
   patch, applied as a linear on the flattened patch) -> ``h [N, hidden]``;
2. per chunk ``c = t_embedder(t) [+ step-size embedding] + y_proj_adaln(null row -2 | -1)``;
   each layer turns ``c`` into softcapped gates, every token takes its own chunk's gates;
3. per layer ``u = LN(h)``, self-attention (1p q/k norms, 3D RoPE, GQA, block-causal slices) and
   cross-attention (each chunk to its own caption) side by side, outputs interleaved in 8 groups
   -> ``linear_proj``; sandwich norms ``h += post_norm(gate * branch)`` for attention and MLP;
4. ``final_layernorm`` -> ``final_linear`` -> velocity ``[N, C_out, pt, ph, pw]``.

Split for context parallelism: :meth:`MagiDiT.prepare` turns a layout into per-token
:class:`TokenMeta`; :meth:`MagiDiT.forward_tokens` runs any subset of tokens with their rows.
Self-attention goes through each layer's swappable ``core_attention`` module; head counts come
from tensor shapes (tensor parallelism may shard projections by heads). Math runs in the input
dtype; under ``torch.autocast(bf16)`` MAGI-1's fp32 islands stay fp32 (embedders, RoPE, q/k
norms, ``linear_proj``, gating, post-norms, final norm and linear) and the residual stream is fp32.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from magitrain.config import ModelConfig
from magitrain.layout import PackedLayout, patchify, unpatchify
from magitrain.parallel.kernels import attention, slice_attention
from magitrain.parallel.mask import AttnRange, AttnSlice, AttnSlices, MaskType

INTERLEAVE_GROUPS = 8  # MAGI-1 hard-codes 8 groups (its TP8 layout of linear_proj's input)
FREQ_DIM = 256  # sinusoidal timestep features
T_SCALE = 1000  # the timestep embedder sees 1000 * t


# --- fp32 islands ----------------------------------------------------------------------------

def _hi(*tensors) -> torch.dtype:
    """The common dtype of ``tensors``, at least fp32 (fp64 tests stay fp64)."""
    return functools.reduce(torch.promote_types, [t.dtype for t in tensors], torch.float32)


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def _linear32(x, weight, bias=None):
    """``F.linear`` in fp32 (or higher) even under autocast and with low-precision weights."""
    dt = _hi(x, weight)
    with _no_autocast(x):
        return F.linear(x.to(dt), weight.to(dt), None if bias is None else bias.to(dt))


class LayerNorm1p(nn.Module):
    """MAGI-1's "1p" LayerNorm: the stored weight ``w`` is applied as ``1 + w``. Always fp32."""
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x):
        dt = _hi(x, self.weight)
        with _no_autocast(x):
            return F.layer_norm(x.to(dt), self.weight.shape, self.weight.to(dt) + 1, self.bias.to(dt), self.eps)


# --- Embedders and RoPE ----------------------------------------------------------------------

class TimestepEmbedder(nn.Module):
    """``t [C] -> [C, cond_dim]``: 256 sinusoidal features of 1000 t, then Linear-SiLU-Linear."""
    def __init__(self, cond_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(FREQ_DIM, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))

    def forward(self, t):
        half = FREQ_DIM // 2
        dt = _hi(t, self.mlp[0].weight)
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].to(dt) * freqs[None].to(dt) * T_SCALE  # MAGI-1's rounding order
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        h = F.silu(_linear32(feats, self.mlp[0].weight, self.mlp[0].bias))
        return _linear32(h, self.mlp[2].weight, self.mlp[2].bias)


class CaptionEmbedder(nn.Module):
    """Caption tokens for cross-attention, and the one-row "has caption" vector for adaLN."""
    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        d = cfg.caption_channels
        self.y_proj_xattn = nn.Sequential(nn.Linear(d, int(cfg.hidden_size * cfg.xattn_cond_hidden_ratio)), nn.SiLU())
        self.y_proj_adaln = nn.Sequential(nn.Linear(d, cond_dim))
        self.null_caption_embedding = nn.Parameter(torch.empty(cfg.caption_max_length, d))

    def xattn(self, tokens):
        """``[Ny, D] -> [Ny, hidden * xattn_cond_hidden_ratio]``."""
        return F.silu(_linear32(tokens, self.y_proj_xattn[0].weight, self.y_proj_xattn[0].bias))

    def adaln(self, text_null):
        """``text_null [C] bool -> [C, cond_dim]``: null row -1 where dropped, row -2 where kept."""
        null = self.null_caption_embedding
        rows = torch.where(text_null[:, None], null[-1][None], null[-2][None])
        return _linear32(rows, self.y_proj_adaln[0].weight, self.y_proj_adaln[0].bias)


class LearnableRope(nn.Module):
    """3D RoPE with learnable bands: ``head_dim/8`` bands per axis (t, h, w)."""
    def __init__(self, head_dim: int):
        super().__init__()
        self.bands = nn.Parameter(torch.empty(head_dim // 8))
        self.reset_parameters()

    def reset_parameters(self):
        n = self.bands.numel()  # language-style inverse frequencies, temperature 1e4 (MAGI-1's default)
        with torch.no_grad():
            self.bands.copy_(1.0 / 10000 ** (torch.arange(n, dtype=torch.float32, device=self.bands.device) / n))

    def forward(self, pos):
        """``pos [n, 3]`` -> ``(sin, cos)``, each ``[n, 3 * head_dim / 8]`` ordered [t bands | h | w]."""
        dt = _hi(self.bands)
        with _no_autocast(pos):
            angles = (pos.to(dt)[:, :, None] * self.bands.to(dt)).flatten(1)
            return torch.sin(angles), torch.cos(angles)


def apply_rope(x, sin, cos):
    """Rotate-half RoPE on the first ``2 * sin.shape[-1]`` channels of every head of ``x [n, H, D]``."""
    r = sin.shape[-1]
    a, b, rest = x[..., :r], x[..., r:2 * r], x[..., 2 * r:]
    sin, cos = sin[:, None, :], cos[:, None, :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos, rest], dim=-1)


def rope_positions(layout: PackedLayout, ref_grid: int) -> torch.Tensor:
    """``[N, 3]`` float32 (time, height, width) RoPE positions, built as MAGI-1 does: per axis of size
    ``n``, ``arange(n)``, spatial axes centred (``- (n-1)/2``), then ``x / (n-1) * (r-1)`` with
    ``r = H/s, W/s`` for ``s = sqrt(H*W) / ref_grid`` (every resolution spans a ``ref_grid`` square),
    and ``r = n = frame_offset + frames`` for time (a no-op but for rounding); the sample's frames are
    the last ``frames`` positions. An axis of size 1 stays 0; padding gets (0, 0, 0)."""
    def axis(n, ref, centred):
        x = torch.arange(n, dtype=torch.float32)
        if centred:
            x = x - (n - 1) / 2
        return x if n == 1 else x / (n - 1) * (ref - 1)

    pos = torch.zeros(layout.total_tokens, 3)
    for s in layout.samples:
        scale = math.sqrt(s.height * s.width / ref_grid ** 2)
        frames_total = s.frame_offset + s.frames
        grid = torch.meshgrid(axis(frames_total, frames_total, False)[s.frame_offset:],
                              axis(s.height, s.height / scale, True), axis(s.width, s.width / scale, True),
                              indexing="ij")
        pos[s.offset:s.end] = torch.stack(grid, dim=-1).reshape(-1, 3)
    return pos


# --- Per-token metadata: what context parallelism splits -------------------------------------

@dataclass
class TokenMeta:
    """Per-token metadata: ``rope_pos [n, 3]`` float32, ``chunk_ids [n]`` long (-1: padding), the
    global self-attention mask ``self_slices`` (over all ``layout.total_tokens``) and
    ``token_index [n]``, each row's global position (``None``: all tokens in layout order).
    :meth:`select` keeps any rows in any order (a CP rank keeps its local rows)."""
    rope_pos: torch.Tensor
    chunk_ids: torch.Tensor
    self_slices: AttnSlices
    token_index: Optional[torch.Tensor] = None

    @property
    def num_tokens(self) -> int:
        return self.chunk_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "TokenMeta":
        idx = idx.to(self.chunk_ids.device)
        index = torch.arange(self.num_tokens, device=idx.device) if self.token_index is None else self.token_index
        return TokenMeta(self.rope_pos[idx], self.chunk_ids[idx], self.self_slices, index[idx])

    def sort_order(self) -> Optional[torch.Tensor]:
        """The permutation that puts rows in ascending global order, or None if they already are."""
        idx = self.token_index
        if idx is None or idx.numel() < 2 or bool((idx[1:] >= idx[:-1]).all()):
            return None
        return torch.argsort(idx)

    def local_self_slices(self) -> AttnSlices:
        """``self_slices`` restricted to the present rows (ascending): a FULL slice keeps the pairs
        whose query and key are both present (exact for whole samples); other types must be whole."""
        if self.token_index is None:
            return self.self_slices
        idx = self.token_index
        if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
            raise ValueError("TokenMeta.token_index must be strictly increasing (duplicate rows?)")
        bounds = [b for s in self.self_slices for b in (s.q_range.start, s.q_range.end, s.k_range.start, s.k_range.end)]
        local = torch.searchsorted(idx, torch.tensor(bounds, dtype=idx.dtype, device=idx.device)).view(-1, 4)
        out = []
        for s, (q0, q1, k0, k1) in zip(self.self_slices, local.tolist()):
            if q1 == q0 or k1 == k0:
                continue
            if s.mask_type is not MaskType.FULL and (q1 - q0, k1 - k0) != (s.q_range.size, s.k_range.size):
                raise ValueError(f"{s!r} is only partly present in this token subset; only FULL slices can be cut")
            out.append(AttnSlice(AttnRange(q0, q1), AttnRange(k0, k1), s.mask_type))
        return AttnSlices(out, self.num_tokens)


def cross_slices(chunk_ids: torch.Tensor, caption_ranges: list, num_caption_tokens: int) -> AttnSlices:
    """Each run of equal chunk ids attends FULL to its chunk's caption tokens; padding to nothing."""
    ids, counts = torch.unique_consecutive(chunk_ids, return_counts=True)
    slices, start = [], 0
    for c, n in zip(ids.tolist(), counts.tolist()):
        if c >= 0 and caption_ranges[c][1] > caption_ranges[c][0]:
            slices.append(AttnSlice(AttnRange(start, start + n), AttnRange(*caption_ranges[c])))
        start += n
    return AttnSlices(slices, chunk_ids.shape[0], num_caption_tokens)


# --- Transformer layer -----------------------------------------------------------------------

class SliceAttention(nn.Module):
    """The self-attention seam ``(q [n,Hq,D], k, v [n,Hk,D], slices) -> [n,Hq,D]``; CP swaps it."""
    def forward(self, q, k, v, slices: AttnSlices):
        return attention(q, k, v, slices)


class ParallelAttention(nn.Module):
    """Self- and cross-attention from the same normed input, joined by one ``linear_proj``."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden, hd, eps = cfg.hidden_size, cfg.head_dim, cfg.layernorm_eps
        q_dim, kv_dim = cfg.num_heads * hd, cfg.num_kv_heads * hd
        self.head_dim = hd
        self.interleave_width = q_dim // INTERLEAVE_GROUPS  # channels per interleaved group
        self.linear_qkv = nn.ModuleDict(dict(
            layer_norm=nn.LayerNorm(hidden, eps=eps), q=nn.Linear(hidden, q_dim, bias=False),
            qx=nn.Linear(hidden, q_dim, bias=False), k=nn.Linear(hidden, kv_dim, bias=False),
            v=nn.Linear(hidden, kv_dim, bias=False)))
        # rows per KV head h: [key_h | value_h] (MAGI-1's layout; shardable by heads)
        self.linear_kv_xattn = nn.Linear(int(hidden * cfg.xattn_cond_hidden_ratio), 2 * kv_dim, bias=False)
        self.linear_proj = nn.Linear(2 * q_dim, hidden, bias=False)
        self.q_layernorm = LayerNorm1p(hd, eps)
        self.q_layernorm_xattn = LayerNorm1p(hd, eps)
        self.k_layernorm = LayerNorm1p(hd, eps)
        self.k_layernorm_xattn = LayerNorm1p(hd, eps)
        self.core_attention = SliceAttention()

    def heads(self, x, width=None):
        return x.unflatten(-1, (-1, width or self.head_dim))  # head count from the shape (TP-safe)

    # torch.compile (train.compile) never traces the attention: its slice lists are Python data that
    # change with every packed mask, so a compiled block would be re-specialised for each new mask.
    # The dense work before and after is compiled; the kernels (or CP attention) run as they are.
    # parallel/compile.py wraps this in torch.compiler.disable when it compiles a block (a decorator
    # here would import torch._dynamo, ~1.5 s, in every process that builds a model).
    def attend(self, q, k, v, qx, kx, vx, self_slices: AttnSlices, xattn_slices: AttnSlices):
        with _no_autocast(v):  # the kernels run in their inputs' dtype (bf16 under autocast), fp32 accumulation
            out_self = self.core_attention(q, k, v, self_slices)
            out_cross = slice_attention(qx.to(vx.dtype), kx.to(vx.dtype), vx, xattn_slices)[0]
        return out_self, out_cross

    def forward(self, h, rope, caption, self_slices: AttnSlices, xattn_slices: AttnSlices):
        lin = self.linear_qkv
        u = lin.layer_norm(h)
        v = self.heads(lin.v(u))
        q = apply_rope(self.q_layernorm(self.heads(lin.q(u))), *rope).to(v.dtype)
        k = apply_rope(self.k_layernorm(self.heads(lin.k(u))), *rope).to(v.dtype)
        qx = self.q_layernorm_xattn(self.heads(lin.qx(u)))
        kx, vx = self.heads(self.linear_kv_xattn(caption), 2 * self.head_dim).chunk(2, dim=-1)
        kx = self.k_layernorm_xattn(kx)
        out_self, out_cross = self.attend(q, k, v, qx, kx, vx, self_slices, xattn_slices)

        # [self | cross] -> 8 groups of each, alternating: (2, g, w) -> (g, 2, w)
        both = torch.stack([out_self.flatten(1), out_cross.flatten(1)], dim=1)
        both = self.heads(both, self.interleave_width).transpose(1, 2).flatten(1)
        return _linear32(both, self.linear_proj.weight)


class MLP(nn.Module):
    """Pre-LN MLP: GELU (erf), or SwiGLU where ``linear_fc1`` rows are ``[gate | up]``."""
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gated = cfg.gated_linear_unit
        self.layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layernorm_eps)
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.ffn_hidden_size * (2 if self.gated else 1), bias=False)
        self.linear_fc2 = nn.Linear(cfg.ffn_hidden_size, cfg.hidden_size, bias=False)

    def forward(self, h):
        a = self.linear_fc1(self.layer_norm(h))
        if self.gated:
            gate, up = a.chunk(2, dim=-1)
            a = F.silu(gate) * up
        else:
            a = F.gelu(a)
        return self.linear_fc2(a)


class AdaModulate(nn.Module):
    """Gate-only adaLN: ``softcap(Linear(SiLU(c)))`` -> ``[C, 2 * hidden]`` (attention | MLP), fp32."""
    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        self.cap = cfg.gate_softcap
        self.proj = nn.Sequential(nn.Linear(cond_dim, int(cfg.hidden_size * cfg.cond_gating_ratio) * 2))

    def forward(self, c):
        g = self.proj(F.silu(c))
        return self.cap * torch.tanh(g.to(_hi(g)) / self.cap)


class TransformerLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, cond_dim: int):
        super().__init__()
        self.ada_modulate_layer = AdaModulate(cfg, cond_dim)
        self.self_attention = ParallelAttention(cfg)
        self.self_attn_post_norm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_eps)
        self.mlp = MLP(cfg)
        self.mlp_post_norm = LayerNorm1p(cfg.hidden_size, cfg.layernorm_eps)

    def forward(self, h, cond, chunk_ids, rope, caption, self_slices, xattn_slices):
        """``h [n, hidden]``, ``cond [C, cond_dim]`` per chunk, ``chunk_ids [n]`` (-1: padding)."""
        gates = self.ada_modulate_layer(cond)
        gates = torch.cat([gates, gates.new_zeros(1, gates.shape[1])])[chunk_ids]  # id -1 -> zero row
        gate_attn, gate_mlp = gates.chunk(2, dim=-1)
        h = h.to(_hi(h))  # fp32 residual stream
        h = h + self.self_attn_post_norm(self.self_attention(h, rope, caption, self_slices, xattn_slices) * gate_attn)
        return h + self.mlp_post_norm(self.mlp(h).to(h.dtype) * gate_mlp)


# --- The model -------------------------------------------------------------------------------

class MagiDiT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        _check_config(cfg)
        self.cfg = cfg
        pt, p = cfg.t_patch_size, cfg.patch_size
        cond_dim = int(cfg.hidden_size * cfg.cond_hidden_ratio)
        self.x_embedder = nn.Conv3d(cfg.in_channels, cfg.hidden_size, (pt, p, p), (pt, p, p), bias=False)
        self.t_embedder = TimestepEmbedder(cond_dim)
        # step-size embedder of zero_init distilled models (magi1: the t_embedder embeds the step size too)
        self.dt_embedder = (TimestepEmbedder(cond_dim) if cfg.step_size_conditioning
                            and cfg.step_size_embedder == "zero_init" else None)
        self.y_embedder = CaptionEmbedder(cfg, cond_dim)
        self.rope = LearnableRope(cfg.head_dim)
        # ModuleDicts only to reproduce MAGI-1's key names
        self.videodit_blocks = nn.ModuleDict(dict(
            layers=nn.ModuleList([TransformerLayer(cfg, cond_dim) for _ in range(cfg.num_layers)]),
            final_layernorm=LayerNorm1p(cfg.hidden_size, cfg.layernorm_eps)))
        self.final_linear = nn.ModuleDict(dict(linear=nn.Linear(cfg.hidden_size, pt * p * p * cfg.out_channels,
                                                                bias=False)))
        self.init_weights()

    @property
    def layers(self) -> nn.ModuleList:
        return self.videodit_blocks.layers

    def init_weights(self):
        """Training-from-scratch init (MAGI-1's is not public): every matrix N(0, init_std), biases 0,
        plain LayerNorms (1, 0), 1p norms 0 (gamma 1), default RoPE bands, ``final_linear`` zero
        so the model starts by predicting v = 0 (DiT practice); the gates are not zeroed because
        the post-norms would renormalise a zero branch."""
        std = self.cfg.init_std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.normal_(m.weight, std=std)
            elif isinstance(m, (nn.LayerNorm, LayerNorm1p)):
                nn.init.constant_(m.weight, 1.0 if isinstance(m, nn.LayerNorm) else 0.0)
            if isinstance(getattr(m, "bias", None), nn.Parameter):
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.y_embedder.null_caption_embedding, std=std)
        self.rope.reset_parameters()
        nn.init.zeros_(self.final_linear.linear.weight)
        if self.dt_embedder is not None:  # adds exact zeros: outputs equal the base model's bit for bit
            nn.init.zeros_(self.dt_embedder.mlp[2].weight)
            nn.init.zeros_(self.dt_embedder.mlp[2].bias)

    def prepare(self, layout: PackedLayout, drop_history: Optional[torch.Tensor] = None) -> TokenMeta:
        """Per-token metadata of ``layout``. ``drop_history [num_samples]`` bool: those samples'
        chunks attend only to themselves (history dropout, the 3rd CFG pass)."""
        device = self.rope.bands.device
        slices = layout.self_attn_slices()
        if drop_history is not None:
            if drop_history.shape != (len(layout.samples),):
                raise ValueError(f"drop_history must be [{len(layout.samples)}] (one per sample), "
                                 f"got {list(drop_history.shape)}")
            drop = drop_history.tolist()
            per_chunk = layout.chunk_self_slices()
            own = layout.chunk_self_slices(window_chunks=1)  # one slice per chunk: itself
            slices = AttnSlices([sl for f, o, s in zip(per_chunk, own, layout.chunk_sample_index())
                                 for sl in (o if drop[s] else f)], layout.total_tokens)
        return TokenMeta(rope_positions(layout, self.cfg.rope_ref_grid).to(device),
                         layout.token_chunk_ids(device), slices)

    def condition(self, t, text_null=None, step_size=None):
        """Per-chunk ``[C, cond_dim]`` = t_emb(t) [+ dt_emb(step_size)] + adaLN caption row. ``step_size_embedder``
        magi1: as in MAGI-1's distilled models the SAME ``t_embedder`` embeds the step size (no extra keys);
        zero_init: ``dt_embedder``, whose zero last layer adds exact zeros until trained (a base checkpoint
        starts unchanged). None: the base model."""
        c = self.t_embedder(t)
        if step_size is not None:
            c = c + (self.t_embedder if self.dt_embedder is None else self.dt_embedder)(step_size)
        if text_null is None:
            text_null = torch.zeros(t.shape[0], dtype=torch.bool, device=t.device)
        return c + self.y_embedder.adaln(text_null)

    def caption_tokens(self, text_emb, text_mask, text_null=None):
        """Packed valid caption tokens after ``y_proj_xattn`` and each chunk's ``(start, end)`` in them; a
        ``text_null`` chunk gets the first ``min(null_caption_tokens, caption_max_length)`` null rows (stored once)."""
        mask = text_mask.bool()
        if text_null is not None:
            mask = mask & ~text_null[:, None]
        ends = torch.cumsum(mask.sum(1), 0).tolist()
        ranges = [(e - n, e) for e, n in zip(ends, mask.sum(1).tolist())]
        null = self.y_embedder.null_caption_embedding
        tokens = text_emb[mask].to(_hi(text_emb, null))
        if text_null is not None and bool(text_null.any()):
            n_null, start = min(self.cfg.null_caption_tokens, self.cfg.caption_max_length), tokens.shape[0]
            tokens = torch.cat([tokens, null[:n_null].to(tokens.dtype)])
            ranges = [(start, start + n_null) if drop else r for r, drop in zip(ranges, text_null.tolist())]
        return self.y_embedder.xattn(tokens), ranges

    def forward(self, x, t, text_emb, text_mask, layout: PackedLayout, text_null=None, drop_history=None,
                step_size=None):
        """Velocity ``[N, C, pt, ph, pw]`` for patch tokens ``x [N, C, pt, ph, pw]`` in layout order. Per chunk:
        ``t [C]`` (0 noise, 1 clean), ``text_emb [C, L, D]``, ``text_mask [C, L]``, ``text_null [C]`` (null
        caption in cross-attention AND adaLN row -1), ``step_size [C]``; ``drop_history [num_samples]``."""
        if x.shape[0] != layout.total_tokens:
            raise ValueError(f"x holds {x.shape[0]} tokens, the layout {layout.total_tokens}")
        return self.forward_tokens(x, t, text_emb, text_mask, self.prepare(layout, drop_history), text_null, step_size)

    def forward_tokens(self, x, t, text_emb, text_mask, meta: TokenMeta, text_null=None, step_size=None):
        """The token computation for the rows of ``meta`` (any subset, any order); per-chunk inputs global."""
        self._check_inputs(x, t, text_emb, text_mask, meta, text_null, step_size)
        order = meta.sort_order()
        if order is not None:  # work in ascending global order, answer in the caller's order
            out = self.forward_tokens(x[order], t, text_emb, text_mask, meta.select(order), text_null, step_size)
            return torch.empty_like(out).index_copy_(0, order, out)
        cond = self.condition(t, text_null, step_size)
        caption, ranges = self.caption_tokens(text_emb, text_mask, text_null)
        xattn = cross_slices(meta.chunk_ids, ranges, caption.shape[0])
        self_slices = meta.local_self_slices()
        rope = self.rope(meta.rope_pos)
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h, cond, meta.chunk_ids, rope, caption, self_slices, xattn)
        return self.head(h)

    def embed(self, x):
        """``[n, C, pt, ph, pw] -> [n, hidden]`` (input rescale and half-channel duplication as MAGI-1)."""
        x = x * self.cfg.x_rescale_factor
        if self.cfg.half_channel_vae:
            x = torch.cat([x, x], dim=1)
        return _linear32(x.flatten(1), self.x_embedder.weight.flatten(1))

    def head(self, h):
        """``[n, hidden] -> [n, C_out, pt, ph, pw]``; per token the final linear is ordered (pt, ph, pw, C)."""
        out = _linear32(self.videodit_blocks.final_layernorm(h), self.final_linear.linear.weight)
        pt, p = self.cfg.t_patch_size, self.cfg.patch_size
        out = out.unflatten(1, (pt, p, p, -1)).permute(0, 4, 1, 2, 3)
        if self.cfg.half_channel_vae:
            out = out[:, : out.shape[1] // 2]
        return out / self.cfg.x_rescale_factor

    def forward_video(self, x, t, text_emb, text_mask, **kw):
        """``x [B, C, T, H, W]``, ``t [B, R]``: B equal samples of R chunks -> velocity ``[B, C, T, H, W]``.
        ``text_emb [B*R, L, D]``, ``text_mask [B*R, L]`` with the chunk fastest (MAGI-1's ``y`` rows);
        ``text_null``, ``step_size`` per chunk (``[B*R]`` or ``[B, R]``), ``drop_history [B]``."""
        b, _, frames, height, width = x.shape
        pt, p, r = self.cfg.t_patch_size, self.cfg.patch_size, t.shape[1]
        if frames % pt or height % p or width % p or (frames // pt) % r:
            raise ValueError(f"video [{frames}, {height}, {width}] does not split into patches "
                             f"({pt}, {p}, {p}) and {r} chunks of equal length")
        grid = (frames // pt, height // p, width // p)
        layout = PackedLayout.pack([(*grid, grid[0] // r)] * b)
        tokens = torch.cat([patchify(v, pt, p, p) for v in x])
        kw = {k: v.reshape(-1) if v is not None and k in ("text_null", "step_size") else v for k, v in kw.items()}
        out = self.forward(tokens, t.reshape(-1), text_emb.reshape(b * r, *text_emb.shape[-2:]),
                           text_mask.reshape(b * r, -1), layout, **kw)
        return torch.stack([unpatchify(o, *grid) for o in out.chunk(b)])

    def _check_inputs(self, x, t, text_emb, text_mask, meta, text_null, step_size):
        cfg, n_chunks, length = self.cfg, t.shape[0], text_emb.shape[1] if text_emb.dim() == 3 else -1
        p, c_in = cfg.patch_size, cfg.in_channels // (2 if cfg.half_channel_vae else 1)
        for name, v, want in (("x", x, (meta.num_tokens, c_in, cfg.t_patch_size, p, p)), ("t", t, (n_chunks,)),
                              ("text_emb", text_emb, (n_chunks, length, cfg.caption_channels)),
                              ("text_mask", text_mask, (n_chunks, length)), ("text_null", text_null, (n_chunks,)),
                              ("step_size", step_size, (n_chunks,))):
            if v is not None and tuple(v.shape) != want:
                raise ValueError(f"{name} must be {list(want)}, got {list(v.shape)}")
        if step_size is not None and not cfg.step_size_conditioning:
            raise ValueError("step_size given but model.step_size_conditioning is False")
        if meta.num_tokens and int(meta.chunk_ids.max()) >= n_chunks:
            raise ValueError(f"token metadata names chunk {int(meta.chunk_ids.max())}, but t has {n_chunks} chunks")


def _check_config(cfg: ModelConfig):
    for bad, msg in (
            (cfg.head_dim % 8, f"head_dim={cfg.head_dim} must be a multiple of 8 (RoPE: head_dim/8 bands per axis)"),
            (cfg.num_heads * cfg.head_dim % INTERLEAVE_GROUPS, "num_heads * head_dim must be a multiple of 8"),
            (cfg.num_heads % cfg.num_kv_heads, f"num_kv_heads={cfg.num_kv_heads} must divide num_heads={cfg.num_heads}"),
            (int(cfg.hidden_size * cfg.cond_gating_ratio) != cfg.hidden_size,
             f"cond_gating_ratio={cfg.cond_gating_ratio} must be 1 (the gates multiply the hidden states)"),
            (cfg.half_channel_vae and (cfg.in_channels % 2 or cfg.out_channels % 2),
             "half_channel_vae needs even in_channels and out_channels")):
        if bad:
            raise ValueError(msg)


MAGI1_FIELD_NAMES = {"num_attention_heads": "num_heads", "num_query_groups": "num_kv_heads",
                     "kv_channels": "head_dim", "layernorm_epsilon": "layernorm_eps"}


def config_from_magi1(model_config: dict, **overrides) -> ModelConfig:
    """Our :class:`ModelConfig` from MAGI-1's ``model_config`` JSON section (unknown keys ignored)."""
    if not model_config.get("apply_layernorm_1p", True):
        raise ValueError("MAGI-1 configs with apply_layernorm_1p=false are not supported")
    heads = model_config.get("num_attention_heads")
    if heads and model_config.get("kv_channels") not in (None, model_config["hidden_size"] // heads):
        raise ValueError("MAGI-1 sizes RoPE by hidden_size / num_attention_heads; it must equal kv_channels")
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    kw = {MAGI1_FIELD_NAMES.get(k, k): v for k, v in model_config.items() if MAGI1_FIELD_NAMES.get(k, k) in names}
    return ModelConfig(**{**kw, **overrides})
