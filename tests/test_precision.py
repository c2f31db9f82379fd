"""When half precision is worth it: the warning follows the CPU's bf16 hardware flags."""

from __future__ import annotations

import pytest
import torch

from fastdit import devices
from fastdit.precision import precision_warning

CPU = torch.device("cpu")


@pytest.mark.parametrize("flags, warns", [({"avx512f", "avx512_bf16"}, False), ({"avx2", "amx_bf16"}, False),
                                          ({"avx512f", "avx512bw"}, True), ({"avx2", "fma"}, True)])
def test_bf16_warning_follows_the_bf16_flags(monkeypatch, flags, warns):
    monkeypatch.setattr(devices, "cpu_flags", lambda: flags)
    warning = precision_warning(CPU, "bf16")
    assert (warning is not None) == warns
    if warns:
        assert "AVX512-BF16 or AMX" in warning and "--precision fp32" in warning


def test_fp16_on_a_cpu_always_warns_and_fp32_never(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: {"avx512_bf16", "amx_bf16", "avx512_fp16"})
    assert "bf16" in precision_warning(CPU, "fp16")
    assert precision_warning(CPU, "fp32") is None
    assert precision_warning(torch.device("cuda"), "bf16") is None


def test_without_flags_avx512_kernels_count_as_fast(monkeypatch):
    monkeypatch.setattr(devices, "cpu_flags", lambda: set())
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert precision_warning(CPU, "bf16") is not None
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    assert precision_warning(CPU, "bf16") is None
