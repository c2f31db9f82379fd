"""`ddpm`: DiT's IDDPM Gaussian diffusion (Nichol & Dhariwal 2021), the process of the official DiT code.

ε-prediction with learned-range variance on the linear 1000-step schedule; the loss is MSE(ε) + L_vlb
(`fastdit.diffusion.gaussian`). Time is the original timestep, 0 (data) ... 999 (noise). A network
with 2C output channels learns the variance (the "vb" term); one with C channels has the fixed large
variance and the MSE alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..diffusion import create_diffusion
from .base import Objective, register_objective
from .policy import SamplingPolicy
from .views import gaussian_grid

TRAINING_STEPS = 1000  # DiT's diffusion_steps


@register_objective
@dataclass
class DDPM(Objective):
    name: ClassVar[str] = "ddpm"
    summary: ClassVar[str] = "DiT's IDDPM process: ε and the variance, MSE + VLB"
    time_range: ClassVar[tuple[float, float]] = (0.0, TRAINING_STEPS - 1.0)
    flow_time: ClassVar[bool] = False
    # DiT's: ancestral sampling with the learned variances, 250 steps
    sampling: ClassVar[SamplingPolicy] = SamplingPolicy("ddpm", sampler="ddpm")
    views: ClassVar[frozenset[str]] = frozenset({"gaussian", "grid"})

    def __post_init__(self) -> None:
        super().__post_init__()
        # One schedule; the variance type only decides whether the VLB term exists (2C outputs).
        self._learned = create_diffusion("", learn_sigma=True, diffusion_steps=TRAINING_STEPS)
        self._fixed = create_diffusion("", learn_sigma=False, diffusion_steps=TRAINING_STEPS)

    def draw(self, shape, generator, device):
        return {
            "t": torch.randint(0, TRAINING_STEPS, (1,), device=device, generator=generator),  # t ~ U{0..T−1}
            "noise": torch.randn((1, *shape), generator=generator, device=device),
        }

    def losses(self, network, x, draws, conditions):
        t, noise = draws["t"], draws["noise"]
        x_t = self._learned.q_sample(x, t, noise=noise)
        output = network(x_t, t, **conditions)
        diffusion = self._learned if output.shape[1] == 2 * x.shape[1] else self._fixed
        return diffusion.losses_from_output(output, x, x_t, t, noise)

    def gaussian(self, num_steps, *, learn_sigma):
        return create_diffusion(str(num_steps), learn_sigma=learn_sigma, diffusion_steps=TRAINING_STEPS)

    def grid(self, model_fn, y, num_calls, *, learn_sigma, time_shift):
        return gaussian_grid(self.gaussian(num_calls, learn_sigma=learn_sigma), model_fn, y)
