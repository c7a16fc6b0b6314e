"""The caption-following metric: ~1 on the procedural clips (sharp and through the PatchEncoder round
trip the demo's videos go through), 0 on noise, and each field drops when the caption says otherwise."""

import numpy as np
import pytest
import torch

from magitrain.caption_score import Caption, mean_score, read_frame, score_video, windows_of
from magitrain.contact_sheet import contact_sheet
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.demo import demo_clip

CLIPS = 12


@pytest.fixture(scope="module")
def clips():
    return [demo_clip(seed) for seed in range(CLIPS)]


def test_training_clips_score_about_one(clips):
    enc = PatchEncoder(4)
    sharp = mean_score([score_video(v, c) for v, c in clips])
    round_trip = mean_score([score_video(enc.decode(enc.encode(v)), c) for v, c in clips])
    for s in (sharp, round_trip):
        assert min(s.object_present, s.colour, s.motion, s.size_trend) >= 0.95, s


def test_noise_and_blank_score_zero(clips):
    g = torch.Generator().manual_seed(0)
    enc = PatchEncoder(4)
    latent_noise = [score_video(enc.decode(torch.randn(4, 8, 8, 8, generator=g) * 0.5), c) for _, c in clips[:4]]
    pixel_noise = [score_video((torch.rand(16, 64, 64, 3, generator=g) * 255).to(torch.uint8), c) for _, c in clips[:2]]
    blank = [score_video(torch.full((16, 64, 64, 3), 25, dtype=torch.uint8), c) for _, c in clips[:2]]
    for s in latent_noise + pixel_noise + blank:
        assert s.object_present == 0 and s.colour == 0 and s.motion == 0 and s.size_trend == 0, s


def test_two_objects_are_not_one():
    a, cap = demo_clip(0, shape="square", motion="right", grows=True)
    b, _ = demo_clip(0, shape="square", color="green", motion="right", grows=True)
    both = torch.maximum(a, torch.roll(b, shifts=32, dims=1))  # the same shape again, half a frame away
    assert score_video(a, cap).object_present == 1.0
    assert score_video(both, cap).object_present == 0.0


@pytest.mark.parametrize("field", ["colour", "direction", "growing"])
def test_each_field_fails_on_the_wrong_caption(field):
    video, caption = demo_clip(5, color="green", motion="left", grows=True)
    assert caption.startswith("a green") and "left, growing" in caption
    right = score_video(video, caption)
    wrong_caption = {"colour": caption.replace("green", "blue"), "direction": caption.replace("left", "right"),
                     "growing": caption.replace("growing", "shrinking")}[field]
    wrong = score_video(video, wrong_caption)
    name = {"colour": "colour", "direction": "motion", "growing": "size_trend"}[field]
    assert getattr(right, name) == 1.0 and getattr(wrong, name) == 0.0
    assert wrong.object_present == 1.0  # presence does not depend on the caption


def test_keeping_its_size_scores_a_steady_shape_and_fails_a_changing_one():
    """"keeping its size": a steady clip's windows all pass (sharp and decoded), a growing or shrinking
    clip's fail, and a steady clip fails "growing" (the size field reads the new words, not a default)."""
    enc = PatchEncoder(4)
    for shape in ("square", "disk", "bar"):
        steady, caption = demo_clip(7, 64, shape=shape, motion="down", steady=True)
        assert caption == f"a {demo_clip(7, shape=shape)[1].split()[1]} {shape} moving down, keeping its size"
        for frames in (steady, enc.decode(enc.encode(steady))):
            assert score_video(frames, caption).size_trend == 1.0
        assert score_video(steady, caption.replace("keeping its size", "growing")).size_trend == 0.0
        for grows in (True, False):
            changing, _ = demo_clip(7, shape=shape, motion="down", grows=grows)
            assert score_video(changing, caption).size_trend <= 0.25  # the clip's last window: 8 frames, 7 of growth


def test_elongation_reads_a_bar_and_its_way():
    """A flat bar reads clearly negative, an upright one (``bar_across``, moving sideways) positive, squares and
    disks about 0, sharp and through the PatchEncoder round trip."""
    enc = PatchEncoder(4)
    for shape, motion, sign in (("bar", "up", -1), ("bar", "left", 1), ("square", "left", 0), ("disk", "up", 0)):
        video, _ = demo_clip(5, 16, shape=shape, motion=motion, steady=True, bar_across=True)
        for frames, bar in ((video, 2.4), (enc.decode(enc.encode(video)), 1.5)):
            e = [read_frame(f.numpy()).elongation for f in frames]
            if sign:
                assert min(sign * x for x in e) > bar
            else:
                assert max(abs(x) for x in e) < 0.15


def test_a_band_around_the_frame_is_not_an_object():
    """A shape grown across the whole frame (what a drifting "growing" rollout becomes) has no position: not
    present, although it is one compact-enough blob; the widest shape the renderer draws still is."""
    frame = np.full((64, 64, 3), 25, dtype=np.uint8)
    frame[16:44, :] = (255, 0, 0)  # a red band, 28 rows, every column
    assert not read_frame(frame).present
    assert not read_frame(frame.transpose(1, 0, 2).copy()).present  # every row
    frame[:, 60:] = 25  # a gap of 4 columns: a (wide) shape again
    assert read_frame(frame).present
    enc = PatchEncoder(4)
    for shape in ("bar", "square"):  # grown to the end of their range, sharp and through the decoder
        video, caption = demo_clip(3, shape=shape, motion="left", grows=True)
        for v in (video, enc.decode(enc.encode(video))):
            assert read_frame(v[-1].numpy()).present, caption


def test_motion_across_the_frame_edge():
    """A shape that wraps around the edge moves on: the centroid is read on the torus."""
    for motion in ("left", "right", "up", "down"):
        video, caption = demo_clip(7, motion=motion)
        assert score_video(video, caption).motion == 1.0, caption
    frame = np.full((64, 64, 3), 25, dtype=np.uint8)
    frame[20:30, :6] = frame[20:30, -6:] = (255, 0, 0)  # one square split by the seam
    r = read_frame(frame)
    assert r.present and r.colour == "red" and (r.centroid[1] < 1 or r.centroid[1] > 62)


def test_windows_share_boundaries_and_caption_parsing():
    assert windows_of(17, 8) == [(0, 8), (8, 16)]
    assert windows_of(1, 8) == []
    assert Caption.parse("a red disk moving up, shrinking") == Caption("red", "disk", "up", False)
    assert Caption.parse("a red disk moving up, keeping its size") == Caption("red", "disk", "up", None)
    with pytest.raises(ValueError, match="not of the form"):
        Caption.parse("a cat sitting")


def test_contact_sheet_layout():
    rows = [torch.full((8, 4, 6, 3), i * 40, dtype=torch.uint8) for i in range(3)]
    sheet = contact_sheet(rows, scale=1, gap=2)
    assert sheet.shape == (3 * (4 + 2), 8 * (6 + 2), 3)
    assert (sheet[6:10, 0:6] == 40).all() and (sheet[4:6] == 128).all()
    with pytest.raises(ValueError):
        contact_sheet([])
