"""Slice attention kernels: ``(q, k, v, slices) -> (out, lse)``.

Shapes (packed varlen, no batch dimension, as flash-attn's varlen API):

- ``q``: ``[Nq, Hq, D]``, ``k`` and ``v``: ``[Nk, Hk, D]`` with ``Hq % Hk == 0`` (grouped-query
  attention: query head ``h`` uses key/value head ``h // (Hq // Hk)``).
- ``out``: ``[Nq, Hq, D]`` in ``q``'s dtype; ``lse``: ``[Nq, Hq]`` float32, the log-sum-exp of
  the scaled scores of every allowed key of the row. A row that sees no key has ``out = 0``
  and ``lse = -inf``.

Because every kernel returns the LSE, partial results over disjoint key sets merge exactly
(:func:`merge_partials`); context parallelism relies on that.

Backends, picked at run time by :func:`slice_attention`:

- ``torch``: plain PyTorch, any device, differentiable by autograd. The CPU training path
  and the reference for the others.
- further backends (flex_attention, flash-attn varlen) register in ``BACKENDS``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from .mask import AttnSlices

_NEG_INF = float("-inf")


def _expand_kv_heads(x: torch.Tensor, hq: int) -> torch.Tensor:
    """``[N, Hk, D] -> [N, Hq, D]`` by repeating each KV head for its query group."""
    hk = x.shape[1]
    if hq % hk != 0:
        raise ValueError(f"query heads ({hq}) must be a multiple of key/value heads ({hk})")
    return x if hk == hq else x.repeat_interleave(hq // hk, dim=1)


def _attend_one_slice(q, k, v, s, scale):
    """Attention of one slice, accumulated in fp32 (fp64 for fp64 inputs): ``(out [Lq,H,D], lse [Lq,H])``."""
    acc = torch.promote_types(q.dtype, torch.float32)
    qs = q[s.q_range.start:s.q_range.end].to(acc)
    ks = k[s.k_range.start:s.k_range.end].to(acc)
    vs = v[s.k_range.start:s.k_range.end].to(acc)
    scores = torch.einsum("qhd,khd->hqk", qs, ks) * scale
    if s.mask_type.value != "full":
        lo, hi = s.row_bounds(torch.arange(s.q_range.size, device=q.device))
        cols = torch.arange(s.k_range.size, device=q.device)
        allowed = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
        scores = scores.masked_fill(~allowed, _NEG_INF)
    lse = torch.logsumexp(scores, dim=-1)  # [H, Lq]
    # rows with no allowed key: lse = -inf; use 0 there so the softmax is 0, not NaN
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe_lse[..., None])
    out = torch.einsum("hqk,khd->qhd", probs, vs)
    return out, lse.transpose(0, 1)


def merge_partials(parts, nq: int, hq: int, d: int, device, out_dtype):
    """Merge partial results ``[(q_start, out_i [L,H,D], lse_i [L,H]), ...]`` by log-sum-exp.

    Partials may cover any rows, overlapping or not, as long as their key sets are disjoint.
    Rows no partial covers get ``out = 0``, ``lse = -inf``. Differentiable.
    """
    if not parts:
        return (torch.zeros(nq, hq, d, device=device, dtype=out_dtype),
                torch.full((nq, hq), _NEG_INF, device=device))
    rows = torch.cat([torch.arange(q0, q0 + o.shape[0], device=device) for q0, o, _ in parts])
    outs = torch.cat([o for _, o, _ in parts])
    lses = torch.cat([l for _, _, l in parts])
    # a per-row max keeps the exponentials in range; it needs no gradient
    acc = lses.dtype
    row_max = torch.full((nq, hq), _NEG_INF, device=device, dtype=acc)
    row_max = row_max.scatter_reduce(0, rows[:, None].expand_as(lses), lses.detach(), "amax")
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights_unnorm = torch.exp(lses - row_max[rows])
    sumexp = torch.zeros(nq, hq, device=device, dtype=acc).index_add(0, rows, weights_unnorm)
    lse = torch.log(sumexp) + row_max
    safe_lse = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    weights = torch.exp(lses - safe_lse[rows])
    out = torch.zeros(nq, hq, d, device=device, dtype=outs.dtype).index_add(0, rows, outs * weights[..., None])
    return out.to(out_dtype), lse


def torch_slice_attention(q, k, v, slices: AttnSlices, scale: float | None = None):
    """Reference/CPU backend: one dense block per slice, merged by LSE."""
    nq, hq, d = q.shape
    if slices.total_q != nq or slices.total_k != k.shape[0]:
        raise ValueError(
            f"slices describe {slices.total_q} queries x {slices.total_k} keys, "
            f"got q with {nq} and k with {k.shape[0]} tokens")
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = _expand_kv_heads(k, hq), _expand_kv_heads(v, hq)
    parts = []
    for s in slices:
        if s.area() == 0:
            continue
        out_s, lse_s = _attend_one_slice(q, k, v, s, scale)
        parts.append((s.q_range.start, out_s, lse_s))
    return merge_partials(parts, nq, hq, d, q.device, q.dtype)


BACKENDS: dict[str, Callable] = {"torch": torch_slice_attention}


def pick_backend(q: torch.Tensor, requires_grad: bool) -> str:
    """The fastest registered backend that supports this device and (for training) backward."""
    return "torch"


def slice_attention(q, k, v, slices: AttnSlices, scale: float | None = None, backend: str | None = None):
    """Attention of ``q`` over ``k, v`` restricted to ``slices``; returns ``(out, lse)``."""
    if backend is None:
        backend = pick_backend(q, torch.is_grad_enabled() and (q.requires_grad or k.requires_grad))
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; available: {sorted(BACKENDS)}")
    return BACKENDS[backend](q, k, v, slices, scale)


def attention(q, k, v, slices: AttnSlices, scale: float | None = None) -> torch.Tensor:
    """The model's attention seam on one process: ``out [Nq, Hq, D]``."""
    return slice_attention(q, k, v, slices, scale)[0]
