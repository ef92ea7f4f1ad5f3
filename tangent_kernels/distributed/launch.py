"""The command line under torchrun: ``torchrun --nproc-per-node=N -m tangent_kernels gram ...``.

torchrun starts N copies of the command with RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in their environment; each joins the process group here (NCCL for
CUDA devices, one GPU per local rank; gloo for CPUs) and computes its share. K is
gathered on rank 0, which writes it; the other ranks write nothing.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

__all__ = ["TorchrunSession", "torchrun_session"]


@dataclass(frozen=True)
class TorchrunSession:
    rank: int
    world_size: int
    device: Optional[str]  # this rank's device (cuda:LOCAL_RANK for a CUDA run)

    @property
    def writes(self) -> bool:
        """Whether this rank writes the command's outputs."""
        return self.rank == 0


def torchrun_session(device: Optional[str]) -> Optional[TorchrunSession]:
    """This rank's session when launched by torchrun with several ranks (the process
    group initialized here if it is not yet); None for a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return None
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device is not None and torch.device(device).type == "cuda" and torch.device(device).index is None:
        device = f"cuda:{local}"  # --device cuda: each rank its own GPU
    cuda = device is not None and torch.device(device).type == "cuda"
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group("nccl" if cuda else "gloo")
        atexit.register(_close)
    return TorchrunSession(dist.get_rank(), dist.get_world_size(), device)


def _close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
