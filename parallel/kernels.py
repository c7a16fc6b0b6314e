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

- ``torch``: plain PyTorch, one dense block per slice, any device, differentiable by autograd.
  The reference for the others.
- ``grouped``: the same function with the slices grouped into a few batched dense blocks
  (:mod:`.grouped_attention`); plain PyTorch, differentiable. The CPU path (training and
  inference): a packed batch of short clips has hundreds of slices, and per-slice overhead,
  not arithmetic, dominated the reference's time.
- ``flex``: ``torch.nn.attention.flex_attention`` with a block mask built from the slices
  (compiled on CUDA). Differentiable on CUDA; forward only on CPU (its backward raises there),
  so it is picked on CUDA only.
- ``flash``: flash-attn's varlen kernel, CUDA with fp16/bf16 only, forward only here (its
  autograd drops the LSE gradient, which partial results need), so it is picked for inference.

:func:`partial_attention_backward` gives the gradient of one partial result (a key subset)
through the final LSE merge; context parallelism uses it to recompute stage by stage.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch

from .block_mask import slice_block_mask
from .grouped_attention import grouped_slice_attention
from .mask import AttnRange, AttnSlice, AttnSlices, MaskType

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
    _check_shapes(q, k, slices)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    k, v = _expand_kv_heads(k, hq), _expand_kv_heads(v, hq)
    parts = []
    for s in slices:
        if s.area() == 0:
            continue
        out_s, lse_s = _attend_one_slice(q, k, v, s, scale)
        parts.append((s.q_range.start, out_s, lse_s))
    return merge_partials(parts, nq, hq, d, q.device, q.dtype)


def _flex_slice_attention(q, k, v, slices: AttnSlices, scale: float | None = None):
    """flex_attention over the whole mask in one call; the block mask skips untouched blocks."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    nq, hq, d = q.shape
    _check_shapes(q, k, slices)
    block_mask = _flex_block_mask(slices, q.device)
    fn = _compiled_flex() if q.is_cuda else flex_attention
    out, aux = fn(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                  block_mask=block_mask, scale=1.0 / math.sqrt(d) if scale is None else scale,
                  enable_gqa=k.shape[1] != hq, return_aux=AuxRequest(lse=True))
    return out[0].transpose(0, 1), aux.lse[0].transpose(0, 1).to(torch.promote_types(q.dtype, torch.float32))


_COMPILED_FLEX = None
_BLOCK_MASKS: list = []  # [(slices, device, block_mask)], most recent first


def _flex_block_mask(slices: AttnSlices, device):
    """The block mask of ``slices``, cached: the layers of one step (and the steps of one CP plan,
    whose local masks are the same objects) share it; a mask equal to a cached one reuses it.

    Built from the slice ranges (:func:`~magitrain.parallel.block_mask.slice_block_mask`: memory
    linear in tokens, quadratic only in 128-token blocks), never from an ``Nq x Nk`` grid. Inside
    partial blocks, the mask function tests ``kv`` against the few key intervals ``[lo, hi)`` of
    each query row (``[Nq, M]`` tensors, ``M`` = most slices over one row).
    """
    for cached, dev, block_mask in _BLOCK_MASKS:
        if dev == device and (cached is slices or cached == slices):
            return block_mask
    block_mask = slice_block_mask(slices, interval_mask_mod(slices, device), device=device)
    _BLOCK_MASKS.insert(0, (slices, device, block_mask))
    del _BLOCK_MASKS[16:]
    return block_mask


def interval_mask_mod(slices: AttnSlices, device=None):
    """flex's ``mask_mod(b, h, q, kv)`` of ``slices``: is ``kv`` in one of row ``q``'s key intervals."""
    lo, hi = row_intervals(slices, device)

    def mask_mod(b, h, qi, ki):
        allowed = (ki >= lo[qi, 0]) & (ki < hi[qi, 0])
        for m in range(1, lo.shape[1]):
            allowed = allowed | ((ki >= lo[qi, m]) & (ki < hi[qi, m]))
        return allowed

    return mask_mod


def row_intervals(slices: AttnSlices, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, the absolute key intervals it may see: ``lo, hi`` of shape ``[Nq, M]``.

    Column ``m`` of a row holds one slice's interval (empty ``[0, 0)`` where unused); slices
    whose q ranges overlap get different columns.
    """
    columns = torch.zeros(slices.total_q, dtype=torch.long)
    placed = []
    for s in slices:
        if s.area() == 0:
            continue
        q0, q1 = s.q_range.start, s.q_range.end
        col = int(columns[q0:q1].max())
        columns[q0:q1] = col + 1
        lo, hi = s.row_bounds()
        placed.append((q0, q1, col, lo + s.k_range.start, hi + s.k_range.start))
    width = max(1, int(columns.max()) if slices.total_q else 1)
    lo_t = torch.zeros(slices.total_q, width, dtype=torch.long)
    hi_t = torch.zeros(slices.total_q, width, dtype=torch.long)
    for q0, q1, col, lo, hi in placed:
        lo_t[q0:q1, col], hi_t[q0:q1, col] = lo, hi
    return lo_t.to(device), hi_t.to(device)


