"""Mixed precision, shared by training and sampling: the autocast context and when it is not worth it,
and TF32."""

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


def tf32_in_effect(device: torch.device, enabled: bool) -> bool:
    """Whether float32 matmuls on `device` run as TF32 when `enabled`: on CUDA only (Ampere and newer
    round each matmul's inputs to TF32's 10 mantissa bits; older GPUs and CPUs compute in float32)."""
    return bool(enabled) and device.type == "cuda"


def use_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions on a CUDA `device`, on or off, for the process;
    nothing elsewhere. DiT's sample_ddp.py and train.py turn it on: tensor cores run TF32 at 8x the
    float32 rate of the CUDA cores (A100: 156 against 19.5 TFLOP/s dense; H100 SXM: 495 against 67)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def tf32(device: torch.device, enabled: bool):
    """`use_tf32(device, enabled)` inside the block; the settings before it come back after."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    use_tf32(device, enabled)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved
