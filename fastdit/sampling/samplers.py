"""Samplers of the DDPM process and the grid samplers both processes share.

* `ddpm_sample`: ancestral sampling with the learned variances (IDDPM), DiT's default. It belongs to
  the Gaussian process and takes the respaced `GaussianDiffusion` and `model_fn(x, t, y)`, t on the
  original 0..999 scale.
* `ddim`, `dpm_solver_pp_2m`: pure functions over a grid, in the style of k-diffusion. They see the
  model only through `denoise(x, k) -> (x̂0, ε̂)` at grid point k, and the grid through `alphas[k]`,
  `sigmas[k]` with x_k = α_k x0 + σ_k ε; the last point is data (α = 1, σ = 0). Any process whose
  states are such affine mixtures provides this as its "grid" view (`fastdit.objectives.views`).

Every sampler takes its options as keywords and no others (an option a sampler does not take is a
TypeError in Python and a one-line error at the CLI); fresh noise comes from `noise_fn(x)`, so callers
can seed it per image.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..diffusion import GaussianDiffusion
from ..objectives.views import Grid
from ..progress import tqdm

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _maybe_progress(steps, progress: bool, desc: str):
    return tqdm(steps, desc=desc, leave=False) if progress else steps


@torch.no_grad()
def ddpm_sample(diffusion: GaussianDiffusion, model_fn: ModelFn, x_T, y, *, noise_fn: NoiseFn, progress: bool = False,
                on_estimate: Callable[[torch.Tensor], None] | None = None):
    """Ancestral sampling with the learned variances (IDDPM); DiT's default with 250 respaced steps.
    `on_estimate(x̂0)`, when given, sees each step's prediction of the clean sample (it only reads)."""
    x = x_T
    for i in _maybe_progress(range(diffusion.num_timesteps - 1, -1, -1), progress, "DDPM"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        step = diffusion.p_sample(model_fn, x, t, model_kwargs={"y": y}, noise=noise_fn(x))
        if on_estimate is not None:
            on_estimate(step["pred_xstart"])
        x = step["sample"]
    return x


# ----------------------------------------------------------------------------------------------
# Samplers over a grid
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def ddim(grid: Grid, x, *, eta: float = 0.0, noise_fn: NoiseFn | None = None, progress: bool = False):
    """DDIM (Song et al. 2021, eq. 12) for x = α x0 + σ ε:

        x_next = α' x̂0 + sqrt(σ'² − s²) ε̂ + s z,   s = η σ' sqrt(1 − (α σ' / (α' σ))²)

    which for α² + σ² = 1 is the paper's σ_t(η); η = 0 is the deterministic (ODE) sampler and draws
    no noise, η = 1 is DDPM-like. The step onto the data point returns x̂0."""
    if eta > 0 and noise_fn is None:
        raise ValueError("DDIM with eta > 0 needs a noise_fn")
    alphas, sigmas = grid.alphas, grid.sigmas
    for k in _maybe_progress(range(len(alphas) - 1), progress, "DDIM"):
        x0, eps = grid.denoise(x, k)
        a, s, a_next, s_next = (float(v) for v in (alphas[k], sigmas[k], alphas[k + 1], sigmas[k + 1]))
        if s_next == 0:
            x = x0
            continue
        spread = eta * s_next * (max(0.0, 1 - (a * s_next / (a_next * s)) ** 2)) ** 0.5 if eta > 0 else 0.0
        x = a_next * x0 + (s_next**2 - spread**2) ** 0.5 * eps
        if spread > 0:
            x = x + spread * noise_fn(x)
    return x


@torch.no_grad()
def dpm_solver_pp_2m(grid: Grid, x, *, progress: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), data prediction, multistep.

    With λ = log(α/σ) and h = λ' − λ: x' = (σ'/σ) x − α' (e^{−h} − 1) D, where D is x̂0 on the first
    step and (1 + 1/(2r)) x̂0 − 1/(2r) x̂0_prev after it, r = h_prev / h. The step onto the data point
    returns x̂0. A grid that starts at pure noise (α = 0, the flow's t = 0) has h = ∞ there:
    e^{−h} = 0 and the step is x' = σ' x + α' x̂0, and the next one is first order (r = ∞)."""
    alphas, sigmas = grid.alphas, grid.sigmas
    lambdas = torch.log(alphas) - torch.log(sigmas)
    previous_x0, previous_h = None, None
    for k in _maybe_progress(range(len(alphas) - 1), progress, "DPM-Solver++(2M)"):
        x0, _ = grid.denoise(x, k)
        if float(sigmas[k + 1]) == 0:
            x = x0
            continue
        h = lambdas[k + 1] - lambdas[k]
        if previous_x0 is None:
            denoised = x0
        else:
            r = previous_h / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = ((sigmas[k + 1] / sigmas[k]) * x - alphas[k + 1] * torch.expm1(-h) * denoised).to(x.dtype)
        previous_x0, previous_h = x0, h
    return x
