"""Tensor / sequence parallelism for the 24B-style model (SwiGLU MLP, half-channel VAE, GQA 4:1,
x_rescale_factor) against one process: step-1 loss, gradient norm and every gradient.

Fast suite: one 2-rank spawn, tp=2 with sequence parallelism (TP alone is in the slow matrix).
Slow suite: one 4-rank spawn, tp=4 (KV heads replicated: 4 > num_kv_heads=2) with and without SP, tp=2 x cp=2 with and
without SP, tp=2 x dp=2 with and without SP, each also trained 3 steps (losses against one
process), and the per-rank MLP parameter count at tp=4 (asserted: exactly 1/4). Tolerances as
in tests/test_parallel_layouts.py (fp32 on gloo; layouts only change summation order).
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from test_parallel_layouts import GRAD_TOL, LOSS_RTOL, _free_port, _max_errors, layout_cfg, step_grads

# the 24B recipe's shape options at tiny sizes: SwiGLU, half-channel VAE, GQA (8 query : 2 KV heads)
MAGI24_STYLE = ["model.gated_linear_unit=true", "model.half_channel_vae=true", "model.in_channels=8",
                "model.out_channels=8", "model.num_heads=8", "model.num_kv_heads=2", "model.head_dim=8",
                "model.x_rescale_factor=0.1"]
FAST = ["train.steps=2", "data.batch_size=2", "train.grad_accum=1", "optim.grad_clip=1e9"]
TRAIN = ["train.steps=3", "data.batch_size=4", "train.grad_accum=1"]
SP = "parallel.sequence_parallel=true"
FAST_CASES = [((1, 1, 2), True)]
SLOW_CASES = [((1, 1, 4), False), ((1, 1, 4), True), ((1, 2, 2), False), ((1, 2, 2), True),
              ((2, 1, 2), False), ((2, 1, 2), True)]


def _name(layout, sp):
    return "".join(map(str, layout)) + ("_sp" if sp else "")


def _cfg(root, layout, sp, *extra):
    return layout_cfg(os.path.join(root, _name(layout, sp)), layout, *MAGI24_STYLE, *([SP] if sp else []), *extra)


def mlp_params_per_rank(model) -> int:
    """Elements of this rank's own pieces of every MLP matrix (TP and FSDP shards, not gathered)."""
    from torch.distributed.tensor import DTensor

    local = lambda p: p._local_tensor if isinstance(p, DTensor) else p  # noqa: E731
    return sum(local(p).numel() for n, p in model.named_parameters() if ".mlp.linear_fc" in n)


def _worker(rank, world, port, root, cases, train_too):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for layout, sp in cases:
        grads = step_grads(_cfg(root, layout, sp, *FAST))
        if rank == 0:
            torch.save(grads, os.path.join(root, _name(layout, sp) + ".pt"))
        if train_too:
            from magitrain.train import train
            train(_cfg(root, layout, sp, *TRAIN))
    if world == 4:
        from magitrain.model import MagiDiT
        from magitrain.parallel.mesh import init_parallel
        from magitrain.parallel.parallelize import parallelize_model
        cfg = _cfg(root, (1, 1, 4), False)
        model = parallelize_model(MagiDiT(cfg.model), init_parallel(cfg), cfg)
        with open(os.path.join(root, f"mlp_params_{rank}"), "w") as f:
            f.write(str(mlp_params_per_rank(model)))


def _check_grads(root, cases):
    ref = step_grads(_cfg(root, (1, 1, 1), False, *FAST))
    for layout, sp in cases:
        got = torch.load(os.path.join(root, _name(layout, sp) + ".pt"), weights_only=True)
        rel, grad_err = _max_errors(got, ref)
        print(f"{layout} sp={sp}: loss/grad-norm rel err {rel:.2e}, gradient err / scale {grad_err:.2e}")
        assert rel <= LOSS_RTOL and grad_err <= GRAD_TOL, (layout, sp, rel, grad_err)


def test_tp2_sequence_parallel_matches_single_process(tmp_path):
    root = str(tmp_path)
    mp.spawn(_worker, args=(2, _free_port(), root, FAST_CASES, False), nprocs=2)
    _check_grads(root, FAST_CASES)


def _losses(root, layout, sp):
    with open(os.path.join(root, _name(layout, sp), "".join(map(str, layout)), "run", "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_tp4_cp_dp_compositions_match_single_process(tmp_path):
    from magitrain.model import MagiDiT
    from magitrain.train import train

    root = str(tmp_path)
    mp.spawn(_worker, args=(4, _free_port(), root, SLOW_CASES, True), nprocs=4)
    _check_grads(root, SLOW_CASES)
    train(_cfg(root, (1, 1, 1), False, *TRAIN))
    ref = _losses(root, (1, 1, 1), False)
    assert sorted(ref) == [1, 2, 3]
    for layout, sp in SLOW_CASES:
        got = _losses(root, layout, sp)
        print(layout, sp, "losses", got, "reference", ref)
        assert sorted(got) == sorted(ref)
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=LOSS_RTOL), (layout, sp, step)
    full = mlp_params_per_rank(MagiDiT(_cfg(root, (1, 1, 1), False).model))
    per_rank = [int(open(os.path.join(root, f"mlp_params_{r}")).read()) for r in range(4)]
    print(f"MLP parameters: unsharded {full}, per rank at tp=4 {per_rank}")
    assert all(4 * n == full for n in per_rank), (full, per_rank)
