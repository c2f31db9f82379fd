"""Tiny helpers over `torch.distributed` for jobs launched with `torchrun` (or run as one process).

`init_from_env()` reads the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, ...).
Without them it returns a single-process `DistInfo` and initialises nothing, so every helper below is
a no-op and the same code runs under `python` and under `torchrun`.

    dist = init_from_env()
    try:
        ...  # rank dist.rank of dist.world_size, on dist.device
    finally:
        shutdown()
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from .errors import UserError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def _pick_device(device: str | torch.device | None, local_rank: int) -> torch.device:
    """None/"auto" -> this process's GPU when there is one, else the CPU."""
    if device in (None, "auto"):
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", local_rank)  # one GPU per process, as torchrun intends
    return device


def init_from_env(device: str | torch.device | None = None) -> DistInfo:
    """Join the torchrun process group if there is one (NCCL on CUDA, gloo otherwise)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return DistInfo(rank=0, world_size=1, local_rank=0, device=_pick_device(device, 0))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = _pick_device(device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init: NCCL binds each process to its own GPU
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size, device_id=device if backend == "nccl" else None
        )
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_initialized() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized()


def barrier() -> None:
    if is_initialized():
        torch_dist.barrier()


def shutdown() -> None:
    """Leave the process group. The barrier first: torch 2.13 sometimes aborts at exit without it."""
    if is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def in_multiprocess_job() -> bool:
    """Whether this process is one of several started by torchrun (or by hand with its variables)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave_job_now(status: int, message: str = "") -> None:
    """End this process of a distributed job at once, after writing `message` to stderr: interpreter
    teardown after a gloo group now and then aborts or hangs in torch 2.13 ("terminate called without an
    active exception"), and every file is written atomically, so nothing is left to finish."""
    sys.stderr.write(message)
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(status)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; returns it for chaining."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` over all processes, in place (use float64 for metrics that must add up exactly)."""
    if is_initialized():
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        tensor.div_(torch_dist.get_world_size())
    return tensor
