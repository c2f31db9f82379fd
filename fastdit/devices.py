"""Device choice (`auto` means CUDA when available, else the CPU) and what the CPU can do."""

from __future__ import annotations

import platform
from pathlib import Path

import torch

from .errors import UserError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {name!r} asked for, but no CUDA device is available; use --device cpu")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise UserError(f"device {name!r} asked for, but this torch has no usable MPS (Apple GPU) backend; "
                        f"use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"device {name!r} is not one fastdit runs on; use auto, cpu, cuda, cuda:N or mps")
    return device


def _cpuinfo_field(name: str) -> str | None:
    """The first `name : value` of Linux's /proc/cpuinfo, None where there is none."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith(name))
    except (OSError, StopIteration):
        return None
    return line.split(":", 1)[1].strip()


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    return set((_cpuinfo_field("flags") or "").split())


def cpu_name() -> str:
    """The CPU's model name (Linux), else what the platform module knows."""
    return _cpuinfo_field("model name") or platform.processor() or platform.machine()


def cpu_has_fast_bf16() -> bool | None:
    """Whether bf16 matmuls run in hardware (AVX512-BF16 or AMX), None where that cannot be told."""
    flags = cpu_flags()
    if not flags:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & flags)
