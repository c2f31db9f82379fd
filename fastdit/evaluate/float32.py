"""Full float32 arithmetic for evaluation, whatever the caller (e.g. `train --tf32`) switched on.

On Ampere and newer GPUs, TF32 rounds matmul and convolution inputs to 10 mantissa bits. The TF
graph that the ADM evaluator runs computes in full float32; TF32 convolutions move FID, and TF32
in the logits matmul moves the Inception Score, by more than the evaluator differences people argue about.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def full_float32() -> Iterator[None]:
    """No TF32 (nor bf16) in CUDA matmuls or cuDNN convolutions inside; the caller's settings come back after.

    cuDNN's autotuner is off too, so that one run picks the same kernels as the next.
    """
    matmul_precision = torch.get_float32_matmul_precision()  # "highest", "high" (TF32) or "medium" (bf16)
    torch.set_float32_matmul_precision("highest")  # also turns torch.backends.cuda.matmul.allow_tf32 off
    try:
        with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=False, allow_tf32=False):
            yield
    finally:
        torch.set_float32_matmul_precision(matmul_precision)
