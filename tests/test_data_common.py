"""Helpers shared by the data-pipeline tests (latent shards written directly), plus unit tests of
the pieces: shard codecs, PatchEncoder, packer."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
import webdataset as wds
from magitrain.data_pipeline import shard_format as fmt
from magitrain.data_pipeline.encoders import PatchEncoder
from magitrain.data_pipeline.packer import Packer

from magitrain.config import load_config
from magitrain.layout import unpatchify

C = 4  # model.in_channels of the tiny config


def key_latent(index: int, shape: tuple[int, int, int]) -> torch.Tensor:
    """A latent that identifies its sample: channel 0 holds the index, the rest a seeded pattern."""
    g = torch.Generator().manual_seed(index)
    x = torch.randn(C, *shape, generator=g).half().float()
    x[0] = float(index)
    return x


def write_latent_shards(folder: str, shapes_per_shard: list[list[tuple[int, int, int]]], manifest: bool = True,
                        first_index: int = 0) -> list[str]:
    """One tar per entry of ``shapes_per_shard``; sample ``i`` has key ``s{i:05d}`` and caption 'sample i'."""
    os.makedirs(folder, exist_ok=True)
    paths, entries, i = [], [], first_index
    for n, shapes in enumerate(shapes_per_shard):
        path = os.path.join(folder, f"shard-{n:06d}.tar")
        with wds.TarWriter(path, encoder=False) as w:
            for shape in shapes:
                lat = key_latent(i, shape)
                meta = {"kind": "image" if shape[0] == 1 else "video", "latent_dtype": "float16",
                        "frames": shape[0] * 4, "height": shape[1] * 8, "width": shape[2] * 8, "source": "test"}
                w.write({"__key__": f"s{i:05d}", fmt.LATENT: fmt.latent_to_npy(lat, "float16"),
                         fmt.CAPTION: f"sample {i}".encode(), fmt.META: json.dumps(meta).encode()})
                i += 1
        paths.append(path)
        entries.append({"name": os.path.basename(path), "samples": len(shapes)})
    if manifest:
        with open(os.path.join(folder, "manifest.json"), "w") as f:
            json.dump({"shards": entries}, f)
    return paths


def tiny_cfg(shards: str, *extra: str):
    return load_config(overrides=["data.source=webdataset", f"data.shards={shards}", "model.in_channels=4",
                                  "model.out_channels=4", "model.patch_size=2", "model.chunk_frames=2",
                                  "data.shuffle_buffer=4", "data.max_bad_fraction=0.5", *extra])


def sample_latents(batch) -> list[torch.Tensor]:
    """Unpatchify every sample of a batch back to ``[C, T, H, W]``."""
    out = []
    for s in batch.layout.samples:
        tok = batch.latents[s.offset:s.end]
        out.append(unpatchify(tok, s.frames, s.height, s.width))
    return out


def batch_keys(batch) -> list[int]:
    """Sample indices of a batch (from channel 0 of each latent)."""
    return [int(x[0].flatten()[0].item()) for x in sample_latents(batch)]


# -- unit tests of the pieces ---------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_latent_npy_roundtrip(dtype):
    x = torch.randn(4, 3, 5, 6)
    torch_dtype = torch.float16 if dtype == "float16" else torch.bfloat16
    back = fmt.latent_from_npy(fmt.latent_to_npy(x, dtype), dtype)
    assert torch.equal(back, x.to(torch_dtype).float())


def test_npy_decoding_refuses_pickle():
    import io
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(fmt.BadSample):
        fmt.load_npy(buf.getvalue(), "x")


def test_patch_encoder_exact_on_block_constant_video():
    enc = PatchEncoder(channels=4)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (2, 3, 5, 3), generator=g, dtype=torch.uint8)  # T', H', W', RGB
    video = blocks.repeat_interleave(4, 0).repeat_interleave(8, 1).repeat_interleave(8, 2)
    latent = enc.encode(video)
    assert latent.shape == (4, 2, 3, 5)
    assert torch.equal(enc.decode(latent), video)
    # a general video decodes to its block means (reference: float64 block averages)
    v = torch.randint(0, 256, (8, 16, 16, 3), generator=g, dtype=torch.uint8)
    ref = v.double().reshape(2, 4, 2, 8, 2, 8, 3).mean((1, 3, 5))
    dec = enc.decode(enc.encode(v)).double().reshape(2, 4, 2, 8, 2, 8, 3)[:, 0, :, 0, :, 0]
    assert (dec - ref).abs().max() <= 0.51


def test_packer_first_fit_never_overflows_and_keeps_every_item():
    rng = random.Random(0)
    packer = Packer(seq_tokens=20, max_bins=3)
    sizes = [rng.choice([4, 6, 8, 20]) for _ in range(200)]
    out = []
    for i, n in enumerate(sizes):
        out += packer.add(i, n)
    out += packer.flush()
    assert sorted(i for seq in out for i in seq) == list(range(200))
    assert all(sum(sizes[i] for i in seq) <= 20 for seq in out)
    with pytest.raises(ValueError):
        packer.add(0, 21)
