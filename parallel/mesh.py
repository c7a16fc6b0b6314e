"""The dp x cp x tp device mesh: one object that starts torch.distributed and names each axis.

Ranks are laid out with tensor parallel innermost (neighbouring ranks, usually one node's
fast links), then context parallel, then data parallel outermost: global rank
``r = (dp_rank * cp + cp_rank) * tp + tp_rank``. Nothing assumes a single host: rank and
world size come from the launcher's environment (torchrun / SLURM).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from magitrain.config import Config, ConfigError

from . import collectives


@dataclass
class ParallelEnv:
    """Where this process sits in the job, and the process groups of each axis."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    dp: int
    cp: int
    tp: int
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh; None on a plain (not launched) process
    timeout_s: float = 120.0  # parallel.timeout_s: the bound on every collective

    @property
    def distributed(self) -> bool:
        """True when torch.distributed runs (any launcher-started job, one rank included)."""
        return self.mesh is not None

    def coord(self, rank: int | None = None) -> tuple[int, int, int]:
        """``(dp_rank, cp_rank, tp_rank)`` of ``rank`` (default: this process)."""
        r = self.rank if rank is None else rank
        return r // (self.cp * self.tp), (r // self.tp) % self.cp, r % self.tp

    @property
    def dp_rank(self) -> int:
        return self.coord()[0]

    @property
    def cp_rank(self) -> int:
        return self.coord()[1]

    @property
    def tp_rank(self) -> int:
        return self.coord()[2]

    def group(self, axis: str):
        """The process group of ``axis`` ('dp', 'cp', 'tp' or 'dp_cp'); None on a single process."""
        return None if self.mesh is None else self.mesh.get_group(axis)

    def submesh(self, axis: str):
        """The 1-D device mesh of ``axis``: 'dp', 'cp', 'tp', or 'dp_cp' (dp x cp flattened: the
        ranks that hold replicas of the same parameters, over which FSDP2 shards them)."""
        return None if self.mesh is None else self.mesh[axis]

    def size(self, axis: str) -> int:
        return {"dp": self.dp, "cp": self.cp, "tp": self.tp, "dp_cp": self.dp * self.cp}[axis]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(backend: str) -> tuple[torch.device, str]:
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if backend in ("auto", "nccl") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank), "nccl"
    if backend == "nccl":
        raise ConfigError("parallel.backend=nccl needs CUDA GPUs; use auto or gloo")
    return torch.device("cpu"), "gloo"


def validate_layout(cfg: Config, world: int) -> None:
    """Layout checks beyond :func:`magitrain.config.validate`, raised before any process group
    starts: a bad layout fails on every rank at once, naming the key."""
    p, m = cfg.parallel, cfg.model
    if p.dp * p.cp * p.tp != world:
        raise ConfigError(f"parallel.dp x parallel.cp x parallel.tp = {p.dp} x {p.cp} x {p.tp} = "
                          f"{p.dp * p.cp * p.tp}, but the job has {world} processes (WORLD_SIZE)")
    if p.tp > 1:
        if m.num_kv_heads % p.tp and p.tp % m.num_kv_heads:
            raise ConfigError(f"parallel.tp={p.tp} and model.num_kv_heads={m.num_kv_heads}: one must divide the "
                              "other (tensor parallelism splits key/value heads, or replicates them when tp "
                              "exceeds them)")
        if 8 % p.tp:  # MAGI-1's linear_proj input is 8 interleaved [self | cross] groups
            raise ConfigError(f"parallel.tp={p.tp} must divide 8 (linear_proj's 8 interleaved head groups)")
    if p.cp > 1 and cfg.data.seq_tokens < p.cp * p.cp_chunk_size:
        raise ConfigError(f"data.seq_tokens={cfg.data.seq_tokens} is shorter than parallel.cp={p.cp} chunks of "
                          f"parallel.cp_chunk_size={p.cp_chunk_size}")
    if p.dp_engine == "deepspeed" and (p.cp > 1 or p.tp > 1):
        raise ConfigError("parallel.dp_engine=deepspeed supports data parallelism only (parallel.cp=1, parallel.tp=1)")


def launched() -> bool:
    """Whether a launcher (torchrun, SLURM via torchrun, a Kubernetes pod) started this process: it
    sets WORLD_SIZE. Such a process always starts torch.distributed, one rank or many, so a one-GPU
    ``torchrun --nproc_per_node 1`` runs the same process groups and collectives as N ranks."""
    return "WORLD_SIZE" in os.environ


