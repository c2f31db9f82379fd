"""Exponential moving average of the weights (DiT samples from the EMA model, decay 0.9999)."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


# Parameters per chunk of the device-weighted update: its temporary differences stay under 64 MB.
CHUNK_NUMEL = 1 << 24


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, weight) -> None:
    """ema ← ema + weight · (p − ema) for every parameter (frozen ones such as pos_embed included), with
    weight = 1 − decay: decay · ema + (1 − decay) · p up to rounding. A number: one multi-tensor lerp.
    A scalar tensor on the device (the training step's: 0 on a step skipped for a non-finite loss, which
    then moves nothing): the same update by multi-tensor sub, mul and add in chunks, since a lerp would
    read the tensor's value on the host and wait for the step. Under FSDP both lists hold matching shards."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    if not torch.is_tensor(weight):
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], weight)
        return
    for chunk in _chunks(pairs, CHUNK_NUMEL):
        averages = [e for e, _ in chunk]
        moves = torch._foreach_sub([p for _, p in chunk], averages)
        torch._foreach_mul_(moves, weight)
        torch._foreach_add_(averages, moves)


def _chunks(pairs, numel: int):
    chunk, size = [], 0
    for pair in pairs:
        chunk.append(pair)
        size += pair[0].numel()
        if size >= numel:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
