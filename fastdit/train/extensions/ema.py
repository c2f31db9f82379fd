"""The exponential moving average of the weights: what every run exports and samples from.

DiT samples from the EMA (decay 0.9999, updated after every optimizer step). The average is a copy of
the plain model made before any wrapping, sharded like the model under FSDP (each process averages its
own shard: no communication), saved under "ema" in training checkpoints, from which the run's exports
are written (`fastdit.train.state`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

from ..ema import make_ema, update_ema
from ..options import option
from .base import BuildContext, TrainExtension, register_extension


@dataclass
class EMASettings:
    ema_decay: float = option(0.9999, "EMA decay per step", unit_interval=True)  # DiT's
    # min(decay, (1 + t) / (10 + t)) at step t: the warm-up many codebases use (e.g. diffusers' EMAModel),
    # so that a short run's EMA is not still mostly its random initial weights. DiT's recipe has none.
    ema_warmup: bool = option(False, "warm the EMA up: decay min(--ema-decay, (1 + t) / (10 + t)) at step t, so a "
                                     "short run's EMA follows the model from the start (DiT's recipe: off)")


@register_extension
class ExponentialMovingAverage(TrainExtension):
    name: ClassVar[str] = "ema"
    section: ClassVar[str] = "ema"
    settings: ClassVar[type] = EMASettings
    checkpoint_key: ClassVar[str] = "ema"

    def __init__(self, module: torch.nn.Module, decay: float, warmup: bool = False, max_steps: int | None = None):
        self.module, self.decay, self.warmup, self.max_steps = module, decay, warmup, max_steps

    @classmethod
    def enabled(cls, config) -> bool:
        return True  # every run exports its EMA

    @classmethod
    def build(cls, context: BuildContext) -> "ExponentialMovingAverage":
        settings = context.config.ema
        return cls(make_ema(context.model), settings.ema_decay, settings.ema_warmup,
                   context.config.optimisation.max_steps)

    def describe(self) -> str:
        """Says so when the run is too short for its EMA: without a warm-up, after `max_steps` updates the
        average still holds decay^max_steps of the initial (random) weights, and every export samples that."""
        if self.warmup:
            return f"EMA {self.decay:g} with warm-up"
        if self.max_steps and self.decay ** self.max_steps > 0.1:
            return (f"warning: EMA {self.decay:g} after {self.max_steps:,} steps still holds "
                    f"{self.decay ** self.max_steps:.0%} of the initial weights (add --ema-warmup or lower --ema-decay)")
        return ""

    def decay_at(self, step: int) -> float:
        """The decay of the update after step `step` (counted from 0)."""
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    def shard(self, shard_like_model) -> None:
        if shard_like_model is not None:
            shard_like_model(self.module)

    def after_step(self, model, step, taken):
        update_ema(self.module, model, (1 - self.decay_at(step)) * taken)

    def state_dict(self, options):
        return get_model_state_dict(self.module, options=options)

    def load_state_dict(self, state, options):
        set_model_state_dict(self.module, state if state is not None else {}, options=options)
