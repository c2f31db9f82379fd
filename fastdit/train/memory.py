"""How much memory a training run needs on each process, estimated without allocating it.

The model is built on PyTorch's meta device (shapes and dtypes, no storage) and one micro-batch of the
run's objective goes forward and backward through it, with the run's activation-checkpointing policy
and precision; a `saved_tensors_hooks` pair counts the bytes autograd keeps for the backward (each
storage once). Beside those activations the estimate counts what lives for the whole run:

* the weights, their gradients and AdamW's two moments (float32), divided over the processes under
  FSDP (which also holds one block's gathered weights at a time);
* the EMA of the weights and any further averages (post-hoc EMAs), likewise sharded under FSDP;
* under activation checkpointing, one block's activations recomputed in the backward;
* the backward's working buffers (the gradients flowing back through a block): about one block's
  activations.

It leaves out the CUDA context and kernels' workspaces (about 0.5-1 GB on a GPU) and the allocator's
fragmentation, the data loader's pinned batches, a training extension's own modules (REPA's encoder)
and transient buffers; `fastdit train --dry-run` prints it, and the message of a run that runs out of
memory quotes it beside the three levers that lower it.
"""

from __future__ import annotations

import contextlib
import gc
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..models import build_model
from ..objectives import TrainingNetwork
from ..precision import AUTOCAST_DTYPES, autocast
from .data_order import batch_split
from .setup import checkpoint_blocks, checkpoint_stride

