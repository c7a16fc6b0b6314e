"""build_shards round trip: a generated folder (mp4s made with PyAV, PNGs, captions, one broken
file) -> shards -> reader; what the reader yields equals what was written, and what was written
equals an independent encode of the source media."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import torch
from magitrain.data_pipeline.build_shards import main as build_shards
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.data_pipeline.media import decode_video, encode_mp4
from magitrain.data_pipeline.source import WebDatasetSource
from magitrain.data_pipeline.text import HashTextEmbedder
from PIL import Image
from test_data_common import sample_latents, tiny_cfg


def _make_folder(src: str) -> dict[str, torch.Tensor]:
    """3 videos (16 frames, 32x32) and 2 images, captions 'clip i' / 'picture i'; returns caption -> pixels."""
    os.makedirs(os.path.join(src, "sub"), exist_ok=True)
    g = torch.Generator().manual_seed(0)
    pixels = {}
    for i in range(3):
        video = torch.randint(0, 256, (16, 32, 32, 3), generator=g, dtype=torch.uint8)
        path = os.path.join(src, "sub" if i == 2 else "", f"clip.{i}.mp4")
        with open(path, "wb") as f:
            f.write(encode_mp4(video, fps=8))
        with open(path[:-4] + ".txt", "w") as f:
            f.write(f"clip {i}")
        with open(path, "rb") as f:
            pixels[f"clip {i}"] = decode_video(f.read())  # what PyAV decodes from the file
    for i in range(2):
        img = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(img.numpy()).save(os.path.join(src, f"pic{i}.png"))
        with open(os.path.join(src, f"pic{i}.txt"), "w") as f:
            f.write(f"picture {i}")
        pixels[f"picture {i}"] = img[None]
    with open(os.path.join(src, "broken.mp4"), "wb") as f:
        f.write(b"this is not a video")
    return pixels


def _tar_samples(out: str) -> dict[str, dict]:
    """Read the shards with plain tarfile (independent of the reader): caption -> {ext: bytes}."""
    by_key: dict[str, dict] = {}
    for name in sorted(os.listdir(out)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(out, name)) as tf:
                for m in tf.getmembers():
                    key, ext = m.name.split(".", 1)
                    by_key.setdefault(key, {})[ext] = tf.extractfile(m).read()
    return {s["txt"].decode(): s for s in by_key.values()}


def _read_all(out: str, *extra) -> dict[str, tuple]:
    cfg = tiny_cfg(out, "data.seq_tokens=64", "data.batch_size=1", "data.num_workers=0", *extra)
    src = WebDatasetSource(cfg, 0, 1, epochs=1)
    got = {}
    while True:
        try:
            b = src.next_batch()
        except StopIteration:
            return got
        chunk = 0
        for s, cap, lat in zip(b.layout.samples, b.captions, sample_latents(b)):
            got[cap] = (lat, b.text_emb[chunk], b.text_mask[chunk], s.chunk_frames)
            chunk += s.num_chunks


def test_latent_shards_round_trip(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    pixels = _make_folder(src)
    assert build_shards([src, out, "--latent-encoder", "patch", "--latent-channels", "4", "--text-encoder", "hash",
                         "--max-shard-samples", "2", "--quiet"]) == 0
    with open(os.path.join(out, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["samples"] == 5 and [s["file"] for s in manifest["skipped"]] == ["broken.mp4"]
    assert len(manifest["shards"]) == 3 and manifest["buckets"] == {"1x4x4": {"samples": 2, "tokens": 8},
                                                                     "4x4x4": {"samples": 3, "tokens": 48}}
    enc, text = PatchEncoder(4), HashTextEmbedder(32, 8)
    written = _tar_samples(out)
    for cap, px in pixels.items():
        lat = torch.from_numpy(np.load(io.BytesIO(written[cap]["latent.npy"]), allow_pickle=False))
        assert lat.dtype == torch.float16 and torch.equal(lat, enc.encode(px).half())
    got = _read_all(out)
    assert set(got) == set(pixels)
    for cap, (lat, emb, mask, cf) in got.items():
        assert torch.equal(lat, enc.encode(pixels[cap]).half().float())
        assert cf == (1 if cap.startswith("picture") else 2)
        ref_emb, ref_mask = text.embed(cap)
        assert torch.equal(mask, ref_mask) and torch.equal(emb, ref_emb.half().float() * ref_mask[:, None])


def test_media_shards_round_trip_encode_on_the_fly(tmp_path):
    src, out = str(tmp_path / "src"), str(tmp_path / "out")
    pixels = _make_folder(src)
    assert build_shards([src, out, "--max-shard-samples", "2", "--quiet"]) == 0
    written = _tar_samples(out)
    with open(os.path.join(src, "clip.0.mp4"), "rb") as f:
        assert written["clip 0"]["mp4"] == f.read()  # raw media stored as-is
    got = _read_all(out)
    enc, text = PatchEncoder(4), HashTextEmbedder(32, 8)
    assert set(got) == set(pixels)
    for cap, (lat, emb, mask, _) in got.items():
        assert torch.equal(lat, enc.encode(pixels[cap]))
        assert torch.equal(emb, text.embed(cap)[0])


def test_shards_are_plain_ustar_and_reproducible(tmp_path):
    """No PAX header per member (a float mtime would add one, and the reader would parse it on every
    pass), and the same folder builds byte-identical shards."""
    import hashlib

    src = str(tmp_path / "src")
    _make_folder(src)
    digests = []
    for run in ("a", "b"):
        out = str(tmp_path / run)
        assert build_shards([src, out, "--latent-encoder", "patch", "--latent-channels", "4", "--text-encoder",
                             "hash", "--max-shard-samples", "2", "--quiet"]) == 0
        tars = sorted(n for n in os.listdir(out) if n.endswith(".tar"))
        for name in tars:
            with tarfile.open(os.path.join(out, name)) as tf:
                assert all(not m.pax_headers for m in tf.getmembers()), name
        digests.append([hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in tars])
    assert digests[0] == digests[1]
