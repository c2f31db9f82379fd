"""`flow`: flow matching as SiT (Ma et al. 2024): one of its paths, one of its predictions.

x_t = α_t x1 + σ_t ε with t in [0, 1], 0 = noise, on the linear (α = t, σ = 1 − t), GVP or VP path; the
network predicts the velocity (the released SiT-XL/2's), the noise or the score, with SiT's losses and
loss weights (`fastdit.diffusion.flow`). Training draws t uniformly (SiT) or logit-normally (Esser et
al. 2024, SD3). The settings are recorded in every checkpoint, so sampling knows what the network
outputs: the views turn it into the velocity (ODE samplers) and the score (SiT's SDE), as SiT's
`Transport.get_drift` and `get_score` do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from ..diffusion.flow import (LOSS_WEIGHTS, PATH_TYPES, PREDICTIONS, TIME_SAMPLINGS, FlowMatching, Interpolant,
                              VelocityModel, time_interval, velocity_channels)
from ..errors import OptionError, UserError
from .base import Objective, register_objective, setting
from .policy import SamplingPolicy
from .views import flow_grid, time_grid

# (velocity, score) of a model at x_t, from one model call.
VelocityAndScore = Callable[..., "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class FlowTimeObjective(Objective):
    """What every objective on a flow path shares: flow time, how training draws it, the (t, ε) draws,
    the grid view built from the velocity view, and SiT's sampling SDE built from the velocity and the
    score (`velocity_and_score`). Subclasses on another path than the linear one, or predicting
    something else than the velocity, say so with `interpolant` and `prediction`."""

    time_range: ClassVar[tuple[float, float]] = (0.0, 1.0)
    flow_time: ClassVar[bool] = True
    views: ClassVar[frozenset[str]] = frozenset({"velocity", "grid", "sde"})

    time_sampling: str = setting("uniform", f"how training draws the flow time t: {' or '.join(TIME_SAMPLINGS)} "
                                            "(SiT: uniform; SD3 and JiT: logit-normal)", choices=TIME_SAMPLINGS)
    logit_normal_mean: float = setting(0.0, "logit-normal time: mean m of t = sigmoid(m + s n), in flow time "
                                            "(0 noise, 1 data; JiT: -0.8)")
    logit_normal_std: float = setting(1.0, "logit-normal time: std s (JiT: 0.8)")

    def validate(self) -> None:
        # FlowMatching checks the time sampling.
        if not math.isfinite(self.logit_normal_mean):
            raise UserError(f"logit-normal mean must be finite, got {self.logit_normal_mean}")
        if not (math.isfinite(self.logit_normal_std) and self.logit_normal_std > 0):
            raise UserError(f"logit-normal std must be finite and > 0, got {self.logit_normal_std}")
        self.path = FlowMatching(self.time_sampling, self.logit_normal_mean, self.logit_normal_std,
                                 **self.process_settings())

    def process_settings(self) -> dict:
        """The path, prediction and loss weight of the flow-matching process (the linear path's velocity)."""
        return {}

    @property
    def interpolant(self) -> Interpolant:
        return self.path.interpolant

    @property
    def prediction(self) -> str:
        """What the sampling interval is chosen for: "velocity" (finite at both ends), "noise" or "score"."""
        return self.path.prediction

    def draw(self, shape, generator, device):
        return {
            "t": self.path.sample_times(1, device=device, generator=generator),
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }

    def grid(self, model_fn, y, num_calls, *, learn_sigma, time_shift):
        return flow_grid(self.velocity(model_fn), y, time_grid(num_calls + 1, shift=time_shift))

    # ------------------------------------------------------------------------------------------
    # sampling: the interval, the score, the estimate of the data
    # ------------------------------------------------------------------------------------------

    def sample_interval(self, *, sde: bool = False, diffusion_form: str = "sigma",
                        last_step_size: float = 0.0) -> tuple[float, float]:
        """SiT's (t0, t1) for sampling this model (`fastdit.diffusion.flow.time_interval`). The SBDM
        diffusion of an SDE that starts at t = 0 would be infinite there (b_t has α̇/α = 1/t on the linear
        path): refused, as SiT would return NaN images."""
        start, end = time_interval(self.interpolant.name, self.prediction, sde=sde, diffusion_form=diffusion_form,
                                   last_step_size=last_step_size)
        if sde and diffusion_form == "sbdm" and start == 0 and self.interpolant.name != "vp":
            raise OptionError("the {diffusion_form:sbdm} diffusion is infinite at t = 0, where the SDE of this "
                              "{objective} model starts (SiT starts there too, and returns NaN): choose another "
                              "diffusion form", "diffusion_form", objective=self.name)
        return start, end

    def velocity_and_score(self, model_fn) -> VelocityAndScore:
        """`(v, s)(x, t, y)` from one model call: the velocity view, and the score from it."""
        velocity = self.velocity(model_fn)

        def both(x, t, y):
            v = velocity(x, t, y)
            return v, self.interpolant.score_from_velocity(v, x, t)

        return both

    def estimate_data(self, x: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
        if self.interpolant.name == "linear":
            return super().estimate_data(x, t, velocity)
        return self.interpolant.data_from_velocity(velocity, x, t)


@register_objective
@dataclass
class Flow(FlowTimeObjective):
    name: ClassVar[str] = "flow"
    summary: ClassVar[str] = ("flow matching as SiT: the velocity (or noise or score) on the linear, GVP or VP path; "
                              "--path-type, --prediction")
    sampling: ClassVar[SamplingPolicy] = SamplingPolicy("flow", sampler="sde-euler")  # SiT's, 250 steps

    path_type: str = setting("linear", f"flow: SiT's path, {', '.join(PATH_TYPES)} (x_t = α_t x1 + σ_t ε: linear t, "
                                       "1 - t; gvp sin, cos of πt/2; vp the VP SDE's)", choices=PATH_TYPES)
    prediction: str = setting("velocity", f"flow: what the network predicts, {', '.join(PREDICTIONS)} (SiT-XL/2: "
                                          "velocity); sampling converts it, as SiT does", choices=PREDICTIONS)
    loss_weight: str = setting("none", f"flow: SiT's loss weight of noise and score prediction, "
                                       f"{', '.join(LOSS_WEIGHTS)}", choices=LOSS_WEIGHTS)

    def validate(self) -> None:
        for name, value, choices in (("path-type", self.path_type, PATH_TYPES), ("prediction", self.prediction, PREDICTIONS),
                                     ("loss-weight", self.loss_weight, LOSS_WEIGHTS)):
            if value not in choices:
                raise UserError(f"unknown --{name} {value!r}; choose one of: {', '.join(choices)}")
        super().validate()
        # DDIM and DPM-Solver++ run on the linear path's (α, σ) = (t, 1 − t) grid from the velocity; the
        # other paths and predictions sample with SiT's own ODE and SDE samplers.
        if (self.path_type, self.prediction) != ("linear", "velocity"):
            self.views = frozenset({"velocity", "sde"})

    def process_settings(self) -> dict:
        return {"path": self.path_type, "prediction": self.prediction, "loss_weight": self.loss_weight}

    def losses(self, network, x, draws, conditions):
        return {"loss": self.path.loss(network, x, conditions, t=draws["t"], noise=draws["noise"])}

    def velocity(self, model_fn):
        if self.prediction == "velocity":
            return VelocityModel(model_fn)
        both = self.velocity_and_score(model_fn)
        return lambda x, t, y: both(x, t, y)[0]

    def velocity_and_score(self, model_fn):
        """SiT's `get_drift` and `get_score`: a velocity model's score from its velocity; a noise model's
        score −ε̂/σ_t, a score model's its output; their velocity a_t x + b_t s."""
        if self.prediction == "velocity":
            return super().velocity_and_score(model_fn)
        path = self.interpolant

        def both(x, t, y):
            output = velocity_channels(model_fn(x, t, y), x)
            score = path.score_from_noise(output, x, t) if self.prediction == "noise" else output
            return path.velocity_from_score(score, x, t), score

        return both