def init_parallel(cfg: Config) -> ParallelEnv:
    """Start the process groups (when launched) and build the mesh.

    Groups (see :mod:`magitrain.parallel.collectives`): the default group on the device's backend
    (NCCL on CUDA, gloo on CPU) with the dp x cp x tp mesh over it, for device tensors; and two gloo
    groups over all ranks for host-side agreement ("cpu") and asynchronous checkpoints
    ("checkpoint"), created here, in this order, on every rank.

    ``parallel.timeout_s`` bounds every collective: if a rank dies, the others raise (gloo:
    at once when a peer's connection drops, after the timeout when it hangs; NCCL: the watchdog
    aborts) instead of hanging, and the trainer names the lost rank (:func:`report_lost_ranks`).
    """
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", 1))
    validate_layout(cfg, world)
    device, backend = pick_device(p.backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if not launched() and not dist.is_initialized():
        return ParallelEnv(0, 1, local_rank, device, 1, 1, 1, timeout_s=p.timeout_s)
    timeout = datetime.timedelta(seconds=p.timeout_s)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    collectives.cpu_group(collectives.CPU, timeout)
    collectives.cpu_group(collectives.CHECKPOINT, timeout)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (p.dp, p.cp, p.tp), mesh_dim_names=("dp", "cp", "tp"))
    mesh["dp", "cp"]._flatten("dp_cp")  # torchtitan's idiom: parameters are replicated over dp and cp
    return ParallelEnv(dist.get_rank(), world, local_rank, device, p.dp, p.cp, p.tp, mesh, p.timeout_s)


# --- A lost rank: a clear error instead of the backend's raw one (or a hang) -------------------

class RankLostError(RuntimeError):
    """A collective failed because other ranks died or stopped answering; names them."""


_COMM_FAILURE_MARKS = ("gloo", "nccl", "connection", "timed out", "timeout", "socket", "peer")


def is_comm_failure(error: BaseException) -> bool:
    """Whether ``error`` came from the communication backend (gloo and NCCL raise plain
    ``RuntimeError``s whose text names the transport; newer ones a ``DistError``)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    return isinstance(error, RuntimeError) and any(m in str(error).lower() for m in _COMM_FAILURE_MARKS)


def find_lost_ranks(env: ParallelEnv, grace_s: float) -> list[int]:
    """The ranks that do not check in through the rendezvous store within ``grace_s`` seconds.

    Every surviving rank that hits the failure calls this: it writes its own key, then polls
    for everyone else's. The store is served by rank 0's process (MASTER_ADDR): if it cannot
    be reached, rank 0 is the lost one.
    """
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"magitrain/alive/{env.rank}", "1")
        others = [r for r in range(env.world_size) if r != env.rank]
        deadline = time.monotonic() + grace_s
        while True:
            lost = [r for r in others if not store.check([f"magitrain/alive/{r}"])]
            if not lost or time.monotonic() >= deadline:
                return lost
            time.sleep(0.2)
    except Exception:  # noqa: BLE001 - any store failure means its host is gone
        return [0]


def describe_rank(env: ParallelEnv, rank: int) -> str:
    return "rank {} (dp {}, cp {}, tp {})".format(rank, *env.coord(rank))


@contextlib.contextmanager
def report_lost_ranks(env: ParallelEnv, where):
    """Re-raise a communication failure inside the block as a :class:`RankLostError` naming the
    ranks that are gone. ``where()`` says what was running (e.g. "step 12").

    The backend bounds the wait: gloo raises at once when a peer's connection drops (kill -9)
    and after ``parallel.timeout_s`` when a peer hangs; the check-in then waits a quarter of
    that (check-in keys stay in the store, so survivors that fail later still see earlier
    ones): a survivor exits within ``1.25 x parallel.timeout_s`` at worst.
    """
    try:
        yield
    except RuntimeError as e:
        if not (env.distributed and is_comm_failure(e)) or isinstance(e, RankLostError):
            raise
        grace = min(10.0, env.timeout_s / 4)
        lost = find_lost_ranks(env, grace)
        names = ", ".join(describe_rank(env, r) for r in lost) or "none identified"
        raise RankLostError(
            f"{where()}: a collective failed on rank {env.rank} of {env.world_size}; lost: {names} "
            f"(no check-in within {grace:.0f} s; dead, hung or unreachable; see their logs). "
            f"Backend error: {str(e).splitlines()[0][:300]}") from e
