"""DP x CP x TP layouts against one process: per-step losses, one step's gradients, and resharded
resume (save at 2x1x2, resume at 1x2x1 and at 1x1x1).

Slow suite: everything multi-process runs in two spawns (4 ranks, then 2 ranks) shared by the
slow tests of this module; the single-process reference runs in the test process. Fast suite:
one 2-rank spawn runs 1x1x2, 2x1x1 and 1x2x1 for two steps with gradient clipping on, so the
step-1 gradients check the sharded gradient norm too. Tolerances: fp32 on gloo, the layouts
only change summation order: losses agree to ~1e-7 relative, we allow 2e-5; gradients to ~1e-7
of their largest entry, we allow 1e-5.
"""

import json
import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config

STEPS = 5
COMMON = [f"train.steps={STEPS}", "ckpt.every=0", "optim.warmup_steps=2", "data.batch_size=4",
          "train.grad_accum=2", "parallel.cp_chunk_size=16"]
LAYOUTS = {4: [(2, 2, 1), (1, 2, 2), (2, 1, 2), (1, 4, 1)], 2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)]}
SAVE_LAYOUT, RESUME_STEP = (2, 1, 2), 3
LOSS_RTOL, GRAD_TOL = 2e-5, 1e-5
FAST = ["train.steps=2", "data.batch_size=2", "train.grad_accum=1"]  # after COMMON: overrides it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def layout_cfg(root, layout, *extra):
    dp, cp, tp = layout
    return tiny_config(os.path.join(root, "".join(map(str, layout))), *COMMON, f"parallel.dp={dp}",
                       f"parallel.cp={cp}", f"parallel.tp={tp}", *extra)


class _GradCapture:
    """Stands in for the optimizer in ``train_step``: records the full (unsharded) gradients."""

    def __init__(self, model):
        self.model, self.grads = model, {}

    def step(self):
        from torch.distributed.tensor import DTensor
        for name, p in self.model.named_parameters():
            g = p.grad
            self.grads[name] = (g.full_tensor() if isinstance(g, DTensor) else g).detach().clone()

    def zero_grad(self, set_to_none=True):
        self.model.zero_grad(set_to_none=set_to_none)


def step_grads(cfg) -> dict:
    """The gradients of step 1 (after clipping: pass a huge optim.grad_clip for the raw ones) under
    cfg's layout, plus the step's ``loss`` and ``grad_norm`` under those two keys.

    Step 0 would test little: the zero-initialised final layer makes every other gradient zero.
    """
    from magitrain.data import build_data_source
    from magitrain.model import MagiDiT
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.parallelize import parallelize_model
    from magitrain.train import build_optimizer, train_step

    env = init_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    model = parallelize_model(MagiDiT(cfg.model), env, cfg)
    data = build_data_source(cfg, env.dp_rank, env.dp)
    micro = lambda: [data.next_batch() for _ in range(cfg.train.grad_accum)]  # noqa: E731
    train_step(model, micro(), cfg, env, 0, build_optimizer(model, cfg))
    capture = _GradCapture(model)
    out = train_step(model, micro(), cfg, env, 1, capture)
    return {**capture.grads, "loss": torch.tensor(out["loss"]), "grad_norm": torch.tensor(out["grad_norm"])}


def _worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from magitrain.train import train

    for layout in LAYOUTS[world]:
        extra = [f"ckpt.every={RESUME_STEP}"] if layout == SAVE_LAYOUT else []
        train(layout_cfg(root, layout, *extra))
        grads = step_grads(layout_cfg(root, layout, "optim.grad_clip=1e9"))
        if rank == 0:
            torch.save(grads, os.path.join(root, "".join(map(str, layout)), "grads.pt"))
    if world == 2:  # resume the 2x1x2 run's step-3 checkpoint at 1x2x1
        train(_resume_cfg(root, (1, 2, 1)))


def _resume_cfg(root, layout):
    run = os.path.join(root, "resume_" + "".join(map(str, layout)))
    src = os.path.join(root, "".join(map(str, SAVE_LAYOUT)), "run", "checkpoints", f"step_{RESUME_STEP:08d}")
    return layout_cfg(run, layout, f"ckpt.resume={src}")


