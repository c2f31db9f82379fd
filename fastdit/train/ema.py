"""Exponential moving average of the weights (DiT samples from the EMA model, decay 0.9999)."""

from __future__ import annotations

import copy

import torch


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    ema = copy.deepcopy(model).eval()
    ema.requires_grad_(False)
    return ema


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema ← ema + (1 − decay) · (p − ema) for every parameter (frozen ones such as pos_embed included):
    decay · ema + (1 − decay) · p up to rounding, as one multi-tensor lerp (faster than a loop over the
    tensors). Under FSDP both lists hold matching shards."""
    ema_params = dict(ema.named_parameters())
    pairs = [(ema_params[name], param.detach()) for name, param in model.named_parameters()]
    torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - decay)
