"""Per-chunk flow matching: monotone noise, clean context without loss, layout-independent draws."""

import torch

from magitrain.batch import Batch
from magitrain.config import DiffusionConfig
from magitrain.diffusion import (chunk_times, guided_velocity, masked_sq_error, noise_batch, sampling_schedule,
                                 shift_t)
from magitrain.layout import PackedLayout


def _batch(grids, total):
    layout = PackedLayout.pack(grids, total)
    n, nc = layout.total_tokens, layout.num_chunks
    return Batch(torch.randn(n, 3, 1, 2, 2), layout, torch.randn(nc, 4, 8), torch.ones(nc, 4, dtype=torch.bool))


def test_chunk_noise_never_decreases_with_chunk_index():
    for monotone in ("sorted", "window"):
        cfg = DiffusionConfig(monotone=monotone, clean_prefix_prob=0.5, max_clean_prefix_chunks=3)
        gen = torch.Generator().manual_seed(0)
        for _ in range(2000):
            t, clean = chunk_times(6, cfg, gen)
            # t = 1 is clean: cleanliness must not increase from earlier to later chunks
            assert torch.all(t[1:] <= t[:-1]), (monotone, t)
            assert torch.all((t >= 0) & (t <= 1))
            assert torch.all(t[:clean] == cfg.clean_t)
            assert clean < 6


def test_clean_context_chunks_carry_no_loss():
    cfg = DiffusionConfig(clean_prefix_prob=1.0, max_clean_prefix_chunks=1)
    b = _batch([(4, 2, 2, 1), (3, 2, 2, 1)], 40)
    nb = noise_batch(b, cfg, seed=0, step=0)
    ids = b.layout.token_chunk_ids()
    first_chunks = {0, 4}  # first chunk of each sample is held clean
    for tok in range(b.layout.total_tokens):
        expected = ids[tok].item() >= 0 and ids[tok].item() not in first_chunks
        assert nb.loss_mask[tok].item() == expected
    assert torch.all(nb.t[[0, 4]] == 1.0)
    # clean chunks are the data itself
    assert torch.equal(nb.x_t[:4], b.latents[:4])
    # changing the prediction on masked-out tokens leaves the loss unchanged
    pred = torch.randn_like(nb.target)
    pred2 = pred.clone()
    pred2[~nb.loss_mask] += 100
    assert masked_sq_error(pred, nb.target, nb.loss_mask)[0] == masked_sq_error(pred2, nb.target, nb.loss_mask)[0]


def test_draws_depend_on_sample_id_not_position():
    cfg = DiffusionConfig()
    a = _batch([(4, 2, 2, 2), (2, 2, 2, 2)], 24)
    b = Batch(torch.cat([a.latents[16:24], a.latents[:16]]), PackedLayout.pack([(2, 2, 2, 2), (4, 2, 2, 2)], 24),
              torch.cat([a.text_emb[2:], a.text_emb[:2]]), torch.cat([a.text_mask[2:], a.text_mask[:2]]),
              sample_ids=[1, 0])
    na, nb = noise_batch(a, cfg, 3, 5), noise_batch(b, cfg, 3, 5)
    assert torch.equal(na.x_t[:16], nb.x_t[8:24]) and torch.equal(na.x_t[16:], nb.x_t[:8])
    assert torch.equal(na.t[:2], nb.t[1:]) and torch.equal(na.t[2:], nb.t[:1])


def test_schedule_and_shift():
    s = sampling_schedule(8, shift=3.0)
    assert s[0] == 0 and abs(s[-1] - 1) < 1e-6 and torch.all(s[1:] > s[:-1])
    t = torch.rand(100)
    assert torch.allclose(shift_t(t, 1.0), t)
    assert torch.all(shift_t(t, 3.0) <= t + 1e-7)


def test_three_pass_guidance_matches_magi1_formula():
    full, no_text, uncond = torch.randn(3, 5)
    s_prev, s_text = 1.5, 7.5
    ref = (1 - s_prev) * uncond + (s_prev - s_text) * no_text + s_text * full
    assert torch.allclose(guided_velocity(full, no_text, uncond, s_prev, s_text), ref, atol=1e-6)
