"""Device choice (`auto` means CUDA when available, else the CPU) and what the CPU can do."""

from __future__ import annotations

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
    return device


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def cpu_has_fast_bf16() -> bool | None:
    """Whether bf16 matmuls run in hardware (AVX512-BF16 or AMX), None where that cannot be told."""
    flags = cpu_flags()
    if not flags:
        return None
    return bool({"avx512_bf16", "amx_bf16"} & flags)