def _compiled_flex():
    global _COMPILED_FLEX
    if _COMPILED_FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        _COMPILED_FLEX = torch.compile(flex_attention)
    return _COMPILED_FLEX


def _flash_window(s) -> tuple[bool, tuple[int, int]]:
    """flash-attn's ``(causal, window_size)`` for a slice whose every row sees a key.

    flash-attn aligns causal masks and windows bottom-right, as our CAUSAL does: row ``i``
    sees ``[i + Lk - Lq - left, i + Lk - Lq + right]``.
    """
    diff = s.k_range.size - s.q_range.size
    return {
        "full": (False, (-1, -1)),
        "causal": (True, (-1, -1)),
        "inv_causal": (False, (diff, -1)),
        "bi_causal": (False, (diff, 0)),
    }[s.mask_type.value]


def _flash_slice_attention(q, k, v, slices: AttnSlices, scale: float | None = None):
    """flash-attn varlen: slices with the same ``(causal, window)`` go in one batched call.

    Rows that see no key are trimmed first (flash-attn gives them ``lse = +inf``, which
    would poison the merge).
    """
    from flash_attn import flash_attn_varlen_func

    nq, hq, d = q.shape
    _check_shapes(q, k, slices)
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    groups: dict = {}
    for s in trim_empty_rows(slices):
        groups.setdefault(_flash_window(s), []).append(s)
    parts = []
    for (causal, window), group in groups.items():
        q_idx = torch.cat([torch.arange(s.q_range.start, s.q_range.end) for s in group]).to(q.device)
        k_idx = torch.cat([torch.arange(s.k_range.start, s.k_range.end) for s in group]).to(q.device)
        cu_q = torch.tensor([0] + [s.q_range.size for s in group]).cumsum(0).to(q.device, torch.int32)
        cu_k = torch.tensor([0] + [s.k_range.size for s in group]).cumsum(0).to(q.device, torch.int32)
        out, lse, _ = flash_attn_varlen_func(
            q[q_idx], k[k_idx], v[k_idx], cu_q, cu_k,
            max(s.q_range.size for s in group), max(s.k_range.size for s in group),
            softmax_scale=scale, causal=causal, window_size=window, return_attn_probs=True)
        lse = lse.transpose(0, 1).float()  # flash-attn >= 2.4: [H, total_q]
        for s, start in zip(group, cu_q[:-1].tolist()):
            parts.append((s.q_range.start, out[start:start + s.q_range.size], lse[start:start + s.q_range.size]))
    return merge_partials(parts, nq, hq, d, q.device, q.dtype)


