"""Training on its own rollouts (``objective: self_rollout``): the history fed to the loss is the model's own
sequential generation (against a hand loop and the inference sampler), a teacher equal to the student
without guidance gives loss 0, the draws are per sample, config checks; slow: loss parity over dp/cp/tp
layouts and a bitwise resume."""

import copy
import dataclasses
import json
import os
import shutil
import socket

import pytest
import torch

from magitrain import sampler as sampler_module
from magitrain.batch import Batch
from magitrain.checkpoint import Checkpointer
from magitrain.config import ConfigError, load_config
from magitrain.diffusion import sampling_schedule
from magitrain.layout import PackedLayout, unpatchify
from magitrain.parallel.mesh import init_parallel
from magitrain.sampler import ChunkSampler, SamplerConfig
from magitrain.self_rollout import SelfRollout, rollout_batch
from magitrain.synthetic import SyntheticSource
from magitrain.train import build_optimizer, main, train, train_step

from conftest import REPO
from test_distill import a_batch, random_model  # fp64 models with every weight random, a synthetic batch

TINY_YAML = os.path.join(REPO, "configs", "tiny.yaml")
QUIET = ["log.progress=false", "log.tensorboard=false"]


def rollout_config(tmp_path, *overrides):
    return load_config(TINY_YAML, [f"run.dir={tmp_path}/run", "objective=self_rollout", "ckpt.init_from=unused"]
                       + QUIET + list(overrides))


# --- the rollout is the model's own sequential generation ---------------------------------------

def hand_rollout(model, batch, rb, k, steps, context_t):
    """Sample ``k`` streamed alone, chunk after chunk, in its own layout of the chunks so far (no later
    chunks, no other samples): ``(generated clean chunks, the loss chunk's state after i steps)``."""
    s = batch.layout.samples[k]
    first = sum(x.num_chunks for x in batch.layout.samples[:k])
    ct = s.chunk_tokens
    rows = lambda c: slice(s.offset + c * ct, s.offset + (c + 1) * ct)  # noqa: E731
    sched = sampling_schedule(steps, 3.0)  # float32, as the sampler's (its step sizes are float32 differences)
    r, i = int(rb.history[k]), int(rb.step_index[k])
    generated, state = [], None
    for j in range(r + 1):
        x = rb.noise[rows(j)].clone()
        ctx = [context_t * g + (1 - context_t) * rb.context_noise[rows(c)] for c, g in enumerate(generated)]
        layout = PackedLayout.pack([((j + 1) * s.chunk_frames, s.height, s.width, s.chunk_frames)])
        chunks = slice(first, first + j + 1)
        for step in range(steps if j < r else i):
            t = torch.tensor([context_t] * j + [float(sched[step])])
            with torch.no_grad():
                v = model(torch.cat(ctx + [x]), t, batch.text_emb[chunks], batch.text_mask[chunks], layout,
                          text_null=rb.text_null[chunks])[j * ct:]
            x = x + v * float(sched[step + 1] - sched[step])
        if j < r:
            generated.append(x)
        else:
            state = x
    return generated, state


