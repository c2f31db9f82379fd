"""`flow`: flow matching on the linear path with velocity prediction, as SiT (Ma et al. 2024).

x_t = t x1 + (1 − t) ε with t in [0, 1], 0 = noise; the network predicts v = x1 − ε and the loss is
mean((v̂ − v)²) (`fastdit.diffusion.flow.FlowMatching`). Training draws t uniformly (SiT) or
logit-normally (Esser et al. 2024, SD3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..diffusion.flow import TIME_SAMPLINGS, FlowMatching, VelocityModel
from ..errors import UserError
from .base import Objective, register_objective, setting
from .policy import SamplingPolicy
from .views import flow_grid, time_grid


@dataclass
class FlowTimeObjective(Objective):
    """What every objective on the linear flow path shares: flow time, how training draws it, the
    (t, ε) draws, and the grid view built from the velocity view."""

    time_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    flow_time: ClassVar[bool] = True
    views: ClassVar[frozenset[str]] = frozenset({"velocity", "grid"})

    time_sampling: str = setting("uniform", f"how training draws the flow time t: {' or '.join(TIME_SAMPLINGS)} "
                                            "(SiT: uniform; SD3 and JiT: logit-normal)")
    logit_normal_mean: float = setting(0.0, "logit-normal time: mean m of t = sigmoid(m + s n), in flow time "
                                            "(0 noise, 1 data; JiT: -0.8)")
    logit_normal_std: float = setting(1.0, "logit-normal time: std s (JiT: 0.8)")

    def validate(self) -> None:
        # FlowMatching checks the time sampling.
        if not math.isfinite(self.logit_normal_mean):
            raise UserError(f"logit-normal mean must be finite, got {self.logit_normal_mean}")
        if not (math.isfinite(self.logit_normal_std) and self.logit_normal_std > 0):
            raise UserError(f"logit-normal std must be finite and > 0, got {self.logit_normal_std}")
        self.path = FlowMatching(self.time_sampling, self.logit_normal_mean, self.logit_normal_std)

    def draw(self, shape, generator, device):
        return {
            "t": self.path.sample_times(1, device=device, generator=generator),
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }

    def grid(self, model_fn, y, num_calls, *, learn_sigma, time_shift):
        return flow_grid(self.velocity(model_fn), y, time_grid(num_calls + 1, shift=time_shift))


@register_objective
@dataclass
class Flow(FlowTimeObjective):
    name: ClassVar[str] = "flow"
    summary: ClassVar[str] = "flow matching as SiT: the velocity x1 − ε on the linear path"
    sampling: ClassVar[SamplingPolicy] = SamplingPolicy("flow", sampler="sde-euler")  # SiT's, 250 steps

    def losses(self, network, x, draws, conditions):
        return {"loss": self.path.loss(network, x, conditions, t=draws["t"], noise=draws["noise"])}

    def velocity(self, model_fn):
        return VelocityModel(model_fn)
