"""The Gaussian diffusion process DiT trains and samples with (IDDPM, Nichol & Dhariwal 2021).

ε-prediction, learned-range variance, loss = MSE(ε) + L_vlb with the mean detached inside the VLB
term (IDDPM section 3.1, "L_hybrid" with λ = 1 as DiT uses), and respacing: a process built on a
subset of the 1000 training timesteps, whose model calls receive the ORIGINAL timestep
(`timestep_map[t]`), so one network serves every respaced process.

Numerics follow the reference code: every schedule array is float64, each per-timestep coefficient
is gathered then cast to the data's dtype before multiplying (this matters at the 1e-7 level).

Model contract: `model(x_t, t_original, **model_kwargs) -> (N, C or 2C, H, W)`.
"""

from __future__ import annotations

import enum
from typing import Callable

import numpy as np
import torch

from ..errors import UserError
from .losses import discretized_gaussian_log_likelihood, mean_flat, normal_kl
from .schedule import named_betas, respace_betas, space_timesteps


class VarianceType(enum.Enum):
    LEARNED_RANGE = "learned_range"  # the model interpolates between β_t and β̃_t in log space
    FIXED_LARGE = "fixed_large"  # σ² = β_t (β̃_1 at t = 0)
    FIXED_SMALL = "fixed_small"  # σ² = β̃_t, the posterior variance


