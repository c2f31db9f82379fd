"""Steps of the official IDDPM/DiT code (guided_diffusion/gaussian_diffusion.py) that fastdit's samplers
do not use, written over a `fastdit.diffusion.GaussianDiffusion` for the tests that compare against them.

fastdit samples DDIM through `fastdit.sampling.ddim` on a grid of (α, σ) scalars; the official per-step
form lives here so that the package holds only code it runs, while the parity tests still reproduce the
official arithmetic (coefficients gathered in float64 and cast to the data's dtype, as the fixtures'
README describes).
"""

from __future__ import annotations

import torch


def ddim_step(diffusion, model, x, t, clip_denoised: bool = False, model_kwargs: dict | None = None,
              eta: float = 0.0, noise=None) -> dict[str, torch.Tensor]:
    """One DDIM step x_t -> x_{t−1} (Song et al. 2021, eq. 12), as the official `ddim_sample`: eta = 0 is
    deterministic, eta = 1 is DDPM-like. Like the official step it draws `randn_like(x)` when no noise
    is given, even at eta = 0 (where σ = 0 multiplies it), so the global generator advances alike."""
    out = diffusion.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
    eps = diffusion.predict_eps_from_xstart(x, t, out["pred_xstart"])
    alpha_bar = diffusion._extract(diffusion.alphas_cumprod, t, x.shape, x.dtype)
    alpha_bar_prev = diffusion._extract(diffusion.alphas_cumprod_prev, t, x.shape, x.dtype)
    sigma = eta * torch.sqrt((1 - alpha_bar_prev) / (1 - alpha_bar)) * torch.sqrt(1 - alpha_bar / alpha_bar_prev)
    if noise is None:
        noise = torch.randn_like(x)
    mean_pred = out["pred_xstart"] * torch.sqrt(alpha_bar_prev) + torch.sqrt(1 - alpha_bar_prev - sigma**2) * eps
    nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return {"sample": mean_pred + nonzero * sigma * noise, "pred_xstart": out["pred_xstart"]}
