"""Keep freed host memory in the process instead of handing it back to the OS after every step.

glibc's malloc returns memory in two ways: large blocks are mmap-ed and unmapped on free, and free
space at the top of the heap is trimmed. Both thresholds adapt while a program runs, and a training
step's pattern (gradients freed before the forward, activations freed in the backward) makes them give
memory back and take it again each step: every page is then faulted in and zeroed anew, a visible
share of a CPU training step's time (the figure: README, training benchmark). With both thresholds
fixed, freed blocks stay in the heap and the next step reuses them.
"""

from __future__ import annotations

import ctypes
import sys

# mallopt parameters from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024  # glibc's own ceiling for its adaptive threshold
TRIM_THRESHOLD_BYTES = 2**31 - 1  # the largest value mallopt takes: do not trim the heap's top


def keep_freed_host_memory() -> bool:
    """Fix glibc's mmap and trim thresholds for this process (Linux with glibc; elsewhere nothing is
    done). Blocks under 32 MB then come from the heap and stay there for reuse. -> whether it applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
