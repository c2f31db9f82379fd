"""Tiny helpers over `torch.distributed` for jobs launched with `torchrun`, with `srun`, or run as one process.

`init_from_env()` reads what the launcher set:

* torchrun (or `accelerate launch`, or by hand): RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT;
* SLURM's `srun` with one task per GPU and no torchrun: SLURM_PROCID, SLURM_STEP_NUM_TASKS and
  SLURM_LOCALID give the rank, the world size and the local rank; MASTER_ADDR, where it is not set,
  is the first node of the step (SLURM_STEP_NODELIST), where task 0 runs, and MASTER_PORT, where it is
  not set, 15000 + SLURM_JOB_ID mod 20000 (two jobs sharing a node get different ports). A sbatch
  script that runs `python -m fastdit ...` itself (no srun) is one process, whatever --ntasks says.

Without either it returns a single-process `DistInfo` and initialises nothing, so every helper below
is a no-op and the same code runs under `python`, `torchrun` and `srun`.

The process group's timeout (how long a collective waits for the slowest process before the job is
stopped) is FASTDIT_DIST_TIMEOUT: seconds, or a number followed by s, m or h (default 30m; NCCL's own
default, 10 minutes, is shorter than a checkpoint written to a slow network filesystem).

    dist = init_from_env()
    try:
        ...  # rank dist.rank of dist.world_size, on dist.device
    finally:
        shutdown()
"""

from __future__ import annotations

import datetime
import os
import re
import sys
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as torch_dist

from .errors import UserError

TIMEOUT_VARIABLE = "FASTDIT_DIST_TIMEOUT"
DEFAULT_TIMEOUT = datetime.timedelta(minutes=30)
_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([smh]?)\s*")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600}


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


@dataclass(frozen=True)
class Launch:
    """Where this process stands in its job, as its launcher says: `launcher` is "torchrun" (its
    variables), "srun" (SLURM's) or "none" (one process); `init_method` the rendezvous address."""

    launcher: str
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    init_method: str = "env://"


def launch_from_env(environ: Mapping[str, str] | None = None) -> Launch:
    """This process's rank, world size and local rank from torchrun's variables, else from an srun
    step's, else one process. A UserError names a variable that is missing or not a number."""
    environ = os.environ if environ is None else environ
    if "RANK" in environ and "WORLD_SIZE" in environ:
        return Launch("torchrun", _integer(environ, "RANK"), _integer(environ, "WORLD_SIZE"),
                      _integer(environ, "LOCAL_RANK", 0))
    # srun sets SLURM_STEP_NUM_TASKS in each task of a job step; an sbatch script itself has SLURM_NTASKS
    # and SLURM_PROCID=0 but no step: it is one process, not rank 0 of a group that will never come.
    if "SLURM_STEP_NUM_TASKS" not in environ or _integer(environ, "SLURM_STEP_NUM_TASKS") <= 1:
        return Launch("none")
    rank, world_size = _integer(environ, "SLURM_PROCID"), _integer(environ, "SLURM_STEP_NUM_TASKS")
    local_rank = _integer(environ, "SLURM_LOCALID")
    address = environ.get("MASTER_ADDR") or _first_host(environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST"))
    if not address:
        raise UserError(f"srun started {world_size} tasks but neither MASTER_ADDR nor SLURM_STEP_NODELIST is set; "
                        "export MASTER_ADDR=<the host of task 0> (and MASTER_PORT), or launch with torchrun")
    port = environ.get("MASTER_PORT") or str(15000 + _integer(environ, "SLURM_JOB_ID", 0) % 20000)
    return Launch("srun", rank, world_size, local_rank, init_method=f"tcp://{address}:{port}")


def _integer(environ: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = environ.get(name)
    if value is None and default is not None:
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"the launcher's variable {name} is {'missing' if value is None else repr(value)}, "
                        "not a whole number; launch with torchrun, or srun with one task per GPU") from None


def _first_host(nodelist: str | None) -> str | None:
    """The first host of a SLURM host list: "gpu[07-09,12],cpu01" -> "gpu07", "n[1-2]-ib" -> "n1-ib"."""
    if not nodelist:
        return None
    depth, end = 0, len(nodelist)
    for position, char in enumerate(nodelist):  # the first comma outside brackets ends the first entry
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            end = position
            break
    first = re.sub(r"\[([^\]]*)\]", lambda match: match[1].split(",")[0].split("-")[0], nodelist[:end])
    return first.strip() or None


def timeout_from_env(environ: Mapping[str, str] | None = None) -> datetime.timedelta:
    """FASTDIT_DIST_TIMEOUT as a duration ("5400", "90m", "1.5h"), else DEFAULT_TIMEOUT."""
    environ = os.environ if environ is None else environ
    text = environ.get(TIMEOUT_VARIABLE)
    if text is None or not text.strip():
        return DEFAULT_TIMEOUT
    match = _DURATION.fullmatch(text)
    if not match or float(match[1]) <= 0:
        raise UserError(f"{TIMEOUT_VARIABLE}={text!r} is not a duration; give seconds, or a number followed by s, m or h "
                        f"(e.g. 90m; default {_describe(DEFAULT_TIMEOUT)})")
    return datetime.timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])


