"""LoRA under data, context and tensor parallelism against one process: the losses of two steps and
step 1's adapter gradients (unclipped; step 1, since step 0's zero B leaves every A gradient zero).

Layouts (all slow, for the CI budget): tp=2 on configs/tiny.yaml's model (2 KV heads, random base
weights); dp=2 and cp=2 on the MAGI-1 tiny reference (imported with ``release import``); one 4-rank
spawn for every pair of axes (dp=2 x tp=2 and cp=2 x tp=2 on tiny, dp=2 x cp=2 on MAGI-1); and one
8-rank spawn of dp=2 x cp=2 x tp=2 on the MAGI-1 reference, whose single KV head tp=2 replicates.
Tolerances as tests/test_parallel_layouts.py: the layouts change only the
summation order (measured below 1e-6): losses 2e-5 relative, gradients 1e-5 of their largest entry.
"""

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from lora_helpers import (
    MAGI1_DATA,
    REF,
    import_magi1_reference,
    lora_cfg,
    lora_step_grads,
    tiny_base,
)

pytestmark = pytest.mark.skipif(not os.path.isdir(REF), reason="MAGI-1 tiny reference data not present")

LOSS_RTOL, GRAD_TOL = 2e-5, 1e-5
# (dp, cp, tp, base)
FAST = [(1, 1, 2, "tiny"), (1, 1, 2, "magi1")]  # magi1: its one KV head replicated (tp > num_kv_heads)
SLOW2 = [(2, 1, 1, "magi1"), (1, 2, 1, "magi1")]
SLOW = [(2, 1, 2, "tiny"), (1, 2, 2, "tiny"), (2, 2, 1, "magi1")]
ALL_AXES = [(2, 2, 2, "magi1")]  # 8 ranks; tp=2 replicates MAGI-1's one KV head (tp > num_kv_heads)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(root, dp, cp, tp, base, run="run", world=None):
    path = import_magi1_reference(root) if base == "magi1" else tiny_base(root)
    extra = MAGI1_DATA if base == "magi1" else ["parallel.cp_chunk_size=16"]
    return lora_cfg(path, os.path.join(root, f"{run}_{dp}{cp}{tp}{base}"), *extra, "optim.grad_clip=1e9",
                    f"data.batch_size={4 if (world or dp * cp * tp) == 4 else 2}",  # world: the layout compared with
                    f"parallel.dp={dp}", f"parallel.cp={cp}", f"parallel.tp={tp}")


def _worker(rank, world, port, root, layouts):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    for layout in layouts:
        grads = lora_step_grads(_cfg(root, *layout))
        if rank == 0:
            torch.save(grads, os.path.join(root, "%d%d%d%s.pt" % layout))


def _compare(root, layouts):
    refs = {}
    for layout in layouts:
        dp, cp, tp, base = layout
        if base not in refs or refs[base][0] != dp * cp * tp:
            refs[base] = (dp * cp * tp, lora_step_grads(_cfg(root, 1, 1, 1, base, run=f"ref{dp * cp * tp}",
                                                                   world=dp * cp * tp)))
        ref = refs[base][1]
        got = torch.load(os.path.join(root, "%d%d%d%s.pt" % layout), weights_only=True)
        assert got.keys() == ref.keys(), layout
        adapters = [k for k in ref if "lora_" in k]
        assert adapters and len(adapters) == len(ref) - 3, "only adapter parameters may have gradients"
        rel = max(abs(float(got[k]) - float(ref[k])) / abs(float(ref[k])) for k in ("loss0", "loss1", "grad_norm"))
        scale = max(float(ref[k].abs().max()) for k in adapters)
        err = max(float((got[k] - ref[k]).abs().max()) for k in adapters) / scale
        print(f"{layout}: loss/grad-norm rel err {rel:.2e}, adapter gradient err / scale {err:.2e}")
        assert rel <= LOSS_RTOL and err <= GRAD_TOL, (layout, rel, err)


def _spawn_and_compare(root: str, layouts, world: int) -> None:
    """Train ``layouts`` on ``world`` spawned ranks and compare each with one process."""
    import_magi1_reference(root), tiny_base(root)  # once, before the ranks start
    mp.spawn(_worker, args=(world, _free_port(), root, layouts), nprocs=world)
    _compare(root, layouts)


@pytest.mark.slow
def test_lora_tp2_matches_single_process(tmp_path):
    _spawn_and_compare(str(tmp_path), FAST, 2)


@pytest.mark.slow
def test_lora_two_rank_dp_cp_on_magi1_match_single_process(tmp_path):
    _spawn_and_compare(str(tmp_path), SLOW2, 2)


@pytest.mark.slow
def test_lora_four_rank_layouts_match_single_process(tmp_path):
    _spawn_and_compare(str(tmp_path), SLOW, 4)


@pytest.mark.slow
def test_lora_dp2_cp2_tp2_on_magi1_matches_single_process(tmp_path):
    """All three axes at once on the imported MAGI-1 tiny reference: 8 gloo ranks (slow on 2 cores)."""
    _spawn_and_compare(str(tmp_path), ALL_AXES, 8)


VAL = ["train.steps=2", "eval.every=2", "eval.batches=1", "eval.video_every=2", "eval.captions=[a red disk]",
       "eval.sample_steps=2", "eval.sample_window=1", "optim.grad_clip=1.0"]


def _train_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    from magitrain.train import train

    train(_val_cfg(root, (2, 1, 2)))


def _val_cfg(root, layout):
    dp, cp, tp = layout
    return lora_cfg(tiny_base(root), os.path.join(root, "val_%d%d%d" % layout), "parallel.cp_chunk_size=16",
                    "data.batch_size=4", f"parallel.dp={dp}", f"parallel.cp={cp}", f"parallel.tp={tp}", *VAL)


@pytest.mark.slow
def test_lora_run_with_validation_under_fsdp_and_tp(tmp_path):
    """A whole LoRA run at dp=2 x tp=2 with eval.every and eval.video_every: the fixed-t losses equal one
    process's, and the sample (drawn from the model gathered from FSDP2 x TP shards) is written."""
    import json

    from magitrain.train import train

    root = str(tmp_path)
    tiny_base(root)
    mp.spawn(_train_worker, args=(4, _free_port(), root), nprocs=4)
    ref = _val_cfg(root, (1, 1, 1))
    train(ref)

    def val(run_dir):
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            return [{k: v for k, v in r.items() if k.startswith("val_loss")} for r in map(json.loads, f)][-1]

    got, want = val(_val_cfg(root, (2, 1, 2)).run.dir), val(ref.run.dir)
    assert set(want) == set(got) and len(want) == 6
    for k in want:
        assert got[k] == pytest.approx(want[k], rel=LOSS_RTOL), k
    samples = os.path.join(_val_cfg(root, (2, 1, 2)).run.dir, "samples")
    assert sorted(os.listdir(samples)) == ["step_00000002_0.mp4", "step_00000002_0.png", "step_00000002_0.txt"]