GIB = 2**30


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process."""

    weights: int
    gradients: int
    optimizer: int
    averages: int  # the EMA and any further averages of the weights
    activations: int  # what autograd keeps for the backward of one micro-batch
    recomputed: int  # one block's activations, recomputed in the backward under checkpointing
    transient: int  # the backward's working buffers: about one block's activations (their gradients)
    micro_batch: int

    @property
    def total(self) -> int:
        return (self.weights + self.gradients + self.optimizer + self.averages + self.activations + self.recomputed
                + self.transient)

    def lines(self) -> list[str]:
        rows = [("weights", self.weights), ("gradients", self.gradients), ("AdamW moments", self.optimizer),
                ("EMA and other averages", self.averages),
                (f"activations kept for the backward (micro-batch {self.micro_batch})", self.activations)]
        if self.recomputed:
            rows.append(("one block recomputed in the backward", self.recomputed))
        rows.append(("the backward's working buffers (about one block's activations)", self.transient))
        rows.append(("total (plus the CUDA context and workspaces, ~0.5-1 GB)", self.total))
        return [f"  {name:<62} {size / GIB:8.2f} GiB" for name, size in rows]

    def summary(self) -> str:
        return f"{self.total / GIB:.1f} GiB per process (activations {self.activations / GIB:.1f} GiB)"


def count_saved_bytes(run, exclude=()) -> int:
    """Bytes of the tensors autograd keeps for the backward once `run()` has built its graph: each storage
    once, and only those a part of the graph still holds at the end (a branch whose result was dropped,
    e.g. a detached term, frees what it saved). Tensors of `exclude` (the weights, counted apart) are not
    counted when saved."""
    saved: dict[int, tuple[int, list]] = {}
    excluded = {tensor.untyped_storage()._cdata for tensor in exclude}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata in excluded:
            return tensor
        size, holders = saved.setdefault(storage._cdata, (storage.nbytes(), []))
        holders.append(weakref.ref(tensor))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    gc.collect()
    return sum(size for size, holders in saved.values() if any(holder() is not None for holder in holders))


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel (flash, memory-efficient: what CPUs and GPUs run) keeps for its
    backward: q, k, v, the output and one float32 log-sum-exp per query; on the meta device SDPA falls
    back to the math path, which would also keep the (T, T) attention weights of every head."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@contextlib.contextmanager
def _fused_attention_on_meta():
    original = F.scaled_dot_product_attention

    def attention(q, k, v, *args, **kwargs):
        if q.device.type == "meta" and torch.is_grad_enabled():  # passes without a gradient keep nothing
            return _FusedAttention.apply(q, k, v)
        return original(q, k, v, *args, **kwargs)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def _activations(model, objective, micro_batch: int, shape, precision: str) -> int:
    """Activation bytes of one micro-batch through `model` (on any device: meta for the estimate)."""
    device = next(model.parameters()).device
    if device.type == "meta" and AUTOCAST_DTYPES[precision] is not None:
        # Autocast keeps half-precision activations and a half-precision copy of each weight a matmul reads
        # (its cache is off): on meta, where autocast does not run, the model in that dtype keeps the same.
        model.to(AUTOCAST_DTYPES[precision])
    generator = torch.Generator().manual_seed(0)
    draws = [objective.draw(shape, generator, torch.device("cpu")) for _ in range(micro_batch)]
    dtype = next(model.parameters()).dtype
    draws = {name: torch.cat([d[name] for d in draws]).to(device) for name in draws[0]}
    draws = {name: value.to(dtype) if value.is_floating_point() else value for name, value in draws.items()}
    x = torch.zeros((micro_batch, *shape), device=device, dtype=dtype)
    conditions = {"y": torch.zeros(micro_batch, dtype=torch.long, device=device),
                  "force_drop_ids": torch.zeros(micro_batch, dtype=torch.bool, device=device)}
    # whole_batch: the same forwards for every sample, as the estimate cannot look at data-dependent rows.
    network = TrainingNetwork(model, model, whole_batch=True)

    def forward():
        if device.type == "meta":  # no autocast on meta: the half-precision run is the model in that dtype
            terms = objective.losses(network, x, draws, conditions)
        else:
            with autocast(device, precision):
                terms = objective.losses(network, x, draws, conditions)
        forward.loss = terms["loss"].float().mean()

    weights = list(model.parameters())
    with _fused_attention_on_meta():  # the backward too: checkpointing recomputes the forward there
        saved = count_saved_bytes(forward, exclude=[] if weights[0].dtype != torch.float32 else weights)
        forward.loss.backward()
    return saved


def estimate_memory(config, world_size: int, input_shape: tuple[int, int, int]) -> MemoryEstimate:
    """The estimate for `config` (a TrainConfig) on `world_size` processes, for model inputs of
    `input_shape` (C, H, W): built and run on the meta device, nothing allocated."""
    from .extensions import enabled_extensions

    objective = config.build_objective()
    _, micro_batch = batch_split(config.optimisation, world_size)
    with torch.device("meta"):
        model = build_model(config.model.name, input_size=input_shape[1], in_channels=input_shape[0],
                            **config.model_options())
    num_params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    shards = world_size if config.run.fsdp and world_size > 1 else 1
    block_bytes = sum(p.numel() for p in model.blocks[0].parameters()) * 4
    policy = config.run.gradient_checkpointing
    checkpoint_blocks(model, policy)
    activations = _activations(model, objective, micro_batch, input_shape, config.run.precision)
    with torch.device("meta"):  # one block (with the embedders and the final layer: a slight overcount)
        one_block = build_model(config.model.name, input_size=input_shape[1], in_channels=input_shape[0],
                                **{**config.model_options(), "depth": 1})
    block = _activations(one_block, objective, micro_batch, input_shape, config.run.precision)
    recomputed = block if checkpoint_stride(policy) or policy == "mlp" else 0  # recomputed one region at a time
    averages = 1 + sum(len(config.posthoc.posthoc_sigma_rels) for cls in enabled_extensions(config)
                       if cls.name == "posthoc-ema")
    weights = num_params * 4 // shards + (block_bytes if shards > 1 else 0)
    return MemoryEstimate(weights=weights, gradients=trainable * 4 // shards, optimizer=2 * trainable * 4 // shards,
                          averages=averages * num_params * 4 // shards, activations=activations,
                          recomputed=recomputed, transient=block, micro_batch=micro_batch)
