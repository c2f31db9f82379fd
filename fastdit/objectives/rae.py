"""`rae`: flow matching as RAE trains its DiT^DH (Zheng, Ma, Tong & Xie 2025, "Diffusion Transformers with
Representation Autoencoders"; its `stage2/transport`, SiT's transport with the time reversed).

RAE's network lives on its own clock: x_σ = (1 − σ) x + σ ε with σ in [0, 1], **σ = 1 is noise**, the
network is called with σ and predicts the velocity dx_σ/dσ = ε − x. fastdit's flow time is t = 1 − σ
(0 = noise) and its velocity dx/dt = x − ε, so the views call the network at 1 − t and negate its
output; the training loss is RAE's own, on σ. A released RAE checkpoint, and a DiT^DH trained here,
therefore sample (and load into RAE's code) as they are.

**Time shift.** A latent of more dimensions keeps more of its signal at a given noise level, so RAE
shifts the times toward noise by s = sqrt(C·H·W / base) with base 4096 (the paper's section 4, after
Esser et al. 2024, SD3, eq. 23): σ' = s σ / (1 + (s − 1) σ), in the training draws and in the sampling
grid alike (DINOv2-B at 256 px: s = sqrt(768·16·16 / 4096) = sqrt(48) ≈ 6.93; at 512 px sqrt(192)).
The base is the setting `time_shift_base` (recorded with the objective); the shift follows each model's
own input, and the sampling recipe a run records carries it (`--time-shift`, the same warp written in
flow time: t' = t / (t + s (1 − t))).

**Training draws** (RAE's `Transport.sample`): σ logit-normal, logit σ ~ N(−m, s²) with m the flow-time
mean of `--logit-normal-mean` (RAE: m = 0, s = 1), truncated to RAE's [0, 1 − 1/1000] by the inverse
CDF of the truncated normal, then shifted. **Sampling interval**: RAE's ODE runs σ from 1 to 1/1000
(`check_interval`), i.e. flow time [0, 0.999], and its last state keeps that little noise; SDEs end at
1 − the last step size, as SiT's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ..diffusion.flow import LinearPath, VelocityModel, time_interval, velocity_channels
from ..diffusion.losses import mean_flat
from ..errors import OptionError, UserError
from .base import Objective, register_objective, setting
from .policy import SamplingPolicy
from .views import flow_grid, time_grid

# RAE's interval (`Transport.check_interval`): its σ runs over [0, 1 − 1/1000], in training and in the ODE.
RAE_EPS = 1 / 1000
# RAE's base dimension of the time shift (its configs' `time_dist_shift_base`).
RAE_SHIFT_BASE = 4096
# RAE's sample configs: the Euler ODE over 50 points (`sampler.params.num_steps: 50`).
RAE_NUM_STEPS = 50


def dimension_shift(input_shape: tuple[int, ...], base: int) -> float:
    """RAE's s = sqrt(C·H·W / base) for a model input of `input_shape` (C, H, W); 1 (none) for base 0."""
    return math.sqrt(math.prod(input_shape) / base) if base else 1.0


