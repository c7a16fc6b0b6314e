"""Attention masks as lists of slices: the small algebra everything else speaks.

A mask over a query sequence of length ``Nq`` and a key sequence of length ``Nk`` is a list
of :class:`AttnSlice` ``(q_range, k_range, mask_type)``. Ranges are **half-open** token
intervals ``[start, end)`` over global indices. A query row may be covered by several slices;
the attention kernel merges their partial results exactly through the log-sum-exp, so the
allowed (q, k) pairs of the mask are the union of every slice's pairs. Slices of one mask
should not overlap in (q, k) space (every builder here guarantees that), otherwise a pair
would be counted twice.

Within one slice with ``Lq`` query rows and ``Lk`` key columns, row ``i`` and column ``j``
(both 0-based inside the slice) are allowed when:

- ``FULL``:       always.
- ``CAUSAL``:     ``j <= i + (Lk - Lq)``. Aligned to the **bottom-right** corner: the last
  row sees the whole k range. A square causal slice is the usual lower triangle; with
  ``Lk > Lq`` it is a trapezoid; with ``Lk < Lq`` the top ``Lq - Lk`` rows see nothing.
- ``INV_CAUSAL``: ``j >= i``. Aligned to the **top-left** corner: the first row sees the
  whole k range.
- ``BI_CAUSAL``:  both of the above: a band of width ``Lk - Lq + 1`` (empty if ``Lk < Lq``).

This is exactly MagiAttention's convention. The area of a slice (its number of allowed
pairs) is the attention work it costs; the dispatch solver balances it across ranks.

Dense masks are built only by :meth:`AttnSlices.to_dense`, for tests and the reference
backend; the model and the kernels never materialise an N x N mask.
"""

from __future__ import annotations

import enum
import json
import numbers
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch


class MaskType(str, enum.Enum):
    """How the allowed pairs of one slice are shaped (see the module docstring)."""

    FULL = "full"
    CAUSAL = "causal"
    INV_CAUSAL = "inv_causal"
    BI_CAUSAL = "bi_causal"


def _check_int(name: str, value) -> int:
    if type(value) is int:  # the common case, without the ABC check below (masks build ~1000 ranges a step)
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
    return int(value)


@dataclass(frozen=True, order=True)
class AttnRange:
    """A half-open interval ``[start, end)`` of token indices, ``0 <= start <= end``."""

    start: int
    end: int

    def __post_init__(self):
        start = _check_int("range start", self.start)
        end = _check_int("range end", self.end)
        if start < 0:
            raise ValueError(f"range [{start}, {end}) starts below 0")
        if end < start:
            raise ValueError(f"range [{start}, {end}) is reversed (end < start)")
        object.__setattr__(self, "start", start)
        object.__setattr__(self, "end", end)

    @property
    def size(self) -> int:
        return self.end - self.start

    def is_empty(self) -> bool:
        return self.end == self.start

    def intersect(self, other: "AttnRange") -> "AttnRange":
        """The overlap of two ranges (an empty range at ``max(start)`` if they do not meet)."""
        start = max(self.start, other.start)
        return AttnRange(start, max(start, min(self.end, other.end)))

    def shift(self, offset: int) -> "AttnRange":
        return AttnRange(self.start + offset, self.end + offset)

    def __repr__(self) -> str:
        return f"[{self.start}, {self.end})"


