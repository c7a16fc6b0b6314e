"""``train.compile``: torch.compile per transformer block (inductor on CPU) gives the eager model's
outputs and gradients (1e-5) and compiles once: packed batches with other token, chunk and
caption counts and other masks (history/caption dropout) run the same compiled code."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch

from magitrain.config import load_config
from magitrain.configs import config_path
from magitrain.diffusion import noise_batch
from magitrain.model import MagiDiT
from magitrain.parallel.compile import apply_compile
from magitrain.synthetic import SyntheticSource

pytestmark = pytest.mark.slow  # inductor's first compile takes 20-80 s on 2 cores

# (latent frames, samples per sequence, seq_tokens): a different packed mask and size each time
LAYOUTS = [(8, 2, 256), (8, 2, 256), (4, 3, 192), (2, 5, 160), (8, 1, 128), (4, 2, 320)]


def compile_counts() -> int:
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def batches():
    for step, (frames, per_seq, seq_tokens) in enumerate(LAYOUTS):
        cfg = load_config(config_path("tiny.yaml"), [f"data.frames={frames}", f"data.samples_per_seq={per_seq}",
                                                     f"data.seq_tokens={seq_tokens}", "diffusion.caption_dropout=0.5",
                                                     "diffusion.history_dropout=0.5"])
        batch = SyntheticSource(cfg).next_batch()
        yield batch, noise_batch(batch, cfg.diffusion, 0, step)


def test_compiled_blocks_match_eager_and_compile_once():
    torch._dynamo.reset()
    cfg = load_config(config_path("tiny.yaml"))
    torch.manual_seed(0)
    eager = MagiDiT(cfg.model)
    with torch.no_grad():  # the final layer starts at zero: make every output and gradient non-trivial
        for p in eager.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    compiled = copy.deepcopy(eager)
    assert apply_compile(compiled, True) == cfg.model.num_layers
    counts, sizes = [], set()
    for batch, nb in batches():
        outs = []
        for model in (eager, compiled):
            model.zero_grad(set_to_none=True)
            out = model(nb.x_t, nb.t, batch.text_emb, batch.text_mask, batch.layout, text_null=nb.text_null,
                        drop_history=nb.drop_history)
            (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
            outs.append(out.detach())
        scale = outs[0].abs().max()
        assert scale > 0 and (outs[1] - outs[0]).abs().max() <= 1e-5 * scale
        grad_scale = max(p.grad.abs().max() for p in eager.parameters())
        for (name, pe), pc in zip(eager.named_parameters(), compiled.parameters()):
            assert (pc.grad - pe.grad).abs().max() <= 1e-5 * grad_scale, name
        counts.append(compile_counts())
        sizes.add((batch.layout.total_tokens, batch.layout.num_chunks, int(nb.text_null.sum()),
                   tuple(nb.drop_history.tolist())))
    assert len(sizes) == len(LAYOUTS)  # every batch differs in size or mask
    assert counts[0] > 0 and counts[-1] == counts[0], counts  # compiled on the first batch only


def test_train_compile_matches_eager_run(tmp_path):
    torch._dynamo.reset()
    losses = {}
    for name, flag in (("eager", "false"), ("compiled", "true")):
        cfg = load_config(config_path("tiny.yaml"), [f"run.dir={tmp_path}/{name}", "train.steps=3", "ckpt.every=0",
                                                     "log.progress=false", "log.tensorboard=false",
                                                     f"train.compile={flag}"])
        from magitrain.train import train

        train(cfg)
        if flag == "true":
            assert compile_counts() > 0  # it did compile
        with open(os.path.join(cfg.run.dir, "metrics.jsonl")) as f:
            losses[name] = [json.loads(line)["loss"] for line in f]
    assert losses["compiled"] == pytest.approx(losses["eager"], rel=1e-5)