def _describe(duration: datetime.timedelta) -> str:
    seconds = duration.total_seconds()
    return f"{seconds / 60:g}m" if seconds % 60 == 0 else f"{seconds:g}s"


def _pick_device(device: str | torch.device | None, launch: Launch) -> torch.device:
    """None/"auto" -> this process's GPU when there is one, else the CPU; "cuda" -> this process's GPU."""
    if device in (None, "auto"):
        return torch.device("cuda", _gpu_index(launch)) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"device {str(device)!r} was asked for but no CUDA GPU is visible; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", _gpu_index(launch))  # one GPU per process, as torchrun intends
    return device


def _gpu_index(launch: Launch) -> int:
    """The visible GPU of this process: the one at its local rank; under srun with one GPU bound to each
    task (--gpus-per-task=1, --gpu-bind: CUDA_VISIBLE_DEVICES names one GPU), the only one it sees."""
    visible = torch.cuda.device_count()
    if launch.local_rank < visible:
        return launch.local_rank
    if launch.launcher == "srun" and visible == 1:
        return 0
    devices = os.environ.get("CUDA_VISIBLE_DEVICES")
    raise UserError(f"process {launch.rank} has local rank {launch.local_rank} but sees {visible} GPU(s)"
                    f"{f' (CUDA_VISIBLE_DEVICES={devices})' if devices is not None else ''}; start one process per GPU "
                    "(torchrun --nproc_per_node, or srun --ntasks-per-node with --gpus-per-task=1)")


def init_from_env(device: str | torch.device | None = None, *, timeout: datetime.timedelta | None = None) -> DistInfo:
    """Join the process group of a torchrun or srun job if there is one (NCCL on CUDA, gloo otherwise),
    with `timeout` (default: FASTDIT_DIST_TIMEOUT, else 30 minutes) for every collective."""
    launch = launch_from_env()
    timeout = timeout if timeout is not None else timeout_from_env()  # a bad value fails here, even for one process
    if launch.launcher == "none":
        return DistInfo(rank=0, world_size=1, local_rank=0, device=_pick_device(device, launch))
    device = _pick_device(device, launch)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # before init: NCCL binds each process to its own GPU
    if not torch_dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch_dist.init_process_group(
            backend=backend, init_method=launch.init_method, rank=launch.rank, world_size=launch.world_size,
            timeout=timeout, device_id=device if backend == "nccl" else None,
        )
    return DistInfo(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank, device=device)


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
    """Whether this process is one of several started by torchrun or srun (or by hand with their variables)."""
    try:
        return launch_from_env().world_size > 1
    except UserError:
        return False  # variables init_from_env refuses: not a job this process joined


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
