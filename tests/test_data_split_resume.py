"""Node/worker split (every sample of an epoch exactly once across DP ranks and workers) and exact
resume with StatefulDataLoader and 2 workers (bitwise equal batches after a restart)."""

from __future__ import annotations

import io
import os
from collections import Counter

import torch
from magitrain.data_pipeline.source import WebDatasetSource
from test_data_common import batch_keys, key_latent, sample_latents, tiny_cfg, write_latent_shards


def _shapes(n_shards: int, per_shard: int):
    return [[(1, 4, 4) if (n + i) % 3 == 0 else (2, 4, 4) for i in range(per_shard)] for n in range(n_shards)]


def test_epoch_split_over_ranks_and_workers_sees_every_sample_once(tmp_path):
    write_latent_shards(str(tmp_path), _shapes(9, 5))  # 45 samples, uneven shard split over 2 x 2 readers
    cfg = tiny_cfg(str(tmp_path), "data.num_workers=2", "data.seq_tokens=16", "data.batch_size=2")
    seen = Counter()
    for rank in range(2):
        src = WebDatasetSource(cfg, rank, 2, epochs=1)
        while True:
            try:
                batch = src.next_batch()
            except StopIteration:
                break
            assert batch.layout.total_tokens == 16  # local batch 1 sequence x 16 tokens
            for k, lat in zip(batch_keys(batch), sample_latents(batch)):
                seen[k] += 1
                ref = key_latent(k, tuple(lat.shape[1:]))
                assert torch.equal(lat, ref), f"sample {k} decoded wrong"
        assert src.stats()["data_skipped"] == 0
    assert seen == Counter(range(45))


def _run(cfg, n, state=None):
    src = WebDatasetSource(cfg, 1, 2)
    if state is not None:
        src.load_state_dict(state)
    return src, [src.next_batch() for _ in range(n)]


def _same(a, b):
    return (torch.equal(a.latents, b.latents) and a.layout == b.layout and torch.equal(a.text_emb, b.text_emb)
            and torch.equal(a.text_mask, b.text_mask) and a.captions == b.captions)


def test_resume_gives_the_uninterrupted_batches_bitwise(tmp_path):
    write_latent_shards(str(tmp_path), _shapes(8, 7))
    cfg = tiny_cfg(str(tmp_path), "data.num_workers=2", "data.seq_tokens=24", "data.batch_size=4",
                   "data.shuffle_buffer=5", "data.pack_bins=3")
    k, more = 7, 12  # 7 steps run past the first epoch of each worker (2 shards x 7 samples)
    _, full = _run(cfg, k + more)
    src, first = _run(cfg, k)
    assert all(_same(a, b) for a, b in zip(first, full[:k]))  # deterministic
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    src.close()
    buf.seek(0)
    state = torch.load(buf, weights_only=True)  # plain containers only
    resumed_src, resumed = _run(cfg, more, state)
    for i, (a, b) in enumerate(zip(resumed, full[k:])):
        assert _same(a, b), f"batch {k + i} differs after resume"
    assert resumed_src.stats()["data_samples"] > 0
    # the stream really moves on (not the same batch repeated)
    assert not _same(full[k], full[k + 1])


def test_resume_after_shards_were_damaged_skips_the_lost_samples(tmp_path):
    """Shards truncated between runs: samples the checkpoint refers to that are gone count as
    skips and the resumed stream goes on (no error)."""
    paths = write_latent_shards(str(tmp_path), _shapes(4, 7))
    cfg = tiny_cfg(str(tmp_path), "data.num_workers=0", "data.seq_tokens=24", "data.batch_size=2",
                   "data.shuffle_buffer=6", "data.pack_bins=3", "data.max_bad_fraction=0.9")
    src, _ = _run(cfg, 3)
    state = src.state_dict()
    src.close()
    for p in paths:  # cut every shard in half: buffered samples of the checkpoint are lost
        os.truncate(p, os.path.getsize(p) // 2)
    resumed_src, resumed = _run(cfg, 4, state)
    assert len(resumed) == 4
    assert resumed_src.stats()["data_skipped"] > 0