@dataclass(frozen=True)
class AttnSlice:
    """One rectangle of the mask with its shape: queries ``q_range`` attend keys ``k_range``."""

    q_range: AttnRange
    k_range: AttnRange
    mask_type: MaskType = MaskType.FULL

    def __post_init__(self):
        if not isinstance(self.q_range, AttnRange):
            object.__setattr__(self, "q_range", AttnRange(*self.q_range))
        if not isinstance(self.k_range, AttnRange):
            object.__setattr__(self, "k_range", AttnRange(*self.k_range))
        try:
            object.__setattr__(self, "mask_type", MaskType(self.mask_type))
        except ValueError:
            allowed = ", ".join(t.value for t in MaskType)
            raise ValueError(f"unknown mask type {self.mask_type!r}; allowed: {allowed}") from None

    def area(self) -> int:
        """Number of allowed (q, k) pairs."""
        return slice_area(self.q_range.size, self.k_range.size, self.mask_type)

    def row_bounds(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per query row of the slice, the allowed key columns ``[lo, hi)`` (slice-local).

        ``rows`` are slice-local row indices (default: all ``Lq`` rows). Returned bounds are
        clamped to ``[0, Lk]``; ``hi <= lo`` means the row sees nothing.
        """
        lq, lk = self.q_range.size, self.k_range.size
        if rows is None:
            rows = torch.arange(lq)
        lo = torch.zeros_like(rows)
        hi = torch.full_like(rows, lk)
        if self.mask_type in (MaskType.CAUSAL, MaskType.BI_CAUSAL):
            hi = torch.clamp(rows + (lk - lq) + 1, 0, lk)
        if self.mask_type in (MaskType.INV_CAUSAL, MaskType.BI_CAUSAL):
            lo = torch.clamp(rows, 0, lk)
        return lo, hi

    def to_list(self) -> list:
        """The JSON form used by mask files: ``[q_start, q_end, k_start, k_end, type]``."""
        q, k = self.q_range, self.k_range
        return [q.start, q.end, k.start, k.end, self.mask_type.value]

    def __repr__(self) -> str:
        return f"AttnSlice(q={self.q_range!r}, k={self.k_range!r}, {self.mask_type.value})"


def slice_area(lq: int, lk: int, mask_type: MaskType | str) -> int:
    """Closed-form area of a slice with ``lq`` rows and ``lk`` columns."""
    mask_type = MaskType(mask_type)
    if lq == 0 or lk == 0:
        return 0
    if mask_type is MaskType.FULL:
        return lq * lk
    if mask_type in (MaskType.CAUSAL, MaskType.INV_CAUSAL):
        if lk >= lq:
            return lq * lk - lq * (lq - 1) // 2
        return lk * (lk + 1) // 2
    # BI_CAUSAL: a band of width lk - lq + 1 in every row
    return lq * (lk - lq + 1) if lk >= lq else 0


class AttnSlices(Sequence[AttnSlice]):
    """An immutable, validated mask: slices over ``total_q`` queries and ``total_k`` keys."""

    def __init__(self, slices: Iterable[AttnSlice | Sequence], total_q: int, total_k: int | None = None):
        self.total_q = _check_int("total_q", total_q)
        self.total_k = self.total_q if total_k is None else _check_int("total_k", total_k)
        if self.total_q < 0 or self.total_k < 0:
            raise ValueError("sequence lengths must be >= 0")
        parsed = []
        for s in slices:
            if not isinstance(s, AttnSlice):
                if not isinstance(s, (list, tuple)) or len(s) != 5:
                    raise ValueError(f"a slice is [q_start, q_end, k_start, k_end, type], got {s!r}")
                s = AttnSlice(AttnRange(s[0], s[1]), AttnRange(s[2], s[3]), s[4])
            if s.q_range.end > self.total_q:
                raise ValueError(f"{s!r}: q range ends past total_q={self.total_q}")
            if s.k_range.end > self.total_k:
                raise ValueError(f"{s!r}: k range ends past total_k={self.total_k}")
            parsed.append(s)
        self._slices = tuple(parsed)

    def __getitem__(self, i):
        return self._slices[i]

    def __len__(self) -> int:
        return len(self._slices)

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, AttnSlices)
            and self._slices == other._slices
            and (self.total_q, self.total_k) == (other.total_q, other.total_k)
        )

    def __repr__(self) -> str:
        return f"AttnSlices({list(self._slices)!r}, total_q={self.total_q}, total_k={self.total_k})"

    def area(self) -> int:
        return sum(s.area() for s in self._slices)

    def nonempty(self) -> "AttnSlices":
        """The same mask without slices of zero area."""
        return AttnSlices([s for s in self._slices if s.area() > 0], self.total_q, self.total_k)

    def shift(self, q_offset: int, k_offset: int | None = None, total_q: int | None = None,
              total_k: int | None = None) -> "AttnSlices":
        """Move every slice by the offsets (e.g. to place one sample's mask in a packed batch)."""
        k_offset = q_offset if k_offset is None else k_offset
        return AttnSlices(
            [AttnSlice(s.q_range.shift(q_offset), s.k_range.shift(k_offset), s.mask_type) for s in self._slices],
            self.total_q + q_offset if total_q is None else total_q,
            self.total_k + k_offset if total_k is None else total_k,
        )

    def to_dense(self, device=None) -> torch.Tensor:
        """Boolean ``[total_q, total_k]`` mask; for tests and the reference backend only."""
        dense = torch.zeros(self.total_q, self.total_k, dtype=torch.bool, device=device)
        for s in self._slices:
            lo, hi = s.row_bounds(torch.arange(s.q_range.size, device=device))
            cols = torch.arange(s.k_range.size, device=device)
            block = (cols[None, :] >= lo[:, None]) & (cols[None, :] < hi[:, None])
            dense[s.q_range.start:s.q_range.end, s.k_range.start:s.k_range.end] |= block
        return dense

    def to_json(self) -> dict:
        """The mask-file form read by ``python -m magitrain.parallel.dispatch``."""
        if self.total_q != self.total_k:
            raise ValueError("mask files describe self-attention: total_q must equal total_k")
        return {"total_seqlen": self.total_q, "slices": [s.to_list() for s in self._slices]}

    @classmethod
    def from_json(cls, obj: dict) -> "AttnSlices":
        if not isinstance(obj, dict) or "total_seqlen" not in obj or "slices" not in obj:
            raise ValueError('a mask file is {"total_seqlen": N, "slices": [[qs, qe, ks, ke, type], ...]}')
        if not isinstance(obj["slices"], list):
            raise ValueError('"slices" must be a list')
        return cls(obj["slices"], obj["total_seqlen"])

    @classmethod
    def load(cls, path: str) -> "AttnSlices":
        with open(path) as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(obj)


# ----------------------------------------------------------------------------------------
# Builders for the masks users need. Each returns non-overlapping slices.
# ----------------------------------------------------------------------------------------

def block_causal_video(chunk_tokens: Sequence[int], offset: int = 0, total: int | None = None,
                       window_chunks: int | None = None) -> AttnSlices:
    """MAGI-1's training mask for one video: chunk ``i`` attends FULL to chunks ``0..i``.

    ``chunk_tokens[i]`` is the token count of chunk ``i`` (chunks are contiguous, starting at
    ``offset``). With ``window_chunks=w`` chunk ``i`` sees only chunks ``max(0, i-w+1)..i``
    (MAGI-1's inference KV window). One FULL slice per chunk.
    """
    starts = [offset]
    for n in chunk_tokens:
        starts.append(starts[-1] + _check_int("chunk token count", n))
    end = starts[-1]
    slices = []
    for i in range(len(chunk_tokens)):
        first = 0 if window_chunks is None else max(0, i - window_chunks + 1)
        slices.append(AttnSlice(AttnRange(starts[i], starts[i + 1]), AttnRange(starts[first], starts[i + 1])))
    return AttnSlices(slices, end if total is None else total)


def varlen_full(seqlens: Sequence[int], total: int | None = None) -> AttnSlices:
    """Packed samples, each attending FULL to itself."""
    return _varlen(seqlens, MaskType.FULL, total)


def varlen_causal(seqlens: Sequence[int], total: int | None = None) -> AttnSlices:
    """Packed samples, each causal in itself (documents in LLM packing)."""
    return _varlen(seqlens, MaskType.CAUSAL, total)


def _varlen(seqlens, mask_type, total):
    slices, start = [], 0
    for n in seqlens:
        n = _check_int("sequence length", n)
        slices.append(AttnSlice(AttnRange(start, start + n), AttnRange(start, start + n), mask_type))
        start += n
    return AttnSlices(slices, start if total is None else total)


def sliding_window_causal(seqlen: int, window: int, offset: int = 0, total: int | None = None) -> AttnSlices:
    """Causal attention where row ``i`` sees keys ``[i - window + 1, i]``.

    Expressed as at most two slices: a CAUSAL triangle for the first ``window`` rows and a
    BI_CAUSAL band for the rest.
    """
    seqlen, window = _check_int("seqlen", seqlen), _check_int("window", window)
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    head = min(window, seqlen)
    slices = [AttnSlice(AttnRange(offset, offset + head), AttnRange(offset, offset + head), MaskType.CAUSAL)]
    if seqlen > window:
        # rows [window, seqlen) see [i-window+1, i]: a band over keys [1, seqlen)
        slices.append(AttnSlice(AttnRange(offset + window, offset + seqlen),
                                AttnRange(offset + 1, offset + seqlen), MaskType.BI_CAUSAL))
    return AttnSlices(slices, offset + seqlen if total is None else total)


def packed_videos(videos: Sequence[Sequence[int]], total: int | None = None,
                  window_chunks: int | None = None) -> AttnSlices:
    """Several videos (and images: a video of one chunk) packed one after another.

    ``videos[v]`` lists the token counts of video ``v``'s chunks. Each video gets the
    block-causal mask of :func:`block_causal_video`; nothing crosses videos.
    """
    slices, offset = [], 0
    for chunks in videos:
        part = block_causal_video(chunks, offset=offset, window_chunks=window_chunks)
        slices.extend(part)
        offset = part.total_q
    return AttnSlices(slices, offset if total is None else total)
