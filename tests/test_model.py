"""MagiDiT behaviour on a tiny random model (fp64): causality, packing, padding, history
dropout, token subsets (what context parallelism relies on), gradients, input checks."""

import pytest
import torch

from magitrain.config import ModelConfig
from magitrain.layout import PackedLayout
from magitrain.model import MagiDiT

TINY = dict(num_layers=2, hidden_size=32, num_heads=4, num_kv_heads=2, head_dim=8, ffn_hidden_size=48,
            in_channels=4, out_channels=4, patch_size=2, caption_channels=16, caption_max_length=6,
            null_caption_tokens=4, chunk_frames=2)
# sample A: 3 chunks of 16 tokens; B: 2 chunks of 8 tokens, continuing 2 cached frames; C: an image; 5 padding
LAYOUT = PackedLayout.pack([(6, 2, 4, 2), (4, 2, 2, 2), (1, 2, 3, 1)], total_tokens=75, frame_offsets=[0, 2, 0])
CHUNKS = LAYOUT.chunk_token_ranges()  # A: 0-2, B: 3-4, C: 5
SAMPLE_CHUNKS = {"A": [0, 1, 2], "B": [3, 4], "C": [5]}


def make_model(**overrides):
    torch.manual_seed(0)
    model = MagiDiT(ModelConfig(**{**TINY, **overrides})).double()
    with torch.no_grad():  # leave the training init (zero final_linear) so every path matters
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def make_inputs(seed=1, layout=LAYOUT, channels=4):
    g = torch.Generator().manual_seed(seed)
    n, c = layout.total_tokens, layout.num_chunks
    x = torch.randn(n, channels, 1, 2, 2, generator=g, dtype=torch.float64)
    x[layout.num_sample_tokens:] = 0
    mask = torch.rand(c, 6, generator=g) > 0.4
    mask[:, 0] = True
    if c > 4:
        mask[4] = False  # a chunk with an empty caption: no cross-attention
    return dict(x=x, t=torch.rand(c, generator=g, dtype=torch.float64),
                text_emb=torch.randn(c, 6, 16, generator=g, dtype=torch.float64), text_mask=mask)


@pytest.fixture(scope="module")
def model():
    return make_model()


def run(model, inp, layout=LAYOUT, **kw):
    with torch.no_grad():
        return model(inp["x"], inp["t"], inp["text_emb"], inp["text_mask"], layout, **kw)


def rows(out, chunk):
    return out[CHUNKS[chunk].start:CHUNKS[chunk].end]


def check_chunks(a, b, unchanged, changed):
    for c in unchanged:  # fp64: a different mask may batch the same rows differently (last-bit rounding)
        assert torch.allclose(rows(a, c), rows(b, c), rtol=0, atol=1e-12), f"chunk {c} changed"
    for c in changed:
        assert (rows(a, c) - rows(b, c)).abs().max() > 1e-6, f"chunk {c} did not change"


def perturb(inp, key, chunk):
    inp = {k: v.clone() for k, v in inp.items()}
    if key == "x":
        inp["x"][CHUNKS[chunk].start:CHUNKS[chunk].end] += 1.0
    elif key == "t":
        inp["t"][chunk] = 1.0 - inp["t"][chunk]
    else:
        inp["text_emb"][chunk] += 1.0
    return inp


@pytest.mark.parametrize("key", ["x", "t", "text"])
def test_chunk_causality(model, key):
    """Changing chunk 1 of A changes chunks 1 and 2 and leaves chunk 0 (and other samples) bitwise alone."""
    inp = make_inputs()
    base, new = run(model, inp), run(model, perturb(inp, key, 1))
    check_chunks(base, new, unchanged=[0, 3, 4, 5], changed=[1, 2])
    assert torch.equal(base[LAYOUT.num_sample_tokens:], new[LAYOUT.num_sample_tokens:])


def test_first_chunk_reaches_all_later_chunks(model):
    inp = make_inputs()
    check_chunks(run(model, inp), run(model, perturb(inp, "x", 0)), unchanged=[3, 4, 5], changed=[0, 1, 2])


@pytest.mark.parametrize("src,dst", [("A", "B"), ("B", "A"), ("C", "A"), ("A", "C")])
def test_packed_samples_are_independent(model, src, dst):
    inp = make_inputs()
    new = inp
    for c in SAMPLE_CHUNKS[src]:
        for key in ("x", "t", "text"):
            new = perturb(new, key, c)
    base, out = run(model, inp), run(model, new)
    check_chunks(base, out, unchanged=SAMPLE_CHUNKS[dst], changed=SAMPLE_CHUNKS[src])


