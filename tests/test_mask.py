"""Mask algebra: every builder and slice type against a dense mask built from the definition."""

import json

import pytest
import torch
from hypothesis import given, settings, strategies as st

from magitrain.layout import PackedLayout
from magitrain.parallel.mask import (AttnRange, AttnSlice, AttnSlices, MaskType, block_causal_video,
                                     packed_videos, slice_area, sliding_window_causal, varlen_causal,
                                     varlen_full)

SETTINGS = settings(max_examples=40, deadline=None)


def dense_from_rule(total: int, sees) -> torch.Tensor:
    """``[total, total]`` bool with ``[i, j] = sees(i, j)``, computed on index grids."""
    i = torch.arange(total)[:, None].expand(total, total)
    j = torch.arange(total)[None, :].expand(total, total)
    return sees(i, j)


def token_labels(lengths, total: int) -> torch.Tensor:
    """Per token, the index of the run (of ``lengths``) it falls in; ``-1`` past the runs."""
    labels = torch.full((total,), -1, dtype=torch.long)
    start = 0
    for idx, n in enumerate(lengths):
        labels[start:start + n] = idx
        start += n
    return labels


def block_causal_reference(videos, total, window=None):
    """Token i sees j iff same video and chunk(j) <= chunk(i) (and within ``window`` chunks)."""
    chunk_sizes = [n for video in videos for n in video]
    chunk = token_labels(chunk_sizes, total)
    video_of_chunk = torch.tensor([v for v, video in enumerate(videos) for _ in video] + [-1])
    video = video_of_chunk[chunk]  # chunk -1 (padding) maps to the trailing -1

    def sees(i, j):
        ok = (video[i] == video[j]) & (video[i] >= 0) & (chunk[j] <= chunk[i])
        if window is not None:
            ok &= chunk[j] > chunk[i] - window
        return ok

    return dense_from_rule(total, sees)


chunk_lists = st.lists(st.integers(1, 6), min_size=1, max_size=5)


@SETTINGS
@given(chunks=chunk_lists, pad=st.integers(0, 5), window=st.one_of(st.none(), st.integers(1, 4)))
def test_block_causal_video_matches_definition(chunks, pad, window):
    total = sum(chunks) + pad
    mask = block_causal_video(chunks, total=total, window_chunks=window)
    ref = block_causal_reference([chunks], total, window)
    assert torch.equal(mask.to_dense(), ref)
    assert mask.area() == int(ref.sum())


@SETTINGS
@given(videos=st.lists(chunk_lists, min_size=1, max_size=4), pad=st.integers(0, 5),
       window=st.one_of(st.none(), st.integers(1, 3)))
def test_packed_videos_matches_definition(videos, pad, window):
    total = sum(map(sum, videos)) + pad
    mask = packed_videos(videos, total=total, window_chunks=window)
    ref = block_causal_reference(videos, total, window)
    assert torch.equal(mask.to_dense(), ref)
    assert mask.area() == int(ref.sum())


@SETTINGS
@given(seqlens=st.lists(st.integers(0, 9), min_size=1, max_size=5), pad=st.integers(0, 4), causal=st.booleans())
def test_varlen_matches_definition(seqlens, pad, causal):
    total = sum(seqlens) + pad
    mask = (varlen_causal if causal else varlen_full)(seqlens, total=total)
    doc = token_labels(seqlens, total)
    ref = dense_from_rule(total, lambda i, j: (doc[i] == doc[j]) & (doc[i] >= 0) & ((j <= i) | (not causal)))
    assert torch.equal(mask.to_dense(), ref)
    assert mask.area() == int(ref.sum())


@SETTINGS
@given(seqlen=st.integers(0, 30), window=st.integers(1, 35), offset=st.integers(0, 4), pad=st.integers(0, 4))
def test_sliding_window_matches_definition(seqlen, window, offset, pad):
    total = offset + seqlen + pad
    mask = sliding_window_causal(seqlen, window, offset=offset, total=total)

    def sees(i, j):
        inside = (i >= offset) & (i < offset + seqlen) & (j >= offset)
        return inside & (j <= i) & (j > i - window)

    ref = dense_from_rule(total, sees)
    assert torch.equal(mask.to_dense(), ref)
    assert mask.area() == int(ref.sum())


@SETTINGS
@given(lq=st.integers(0, 12), lk=st.integers(0, 12), q0=st.integers(0, 3), k0=st.integers(0, 3),
       mask_type=st.sampled_from(list(MaskType)))