def shift_noise_level(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = s σ / (1 + (s − 1) σ), in RAE's order of operations (its `Transport.sample`, `ode`)."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def truncated_logit_normal(u: torch.Tensor, mean: float, std: float, high: float) -> torch.Tensor:
    """σ with logit σ ~ N(mean, std²) truncated to [0, high], from uniforms `u` by the inverse CDF:
    logit σ = mean + std Φ⁻¹(Φ(β) u), β = (logit(high) − mean) / std (RAE's `truncated_logitnormal_sample`;
    the lower end is σ = 0, Φ(−∞) = 0)."""
    mean_t, std_t = torch.as_tensor(mean), torch.as_tensor(std)
    normal = torch.distributions.Normal(torch.zeros_like(mean_t), torch.ones_like(std_t))
    low_t, high_t = torch.as_tensor(0.0), torch.as_tensor(high)
    cdf_low = normal.cdf((torch.logit(low_t) - mean_t) / std_t)
    cdf_high = normal.cdf((torch.logit(high_t) - mean_t) / std_t)
    u = cdf_low + (cdf_high - cdf_low) * u.clamp(0, 1)
    return torch.sigmoid(mean_t + std_t * normal.icdf(u)).clamp(low_t, high_t)


@register_objective
@dataclass
class RAEFlow(Objective):
    name: ClassVar[str] = "rae"
    summary: ClassVar[str] = ("flow matching as RAE trains DiT^DH: velocity on the linear path in RAE's reversed time, "
                              "logit-normal t shifted by sqrt(C·H·W / --time-shift-base)")
    time_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    flow_time: ClassVar[bool] = True
    views: ClassVar[frozenset[str]] = frozenset({"velocity", "grid", "sde"})
    sampling: ClassVar[SamplingPolicy] = SamplingPolicy("rae", sampler="euler", num_steps=RAE_NUM_STEPS)
    interpolant: ClassVar[LinearPath] = LinearPath()  # in flow time, for the SDE and the previews
    prediction: ClassVar[str] = "velocity"

    # Shared with the flow objectives (one flag each, the same defaults): RAE's configs use logit-normal_0_1.
    logit_normal_mean: float = setting(0.0, "logit-normal time: mean m of t = sigmoid(m + s n), in flow time "
                                            "(0 noise, 1 data; JiT: -0.8)")
    logit_normal_std: float = setting(1.0, "logit-normal time: std s (JiT: 0.8)")
    time_shift_base: int = setting(RAE_SHIFT_BASE, "rae: the time shift s = sqrt(C*H*W / this) of the training draws "
                                                   "and the recorded sampling grid, C*H*W the model's input (RAE: "
                                                   "4096; 0: no shift)")

    def validate(self) -> None:
        if not math.isfinite(self.logit_normal_mean):
            raise UserError(f"logit-normal mean must be finite, got {self.logit_normal_mean}")
        if not (math.isfinite(self.logit_normal_std) and self.logit_normal_std > 0):
            raise UserError(f"logit-normal std must be finite and > 0, got {self.logit_normal_std}")
        base = self.time_shift_base
        if isinstance(base, bool) or not isinstance(base, int) or base < 0:
            raise UserError(f"--time-shift-base must be a whole number >= 0 (RAE: {RAE_SHIFT_BASE}; 0: no shift), "
                            f"got {base!r}")

    def time_shift(self, input_shape: tuple[int, ...]) -> float:
        """RAE's shift for a model input of `input_shape` (C, H, W)."""
        return dimension_shift(input_shape, self.time_shift_base)

    def sampling_time_shift(self, input_shape):
        return self.time_shift(input_shape)

    # ------------------------------------------------------------------------------------------
    # training: RAE's clock σ (1 = noise), its draws and its loss
    # ------------------------------------------------------------------------------------------

    def noise_levels(self, u: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
        """RAE's training σ from uniforms `u`: truncated logit-normal on [0, 1 − 1/1000], then shifted."""
        sigma = truncated_logit_normal(u, -self.logit_normal_mean, self.logit_normal_std, 1 - RAE_EPS)
        return shift_noise_level(sigma, self.time_shift(input_shape))

    def draw(self, shape, generator, device):
        u = torch.rand(1, generator=generator, device=device)
        return {
            "sigma": self.noise_levels(u, shape),  # the network's own time
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }

    def losses(self, network, x, draws, conditions):
        """mean((v̂(x_σ, σ) − (ε − x))²), x_σ = (1 − σ) x + σ ε: RAE's `training_losses` for velocity."""
        sigma, noise = draws["sigma"], draws["noise"]
        s = sigma.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        x_sigma = (1 - s) * x + s * noise
        velocity = velocity_channels(network(x_sigma, sigma, **conditions), x_sigma)
        return {"loss": mean_flat((velocity - (noise - x)) ** 2)}

    # ------------------------------------------------------------------------------------------
    # sampling: fastdit's flow time t = 1 − σ
    # ------------------------------------------------------------------------------------------

    def velocity(self, model_fn):
        network = VelocityModel(model_fn)

        def velocity(x, t, y):
            return -network(x, 1 - t, y)  # dx/dt = −dx/dσ at σ = 1 − t

        return velocity

    def grid(self, model_fn, y, num_calls, *, learn_sigma, time_shift):
        return flow_grid(self.velocity(model_fn), y, time_grid(num_calls + 1, shift=time_shift))

    def velocity_and_score(self, model_fn):
        velocity = self.velocity(model_fn)

        def both(x, t, y):
            v = velocity(x, t, y)
            return v, self.interpolant.score_from_velocity(v, x, t)

        return both

    def sample_interval(self, *, sde: bool = False, diffusion_form: str = "sigma",
                        last_step_size: float = 0.0) -> tuple[float, float]:
        """RAE's ODE over flow time [0, 1 − 1/1000]; an SDE as SiT's, to 1 − the last step size (its
        SBDM diffusion is infinite at t = 0, where the SDE starts: refused, as for the flow objective)."""
        if not sde:
            return 0.0, 1 - RAE_EPS
        if diffusion_form == "sbdm":
            raise OptionError("the {diffusion_form:sbdm} diffusion is infinite at t = 0, where the SDE of this "
                              "{objective} model starts: choose another diffusion form", "diffusion_form",
                              objective=self.name)
        return time_interval("linear", "velocity", sde=True, diffusion_form=diffusion_form,
                             last_step_size=last_step_size)

    def network_interval(self, interval):
        if interval is None:
            return None
        low, high = interval
        return 1 - high, 1 - low