def test_rollout_history_is_sequential_generation(tmp_path, monkeypatch):
    steps, context_t = 3, 0.75
    cfg = rollout_config(tmp_path, "rollout.context_chunks=3", f"rollout.steps={steps}",
                         f"rollout.context_t={context_t}", "diffusion.caption_dropout=0.5",
                         "diffusion.history_dropout=0.0", "train.seed=3")
    model = random_model(cfg.model)
    objective = SelfRollout(cfg, teacher=None)
    batch = a_batch(cfg)
    layout = batch.layout
    step = 1
    rb = objective.noise(batch, step)
    assert bool((rb.history >= 1).all()) and bool((rb.history <= 3).all())
    assert len(set(rb.history.tolist())) > 1 and len(set(rb.step_index.tolist())) > 1  # varied draws exercised
    assert bool(rb.text_null.any()) and not bool(rb.text_null.all())
    x = objective.rollout(model, batch, rb, "cpu")
    figures = objective.take_figures()
    assert figures["rollout_chunks"] == (float(rb.history.sum()), float(len(layout.samples)))
    assert figures["rollout_calls"] == (float((rb.history * steps + rb.step_index).max()), 1.0)
    sched = sampling_schedule(steps, 3.0)
    chunk, sampled = 0, 0
    for k, s in enumerate(layout.samples):
        r, i = int(rb.history[k]), int(rb.step_index[k])
        generated, state = hand_rollout(model, batch, rb, k, steps, context_t)
        ct = s.chunk_tokens
        for c in range(s.num_chunks):
            rows = slice(s.offset + c * ct, s.offset + (c + 1) * ct)
            if c < r:
                want, want_t = context_t * generated[c] + (1 - context_t) * rb.context_noise[rows], context_t
            elif c == r:
                want, want_t = state, float(sched[i])
            else:
                want, want_t = rb.noise[rows], 0.0
            torch.testing.assert_close(x[rows], want, rtol=1e-9, atol=1e-11)
            assert float(rb.t[chunk + c]) == pytest.approx(want_t, abs=1e-7)
            assert bool(rb.loss_mask[rows].all()) == (c == r) and bool(rb.loss_mask[rows].any()) == (c == r)
        if r and not bool(rb.text_null[chunk]):  # ... and the hand loop is the inference sampler's generation
            noise = {c: rb.noise[s.offset + c * ct:s.offset + (c + 1) * ct] for c in range(r)}
            renoise = {c: rb.context_noise[s.offset + c * ct:s.offset + (c + 1) * ct] for c in range(r)}
            monkeypatch.setattr(sampler_module, "chunk_noise", lambda seed, c, shape, dtype, n=noise: n[c].clone())
            monkeypatch.setattr(sampler_module, "context_noise",
                                lambda seed, c, shape, dtype, n=renoise: n[c].clone())
            p = cfg.model.patch_size
            video = ChunkSampler(model, batch.text_emb[chunk:chunk + r], batch.text_mask[chunk:chunk + r],
                                 s.height * p, s.width * p, SamplerConfig(steps=steps, window=1, context_t=context_t)
                                 ).generate()
            want = torch.cat([unpatchify(g, s.chunk_frames, s.height, s.width) for g in generated], dim=1)
            torch.testing.assert_close(video, want, rtol=1e-9, atol=1e-11)
            sampled += 1
        chunk += s.num_chunks
    assert sampled and len(layout.samples) >= 3
    # the test can fail: teacher forcing (the data as history) is another input
    assert (x - batch.latents)[~rb.loss_mask & (layout.token_chunk_ids() >= 0)].abs().max() > 0.1


def test_one_chunk_samples_train_on_policy_without_history(tmp_path):
    """A 1-chunk sample has no history (r = 0): its loss chunk is its own state after i steps from noise."""
    steps = 4
    cfg = rollout_config(tmp_path, "data.frames=2", f"rollout.steps={steps}", "train.seed=2")
    model = random_model(cfg.model)
    objective = SelfRollout(cfg, teacher=None)
    batch = a_batch(cfg)
    rb = objective.noise(batch, 0)
    assert bool((rb.history == 0).all()) and len(set(rb.step_index.tolist())) > 1
    assert torch.equal(rb.loss_mask, batch.layout.token_chunk_ids() >= 0)
    x = objective.rollout(model, batch, rb, "cpu")
    for k, s in enumerate(batch.layout.samples):
        _, state = hand_rollout(model, batch, rb, k, steps, 1.0)
        torch.testing.assert_close(x[s.offset:s.end], state, rtol=1e-9, atol=1e-11)
        assert float(rb.t[k]) == pytest.approx(float(sampling_schedule(steps, 3.0)[rb.step_index[k]]))
    figures = objective.take_figures()
    assert figures["rollout_chunks"][0] == 0 and figures["rollout_power_ratio"] == (0.0, 0.0)
    assert figures["rollout_calls"] == (float(rb.step_index.max()), 1.0)


def test_teacher_equal_to_student_without_guidance_gives_zero_loss(tmp_path):
    cfg = rollout_config(tmp_path, "rollout.text_scale=1.0", "rollout.history_scale=1.0", "rollout.steps=2",
                         "rollout.context_t=0.8")
    model = random_model(cfg.model, dtype=torch.float32)
    batch = SyntheticSource(cfg).next_batch()
    env = init_parallel(cfg)
    out = train_step(model, [batch], cfg, env, 0, build_optimizer(model, cfg),
                     SelfRollout(cfg, copy.deepcopy(model).requires_grad_(False)))
    assert out["loss"] == 0.0 and out["grad_norm"] == 0.0
    assert {"rollout_chunks", "rollout_calls", "rollout_power_ratio"} <= set(out["figures"])
    assert out["figures"]["rollout_calls"] > 0 and out["figures"]["rollout_chunks"] >= 1
    # ... and it can fail: with guidance the teacher's target differs from the student's one pass
    guided = dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, text_scale=1.5, history_scale=1.5))
    out = train_step(model, [batch], guided, env, 0, build_optimizer(model, guided),
                     SelfRollout(guided, copy.deepcopy(model).requires_grad_(False)))
    assert out["loss"] > 1e-6


