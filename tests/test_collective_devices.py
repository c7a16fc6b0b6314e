"""Collectives obey NCCL's device rule (tests/nccl_rule.py) on 2 gloo ranks: host-side agreement
(checkpoint success, stop signal) and DCP go through a CPU group, device groups get device tensors
only, an asynchronous checkpoint has a CPU group of its own.

Before issue 14, ``Checkpointer`` agreed on "every rank wrote its part" with a CPU tensor on the
default group (NCCL: "No backend type associated with device type cpu" at the first checkpoint of
any multi-GPU run); the fast test fails there on that code.
"""

from __future__ import annotations

import json
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from conftest import tiny_config


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_env(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))


def _rule_worker(rank, world, port, root):
    _launch_env(rank, world, port)
    import nccl_rule

    nccl_rule.install()
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from magitrain.checkpoint import Checkpointer
    from magitrain.parallel.mesh import init_parallel
    from magitrain.train import StopRequest, all_reduce_sum

    cfg = tiny_config(root, "parallel.dp=2")
    env = init_parallel(cfg)
    # the trainer's agreement and counters, and a checkpoint save + load, under the rule
    stop = StopRequest()
    stop.requested = rank == 1
    assert stop.agreed(env) is True
    assert all_reduce_sum(rank + 1, env, env.group("dp")) == 3.0
    ck = Checkpointer(os.path.join(root, "run"), keep_last=2)
    w = torch.full((4,), float(rank))
    ck.save(1, {"w": {"x": torch.arange(4.0)}}, "a: 1\n", per_rank={"r": {"w": w}})
    got = {"x": torch.zeros(4)}

    class Holder:
        def __init__(self, tree):
            self.tree = tree

        def state_dict(self):
            return self.tree

        def load_state_dict(self, state):
            self.tree.update(state)

    mine = Holder({"w": None})
    Checkpointer.load_into(ck.latest(), {"w": Holder(got)}, per_rank={"r": mine})
    assert torch.equal(got["x"], torch.arange(4.0)) and torch.equal(mine.tree["w"], w)
    # the harness bites: a host tensor is refused on a device group, accepted on the CPU group
    host = torch.ones(1)
    host._host_tensor_site = "test"
    with pytest.raises(nccl_rule.DeviceRuleError, match="device group"):
        dist.all_reduce(host)
    with pytest.raises(nccl_rule.DeviceRuleError, match="device group"):
        dist.all_reduce(host, group=env.group("dp"))
    from magitrain.parallel import collectives  # after the checkpoint: the old code has no such module

    dist.all_reduce(host, group=collectives.cpu_group())
    assert host.item() == 2
    with pytest.raises(nccl_rule.DeviceRuleError, match="CPU backend"):
        dcp.async_save({"x": torch.ones(1)}, checkpoint_id=os.path.join(root, "never"))

    with open(os.path.join(root, f"ok_{rank}"), "w") as f:
        f.write("ok")


def test_checkpoint_and_agreement_obey_the_nccl_device_rule(tmp_path):
    mp.spawn(_rule_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    assert all(os.path.exists(tmp_path / f"ok_{r}") for r in range(2))


def _train_worker(rank, world, port, root):
    _launch_env(rank, world, port)
    import nccl_rule

    nccl_rule.install()
    from magitrain.train import train

    common = ["train.steps=6", "optim.warmup_steps=2", "data.batch_size=2", "parallel.cp_chunk_size=16"]
    run = tiny_config(root, *common, "parallel.dp=2", "train.steps=4", "ckpt.every=2")  # FSDP2, sync saves
    train(run)
    # resharded resume at cp=2 (CP attention's all-to-all, DCP load), asynchronous saves every step
    train(tiny_config(root, *common, "parallel.cp=2", "ckpt.resume=auto", "ckpt.every=1", "ckpt.async_save=true"))


@pytest.mark.slow
def test_training_with_checkpoints_obeys_the_nccl_device_rule(tmp_path):
    """dp=2 (FSDP2) training with checkpoints, then a resharded resume at cp=2 with asynchronous
    checkpoints every step, stop-signal agreement and metrics every step: ~60 s."""
    mp.spawn(_train_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2)
    from magitrain.checkpoint import Checkpointer

    ck = Checkpointer(str(tmp_path / "run"))
    assert [s for s, _ in ck.complete_checkpoints()][-1] == 6
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4, 5, 6]
