"""Samplers over one contract: `model_fn(x, t, y) -> output`, with t on the original 0..999 scale and
output = ε (C channels) followed, for learned variance, by C variance values.

Each sampler takes the (respaced) `GaussianDiffusion` for its schedule and steps, the starting noise
x_T, labels and a `noise_fn(x) -> N(0, I) like x` for any fresh noise (so a caller can seed noise per
image), and returns x_0. Faster samplers are plain functions with the same signature.
"""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from ..diffusion import GaussianDiffusion
from ..errors import UserError

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
NoiseFn = Callable[[torch.Tensor], torch.Tensor]


def _steps(diffusion: GaussianDiffusion, progress: bool, desc: str):
    indices = range(diffusion.num_timesteps - 1, -1, -1)
    return tqdm(indices, desc=desc, leave=False) if progress else indices


@torch.no_grad()
def ddpm_sample(diffusion, model_fn: ModelFn, x_T, y, noise_fn: NoiseFn = torch.randn_like, progress=False, **_):
    """Ancestral sampling with the learned variances (IDDPM); DiT's default with 250 respaced steps."""
    x = x_T
    for i in _steps(diffusion, progress, "DDPM"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        x = diffusion.p_sample(model_fn, x, t, model_kwargs={"y": y}, noise=noise_fn(x))["sample"]
    return x


@torch.no_grad()
def ddim_sample(diffusion, model_fn: ModelFn, x_T, y, noise_fn: NoiseFn = torch.randn_like, progress=False, eta=0.0, **_):
    """DDIM (Song et al. 2021); deterministic for eta = 0, where no noise is drawn at all."""
    x = x_T
    for i in _steps(diffusion, progress, "DDIM"):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        noise = noise_fn(x) if eta > 0 else torch.zeros_like(x)
        x = diffusion.ddim_sample(model_fn, x, t, model_kwargs={"y": y}, eta=eta, noise=noise)["sample"]
    return x


@torch.no_grad()
def dpm_solver_pp_2m_sample(diffusion, model_fn: ModelFn, x_T, y, progress=False, **_):
    """DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2) on the respaced timesteps, data prediction.

    With λ = log(α/σ) and h_k = λ_{k} − λ_{k−1}: x_k = (σ_k/σ_{k−1}) x_{k−1} − α_k (e^{−h_k} − 1) D_k,
    where D_k is x̂_0 for the first step and the second-order combination
    (1 + 1/(2r)) x̂_0(k−1) − 1/(2r) x̂_0(k−2), r = h_{k−1}/h_k, afterwards. The last step lands on
    the prediction x̂_0 at the smallest timestep.
    """
    alphas_cumprod = torch.from_numpy(diffusion.alphas_cumprod).to(x_T.device)
    x = x_T
    order = list(range(diffusion.num_timesteps - 1, -1, -1))
    previous_x0, previous_h = None, None
    iterator = tqdm(order, desc="DPM-Solver++(2M)", leave=False) if progress else order
    for position, i in enumerate(iterator):
        t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
        output = model_fn(x, diffusion.original_timesteps(t), y)
        x0 = diffusion.p_mean_variance_from_output(output, x, t)["pred_xstart"]
        if position == len(order) - 1:
            x = x0
            break
        j = order[position + 1]
        a_now, a_next = alphas_cumprod[i], alphas_cumprod[j]
        alpha_now, sigma_now = a_now.sqrt(), (1 - a_now).sqrt()
        alpha_next, sigma_next = a_next.sqrt(), (1 - a_next).sqrt()
        h = torch.log(alpha_next / sigma_next) - torch.log(alpha_now / sigma_now)
        if previous_x0 is None:
            denoised = x0
        else:
            r = previous_h / h
            denoised = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = ((sigma_next / sigma_now) * x - alpha_next * torch.expm1(-h) * denoised).to(x.dtype)
        previous_x0, previous_h = x0, h
    return x


SAMPLERS = {"ddpm": ddpm_sample, "ddim": ddim_sample, "dpm++2m": dpm_solver_pp_2m_sample}


def get_sampler(name: str):
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]
