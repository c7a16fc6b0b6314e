"""The dp x cp x tp device mesh: one object that starts torch.distributed and names each axis.

Ranks are laid out with tensor parallel innermost (neighbouring ranks, usually one node's
fast links), then context parallel, then data parallel outermost: global rank
``r = (dp_rank * cp + cp_rank) * tp + tp_rank``. Nothing assumes a single host: rank and
world size come from the launcher's environment (torchrun / SLURM).
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from magitrain.config import Config, ConfigError


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
    mesh: object = None  # torch.distributed.device_mesh.DeviceMesh, None on one process

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def coord(self) -> tuple[int, int, int]:
        """``(dp_rank, cp_rank, tp_rank)`` of this process."""
        return self.rank // (self.cp * self.tp), (self.rank // self.tp) % self.cp, self.rank % self.tp

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
        """The process group of ``axis`` ('dp', 'cp' or 'tp'); None on a single process."""
        return None if self.mesh is None else self.mesh.get_group(axis)

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


def init_parallel(cfg: Config) -> ParallelEnv:
    """Start the process group (if launched with several processes) and build the mesh."""
    p = cfg.parallel
    world = int(os.environ.get("WORLD_SIZE", 1))
    if p.dp * p.cp * p.tp != world:
        raise ConfigError(f"parallel.dp x parallel.cp x parallel.tp = {p.dp} x {p.cp} x {p.tp} = "
                          f"{p.dp * p.cp * p.tp}, but the job has {world} processes (WORLD_SIZE)")
    device, backend = pick_device(p.backend)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if world == 1:
        return ParallelEnv(0, 1, local_rank, device, 1, 1, 1)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=p.timeout_s))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (p.dp, p.cp, p.tp), mesh_dim_names=("dp", "cp", "tp"))
    return ParallelEnv(dist.get_rank(), world, local_rank, device, p.dp, p.cp, p.tp, mesh)
