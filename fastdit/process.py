"""What a model was trained to predict, recorded with its weights: the process.

Two processes share the DiT network:

* `ddpm`: the IDDPM Gaussian diffusion of DiT (ε-prediction, learned variance, 1000 discrete steps;
  `fastdit.diffusion.gaussian`). Its time is the original timestep, 0 (data) ... 999 (noise).
* `flow`: flow matching on the linear path with velocity prediction, as SiT (`fastdit.diffusion.flow`).
  Its time is real, 0 (noise) ... 1 (data), and training draws it uniformly or logit-normally.

A checkpoint and its export record a `ProcessSpec`; sampling rebuilds the process from it, never from
a default, and refuses a sampler that does not fit. Checkpoints written before the process was
recorded are DDPM models, which is what they hold.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from .errors import UserError

OBJECTIVES = ("ddpm", "flow")
TIME_SAMPLINGS = ("uniform", "logit-normal")

# Samplers per process. DDIM and DPM-Solver++(2M) need only x̂0 and ε on a grid of (α, σ), which both
# processes provide; DDPM ancestral sampling uses the learned variances of the Gaussian process; the
# flow samplers integrate the velocity.
SAMPLERS_BY_OBJECTIVE = {
    "ddpm": ("ddpm", "ddim", "dpm++2m"),
    "flow": ("sde-euler", "sde-heun", "euler", "heun", "dopri5", "ddim", "dpm++2m"),
}
ALL_SAMPLERS = tuple(dict.fromkeys(name for names in SAMPLERS_BY_OBJECTIVE.values() for name in names))
# The sampler each process uses when none is asked for: the official ones (DiT's DDPM, SiT's SDE Euler).
DEFAULT_SAMPLER = {"ddpm": "ddpm", "flow": "sde-euler"}
# The process's time range, where a guidance interval is given.
TIME_RANGE = {"ddpm": (0.0, 999.0), "flow": (0.0, 1.0)}


@dataclass
class ProcessSpec:
    objective: str = "ddpm"
    # flow only: how training draws t (SiT: uniform; logit-normal: Esser et al. 2024, in SiT's time direction)
    time_sampling: str = "uniform"
    logit_normal_mean: float = 0.0
    logit_normal_std: float = 1.0

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"unknown objective {self.objective!r}; choose one of: {', '.join(OBJECTIVES)}")
        if self.time_sampling not in TIME_SAMPLINGS:
            raise UserError(f"unknown time sampling {self.time_sampling!r}; choose one of: {', '.join(TIME_SAMPLINGS)}")
        if not math.isfinite(self.logit_normal_mean):
            raise UserError(f"logit-normal mean must be finite, got {self.logit_normal_mean}")
        if not (math.isfinite(self.logit_normal_std) and self.logit_normal_std > 0):
            raise UserError(f"logit-normal std must be finite and > 0, got {self.logit_normal_std}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict | None) -> "ProcessSpec":
        return cls(**(data or {}))

    @property
    def samplers(self) -> tuple[str, ...]:
        return SAMPLERS_BY_OBJECTIVE[self.objective]

    @property
    def default_sampler(self) -> str:
        return DEFAULT_SAMPLER[self.objective]

    @property
    def time_range(self) -> tuple[float, float]:
        return TIME_RANGE[self.objective]

    def check_sampler(self, name: str) -> None:
        if name not in self.samplers:
            raise UserError(
                f"sampler {name!r} does not fit this {self.objective} model; use one of: {', '.join(self.samplers)}"
            )

    def check_guidance_interval(self, interval: tuple[float, float] | None) -> None:
        if interval is None:
            return
        low, high = (float(v) for v in interval)
        first, last = self.time_range
        if not (math.isfinite(low) and math.isfinite(high)) or not first <= low <= high <= last:
            raise UserError(
                f"guidance interval ({low:g}, {high:g}) must lie in this {self.objective} model's time range "
                f"[{first:g}, {last:g}] with LOW <= HIGH"
                + (" (flow time: 0 noise, 1 data)" if self.objective == "flow" else " (timesteps: 0 data, 999 noise)")
            )

    def training_process(self, learn_sigma: bool):
        """The process whose `loss(model, x, model_kwargs, t=, noise=)` and `sample_times(n, ...)` train."""
        if self.objective == "ddpm":
            from .diffusion import create_diffusion

            return create_diffusion("", learn_sigma=learn_sigma)
        from .diffusion import FlowMatching

        return FlowMatching(self.time_sampling, self.logit_normal_mean, self.logit_normal_std)
