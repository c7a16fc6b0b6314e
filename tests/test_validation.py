"""Validation during training (magitrain/validation.py): the fixed-t held-out losses of a run and of
its resumed twin are identical (same machine: bitwise), so are those of a run validating every step
(nothing but the weights moves them), they change when the weights do, and the
streamed samples reach run.dir/samples and TensorBoard (read back from the event file)."""

import glob
import json
import os

from conftest import tiny_config

EVAL = ["eval.every=2", "eval.batches=1", "optim.warmup_steps=2", "ckpt.every=0", "train.steps=4"]


def _val(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: {k: v for k, v in r.items() if k.startswith("val_loss")} for r in rows if "val_loss" in r}


def test_fixed_t_losses_equal_for_resumed_twin(tmp_path):
    from magitrain.train import train

    train(tiny_config(tmp_path / "straight", *EVAL))
    train(tiny_config(tmp_path / "twin", *EVAL, "train.stop_at=2"))
    train(tiny_config(tmp_path / "twin", *EVAL, "ckpt.resume=auto"))
    straight, twin = _val(tmp_path / "straight" / "run"), _val(tmp_path / "twin" / "run")
    assert sorted(straight) == [2, 4] and sorted(twin) == [2, 4]
    names = {"val_loss", "val_loss_t0.1", "val_loss_t0.3", "val_loss_t0.5", "val_loss_t0.7", "val_loss_t0.9"}
    assert set(straight[4]) == names
    assert twin == straight  # bitwise: same machine, same weights, fixed data and noise
    assert straight[2]["val_loss"] != straight[4]["val_loss"]  # it measures the weights
    # validating more often changes nothing: the figures depend on the weights only (no shared RNG draws)
    often = tiny_config(tmp_path / "often", *EVAL, "train.steps=2", "eval.every=1")
    train(often)
    assert _val(often.run.dir)[2] == straight[2]


def test_samples_reach_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from magitrain.train import train

    cfg = tiny_config(tmp_path, "train.steps=2", "ckpt.every=0", "log.tensorboard=true", "eval.video_every=2",
                      "eval.captions=[a red disk moving right, a blue square moving left]", "eval.sample_steps=2",
                      "eval.sample_window=1")
    train(cfg)
    samples = sorted(os.path.basename(p) for p in glob.glob(os.path.join(cfg.run.dir, "samples", "*")))
    assert samples == [f"step_00000002_{i}.{ext}" for i in (0, 1) for ext in ("mp4", "png", "txt")]
    assert all(os.path.getsize(os.path.join(cfg.run.dir, "samples", s)) > 0 for s in samples)
    events = EventAccumulator(os.path.join(cfg.run.dir, "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    assert {"samples/0", "samples/1"} <= set(events.Tags()["images"])
    image = events.Images("samples/0")
    assert [e.step for e in image] == [2] and image[0].width > 0 and image[0].height > 0