def test_padding_does_not_influence_real_tokens(model):
    inp = make_inputs()
    noisy = dict(inp, x=inp["x"].clone())
    noisy["x"][LAYOUT.num_sample_tokens:] = 1e3 * torch.randn_like(noisy["x"][LAYOUT.num_sample_tokens:])
    base, out = run(model, inp), run(model, noisy)
    assert torch.equal(base[:LAYOUT.num_sample_tokens], out[:LAYOUT.num_sample_tokens])
    assert torch.isfinite(out).all()


def test_drop_history_makes_chunks_independent_of_the_past(model):
    inp = make_inputs()
    drop = torch.tensor([True, False, False])
    base, new = run(model, inp, drop_history=drop), run(model, perturb(inp, "x", 0), drop_history=drop)
    check_chunks(base, new, unchanged=[1, 2, 3, 4, 5], changed=[0])
    # without it chunk 0 reaches chunk 2 (control), and B keeps its history
    check_chunks(run(model, inp), run(model, perturb(inp, "x", 0)), unchanged=[], changed=[1, 2])
    check_chunks(run(model, inp), base, unchanged=[0, 3, 4, 5], changed=[1, 2])


def test_text_null_ignores_the_caption_and_changes_the_output(model):
    inp = make_inputs()
    null = torch.zeros(LAYOUT.num_chunks, dtype=torch.bool)
    null[2] = True
    base, dropped = run(model, inp), run(model, inp, text_null=null)
    check_chunks(base, dropped, unchanged=[0, 1, 3, 4, 5], changed=[2])
    check_chunks(dropped, run(model, perturb(inp, "text", 2), text_null=null), unchanged=range(6), changed=[])


@pytest.mark.parametrize("subset", ["all_permuted", "sample_B_permuted", "sample_A_in_order"])
def test_forward_tokens_on_a_subset_matches_the_full_forward(model, subset):
    """What CP relies on: rows of a (self-contained) subset, in any order, with their metadata rows."""
    inp = make_inputs()
    full = run(model, inp)
    g = torch.Generator().manual_seed(3)
    if subset == "all_permuted":
        idx = torch.randperm(LAYOUT.total_tokens, generator=g)
    elif subset == "sample_B_permuted":
        b = LAYOUT.samples[1]
        idx = b.offset + torch.randperm(b.num_tokens, generator=g)
    else:
        idx = torch.arange(LAYOUT.samples[0].num_tokens)
    meta = model.prepare(LAYOUT).select(idx)
    with torch.no_grad():
        out = model.forward_tokens(inp["x"][idx], inp["t"], inp["text_emb"], inp["text_mask"], meta)
    torch.testing.assert_close(out, full[idx], rtol=1e-12, atol=1e-12)


def test_a_subset_without_its_history_differs(model):
    """Control for the subset test: chunk 2 of A alone loses its history, so its output moves."""
    inp = make_inputs()
    idx = torch.arange(CHUNKS[2].start, CHUNKS[2].end)
    with torch.no_grad():
        out = model.forward_tokens(inp["x"][idx], inp["t"], inp["text_emb"], inp["text_mask"],
                                   model.prepare(LAYOUT).select(idx))
    assert (out - run(model, inp)[idx]).abs().max() > 1e-6


def test_gradients_reach_every_parameter_and_match_finite_differences():
    model = make_model()
    inp = make_inputs()
    null = torch.tensor([False, False, True, False, False, True])
    target = torch.randn(LAYOUT.total_tokens, 4, 1, 2, 2, dtype=torch.float64)

    def loss_fn():
        out = model(inp["x"], inp["t"], inp["text_emb"], inp["text_mask"], LAYOUT, text_null=null)
        return ((out - target)[:LAYOUT.num_sample_tokens] ** 2).mean()

    loss = loss_fn()
    loss.backward()
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.grad is None or p.grad.abs().max() == 0]
    assert missing == []
    g = torch.Generator().manual_seed(5)
    direction = {n: torch.randn(p.shape, generator=g, dtype=p.dtype) for n, p in params.items()}
    analytic = sum((params[n].grad * d).sum() for n, d in direction.items())
    eps = 1e-6
    with torch.no_grad():
        values = []
        for sign in (1, -1):
            for n, d in direction.items():
                params[n].add_(sign * eps * d)
            values.append(loss_fn())
            for n, d in direction.items():
                params[n].sub_(sign * eps * d)
    numeric = (values[0] - values[1]) / (2 * eps)
    torch.testing.assert_close(analytic, numeric, rtol=1e-6, atol=1e-9)


