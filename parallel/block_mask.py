"""flex_attention's ``BlockMask`` built straight from slice ranges, never from a token grid.

``create_block_mask(mask_mod, ...)`` run eagerly evaluates ``mask_mod`` on all ``Nq x Nk`` token
pairs and sums them per block: memory quadratic in tokens (about 640 MB of resident memory at 8K
tokens; a 24B run has ~65K tokens per rank and a new mask every step). The slices already say
which keys every query row sees, so the per-block counts follow from ranges:

- the sequence is cut into blocks of ``block_size`` (128: flex's default) rows and columns;
- for every slice and every query block its rows cross, the rows' key intervals ``[lo, hi)`` are
  clipped to each key block in the slice's reach: ``rows x key blocks`` numbers at a time, at most
  ``block_size x Nk / block_size`` (linear in tokens);
- the counts of allowed pairs per (query block, key block), summed over slices (slices of one
  mask never overlap, so the sum is the union's count), are ``Nq/B x Nk/B`` integers: quadratic
  only in blocks (512 x 512 at 64K tokens);
- a block is *full* when every one of its ``B x B`` pairs is allowed (flex then skips
  ``mask_mod``), *partial* when some are (``mask_mod`` decides per pair, from per-row key
  intervals: ``[Nq, M]`` integers, ``M`` the most slices over one row), empty otherwise. Blocks
  that stick out past the sequence end are never full, as with ``create_block_mask``.

The result is the one ``create_block_mask`` gives for the same mask_mod (same counts, same index
order: each row's blocks in ascending order first), tested on small masks.
"""

from __future__ import annotations

import torch

from .mask import AttnSlices

BLOCK_SIZE = 128  # flex_attention's default sparse block size

_OFFERED: list = []  # [(slices, block_size, counts)], most recent first: counts computed ahead
_OFFERED_SIZE = 16


def offer_block_counts(slices: AttnSlices, counts: torch.Tensor, block_size: int = BLOCK_SIZE) -> None:
    """Hand over counts computed elsewhere (the loader, see :mod:`magitrain.parallel.solve_ahead`):
    :func:`block_counts` of an equal mask returns them instead of recomputing."""
    _OFFERED.insert(0, (slices, block_size, counts))
    del _OFFERED[_OFFERED_SIZE:]


def block_counts(slices: AttnSlices, block_size: int = BLOCK_SIZE) -> torch.Tensor:
    """``[ceil(Nq/B), ceil(Nk/B)]`` int64: allowed (query, key) pairs per block of the mask."""
    for cached, size, counts in _OFFERED:
        if size == block_size and (cached is slices or cached == slices):
            return counts
    b = block_size
    nbq, nbk = -(-slices.total_q // b), -(-slices.total_k // b)
    counts = torch.zeros(nbq, nbk, dtype=torch.int64)
    for s in slices:
        if s.area() == 0:
            continue
        q0, q1, k0 = s.q_range.start, s.q_range.end, s.k_range.start
        for qb in range(q0 // b, (q1 - 1) // b + 1):
            r0, r1 = max(q0, qb * b), min(q1, (qb + 1) * b)
            lo, hi = s.row_bounds(torch.arange(r0 - q0, r1 - q0))
            lo, hi = lo + k0, hi + k0  # absolute key columns of each row
            seen = hi > lo
            if not bool(seen.any()):
                continue
            kb0, kb1 = int(lo[seen].min()) // b, (int(hi[seen].max()) - 1) // b + 1
            starts = torch.arange(kb0, kb1) * b
            overlap = (torch.minimum(hi[:, None], starts[None, :] + b) - torch.maximum(lo[:, None], starts[None, :]))
            counts[qb, kb0:kb1] += overlap.clamp_(min=0).sum(0)
    return counts


def _ordered(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(blocks per row, column indices with the row's blocks first in ascending order): flex's layout."""
    blocks = blocks.to(torch.int32)
    return (blocks.sum(-1).to(torch.int32)[None, None].contiguous(),
            torch.argsort(blocks, dim=-1, descending=True, stable=True).to(torch.int32)[None, None].contiguous())


def slice_block_mask(slices: AttnSlices, mask_mod, block_size: int = BLOCK_SIZE, device=None):
    """The ``BlockMask`` of ``slices`` for ``flex_attention``; ``mask_mod`` decides pairs inside
    partial blocks (it must allow exactly the slices' pairs)."""
    from torch.nn.attention.flex_attention import BlockMask

    counts = block_counts(slices, block_size)
    full = counts == block_size * block_size
    partial = (counts > 0) & ~full
    kv_num, kv_idx = _ordered(partial)
    full_num, full_idx = _ordered(full)
    mask = BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=block_size, mask_mod=mask_mod,
                                    seq_lengths=(slices.total_q, slices.total_k))
    return mask if device is None else mask.to(device)
