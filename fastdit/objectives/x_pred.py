"""`x-pred`: x-prediction with a velocity loss (JiT: Li & He 2025, "Back to Basics: Let Denoising
Generative Models Denoise").

The network outputs the clean image x̂1 on the linear flow path x_t = t x1 + (1 − t) ε (flow time,
0 = noise, the same direction as JiT's). The velocity is derived from it,

    v̂ = (x̂1 − x_t) / max(1 − t, t_eps),

with 1 − t clipped away from 0 as JiT does (t_eps = 0.05), and the loss is taken on the velocity,
mean((v̂ − (x1 − ε))²). The point of the paper: a clean image lies on a low-dimensional manifold that
a network with few channels per token (large patches in pixel space) can still predict, where ε or v
cannot be; so x-pred trains large-patch transformers on pixels without a latent space. JiT draws t
logit-normally (m = −0.8, s = 0.8): `--time-sampling logit-normal --logit-normal-mean -0.8
--logit-normal-std 0.8`. Every flow sampler samples it through the derived velocity; guidance on x̂1
is guidance on v̂ (v̂ is affine in x̂1 at fixed x_t and t).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..diffusion.flow import velocity_channels
from ..diffusion.losses import mean_flat
from ..errors import UserError
from .base import register_objective, setting
from .flow import FlowTimeObjective
from .policy import SamplingPolicy


@register_objective
@dataclass
class XPrediction(FlowTimeObjective):
    name: ClassVar[str] = "x-pred"
    summary: ClassVar[str] = "x-prediction as JiT: the network predicts the clean image, the loss is on the velocity"
    sampling: ClassVar[SamplingPolicy] = SamplingPolicy("x-pred", sampler="heun")  # JiT samples with Heun's ODE method

    x_pred_t_eps: float = setting(0.05, "x-pred: the derived velocity divides by max(1 - t, this) (JiT: 0.05)")

    def validate(self) -> None:
        super().validate()
        # Below float32's spacing at 1 (2^-23), the clip changes nothing but at t = 1 exactly, and there it
        # divides by a number so small that the velocity, or its square in the loss, overflows.
        smallest = torch.finfo(torch.float32).eps
        if not smallest <= self.x_pred_t_eps <= 1:
            raise UserError(f"--x-pred-t-eps must be in [{smallest:.3g}, 1] (below float32's resolution of 1 - t it "
                            f"would only divide by almost 0 at t = 1), got {self.x_pred_t_eps}; JiT uses 0.05")

    def derived_velocity(self, x1_hat: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """v̂ = (x̂1 − x_t) / max(1 − t, t_eps), t of shape (N,)."""
        gap = (1 - t).clamp_min(self.x_pred_t_eps).reshape(-1, *([1] * (x_t.ndim - 1))).to(x_t.dtype)
        return (x1_hat - x_t) / gap

    def losses(self, network, x, draws, conditions):
        t, noise = draws["t"], draws["noise"]
        x_t = self.path.interpolate(x, noise, t)
        x1_hat = velocity_channels(network(x_t, t, **conditions), x_t)  # the first C channels
        velocity = self.derived_velocity(x1_hat, x_t, t)
        return {"loss": mean_flat((velocity - self.path.target_velocity(x, noise)) ** 2)}

    def velocity(self, model_fn):
        def velocity(x, t, y):
            return self.derived_velocity(velocity_channels(model_fn(x, t, y), x), x, t)

        return velocity
