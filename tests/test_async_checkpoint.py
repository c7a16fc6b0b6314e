"""``ckpt.async_save=true`` on gloo ranks: resumed runs equal synchronous ones bitwise, and kill -9 of
a rank while its background write is in flight leaves the previous checkpoint complete and picked.

Each world size runs, in one spawn: a synchronous run (6 steps, a checkpoint every 2); the same run
with asynchronous checkpoints; and a resume of the asynchronous run's step-4 checkpoint (saved
while training went on to step 6: a snapshot that was not copied at save time would hold later
weights). Same machine, same layout: losses, gradient norms and final weights must be bitwise equal.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config
from magitrain.checkpoint import Checkpointer

STEPS, EVERY, RESUME = 6, 2, 4


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cfg(root, name, world, *extra):
    return tiny_config(os.path.join(root, name), f"train.steps={STEPS}", f"ckpt.every={EVERY}", "ckpt.keep_last=10",
                       "optim.warmup_steps=2", f"data.batch_size={world}", f"parallel.dp={world}", *extra)


def _worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import nccl_rule

    nccl_rule.install()  # the async path also obeys NCCL's device rule
    from magitrain.train import train

    train(_cfg(root, "sync", world))
    train(_cfg(root, "async", world, "ckpt.async_save=true"))
    step4 = Checkpointer(os.path.join(root, "async", "run")).path_for(RESUME)
    train(_cfg(root, "resumed", world, "ckpt.async_save=true", f"ckpt.resume={step4}"))


def _records(run_dir) -> dict[int, dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def _check(root):
    sync, asyn, resumed = (os.path.join(root, name, "run") for name in ("sync", "async", "resumed"))
    want = _records(sync)
    assert sorted(want) == list(range(1, STEPS + 1))
    for run, steps in ((asyn, range(1, STEPS + 1)), (resumed, range(RESUME + 1, STEPS + 1))):
        got = _records(run)
        assert sorted(got) == list(steps), run
        for s in steps:
            assert (got[s]["loss"], got[s]["grad_norm"]) == (want[s]["loss"], want[s]["grad_norm"]), (run, s)
        assert [s for s, _ in Checkpointer(run).complete_checkpoints()][-1] == STEPS
    ref = Checkpointer.load(Checkpointer(sync).path_for(STEPS))
    for run in (asyn, resumed):
        got = Checkpointer.load(Checkpointer(run).path_for(STEPS))
        for key in ("model", "optim"):
            flat_ref, flat_got = _flatten(ref[key]), _flatten(got[key])
            assert flat_ref.keys() == flat_got.keys()
            assert all(torch.equal(flat_ref[k], flat_got[k]) for k in flat_ref), (run, key)
    # the step-4 snapshot of the async run equals the sync run's step-4 checkpoint
    a4, s4 = (Checkpointer.load(Checkpointer(r).path_for(RESUME))["model"] for r in (asyn, sync))
    assert all(torch.equal(a4[k], s4[k]) for k in s4)


def _flatten(tree, prefix=""):
    if isinstance(tree, torch.Tensor):
        return {prefix: tree}
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}/{key}").items()}
    if isinstance(tree, list):
        return {k: v for i, sub in enumerate(tree) for k, v in _flatten(sub, f"{prefix}/{i}").items()}
    return {}


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_async_checkpoints_resume_bitwise_like_sync(tmp_path, world):
    mp.spawn(_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world)
    _check(str(tmp_path))


@pytest.mark.slow
def test_kill_during_async_write_keeps_previous_checkpoint(tmp_path):
    """torchrun, 2 ranks (cp=2): rank 1 is SIGKILLed inside its background write of step 6. Step 4
    stays the newest complete checkpoint, ``auto`` resumes from it, and the resumed losses equal an
    uninterrupted synchronous run's bitwise."""
    from test_fault_drill import Launch, complete_steps, losses

    short = ["train.steps=8", "ckpt.every=2"]
    reference = Launch(tmp_path, str(tmp_path / "reference"), short)
    assert reference.wait(300) == 0, reference.output()[-3000:]
    run_dir = str(tmp_path / "run")
    run = Launch(tmp_path, run_dir, short + ["ckpt.async_save=true"], fault="kill:6:1")
    run.wait(120)
    out = run.output()
    assert run.rc(1) is None and run.rc(0) == 2, out[-3000:]
    assert "lost: rank 1" in out, out[-3000:]
    ck = Checkpointer(run_dir)
    assert complete_steps(run_dir) == [2, 4] and ck.resolve("auto") == ck.path_for(4)
    assert os.path.isdir(os.path.join(ck.root, ".tmp_step_00000006"))  # the torn write: no marker, ignored
    got, want = (Checkpointer.load(c.path_for(4))["model"] for c in (ck, Checkpointer(reference.run_dir)))
    assert all(torch.equal(got[k], want[k]) for k in want)

    resumed = Launch(tmp_path, run_dir, short + ["ckpt.async_save=true", "ckpt.resume=auto"])
    assert resumed.wait(300) == 0, resumed.output()[-3000:]
    assert f"resumed from {ck.path_for(4)} at step 4" in resumed.output()
    got, want = losses(run_dir), losses(reference.run_dir)
    assert [got[s] for s in range(5, 9)] == [want[s] for s in range(5, 9)]


def _start_fails_worker(rank, world, port, root):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    import magitrain.checkpoint as ckpt_mod
    from magitrain.checkpoint import CheckpointError
    from magitrain.parallel.mesh import init_parallel

    init_parallel(tiny_config(root, "parallel.dp=2", "parallel.timeout_s=10"))
    ck = Checkpointer(os.path.join(root, "run"), async_save=True)
    ck.save(1, {"w": {"x": torch.ones(4)}}, "")
    ck.wait()
    if rank == 1:  # this rank cannot start its write (e.g. staging runs out of host memory)
        def no_memory(*args, **kwargs):
            raise MemoryError("staging: out of host memory")

        ckpt_mod.dcp.async_save = no_memory
    with pytest.raises(CheckpointError, match="could not write checkpoint"):
        ck.save(2, {"w": {"x": torch.zeros(4)}}, "")
    assert ck.resolve("auto") == ck.path_for(1)
    with open(os.path.join(root, f"ok_{rank}"), "w") as f:
        f.write("ok")


@pytest.mark.slow
def test_async_save_that_one_rank_cannot_start_fails_on_every_rank(tmp_path):
    """No rank goes on with a pending write its peers never started (they would mismatch their next
    collectives): all raise CheckpointError, the previous checkpoint stays the newest. ~40 s: the
    started write of the other rank times out (parallel.timeout_s=10) before its process can exit."""
    mp.spawn(_start_fails_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    assert all(os.path.exists(tmp_path / f"ok_{r}") for r in range(2))