class GaussianDiffusion:
    def __init__(self, betas: np.ndarray, variance_type: VarianceType, timestep_map: np.ndarray | None = None):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        self.variance_type = variance_type
        self.num_timesteps = len(betas)
        self.timestep_map = np.arange(len(betas)) if timestep_map is None else np.asarray(timestep_map)

        self.betas = betas
        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        # q(x_t | x_0) = N(sqrt(ᾱ_t) x_0, (1 − ᾱ_t) I)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        # q(x_{t−1} | x_t, x_0) = N(coef1 x_0 + coef2 x_t, β̃_t I)   (DDPM eq. 6–7)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # β̃_0 = 0: its log is clipped to the value at t = 1.
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        self._timestep_map_tensor = torch.from_numpy(self.timestep_map.astype(np.int64))

    @property
    def learn_sigma(self) -> bool:
        return self.variance_type is VarianceType.LEARNED_RANGE

    # ------------------------------------------------------------------------------------------
    # helpers
    # ------------------------------------------------------------------------------------------

    @staticmethod
    def _extract(array: np.ndarray, t: torch.Tensor, shape: torch.Size, dtype=torch.float32) -> torch.Tensor:
        """array[t] as a (N, 1, 1, ...) tensor of `dtype`: gathered in float64, then cast."""
        values = torch.from_numpy(array).to(device=t.device)[t].to(dtype)
        return values.reshape(-1, *([1] * (len(shape) - 1)))

    def original_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Indices of this (possibly respaced) process -> timesteps of the 1000-step training process."""
        return self._timestep_map_tensor.to(t.device)[t]

    def _call_model(self, model: Callable, x: torch.Tensor, t: torch.Tensor, model_kwargs: dict | None):
        return model(x, self.original_timesteps(t), **(model_kwargs or {}))

    # ------------------------------------------------------------------------------------------
    # forward process
    # ------------------------------------------------------------------------------------------

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            self._extract(self.sqrt_alphas_cumprod, t, x_start.shape, x_start.dtype) * x_start
            + self._extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.shape, x_start.dtype) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        shape, dtype = x_t.shape, x_t.dtype
        mean = (
            self._extract(self.posterior_mean_coef1, t, shape, dtype) * x_start
            + self._extract(self.posterior_mean_coef2, t, shape, dtype) * x_t
        )
        variance = self._extract(self.posterior_variance, t, shape, dtype)
        log_variance = self._extract(self.posterior_log_variance_clipped, t, shape, dtype)
        return mean, variance, log_variance

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        shape, dtype = x_t.shape, x_t.dtype
        return (
            self._extract(self.sqrt_recip_alphas_cumprod, t, shape, dtype) * x_t
            - self._extract(self.sqrt_recipm1_alphas_cumprod, t, shape, dtype) * eps
        )

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        shape, dtype = x_t.shape, x_t.dtype
        return (self._extract(self.sqrt_recip_alphas_cumprod, t, shape, dtype) * x_t - pred_xstart) / self._extract(
            self.sqrt_recipm1_alphas_cumprod, t, shape, dtype
        )

    # ------------------------------------------------------------------------------------------
    # reverse process
    # ------------------------------------------------------------------------------------------

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = False
    ) -> dict[str, torch.Tensor]:
        """p(x_{t−1} | x_t) from a model output (ε, and v for learned-range variance)."""
        C = x.shape[1]
        shape, dtype = x.shape, x.dtype
        if self.variance_type is VarianceType.LEARNED_RANGE:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"a learned-variance model must output {2 * C} channels, got {model_output.shape[1]}")
            eps, var_values = model_output.split(C, dim=1)
            # IDDPM eq. 15: log σ² = v log β_t + (1 − v) log β̃_t, with v = (output + 1) / 2.
            min_log = self._extract(self.posterior_log_variance_clipped, t, shape, dtype)
            max_log = self._extract(np.log(self.betas), t, shape, dtype)
            frac = (var_values + 1) / 2
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output[:, :C]
            if self.variance_type is VarianceType.FIXED_LARGE:
                fixed = np.append(self.posterior_variance[1], self.betas[1:])
                variance = self._extract(fixed, t, shape, dtype)
                log_variance = self._extract(np.log(fixed), t, shape, dtype)
            else:
                variance = self._extract(self.posterior_variance, t, shape, dtype)
                log_variance = self._extract(self.posterior_log_variance_clipped, t, shape, dtype)
            variance = variance.expand(shape)
            log_variance = log_variance.expand(shape)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {"mean": mean, "variance": variance, "log_variance": log_variance, "pred_xstart": pred_xstart, "eps": eps}

    def p_mean_variance(self, model, x, t, clip_denoised: bool = False, model_kwargs: dict | None = None):
        return self.p_mean_variance_from_output(self._call_model(model, x, t, model_kwargs), x, t, clip_denoised)

    def p_sample(self, model, x, t, clip_denoised: bool = False, model_kwargs: dict | None = None, noise=None):
        """One ancestral step x_t -> x_{t−1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, clip_denoised, model_kwargs)
        if noise is None:
            noise = torch.randn_like(x)
        nonzero = (t != 0).to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    # ------------------------------------------------------------------------------------------
    # training
    # ------------------------------------------------------------------------------------------

    def _vb_terms_bpd(self, model_output, x_start, x_t, t, clip_denoised: bool = False) -> torch.Tensor:
        """L_{t−1} = KL(q(x_{t−1}|x_t,x_0) ‖ p(x_{t−1}|x_t)) in bits per dim; at t = 0 the decoder NLL."""
        true_mean, _, true_log_variance = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised)
        kl = mean_flat(normal_kl(true_mean, true_log_variance, out["mean"], out["log_variance"])) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, means=out["mean"], log_scales=0.5 * out["log_variance"])
        nll = mean_flat(nll) / np.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x_start, t, model_kwargs: dict | None = None, noise=None) -> dict[str, torch.Tensor]:
        """Per-sample `loss`, `mse` and (learned variance) `vb` for given timesteps and noise."""
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)
        return self.losses_from_output(self._call_model(model, x_t, t, model_kwargs), x_start, x_t, t, noise)

    def losses_from_output(self, model_output, x_start, x_t, t, noise) -> dict[str, torch.Tensor]:
        """The loss terms of `training_losses` from the model's output at (x_t, t)."""
        C = x_t.shape[1]
        terms = {}
        if self.learn_sigma:
            eps, var_values = model_output.split(C, dim=1)
            # The VLB trains only the variance: the ε half is detached so the mean is learned by the
            # MSE alone (IDDPM section 3.1).
            frozen = torch.cat([eps.detach(), var_values], dim=1)
            terms["vb"] = self._vb_terms_bpd(frozen, x_start, x_t, t)
        else:
            eps = model_output
        terms["mse"] = mean_flat((noise - eps) ** 2)
        terms["loss"] = terms["mse"] + terms["vb"] if "vb" in terms else terms["mse"]
        return terms


def create_diffusion(
    timestep_respacing: str | int | None = "",
    noise_schedule: str = "linear",
    learn_sigma: bool = True,
    sigma_small: bool = False,
    diffusion_steps: int = 1000,
) -> GaussianDiffusion:
    """The DiT diffusion: 1000 linear steps, learned-range variance; `timestep_respacing` "" for the
    training process, "250" / "ddim50" / "10,20,30" for sampling."""
    if diffusion_steps < 2:
        raise UserError(f"diffusion_steps must be >= 2, got {diffusion_steps}")
    betas = named_betas(noise_schedule, diffusion_steps)
    if learn_sigma:
        variance = VarianceType.LEARNED_RANGE
    else:
        variance = VarianceType.FIXED_SMALL if sigma_small else VarianceType.FIXED_LARGE
    kept = space_timesteps(diffusion_steps, timestep_respacing if timestep_respacing not in (None,) else "")
    if len(kept) == diffusion_steps:
        return GaussianDiffusion(betas, variance)
    return GaussianDiffusion(respace_betas(betas, kept), variance, timestep_map=np.array(kept))
