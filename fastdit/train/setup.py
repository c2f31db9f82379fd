"""Systems options applied to a plain model from outside (the model file knows none of them):
gradient checkpointing, torch.compile, DDP, TF32 and mixed precision."""

from __future__ import annotations

import contextlib

import torch

from ..distributed import DistInfo

AUTOCAST_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def enable_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: ~2x faster fp32 training (DiT used it)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def prepare_model(model: torch.nn.Module, *, dist: DistInfo, gradient_checkpointing: bool, compile_model: bool):
    """The module to call in training (checkpointed, compiled, DDP-wrapped as asked). Weights are
    shared with `model`, which stays the plain module whose state dict has the official key names."""
    model.gradient_checkpointing = gradient_checkpointing
    runnable = torch.compile(model) if compile_model else model
    if dist.is_distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        runnable = torch.nn.parallel.DistributedDataParallel(runnable, device_ids=device_ids)
    return runnable


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
    dtype = AUTOCAST_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, precision: str):
    """fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not."""
    if precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def no_sync(runnable, active: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step."""
    if active and isinstance(runnable, torch.nn.parallel.DistributedDataParallel):
        return runnable.no_sync()
    return contextlib.nullcontext()
