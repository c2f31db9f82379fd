"""Systems options applied to a plain model from outside (the model file knows none of them):
activation checkpointing, torch.compile, DDP or FSDP2, TF32 and mixed precision.

The order follows torchtitan: checkpoint blocks, compile, then shard or replicate; the optimizer is
built afterwards (by the caller) so that it holds the parameters as the wrapping left them (sharded
DTensors under FSDP).
"""

from __future__ import annotations

import contextlib
import functools

import torch
from torch.utils.checkpoint import checkpoint

from ..distributed import DistInfo
from ..precision import AUTOCAST_DTYPES

def enable_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs: ~2x faster fp32 training (DiT used it)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


def checkpoint_blocks(model: torch.nn.Module) -> None:
    """Recompute each transformer block's activations in backward instead of storing them.

    The block's own forward is wrapped in place, so parameter names (and state dicts) stay official,
    and a FSDP hook on the block still gathers its weights before the forward and the recomputation.
    """
    for block in model.blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)


def shard_model(model: torch.nn.Module, precision: str) -> None:
    """FSDP2 in place: one unit per block plus the root (embedders, final layer), so only one block's
    full weights live at a time. Under bf16 the gathered weights are bf16 and gradients are reduced
    in fp32 (FSDP2's MixedPrecisionPolicy), as torchtitan trains."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = AUTOCAST_DTYPES[precision]
    policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype else None)
    for block in model.blocks:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)


def prepare_model(model: torch.nn.Module, *, dist: DistInfo, gradient_checkpointing: bool, compile_model: bool,
                  fsdp: bool = False, precision: str = "fp32") -> torch.nn.Module:
    """The module to call in training (checkpointed, compiled, sharded or DDP-wrapped as asked).
    Weights are shared with `model`, which stays the module whose state dict has the official key
    names (under FSDP it is sharded in place)."""
    if gradient_checkpointing:
        checkpoint_blocks(model)
    sharded = fsdp and dist.is_distributed
    if sharded:
        shard_model(model, precision)
    runnable = torch.compile(model) if compile_model else model
    if dist.is_distributed and not sharded:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        runnable = torch.nn.parallel.DistributedDataParallel(runnable, device_ids=device_ids)
    return runnable


def make_grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """fp16 needs loss scaling so small gradients do not underflow; bf16 and fp32 do not (a disabled
    scaler passes everything through unchanged)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def no_sync(runnable, active: bool):
    """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulated step. (FSDP
    reduce-scatters every micro-batch: its gradients stay sharded, which is what it is for.)"""
    if active and isinstance(runnable, torch.nn.parallel.DistributedDataParallel):
        return runnable.no_sync()
    return contextlib.nullcontext()