def test_training_init_predicts_zero_and_padding_stays_finite():
    torch.manual_seed(0)
    model = MagiDiT(ModelConfig(**TINY)).double()
    out = run(model, make_inputs())
    assert torch.equal(out, torch.zeros_like(out))


def test_step_size_conditioning():
    base = make_model()
    distill = make_model(step_size_conditioning=True)
    assert set(base.state_dict()) == set(distill.state_dict())  # MAGI-1: same keys as the base model
    inp = make_inputs()
    out = run(distill, inp)
    assert torch.equal(out, run(base, inp))  # step_size=None: exactly the base model
    step = torch.full((LAYOUT.num_chunks,), 8.0, dtype=torch.float64)
    assert (run(distill, inp, step_size=step) - out)[:LAYOUT.num_sample_tokens].abs().max() > 1e-6
    with pytest.raises(ValueError, match="step_size_conditioning"):
        run(base, inp, step_size=step)


def test_half_channel_vae_and_rescale():
    """24B-style I/O: x has in_channels/2 channels (duplicated inside), the output the first half."""
    model = make_model(in_channels=8, out_channels=8, half_channel_vae=True, x_rescale_factor=0.1)
    inp = make_inputs()
    out = run(model, inp)
    assert out.shape == inp["x"].shape
    w = model.x_embedder.weight.detach()
    with torch.no_grad():  # duplication: the embedding equals one linear with the two weight halves summed
        h = model.embed(inp["x"])
        ref = 0.1 * inp["x"].flatten(1) @ (w[:, :4] + w[:, 4:]).flatten(1).T
    torch.testing.assert_close(h, ref)


def test_forward_video_packs_equal_samples():
    model = make_model()
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 4, 4, 4, 6, generator=g, dtype=torch.float64)
    t = torch.rand(2, 2, generator=g, dtype=torch.float64)
    text = torch.randn(4, 6, 16, generator=g, dtype=torch.float64)
    mask = torch.ones(4, 6, dtype=torch.bool)
    with torch.no_grad():
        both = model.forward_video(x, t, text, mask)
        first = model.forward_video(x[:1], t[:1], text[:2], mask[:2])
        second = model.forward_video(x[1:], t[1:], text[2:], mask[2:],
                                     text_null=torch.tensor([True, False]), drop_history=torch.tensor([True]))
        both_flags = model.forward_video(x, t, text, mask, text_null=torch.tensor([[False, False], [True, False]]),
                                         drop_history=torch.tensor([False, True]))
    assert both.shape == x.shape
    torch.testing.assert_close(both[:1], first, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both_flags[1:], second, rtol=1e-12, atol=1e-12)


def test_bf16_autocast_keeps_fp32_islands():
    torch.manual_seed(0)
    model = make_model().float()
    inp = {k: (v.float() if v.is_floating_point() else v) for k, v in make_inputs().items()}
    ref = run(model, inp)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = run(model, inp)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    err = (out - ref)[:LAYOUT.num_sample_tokens].abs().max() / ref.abs().max()
    assert err < 0.1


@pytest.mark.parametrize("change,needle", [
    (dict(x=torch.zeros(75, 3, 1, 2, 2)), "x must be"),
    (dict(t=torch.zeros(5)), "text_emb must be"),
    (dict(text_mask=torch.ones(6, 5, dtype=torch.bool)), "text_mask must be"),
    (dict(text_null=torch.zeros(5, dtype=torch.bool)), "text_null"),
    (dict(drop_history=torch.zeros(2, dtype=torch.bool)), "drop_history"),
])
def test_bad_inputs_raise_clear_errors(model, change, needle):
    inp = make_inputs()
    kw = {k: change.pop(k) for k in ("text_null", "drop_history") if k in change}
    inp.update({k: (v.double() if v.is_floating_point() else v) for k, v in change.items()})
    with pytest.raises(ValueError, match=needle):
        run(model, inp, **kw)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="cond_gating_ratio"):
        MagiDiT(ModelConfig(**{**TINY, "cond_gating_ratio": 0.5}))
    with pytest.raises(ValueError, match="head_dim"):
        MagiDiT(ModelConfig(**{**TINY, "head_dim": 12}))
