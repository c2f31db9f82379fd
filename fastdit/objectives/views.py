"""The views of a model that samplers consume, and the flow-time grids they run on.

* A **velocity** view is `v(x, t, y)`, dx/dt on the linear path x_t = t x1 + (1 − t) ε with flow time
  t in [0, 1], 0 = noise (SiT's convention); ODE and SDE samplers integrate it over a `time_grid`.
* A **grid** view (`Grid`) is the model as `denoise(x, k) -> (x̂0, ε̂)` at points k of a grid where
  x_k = α_k x0 + σ_k ε; DDIM and DPM-Solver++ need nothing else (in the style of k-diffusion).
  `gaussian_grid` builds it for the IDDPM process (α = sqrt(ᾱ), σ = sqrt(1 − ᾱ)), `flow_grid` for any
  velocity on the linear path (α = t, σ = 1 − t).
* A **gaussian** view is the respaced `GaussianDiffusion` itself, for ancestral sampling with the
  learned variances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import UserError

Denoise = Callable[[torch.Tensor, int], "tuple[torch.Tensor, torch.Tensor]"]


@dataclass
class Grid:
    """Grid points k = 0..K: x_k = alphas[k] x0 + sigmas[k] ε (float64 scalars), the model seen as
    `denoise(x, k) -> (x̂0, ε̂)` at points 0..K−1; point K is data (alpha 1, sigma 0)."""

    denoise: Denoise
    alphas: torch.Tensor
    sigmas: torch.Tensor


def gaussian_grid(diffusion, model_fn, y) -> Grid:
    """The respaced DDPM process from noise (index T'−1) to data: ᾱ of the kept timesteps, then 1."""
    alpha_bars = torch.cat([torch.from_numpy(diffusion.alphas_cumprod).flip(0), torch.ones(1, dtype=torch.float64)])
    steps = list(range(diffusion.num_timesteps - 1, -1, -1))

    def denoise(x, k):
        t = torch.full((x.shape[0],), steps[k], device=x.device, dtype=torch.long)
        output = model_fn(x, diffusion.original_timesteps(t), y)
        x0 = diffusion.p_mean_variance_from_output(output, x, t)["pred_xstart"]
        # ε re-derived from x̂0, as the official DDIM step does (the same as the model's ε without clipping).
        return x0, diffusion.predict_eps_from_xstart(x, t, x0)

    return Grid(denoise, alpha_bars.sqrt(), (1 - alpha_bars).sqrt())


def flow_grid(velocity_fn, y, times: torch.Tensor) -> Grid:
    """The linear path x_t = t x1 + (1 − t) ε on increasing `times` ending at 1: from the velocity
    v = x1 − ε, x̂1 = x + (1 − t) v and ε̂ = x − t v."""
    times = times.to(torch.float64).cpu()
    if float(times[-1]) != 1.0:
        raise ValueError(f"a flow grid for DDIM/DPM-Solver++ must end at t = 1, got {float(times[-1])}")

    def denoise(x, k):
        t = times[k].to(device=x.device, dtype=x.dtype)
        v = velocity_fn(x, t.expand(x.shape[0]), y)
        return x + (1 - t) * v, x - t * v

    return Grid(denoise, times, 1 - times)


def shift_times(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Warp times toward the noise end: t' = t / (t + s (1 − t)), s > 1 spends more steps near noise.
    This is the resolution-dependent shift of Esser et al. 2024 (SD3, eq. 23, σ' = sσ / (1 + (s − 1)σ))
    written for σ = 1 − t; it keeps 0 and 1 fixed."""
    return t / (t + shift * (1 - t))


def time_grid(
    num_points: int, *, start: float = 0.0, end: float = 1.0, shift: float = 1.0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """`num_points` float32 times from `start` (0: noise) to `end`, evenly spaced (SiT's `linspace`),
    then shifted (the shift moves the ends too, except 0 and 1). ODEs use [0, 1]; SDEs end at 1 − last
    step size (SiT: `1 - SIT_LAST_STEP_SIZE`); models SiT samples on a shorter interval start later."""
    if num_points < 2:
        raise UserError(f"a time grid needs at least 2 points, got {num_points}")
    if not 0.0 <= start < end <= 1.0:
        raise UserError(f"the time grid must run from 0 <= start < end <= 1, got [{start}, {end}]")
    if not shift > 0:
        raise UserError(f"time shift must be > 0, got {shift}")
    times = torch.linspace(start, end, num_points, device=device)
    return times if shift == 1.0 else shift_times(times, shift)