def trim_empty_rows(slices: AttnSlices) -> list:
    """The slices of positive area, with the rows that see no key cut off.

    A CAUSAL slice with fewer keys than queries has empty top rows, an INV_CAUSAL one empty
    bottom rows; after trimming, every row of every returned slice sees at least one key.
    """
    out = []
    for s in slices:
        if s.area() == 0:
            continue
        lq, lk = s.q_range.size, s.k_range.size
        if lk < lq and s.mask_type is MaskType.CAUSAL:
            s = AttnSlice(AttnRange(s.q_range.end - lk, s.q_range.end), s.k_range, s.mask_type)
        elif lk < lq and s.mask_type is MaskType.INV_CAUSAL:
            s = AttnSlice(AttnRange(s.q_range.start, s.q_range.start + lk), s.k_range, s.mask_type)
        out.append(s)
    return out


def _check_shapes(q, k, slices: AttnSlices):
    if slices.total_q != q.shape[0] or slices.total_k != k.shape[0]:
        raise ValueError(
            f"slices describe {slices.total_q} queries x {slices.total_k} keys, "
            f"got q with {q.shape[0]} and k with {k.shape[0]} tokens")


BACKENDS: dict[str, Callable] = {
    "torch": torch_slice_attention,
    "grouped": grouped_slice_attention,
    "flex": _flex_slice_attention,
    "flash": _flash_slice_attention,
}


def _flash_available() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


_FORCED: list[str] = []  # forced_backend's stack


@contextlib.contextmanager
def forced_backend(name: str):
    """Every :func:`slice_attention` call inside picks ``name`` (e.g. measuring one kernel's memory)."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(BACKENDS)}")
    _FORCED.append(name)
    try:
        yield
    finally:
        _FORCED.pop()


def pick_backend(q: torch.Tensor, requires_grad: bool) -> str:
    """The fastest backend that supports this device, dtype and (for training) backward.

    CPU: ``grouped`` (flex has no CPU backward, and its eager CPU forward is slower). Fake and
    meta tensors (the planner's traced dry runs): ``torch``, the reference, one block per slice.
    CUDA: ``flash`` for fp16/bf16 inference when flash-attn imports, else ``flex``.
    """
    if _FORCED:
        return _FORCED[-1]
    if q.is_meta or getattr(q, "fake_mode", None) is not None:
        return "torch"
    if not q.is_cuda:
        return "grouped"
    if not requires_grad and q.dtype in (torch.float16, torch.bfloat16) and _flash_available():
        return "flash"
    return "flex"


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


def partial_attention_backward(q, k, v, slices: AttnSlices, out, lse, dout, scale: float | None = None,
                               backend: str | None = None):
    """Gradients ``(dq, dk, dv)`` of one partial result, seen through the final LSE merge.

    The final output merged ``out = sum_p exp(lse_p - lse) * out_p`` over partials ``p`` with
    disjoint key sets. For the partial over ``(k, v, slices)`` this recomputes ``(out_p,
    lse_p)`` and backpropagates ``dL/dout_p = w * dout`` and ``dL/dlse_p = w * <dout, out_p -
    out>`` with ``w = exp(lse_p - lse)``: the exact gradient, so each partial can be done alone
    (e.g. per CP stage, with its keys freed afterwards). ``out``, ``lse``, ``dout`` are the final
    ``[Nq, Hq, D]``, ``[Nq, Hq]``, ``[Nq, Hq, D]``. Needs a differentiable backend.
    """
    if backend == "flash":
        raise ValueError("the flash backend is forward-only; use torch or flex for training")
    if slices.area() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    with torch.enable_grad():
        q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
        out_p, lse_p = slice_attention(q_, k_, v_, slices, scale, backend)
        covered = torch.isfinite(lse_p) & torch.isfinite(lse)
        w = torch.where(covered, torch.exp(lse_p - torch.where(covered, lse, lse_p)), torch.zeros_like(lse_p))
        acc = lse_p.dtype
        g_out = (w[..., None] * dout.to(acc)).to(out_p.dtype)
        g_lse = w * (dout.to(acc) * (out_p.detach().to(acc) - out.to(acc))).sum(-1)
        return torch.autograd.grad((out_p, lse_p), (q_, k_, v_), (g_out, g_lse), allow_unused=True,
                                   materialize_grads=True)
