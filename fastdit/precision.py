"""Mixed precision, shared by training and sampling: the autocast context and when it is not worth it."""

from __future__ import annotations

import contextlib

import torch

from .devices import cpu_has_fast_bf16

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(AUTOCAST_DTYPES)


def precision_warning(device: torch.device, precision: str) -> str | None:
    """A warning when half precision will be slower than fp32: on a CPU without bf16 matmul hardware
    (AVX512-BF16 or AMX) half-precision matmuls are emulated, many times slower than fp32. Where the
    flags cannot be read, AVX-512 is taken as the sign of a fast path."""
    if device.type != "cpu" or precision == "fp32":
        return None
    fast = cpu_has_fast_bf16()
    if fast is None:
        fast = "AVX512" in torch.backends.cpu.get_cpu_capability()
    if precision == "fp16":  # torch's CPU matmuls leave fp16 at fp32 speed, even where AMX speeds up bf16
        return ("--precision fp16 on a CPU is no faster than fp32 (torch's CPU matmuls do not accelerate fp16); "
                "use --precision bf16 on CPUs with AVX512-BF16 or AMX, else fp32")
    if not fast:
        return ("--precision bf16 on this CPU (no AVX512-BF16 or AMX) is far slower than fp32; "
                "use --precision fp32 on it")
    return None


def autocast(device: torch.device, precision: str):
    """Mixed precision for one forward. The cast-weight cache is off: a DiT uses each weight once per
    forward, so the cache saves no casts, but it would keep a half-precision copy of every weight alive
    until the forward ends, after checkpointed blocks have dropped theirs, and so raise the peak memory."""
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=False)