def test_slice_types_match_definition(lq, lk, q0, k0, mask_type):
    """Row i, column j (slice-local) allowed as in the mask module's docstring."""
    total = max(q0 + lq, k0 + lk)
    s = AttnSlice(AttnRange(q0, q0 + lq), AttnRange(k0, k0 + lk), mask_type)
    rule = {
        MaskType.FULL: lambda i, j: torch.ones_like(i, dtype=torch.bool),
        MaskType.CAUSAL: lambda i, j: j <= i + (lk - lq),
        MaskType.INV_CAUSAL: lambda i, j: j >= i,
        MaskType.BI_CAUSAL: lambda i, j: (j <= i + (lk - lq)) & (j >= i),
    }[mask_type]

    def sees(i, j):
        inside = (i >= q0) & (i < q0 + lq) & (j >= k0) & (j < k0 + lk)
        return inside & rule(i - q0, j - k0)

    ref = dense_from_rule(total, sees)
    mask = AttnSlices([s], total)
    assert torch.equal(mask.to_dense(), ref)
    assert s.area() == slice_area(lq, lk, mask_type) == int(ref.sum())


grids = st.tuples(st.integers(1, 4), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2))


@SETTINGS
@given(samples=st.lists(grids, min_size=1, max_size=4), pad=st.integers(0, 6),
       window=st.one_of(st.none(), st.integers(1, 3)))
def test_packed_layout_slices_match_definition(samples, pad, window):
    """Acceptance: the slice list of a packed layout equals a dense reference mask."""
    samples = [(f * cf, h, w, cf) for f, h, w, cf in samples]  # frames a multiple of chunk_frames
    layout = PackedLayout.pack(samples, sum(f * h * w for f, h, w, _ in samples) + pad)
    total = layout.total_tokens
    sample = token_labels([f * h * w for f, h, w, _ in samples], total)
    # chunk index inside the sample, straight from the token order (frame-major)
    local_chunk = torch.full((total,), -1, dtype=torch.long)
    start = 0
    for f, h, w, cf in samples:
        n = f * h * w
        local_chunk[start:start + n] = torch.arange(n) // (cf * h * w)
        start += n

    def sees(i, j):
        ok = (sample[i] == sample[j]) & (sample[i] >= 0) & (local_chunk[j] <= local_chunk[i])
        if window is not None:
            ok &= local_chunk[j] > local_chunk[i] - window
        return ok

    mask = layout.self_attn_slices(window_chunks=window)
    ref = dense_from_rule(total, sees)
    assert torch.equal(mask.to_dense(), ref)
    assert mask.area() == int(ref.sum())


@pytest.mark.parametrize("build, message", [
    (lambda: AttnRange(5, 3), "reversed"),
    (lambda: AttnRange(-1, 3), "below 0"),
    (lambda: AttnRange(0, 2.5), "integer"),
    (lambda: AttnRange(0, "4"), "integer"),
    (lambda: AttnRange(True, 4), "integer"),
    (lambda: AttnSlices([[0, 5, 0, 4, "full"]], 4), "q range ends past"),
    (lambda: AttnSlices([[0, 4, 2, 6, "full"]], 4), "k range ends past"),
    (lambda: AttnSlices([[0, 4, 0, 4, "diagonal"]], 4), "unknown mask type"),
    (lambda: AttnSlices([[0, 4, 0, "full"]], 4), "a slice is"),
    (lambda: AttnSlices([7], 4), "a slice is"),
    (lambda: AttnSlices([], 4.0), "integer"),
    (lambda: AttnSlices([], -1), ">= 0"),
    (lambda: AttnSlices.from_json({"slices": []}), "total_seqlen"),
    (lambda: AttnSlices.from_json({"total_seqlen": 4, "slices": {}}), "must be a list"),
    (lambda: AttnSlices.from_json([1, 2]), "total_seqlen"),
    (lambda: sliding_window_causal(10, 0), "window"),
    (lambda: block_causal_video([4, 1.5]), "integer"),
])
def test_bad_input_raises_value_error(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_json_round_trip(tmp_path):
    mask = AttnSlices(list(packed_videos([[3, 3], [2]])) + list(sliding_window_causal(6, 2, offset=8, total=16))
                      + [AttnSlice(AttnRange(0, 4), AttnRange(10, 16), MaskType.INV_CAUSAL)], 16)
    obj = json.loads(json.dumps(mask.to_json()))
    assert AttnSlices.from_json(obj) == mask
    path = tmp_path / "mask.json"
    path.write_text(json.dumps(obj))
    assert AttnSlices.load(str(path)) == mask
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        AttnSlices.load(str(path))
