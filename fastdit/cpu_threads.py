"""How many threads a fastdit job gives PyTorch's CPU kernels, on a machine others may be using.

PyTorch starts one OpenMP thread per core it may run on. OpenMP threads wait for each other at the end
of every parallel region, spinning while they wait; when another process holds one of those cores,
the thread on it is descheduled, and its siblings spin (burning their own time slices) until it comes
back, so a step on more threads than there are free cores runs slower than on fewer (the figures:
`benchmarks/bench_threads.py`, README "CPU jobs on a busy machine"). So a job counts the cores other
processes keep busy when it starts and takes the rest (at least one); an explicit `--threads` or
`OMP_NUM_THREADS` is left as given.
"""

from __future__ import annotations

import math
import os
import sys
import time

import torch

from .errors import UserError

SAMPLE_SECONDS = 0.2  # how long /proc/stat is watched: long enough to see a busy core, short at start-up
_configured = False


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a container's CPU set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


# Data loader workers decoding images: 4 keep a GPU fed (DiT's train.py uses 4); more processes than
# cores only compete with each other (and PyTorch's DataLoader warns about it).
MAX_DATA_WORKERS = 4


def data_workers() -> int:
    """The default number of data loader worker processes: one per usable core, at most MAX_DATA_WORKERS."""
    return min(MAX_DATA_WORKERS, usable_cores())


def _cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of all cores from Linux's /proc/stat, None elsewhere."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def cores_busy_elsewhere(seconds: float = SAMPLE_SECONDS) -> float | None:
    """How many cores other processes keep busy, measured over `seconds` (this process sleeps
    meanwhile, so what is busy is someone else's); None where the platform does not tell."""
    before = _cpu_times()
    if before is None:
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        return load  # the 1-minute load average: slower to follow, but what other systems offer
    time.sleep(seconds)
    after = _cpu_times()
    total = after[1] - before[1]
    if total <= 0:
        return None
    return (os.cpu_count() or 1) * (after[0] - before[0]) / total


def choose_threads(requested: int | None, *, busy: float | None, usable: int) -> tuple[int, str]:
    """(threads, why): `requested` if given, else the usable cores less those busy elsewhere (rounded
    to the nearest core, at least 1)."""
    if requested is not None:
        return requested, "--threads"
    if busy is None:
        return usable, "all usable cores"
    free = max(1, min(usable, math.floor(usable - busy + 0.5)))
    return free, f"{usable} usable cores, {busy:.1f} busy with other processes"


def configure_threads(requested: int | None) -> None:
    """Set PyTorch's CPU threads for this job, once per process (module docstring); warn once when the
    machine is busy enough to slow the job."""
    global _configured
    if requested is not None and requested < 1:
        raise UserError(f"--threads must be >= 1, got {requested}")
    if requested is not None and requested > usable_cores():
        # More threads than cores spin at every parallel region's barrier (the module docstring): a step
        # runs many times slower, and a huge count overflows OpenMP's or allocates a stack per thread.
        raise UserError(f"--threads {requested} is more than the {usable_cores()} cores this process may use, which "
                        f"only slows every step; pass --threads {usable_cores()} or fewer")
    if _configured:
        return
    _configured = True
    if requested is None and "OMP_NUM_THREADS" in os.environ:
        return  # the user's (or torchrun's) choice
    usable = usable_cores()
    busy = None if requested is not None else cores_busy_elsewhere()
    threads, why = choose_threads(requested, busy=busy, usable=usable)
    torch.set_num_threads(threads)
    if requested is None and threads < usable:
        print(f"fastdit: the machine is busy ({why}); running on {threads} thread{'s' * (threads > 1)} "
              f"(--threads N to choose)", file=sys.stderr, flush=True)
