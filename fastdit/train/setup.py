"""Systems options applied to a plain model from outside (the model file knows none of them):
activation checkpointing, torch.compile, DDP or FSDP2, TF32 and mixed precision.

The order follows torchtitan: checkpoint, compile each block, then shard or replicate; the optimizer is
built afterwards (by the caller) so that it holds the parameters as the wrapping left them (sharded
DTensors under FSDP).
"""

from __future__ import annotations

import contextlib
import functools
import re

import torch
from torch.utils.checkpoint import checkpoint

from ..compile import compile_blocks
from ..distributed import DistInfo
from ..errors import UserError
from ..precision import AUTOCAST_DTYPES, use_tf32

CHECKPOINT_POLICIES = "off, blocks, mlp, every-K (K >= 1, e.g. every-2)"


def enable_tf32(device: torch.device, enabled: bool) -> None:
    """TF32 matmuls and convolutions on Ampere+ GPUs (DiT's train.py turns it on): `fastdit.precision.use_tf32`."""
    use_tf32(device, enabled)


def checkpoint_stride(policy: str) -> int:
    """Every how many blocks `policy` recomputes a whole block (0: none, as for "off" and "mlp");
    a UserError for a policy that is none of CHECKPOINT_POLICIES."""
    every = re.fullmatch(r"every-([1-9][0-9]*)", str(policy))
    if policy in ("off", "mlp", "blocks") or every:
        return int(every[1]) if every else int(policy == "blocks")
    raise UserError(f"unknown gradient checkpointing policy {policy!r}; choose one of {CHECKPOINT_POLICIES}")


def checkpoint_blocks(model: torch.nn.Module, policy: str = "blocks") -> None:
    """Recompute activations in backward instead of storing them: of every block ("blocks"), of blocks
    0, K, 2K, ... ("every-K": memory traded for less recomputation), or of each block's MLP only
    ("mlp": its fc1 and GELU outputs, 2 x 4D numbers per token, are the block's largest activations,
    while attention keeps its own, so backward does not repeat the attention kernel, quadratic in tokens).

    Each chosen module's class becomes a subclass whose forward runs the original one under
    `checkpoint`: in place, so parameter names (and state dicts) stay official, and a FSDP hook on a
    block still gathers its weights before the forward and the recomputation.
    """
    stride = checkpoint_stride(policy)
    if policy == "mlp":
        modules = [block.mlp for block in model.blocks]
    else:
        modules = list(model.blocks)[::stride] if stride else []
    for module in modules:
        module.__class__ = _recomputed_in_backward(type(module))


@functools.cache
def _recomputed_in_backward(cls: type) -> type:
    # A class-level forward (rather than a wrapper set on each instance) for torch.compile: dynamo
    # guards on the identity of an instance's own `forward`, so 28 wrapped MLPs would compile 28
    # graphs (and fall back to eager past its recompile limit of 8); one class compiles once. And the
    # forward is a function of ours: dynamo skips torch's own files (nn.Module's call path,
    # torch.utils.checkpoint) and turns `checkpoint` into a graph region that backward recomputes
    # only when it meets it inside a traced frame.
    def forward(self, *args, **kwargs):
        return checkpoint(cls.forward, self, *args, use_reentrant=False, **kwargs)

    return type(f"Recomputed{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__})


def shard_model(model: torch.nn.Module, precision: str, mesh=None) -> None:
    """FSDP2 in place: one unit per block plus the root (embedders, final layer), so only one block's
    full weights live at a time. Under bf16 the blocks' gathered weights are bf16 and gradients are
    reduced in fp32 (FSDP2's MixedPrecisionPolicy), as torchtitan trains.

    The step runs under autocast, as it does under DDP, so FSDP must not cast the forward's inputs
    (its default): that rounds the flow time t (129 values in [0.5, 1]), MeanFlow's gap and the residual
    stream between blocks to bf16, where DDP's autocast keeps them float32 and rounds only what enters
    a matmul. The root unit (embedders, the frozen position table, the final layer: small) keeps
    float32 weights for the same reason: autocast rounds them where a matmul reads them, as under DDP.

    `mesh`: a 2-D device mesh ("replicate", "shard") for hybrid sharding (`fsdp_mesh`); None shards over
    every process."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    dtype = AUTOCAST_DTYPES[precision]
    reduce_dtype = torch.float32 if dtype else None
    blocks = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    root = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=reduce_dtype, cast_forward_inputs=False)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=blocks)
    fully_shard(model, mesh=mesh, mp_policy=root)


def fsdp_mesh(dist: DistInfo, shard_size: int | None):
    """The device mesh of hybrid sharding (HSDP): shard over groups of `shard_size` processes (a node's
    GPUs: its fast links carry the per-block all-gathers) and replicate over the groups (one gradient
    all-reduce across nodes a step); None: plain FSDP, sharded over every process."""
    if shard_size is None or shard_size == dist.world_size:
        return None
    if dist.world_size % shard_size:
        raise UserError(f"--fsdp-shard-size {shard_size} does not divide the {dist.world_size} processes; give the "
                        f"processes per node (a divisor of {dist.world_size})")
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(dist.device.type, (dist.world_size // shard_size, shard_size),
                            mesh_dim_names=("replicate", "shard"))


def prepare_model(model: torch.nn.Module, *, dist: DistInfo, gradient_checkpointing: str, compile_model: bool,
                  fsdp: bool = False, precision: str = "fp32", compile_backend: str = "inductor", mesh=None,
                  ddp_bucket_mb: int = 25, ddp_bf16_grads: bool = False) -> torch.nn.Module:
    """The module to call in training (checkpointed per `gradient_checkpointing`'s policy, compiled
    block by block, sharded or DDP-wrapped as asked). Weights are shared with `model`, which stays the
    module whose state dict has the official key names (under FSDP it is sharded in place; `mesh`:
    hybrid sharding's, `fsdp_mesh`). DDP reduces the gradients in buckets of `ddp_bucket_mb` MiB, in
    bf16 with `ddp_bf16_grads` (`bf16_all_reduce`: half the bytes on the wire)."""
    checkpoint_blocks(model, gradient_checkpointing)
    if compile_model:
        compile_blocks(model, compile_backend)
    runnable = model
    if fsdp and dist.is_distributed:
        shard_model(model, precision, mesh)
    elif dist.is_distributed:
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        runnable = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, bucket_cap_mb=ddp_bucket_mb)
        if ddp_bf16_grads:
            runnable.register_comm_hook(None, bf16_all_reduce)
    return runnable


def bf16_all_reduce(process_group, bucket):
    """A DDP communication hook: the bucket's gradients rounded to bf16, summed in bf16 over the processes
    and taken back to float32, then averaged (half the bytes of a float32 all-reduce; one bf16 rounding,
    2^-9 relative, per value and per addition). PyTorch's own bf16 hook needs NCCL; this one runs on gloo
    as well."""
    import torch.distributed as torch_dist

    group = process_group if process_group is not None else torch_dist.group.WORLD
    size = torch_dist.get_world_size(group)
    buffer = bucket.buffer()
    compressed = buffer.to(torch.bfloat16)
    future = torch_dist.all_reduce(compressed, group=group, async_op=True).get_future()

    def decompress(done):
        return buffer.copy_(done.value()[0]).div_(size)

    return future.then(decompress)


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
