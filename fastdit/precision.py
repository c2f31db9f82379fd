"""Mixed precision, shared by training and sampling: the autocast context and when it is not worth it."""

from __future__ import annotations

import contextlib

import torch

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning when mixed precision will be slower than fp32: CPUs without AVX-512 have no fast
    half-precision matmul (measured on an AVX2 EPYC: bf16 matmul ~70x slower than fp32)."""
    if device.type == "cpu" and precision != "fp32":
        capability = torch.backends.cpu.get_cpu_capability()
        if "AVX512" not in capability:
            return (f"--precision {precision} on this CPU ({capability}, no native half-precision matmul) is far "
                    f"slower than fp32; use --precision fp32 on it")
    return None


def autocast(device: torch.device, precision: str):
    """Mixed precision for one forward. The cast-weight cache is off: a DiT uses each weight once per
    forward, so the cache saves no casts, but it would keep a half-precision copy of every weight alive
    until the forward ends, after checkpointed blocks have dropped theirs (measured on DiT-S/2, batch 8,
    checkpointing and bf16 on a CPU: 1.22 GB peak resident with the cache, 1.14 GB without)."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
