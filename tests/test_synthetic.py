"""The procedural renderer: where a clip's shape starts (``start_spread``), and ``steady`` clips."""

import torch

from magitrain import demo
from magitrain.synthetic import render_shape_video, steady_caption


def _start_centre(video: torch.Tensor) -> tuple[float, float]:
    """(row, column) centre of the shape's bounding box in frame 0 (it starts clear of the edges)."""
    rows, cols = (video[:, 0] != video[:, 0, 0, 0][:, None, None]).any(0).nonzero(as_tuple=True)
    return (rows.min() + rows.max() + 1).item() / 2, (cols.min() + cols.max() + 1).item() / 2


def test_start_spread_zero_starts_every_clip_at_the_centre():
    fixed = dict(color="red", shape="square", motion="right", grows=True)
    centres = {_start_centre(render_shape_video(32, 64, 64, 3, torch.Generator().manual_seed(s), start_spread=0.0,
                                                **fixed)[0]) for s in range(8)}
    assert centres == {(32.0, 32.0)}
    spread = [_start_centre(render_shape_video(32, 64, 64, 3, torch.Generator().manual_seed(s), **fixed)[0])
              for s in range(32)]
    ys = [y for y, _ in spread]
    assert 16 <= min(ys) and max(ys) <= 48 and max(ys) - min(ys) > 20  # the default: the middle half


def test_demo_clips_start_at_the_demo_spread():
    assert demo.START_SPREAD == 0.0
    a, cap = demo.demo_clip(1, color="blue", shape="disk", motion="up", grows=False)
    b, _ = demo.demo_clip(2, color="blue", shape="disk", motion="up", grows=False)
    assert cap == "a blue disk moving up, shrinking" and torch.equal(a, b)  # nothing left to draw at random


def test_steady_keeps_the_size_and_every_draw():
    """``steady``: every frame has the first frame's area, the caption says "keeping its size", and the
    clip's other draws (colour, shape, motion, start) are the ones without it."""
    for seed in range(4):
        plain, caption = render_shape_video(48, 32, 32, 3, torch.Generator().manual_seed(seed), period=16)
        steady, steady_text = render_shape_video(48, 32, 32, 3, torch.Generator().manual_seed(seed), period=16,
                                                 steady=True)
        assert steady_text == steady_caption(caption) == caption.rsplit(", ", 1)[0] + ", keeping its size"
        lit = (steady != -0.8).any(0)
        assert torch.equal(lit[0], (plain != -0.8).any(0)[0])  # same start, same shape, same size at frame 0
        assert len(set(lit.sum((1, 2)).tolist())) == 1  # 1 px/frame: the same pixel grid offset, the same count
        assert torch.equal(steady[:, 0], plain[:, 0])


def test_bar_across_lies_across_its_motion():
    """``bar_across``: a bar moving left or right stands upright, one moving up or down lies flat as without it;
    other shapes and every draw are unchanged."""
    def extent(video):  # (rows, columns) the shape covers in frame 0
        lit = (video != -0.8).any(0)[0]
        return int(lit.any(1).sum()), int(lit.any(0).sum())

    for motion in ("left", "right", "up", "down"):
        for shape in ("bar", "square", "disk"):
            plain, caption = render_shape_video(8, 64, 64, 3, torch.Generator().manual_seed(2), shape=shape,
                                                motion=motion)
            across, across_caption = render_shape_video(8, 64, 64, 3, torch.Generator().manual_seed(2), shape=shape,
                                                        motion=motion, bar_across=True)
            assert across_caption == caption
            turned = shape == "bar" and motion in ("left", "right")
            assert extent(across) == (extent(plain)[::-1] if turned else extent(plain))
            assert torch.equal(across, plain) != turned
    rows, cols = extent(render_shape_video(8, 64, 64, 3, torch.Generator().manual_seed(2), shape="bar",
                                           motion="left", bar_across=True)[0])
    assert rows > 3 * cols  # upright: long across the motion