def test_micro_batches_give_the_loss_of_one_batch(tmp_path):
    """grad_accum=2 (two micro-batches, two rollouts of their own lengths) = one batch of the same samples."""
    losses, figures = [], []
    for accum in (1, 2):
        cfg = rollout_config(tmp_path, f"train.grad_accum={accum}", "rollout.steps=2", "rollout.context_t=0.8")
        model = random_model(cfg.model, seed=0, dtype=torch.float32)
        objective = SelfRollout(cfg, random_model(cfg.model, seed=1, dtype=torch.float32).requires_grad_(False))
        data = SyntheticSource(cfg)
        out = train_step(model, [data.next_batch() for _ in range(accum)], cfg, init_parallel(cfg), 0,
                         build_optimizer(model, cfg), objective)
        losses.append(out["loss"])
        figures.append(out["figures"])
    assert losses[0] > 1e-4 and losses[1] == pytest.approx(losses[0], rel=1e-5)
    for name in ("rollout_chunks", "rollout_power_ratio"):
        assert figures[1][name] == pytest.approx(figures[0][name], rel=1e-6), name
    assert figures[0]["rollout_calls"] <= figures[1]["rollout_calls"] <= 2 * figures[0]["rollout_calls"]


def test_draws_depend_only_on_the_sample(tmp_path):
    cfg = rollout_config(tmp_path, "rollout.context_chunks=3", "rollout.context_t=0.5")
    batch = a_batch(cfg, torch.float32)
    layout = batch.layout
    keep = [1, 2]  # the same samples in a batch of their own (another rank's share)
    spans = [layout.samples[k] for k in keep]
    first = [sum(s.num_chunks for s in layout.samples[:k]) for k in keep]
    chunks = torch.cat([torch.arange(f, f + s.num_chunks) for f, s in zip(first, spans)])
    sub = Batch(torch.cat([batch.latents[s.offset:s.end] for s in spans]),
                PackedLayout.pack([(s.frames, s.height, s.width, s.chunk_frames) for s in spans]),
                batch.text_emb[chunks], batch.text_mask[chunks], sample_ids=[batch.sample_ids[k] for k in keep])
    whole, part = rollout_batch(batch, cfg, 5), rollout_batch(sub, cfg, 5)
    assert torch.equal(whole.history[keep], part.history) and torch.equal(whole.step_index[keep], part.step_index)
    assert torch.equal(whole.t[chunks], part.t) and torch.equal(whole.text_null[chunks], part.text_null)
    for field in ("noise", "context_noise", "loss_mask"):
        mine = torch.cat([getattr(whole, field)[s.offset:s.end] for s in spans])
        assert torch.equal(mine, getattr(part, field)), field
    other = rollout_batch(batch, cfg, 6)
    assert not (torch.equal(other.history, whole.history) and torch.equal(other.step_index, whole.step_index))


