"""Flow matching on the linear path, velocity prediction: the training objective of SiT
(Ma et al. 2024, "Scalable Interpolant Transformers"; Lipman et al. 2023; Liu et al. 2023).

Time follows SiT: t in [0, 1], **t = 0 is pure noise, t = 1 is data**, and the network embeds the
real t (DiT's sinusoidal embedding accepts real numbers). The path and its velocity are

    x_t = t · x1 + (1 − t) · x0,        u_t = dx_t/dt = x1 − x0,        x0 ~ N(0, I),

and the loss is the per-sample mean of (v(x_t, t) − u_t)², unweighted (SiT's "Linear", "velocity").

Model contract: `model(x_t, t, **model_kwargs) -> (N, C or 2C, H, W)`; the velocity is the first C
channels. A network built with learn_sigma=True (as the released SiT-XL/2 is) has 2C outputs and
SiT's forward drops the second half, which therefore gets no gradient.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from .losses import mean_flat

TIME_SAMPLINGS = ("uniform", "logit-normal")


def velocity_channels(output: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The velocity part of a network output for input `x`: its first C channels (of C or 2C)."""
    C = x.shape[1]
    if output.shape[1] not in (C, 2 * C):
        raise ValueError(f"a velocity model must output {C} or {2 * C} channels, got {output.shape[1]}")
    return output[:, :C]


class VelocityModel:
    """A DiT (or SiT checkpoint) as a velocity function: `model(x, t, y)` with real t in [0, 1],
    keeping the first C output channels, as SiT's forward does for learn_sigma=True. fastdit's DiT
    embeds a real t exactly as SiT does (the sinusoidal features of t itself; no cast to integers)."""

    def __init__(self, model: Callable):
        self.model = model

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return velocity_channels(self.model(x, t, y), x)


class FlowMatching:
    """The linear-path, velocity-prediction process: training loss and time sampling.

    `time_sampling` "uniform" draws t ~ U[0, 1) as SiT does; "logit-normal" draws
    t = sigmoid(mean + std · n), n ~ N(0, 1) (Esser et al. 2024, SD3, section 3.1, eq. 19). SD3's time
    runs the other way (its t = 1 is noise), so SD3's lognorm(m, s) is `mean = −m` here; mean 0 is
    the same in both, and puts most samples at intermediate times.
    """

    def __init__(self, time_sampling: str = "uniform", logit_normal_mean: float = 0.0, logit_normal_std: float = 1.0):
        if time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"unknown time sampling {time_sampling!r}; choose one of: {', '.join(TIME_SAMPLINGS)}")
        if not logit_normal_std > 0:
            raise UserError(f"logit-normal std must be > 0, got {logit_normal_std}")
        self.time_sampling = time_sampling
        self.logit_normal_mean = float(logit_normal_mean)
        self.logit_normal_std = float(logit_normal_std)

    # ------------------------------------------------------------------------------------------
    # the path
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """x_t = t · x1 + (1 − t) · x0, t of shape (N,)."""
        t = t.reshape(-1, *([1] * (x1.ndim - 1))).to(x1.dtype)
        return t * x1 + (1 - t) * x0

    @staticmethod
    def target_velocity(x1: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """u_t = x1 − x0, the same at every t on the linear path."""
        return x1 - x0

    def sample_times(
        self, n: int, device: torch.device | str = "cpu", dtype=torch.float32, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        if self.time_sampling == "uniform":
            return torch.rand(n, device=device, dtype=dtype, generator=generator)
        normal = torch.randn(n, device=device, dtype=dtype, generator=generator)
        return torch.sigmoid(self.logit_normal_mean + self.logit_normal_std * normal)

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def loss(
        self,
        model: Callable,
        x1: torch.Tensor,
        model_kwargs: dict | None = None,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Per-sample loss mean((v(x_t, t) − (x1 − x0))²). `t` and the noise x0 are drawn from
        `generator` (t first, as `GaussianDiffusion.loss` does) unless given."""
        if t is None:
            t = self.sample_times(x1.shape[0], x1.device, x1.dtype, generator)
        if noise is None:
            noise = torch.randn(x1.shape, device=x1.device, dtype=x1.dtype, generator=generator)
        x_t = self.interpolate(x1, noise, t)
        velocity = velocity_channels(model(x_t, t, **(model_kwargs or {})), x_t)
        return mean_flat((velocity - self.target_velocity(x1, noise)) ** 2)
