"""NCCL's device rule, enforced on gloo: make "works on gloo, crashes on the first NCCL checkpoint"
bugs fail on a CPU-only machine.

On a GPU cluster the device groups (the default group, the dp/cp/tp mesh groups) run NCCL, which
only moves CUDA tensors: a CPU tensor fails with "No backend type associated with device type cpu",
and ``dcp.async_save`` refuses a group without a CPU backend. On gloo everything is a CPU tensor
and all of it works, so such a bug stays invisible. :func:`install` (called in each rank's process
before training) wraps torch.distributed so that:

1. **Host tensors on device groups are refused.** A tensor that our code (``magitrain/``,
   ``parallel/``, ``data_pipeline/``) creates with a factory (``torch.tensor``, ``zeros``, ...)
   *without a device* is a host tensor: on a GPU run the default device is the CPU, so that is
   exactly the tensor NCCL refuses. Passing one to a collective on any group that is not one of
   :mod:`magitrain.parallel.collectives`' CPU groups raises :class:`DeviceRuleError` naming where
   the tensor was made. Tensors made with ``device=env.device`` (a CUDA device on a GPU run) and
   everything computed from the model pass, as they would on NCCL. What the harness cannot see on
   CPU: a tensor made with an explicit CPU device, or derived from a host tensor, and then sent
   over a device group; both would still fail on NCCL.
2. **``dcp.async_save`` needs a CPU group**, as DCP requires under NCCL.
3. **One thread per group.** A group used by the training (main) thread is never used by another
   thread, and vice versa: gloo does not order collectives issued on one group by two threads.

Barriers and object collectives (``all_gather_object`` ...) on device groups pass: NCCL runs them
through the current CUDA device.
"""

from __future__ import annotations

import functools
import inspect
import os
import sys
import threading

import torch
import torch.distributed as dist

try:
    from magitrain.parallel.collectives import is_cpu_group
except ImportError:  # code before issue 14: no CPU groups at all
    def is_cpu_group(group) -> bool:
        return False

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_OURS = tuple(os.path.join(_REPO, d) + os.sep for d in ("magitrain", "parallel", "data_pipeline"))
_FACTORIES = ("tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange")
_COLLECTIVES = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
                "reduce_scatter_tensor", "all_to_all_single", "all_to_all", "reduce", "gather", "scatter",
                "send", "recv", "isend", "irecv")
_OWNERS: dict[int, tuple[object, str]] = {}  # id(group) -> (group, "main" | "background")


class DeviceRuleError(TypeError):
    """A collective NCCL would refuse (not a RuntimeError: the trainer's lost-rank handler must not
    mistake it for a communication failure)."""


def _host_factory(fn):
    @functools.wraps(fn)
    def make(*args, **kwargs):
        t = fn(*args, **kwargs)
        if kwargs.get("device") is None and isinstance(t, torch.Tensor):
            caller = sys._getframe(1)
            if caller.f_code.co_filename.startswith(_OURS):
                t._host_tensor_site = f"{os.path.relpath(caller.f_code.co_filename, _REPO)}:{caller.f_lineno}"
        return t
    return make


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)


def _group_name(group) -> str:
    if group is None or group is dist.GroupMember.WORLD:
        return "the default (world) group"
    return f"group {getattr(group, 'group_desc', '') or dist.get_process_group_ranks(group)}"


def _claim(group, name: str) -> None:
    role = "main" if threading.current_thread() is threading.main_thread() else "background"
    key = id(group if group is not None else dist.GroupMember.WORLD)
    owner = _OWNERS.setdefault(key, (group, role))[1]
    if owner != role:
        raise DeviceRuleError(f"{name}() from a {role} thread on {_group_name(group)}, which the {owner} thread "
                              "also drives: gloo does not order two threads' collectives on one group")


def _checked_collective(fn, name: str):
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def run(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        group = bound.arguments.get("group")
        _claim(group, name)
        if not is_cpu_group(group):
            for value in bound.arguments.values():
                for t in _tensors(value):
                    site = getattr(t, "_host_tensor_site", None)
                    if site is not None:
                        raise DeviceRuleError(
                            f"{name}() on {_group_name(group)} (a device group: NCCL on a GPU run) got a host "
                            f"tensor made at {site} without a device; NCCL refuses it (\"No backend type "
                            "associated with device type cpu\"). Use magitrain.parallel.collectives' CPU group.")
        return fn(*args, **kwargs)
    return run


def _checked_async_save(fn):
    @functools.wraps(fn)
    def run(*args, **kwargs):
        group = kwargs.get("process_group")
        if not is_cpu_group(group):
            raise DeviceRuleError(f"dcp.async_save on {_group_name(group)}: DCP needs a group with a CPU backend for "
                                  "asynchronous saves (under NCCL: 'A CPU backend must be enabled for async save')")
        return fn(*args, **kwargs)
    return run


def install() -> None:
    """Enforce the rule in this process (idempotent)."""
    if getattr(dist, "_nccl_rule_installed", False):
        return
    for name in _FACTORIES:
        setattr(torch, name, _host_factory(getattr(torch, name)))
    c10d = dist.distributed_c10d
    for name in _COLLECTIVES:
        wrapped = _checked_collective(getattr(c10d, name), name)
        setattr(c10d, name, wrapped)  # object collectives call these module globals
        setattr(dist, name, wrapped)
    import torch.distributed.checkpoint as dcp

    dcp.async_save = _checked_async_save(dcp.async_save)
    dist._nccl_rule_installed = True