# --- config checks -------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (["ckpt.init_from=''"], "teacher"),
    (["rollout.context_chunks=0"], "context_chunks"),
    (["rollout.steps=0"], "rollout.steps"),
    (["rollout.context_t=1.5"], "context_t"),
    (["rollout.shift=0"], "rollout.shift"),
    (["rollout.text_scale=0"], "text_scale"),
    (["distill.enabled=true", "model.step_size_conditioning=true"], "distill.enabled"),
    (["model.step_size_conditioning=true"], "step_size_conditioning"),
    (["model.lora.rank=4"], "lora"),
    (["objective=dmd"], "objective"),
])
def test_bad_rollout_config(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        rollout_config(tmp_path, *overrides)


def test_bad_rollout_config_is_one_line_exit_2(tmp_path, capsys):
    code = main(["--config", TINY_YAML, f"run.dir={tmp_path}/x", "objective=self_rollout", "rollout.steps=0",
                 "ckpt.init_from=somewhere"] + QUIET)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: rollout.steps=0")
    assert main(["--config", TINY_YAML, f"run.dir={tmp_path}/y", "objective=self_rollout"] + QUIET) == 2
    assert "needs a frozen teacher" in capsys.readouterr().err


# --- real runs: layouts and resume -----------------------------------------------------------------

def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def base_runs(tmp_path_factory):
    """Two short base runs: the student's start (``base``) and a different teacher (``teacher``, other seed), no
    warmup and no EMA (the weights used are the trained ones, whose velocities are not ~0 as at init), so the
    loss is a real student-teacher gap rather than rounding."""
    root = str(tmp_path_factory.mktemp("rollout_bases"))
    for name, seed in (("base", 0), ("teacher", 1)):
        train(load_config(TINY_YAML, [f"run.dir={root}/{name}", "train.steps=3", f"train.seed={seed}",
                                      "optim.warmup_steps=0", "optim.ema_decay=0"] + QUIET))
    return root


def _run_args(root, run, *extra):
    return ([f"run.dir={root}/{run}", f"ckpt.init_from={root}/base", "objective=self_rollout",
             f"rollout.teacher={root}/teacher", "rollout.steps=2", "rollout.context_chunks=2", "rollout.context_t=0.8",
             "train.steps=3", "log.every=1", "ckpt.every=0"] + QUIET + list(extra))


LAYOUTS = [(2, 1, 1), (1, 2, 1), (1, 1, 2)]
FIGURES = ("rollout_chunks", "rollout_calls", "rollout_power_ratio")


def _layout_cfg(root, layout):
    dp, cp, tp = layout
    return load_config(TINY_YAML, _run_args(root, f"{dp}{cp}{tp}", "parallel.cp_chunk_size=16", f"parallel.dp={dp}",
                                            f"parallel.cp={cp}", f"parallel.tp={tp}"))


def _layout_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import nccl_rule

    nccl_rule.install()  # NCCL's device rule on gloo: host tensors only on the CPU groups
    for layout in LAYOUTS:
        train(_layout_cfg(root, layout))


@pytest.mark.slow
def test_self_rollout_losses_match_across_layouts(base_runs, tmp_path):
    """dp=2 (ranks with different rollout lengths: the forwards are agreed), cp=2 and tp=2 self-rollout runs give
    the single-process losses (fp32 on gloo: summation order only) and the same health figures, under NCCL's
    device rule (tests/nccl_rule.py)."""
    import torch.multiprocessing as mp

    root = str(tmp_path)
    for name in ("base", "teacher"):
        os.symlink(os.path.join(base_runs, name), os.path.join(root, name))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_layout_worker, args=(2, port, root), nprocs=2)
    train(_layout_cfg(root, (1, 1, 1)))
    ref = _metrics(f"{root}/111")
    assert len(ref) == 3 and all(r["loss"] > 1e-4 for r in ref)
    for dp, cp, tp in LAYOUTS:
        got = _metrics(f"{root}/{dp}{cp}{tp}")
        assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in ref], rel=2e-5), (dp, cp, tp)
        for name in FIGURES:
            assert [r[name] for r in got] == pytest.approx([r[name] for r in ref], rel=1e-6), (dp, cp, tp, name)


def test_self_rollout_run_resumes_bitwise(base_runs, tmp_path):
    root = str(tmp_path)
    for name in ("base", "teacher"):
        os.symlink(os.path.join(base_runs, name), os.path.join(root, name))
    straight = load_config(TINY_YAML, _run_args(root, "a", "train.steps=4"))
    train(straight)
    interrupted = load_config(TINY_YAML, _run_args(root, "b", "train.steps=4", "ckpt.every=2"))
    train(interrupted)
    ck = Checkpointer(interrupted.run.dir)
    shutil.rmtree(ck.path_for(4))
    train(load_config(TINY_YAML, _run_args(root, "b", "train.steps=4", "ckpt.every=2", "ckpt.resume=auto")))
    a, b = _metrics(straight.run.dir), _metrics(interrupted.run.dir)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss"] for r in a] == [r["loss"] for r in b] and all(r["loss"] > 1e-4 for r in a)
    for name in FIGURES:
        assert [r[name] for r in a] == [r[name] for r in b], name
    sa = Checkpointer.load(Checkpointer(straight.run.dir).latest())
    sb = Checkpointer.load(ck.latest())
    for k in sa["model"]:
        assert torch.equal(sa["model"][k], sb["model"][k]), k
