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


@register_extension
class ExponentialMovingAverage(TrainExtension):
    name: ClassVar[str] = "ema"
    section: ClassVar[str] = "ema"
    settings: ClassVar[type] = EMASettings
    checkpoint_key: ClassVar[str] = "ema"

    def __init__(self, module: torch.nn.Module, decay: float):
        self.module, self.decay = module, decay

    @classmethod
    def enabled(cls, config) -> bool:
        return True  # every run exports its EMA

    @classmethod
    def build(cls, context: BuildContext) -> "ExponentialMovingAverage":
        return cls(make_ema(context.model), context.config.ema.ema_decay)

    def shard(self, shard_like_model) -> None:
        if shard_like_model is not None:
            shard_like_model(self.module)

    def after_step(self, model, step, taken):
        update_ema(self.module, model, (1 - self.decay) * taken)

    def state_dict(self, options):
        return get_model_state_dict(self.module, options=options)

    def load_state_dict(self, state, options):
        set_model_state_dict(self.module, state if state is not None else {}, options=options)