def _losses(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def _max_errors(got: dict, ref: dict) -> tuple[float, float]:
    """(largest relative loss / grad-norm error, largest gradient error / largest reference entry)."""
    assert got.keys() == ref.keys()
    scalars = ("loss", "grad_norm")
    rel = max(abs(float(got[k]) - float(ref[k])) / abs(float(ref[k])) for k in scalars)
    scale = max(float(g.abs().max()) for k, g in ref.items() if k not in scalars)
    return rel, max(float((got[k] - g).abs().max()) for k, g in ref.items() if k not in scalars) / scale


def _fast_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for layout in LAYOUTS[world]:
        grads = step_grads(layout_cfg(root, layout, *FAST))
        if rank == 0:
            torch.save(grads, os.path.join(root, "".join(map(str, layout)) + ".pt"))


def test_two_rank_layouts_match_single_process(tmp_path):
    """Fast parity: step-1 loss, gradient norm and clipped gradients of 2x1x1, 1x2x1, 1x1x2."""
    root = str(tmp_path)
    mp.spawn(_fast_worker, args=(2, _free_port(), root), nprocs=2)
    ref = step_grads(layout_cfg(root, (1, 1, 1), *FAST))
    for layout in LAYOUTS[2]:
        got = torch.load(os.path.join(root, "".join(map(str, layout)) + ".pt"), weights_only=True)
        rel, grad_err = _max_errors(got, ref)
        print(f"{layout}: loss/grad-norm rel err {rel:.2e}, gradient err / scale {grad_err:.2e}")
        assert rel <= LOSS_RTOL and grad_err <= GRAD_TOL, (layout, rel, grad_err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("layouts"))
    for world in (4, 2):
        mp.spawn(_worker, args=(world, _free_port(), root), nprocs=world)
    from magitrain.train import train

    ref = layout_cfg(root, (1, 1, 1))
    train(ref)
    torch.save(step_grads(layout_cfg(root, (1, 1, 1), "optim.grad_clip=1e9")), os.path.join(root, "111", "grads.pt"))
    train(_resume_cfg(root, (1, 1, 1)))
    return root


def _all_layouts():
    return [lay for world in (4, 2) for lay in LAYOUTS[world]]


@pytest.mark.slow
def test_losses_match_single_process(runs):
    ref = _losses(os.path.join(runs, "111", "run"))
    assert sorted(ref) == list(range(1, STEPS + 1))
    for layout in _all_layouts():
        got = _losses(os.path.join(runs, "".join(map(str, layout)), "run"))
        assert sorted(got) == sorted(ref), layout
        print(layout, "max loss rel err", max(abs(got[s] - ref[s]) / ref[s] for s in ref))
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), (layout, step, got[step], ref[step])


@pytest.mark.slow
def test_gradients_match_single_process(runs):
    ref = torch.load(os.path.join(runs, "111", "grads.pt"), weights_only=True)
    for layout in _all_layouts():
        got = torch.load(os.path.join(runs, "".join(map(str, layout)), "grads.pt"), weights_only=True)
        rel, grad_err = _max_errors(got, ref)
        print(f"{layout}: step-1 loss/grad-norm rel err {rel:.2e}, gradient err / scale {grad_err:.2e}")
        assert rel <= LOSS_RTOL and grad_err <= GRAD_TOL, (layout, rel, grad_err)


@pytest.mark.slow
def test_resharded_resume_matches_uninterrupted(runs):
    straight = _losses(os.path.join(runs, "".join(map(str, SAVE_LAYOUT)), "run"))
    for layout in ((1, 2, 1), (1, 1, 1)):
        run = os.path.join(runs, "resume_" + "".join(map(str, layout)), "".join(map(str, layout)), "run")
        resumed = _losses(run)
        assert sorted(resumed) == list(range(RESUME_STEP + 1, STEPS + 1)), layout
        print(layout, "resumed losses", resumed, "uninterrupted", straight)
        for step, loss in resumed.items():
            assert loss == pytest.approx(straight[step], rel=LOSS_RTOL), (layout, step)
