"""Checkpoints of the tensor-parallel 24B-style model keep MAGI-1's tensors: the SwiGLU
``linear_fc1`` (held as paired gate/up shards) is written as MAGI-1's ``[gate | up]`` matrix.

Fast: a tp=2 (+ sequence parallel) checkpoint of the freshly initialised model, read on one
process, equals the one-process model's state dict bit for bit (same seed); and loading it back
at tp=2 restores every rank's local shards exactly. Slow: a tp=2 run (4 steps, checkpoint at
step 2) resumed at tp=4 (4 ranks, KV heads replicated) and at tp=1 reproduces the uninterrupted
losses, and the release export of the tp=2 run equals the one-process run's export (same
training, tolerance 1e-5 of the largest entry: the layouts only change summation order).
"""

import json
import os

import pytest
import torch
import torch.multiprocessing as mp

from test_parallel_layouts import LOSS_RTOL, _free_port, layout_cfg
from test_tensor_parallel_parity import MAGI24_STYLE

SP = "parallel.sequence_parallel=true"
RUN = ["train.steps=4", "ckpt.every=2", "data.batch_size=4", "train.grad_accum=1"]


def _build(cfg):
    from magitrain.model import MagiDiT
    from magitrain.parallel.mesh import init_parallel
    from magitrain.parallel.parallelize import parallelize_model

    env = init_parallel(cfg)
    torch.manual_seed(cfg.train.seed)
    return parallelize_model(MagiDiT(cfg.model), env, cfg)


def _local_shards(model):
    from torch.distributed.tensor import DTensor

    return {n: (p._local_tensor if isinstance(p, DTensor) else p).detach().clone() for n, p in model.named_parameters()}


def _init_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from magitrain.checkpoint import Checkpointer, ModelState

    cfg = layout_cfg(root, (1, 1, 2), *MAGI24_STYLE, SP)
    model = _build(cfg)
    before = _local_shards(model)
    path = Checkpointer(os.path.join(root, "ck")).save(0, {"model": ModelState(model)}, "")
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    Checkpointer.load_into(path, {"model": ModelState(model)})
    after = _local_shards(model)
    bad = [n for n in before if not torch.equal(before[n], after[n])]
    with open(os.path.join(root, f"reload_{rank}.json"), "w") as f:
        json.dump(bad, f)


def test_tp2_checkpoint_holds_magi1_tensors(tmp_path):
    from magitrain.checkpoint import Checkpointer
    from magitrain.model import MagiDiT

    root = str(tmp_path)
    mp.spawn(_init_worker, args=(2, _free_port(), root), nprocs=2)
    for rank in range(2):
        assert json.load(open(os.path.join(root, f"reload_{rank}.json"))) == [], rank
    cfg = layout_cfg(root, (1, 1, 1), *MAGI24_STYLE)
    torch.manual_seed(cfg.train.seed)
    ref = MagiDiT(cfg.model).state_dict()
    saved = Checkpointer.load(os.path.join(root, "ck", "checkpoints", "step_00000000"))["model"]
    assert saved.keys() == ref.keys()
    key = "videodit_blocks.layers.0.mlp.linear_fc1.weight"
    assert tuple(saved[key].shape) == (2 * cfg.model.ffn_hidden_size, cfg.model.hidden_size)
    for name, t in ref.items():
        assert torch.equal(saved[name], t), name


def _run_worker(rank, world, port, root, layout, resume):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from magitrain.train import train

    train(_cfg(root, layout, resume))


def _cfg(root, layout, resume):
    name = "".join(map(str, layout)) + ("_resumed" if resume else "")
    extra = [f"ckpt.resume={_step2(root)}"] if resume else []
    return layout_cfg(os.path.join(root, name), layout, *MAGI24_STYLE, *RUN, *extra)


def _run_dir(root, layout, resume):
    name = "".join(map(str, layout))
    return os.path.join(root, name + ("_resumed" if resume else ""), name, "run")


def _step2(root):
    return os.path.join(_run_dir(root, (1, 1, 2), False), "checkpoints", "step_00000002")


def _losses(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow
def test_tp2_checkpoint_resumes_at_tp4_and_tp1_and_exports_as_tp1(tmp_path):
    from safetensors.torch import load_file

    from magitrain.release import export
    from magitrain.train import train

    root = str(tmp_path)
    mp.spawn(_run_worker, args=(2, _free_port(), root, (1, 1, 2), False), nprocs=2)
    mp.spawn(_run_worker, args=(4, _free_port(), root, (1, 1, 4), True), nprocs=4)
    train(_cfg(root, (1, 1, 1), True))
    train(_cfg(root, (1, 1, 1), False))
    straight = _losses(_run_dir(root, (1, 1, 2), False))
    for layout in ((1, 1, 4), (1, 1, 1)):
        resumed = _losses(_run_dir(root, layout, True))
        print(layout, "resumed", resumed, "uninterrupted tp=2", straight)
        assert sorted(resumed) == [3, 4], layout
        for step, loss in resumed.items():
            assert loss == pytest.approx(straight[step], rel=LOSS_RTOL), (layout, step)
    out = {}
    for layout in ((1, 1, 2), (1, 1, 1)):
        dest = os.path.join(root, "release_" + "".join(map(str, layout)))
        export(_run_dir(root, layout, False), dest, dtype="fp32", ema=False)
        out[layout] = {k: v for f in sorted(os.listdir(dest)) if f.endswith(".safetensors")
                       for k, v in load_file(os.path.join(dest, f)).items()}
    a, b = out[(1, 1, 2)], out[(1, 1, 1)]
    assert a.keys() == b.keys()
    scale = max(float(t.abs().max()) for t in b.values())
    err = max(float((a[k] - b[k]).abs().max()) for k in b)
    print(f"release export tp=2 vs tp=1: max error / scale {err / scale:.2e}")
    assert err <= 1e-5 * scale
