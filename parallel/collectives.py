"""Host-side collectives: every CPU-side agreement between ranks goes through here, naming its group.

Two kinds of process group (torchtitan's cluster setup):

- **device groups**: the default (world) group and the dp / cp / tp mesh groups. Their backend
  is the device's (NCCL on CUDA, gloo on a CPU-only run); they move device tensors only
  (activations, gradients, parameters, the loss counters the trainer builds on ``env.device``).
  NCCL refuses CPU tensors ("No backend type associated with device type cpu").
- **CPU groups**: gloo groups over all ranks, created here by name, for what lives on the host:
  "did every rank write its checkpoint part", "did any rank get SIGTERM", barriers, and DCP's
  planning (which exchanges pickled plans as CPU tensors). ``"cpu"`` serves the training thread;
  ``"checkpoint"`` is used only by the background thread of an asynchronous checkpoint (gloo
  is not safe to drive from two threads at once on one group).

Creating a group is itself collective: every rank must create the same groups in the same order.
:func:`magitrain.parallel.mesh.init_parallel` creates both groups right after the default group,
so later lookups are local. A process that started torch.distributed itself (tools, tests) gets
them created on first use, which must then be a point every rank reaches (a collective call).
Without torch.distributed (one plain process) every function here is the one-process answer.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

CPU = "cpu"  # the training thread's host-side agreement
CHECKPOINT = "checkpoint"  # the asynchronous checkpoint's background thread only
_GROUPS: dict[str, object] = {}
_WORLD: list = [None]  # the default group the cached groups belong to


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)


def cpu_group(name: str = CPU, timeout=None):
    """The gloo group over all ranks called ``name`` (created, collectively, on first use, with
    ``timeout``: a ``datetime.timedelta`` bounding its collectives; default: torch's)."""
    world = dist.distributed_c10d._get_default_group()
    if _WORLD[0] is not world:  # a new torch.distributed session: the old groups died with the old one
        _GROUPS.clear()
        _WORLD[0] = world
    if name not in _GROUPS:
        _GROUPS[name] = dist.new_group(backend="gloo", timeout=timeout, group_desc=f"magitrain_{name}")
    return _GROUPS[name]


def is_cpu_group(group) -> bool:
    """Whether ``group`` is one of the CPU groups made here (test harnesses use this)."""
    return any(group is g for g in _GROUPS.values())


def any_rank(flag: bool, name: str = CPU) -> bool:
    """True on every rank iff ``flag`` is true on at least one rank."""
    if not initialized():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group(name))
    return bool(t.item())


def max_over_ranks(value: int, name: str = CPU) -> int:
    """The largest of every rank's ``value`` (an integer known on the host), on every rank."""
    if not initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device="cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=cpu_group(name))
    return int(t.item())


def every_rank(flag: bool, name: str = CPU) -> bool:
    """True on every rank iff ``flag`` is true on every rank."""
    return not any_rank(not flag, name)


def barrier(name: str = CPU) -> None:
    if initialized():
        dist.barrier(group=cpu_group(name))


def device_sum(values: list[float], device: torch.device, group=None) -> list[float]:
    """Sums of per-rank Python numbers over a device group, in fp64 on ``device`` (the group's
    device: a device group refuses host tensors under NCCL). One process: ``values`` unchanged."""
    if not initialized():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(t, group=group)
    return t.tolist()
