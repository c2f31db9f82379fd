"""From labels to uint8 images: noise -> the process's sampler (with guidance) -> decode -> pixels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from ..diffusion import create_diffusion
from ..compile import compile_blocks
from ..errors import UserError
from ..precision import PRECISIONS, autocast
from ..process import ProcessSpec
from .flow import FLOW_SAMPLERS, SIT_LAST_STEP_SIZE, STOCHASTIC_FLOW_SAMPLERS, VelocityModel, time_grid
from .guidance import ClassifierFreeGuidance
from .noise import PerImageNoise
from .samplers import ddim, ddpm_sample, dpm_solver_pp_2m, flow_grid, gaussian_grid


@dataclass
class SamplingOptions:
    sampler: str | None = None  # None: the process's own (DDPM for DiT, SDE Euler for SiT/flow)
    # DDPM: respaced steps = model calls per image. Flow samplers: grid points, as SiT counts them
    # (Euler/Heun take num_steps − 1 steps; the SDEs stop at 1 − 0.04 and add the "Mean" last step).
    num_steps: int = 250
    cfg_scale: float = 4.0
    # None guides every ε/velocity channel; 3 is the official DiT/SiT behaviour (paper FID 2.27 at cfg 1.5).
    guided_channels: int | None = None
    # Guide only where the process's time lies in [low, high] (DDPM timesteps 0..999, flow time 0..1).
    guidance_interval: tuple[float, float] | None = None
    eta: float = 0.0  # DDIM only
    time_shift: float = 1.0  # flow only: t' = t / (t + s (1 − t)); s > 1 spends more steps near the noise
    # The model's forward under autocast ("bf16", "fp16"); the sampler's arithmetic stays float32.
    precision: str = "fp32"

    def resolved_sampler(self, process: ProcessSpec) -> str:
        return self.sampler or process.default_sampler

    def validate(self, process: ProcessSpec) -> None:
        sampler = self.resolved_sampler(process)
        process.check_sampler(sampler)
        # At least 2: the respaced process needs a step 1 to define the clipped posterior variance, and
        # a flow grid needs two points.
        if self.num_steps < 2 or self.num_steps > 1000:
            raise UserError(f"number of sampling steps must be in [2, 1000], got {self.num_steps}")
        for name in ("cfg_scale", "eta", "time_shift"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"{name.replace('_', ' ')} must be a finite number, got {getattr(self, name)}")
        if self.cfg_scale < 1.0:
            raise UserError(f"cfg scale {self.cfg_scale} < 1 makes no sense; use 1.0 for no guidance, or a value > 1")
        if self.eta != 0.0 and sampler != "ddim":
            raise UserError(f"eta is an option of the ddim sampler only, not of {sampler!r}")
        if not 0.0 <= self.eta <= 1.0:
            raise UserError(f"DDIM eta must be in [0, 1], got {self.eta}")
        if self.time_shift != 1.0 and process.objective != "flow":
            raise UserError("a time shift applies to flow models only; leave it at 1 for a DDPM model")
        if not self.time_shift > 0:
            raise UserError(f"time shift must be > 0, got {self.time_shift}")
        process.check_guidance_interval(self.guidance_interval)
        if self.precision not in PRECISIONS:
            raise UserError(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")


def check_labels(labels, num_classes: int) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if bad.numel():
        raise UserError(f"class label {int(bad[0])} is outside [0, {num_classes}); pick labels from 0 to {num_classes - 1}")
    return labels


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8 exactly as DiT's sample_ddp.py converts samples:
    clamp(127.5 x + 128, 0, 255), then truncation (i.e. rounding half up of 127.5 (x + 1))."""
    images = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def in_precision(model, precision: str):
    """`model(x, t, y)` with its forward under autocast and its output cast back to float32, so that
    guidance and the sampler's updates of x_t (and the noise added to it) stay float32: the ε or
    velocity is rounded once to half precision, the state is not rounded at every step."""
    if precision == "fp32":
        return model

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, precision):
            output = model(x, t, y)
        return output.float()

    return forward


@torch.no_grad()
def sample_latents(
    model, labels: torch.Tensor, *, process: ProcessSpec, options: SamplingOptions, noise: PerImageNoise,
    progress: bool = False,
) -> torch.Tensor:
    """Run the process's sampler from noise to latents (N, C, H, W) for these labels."""
    config = model.config
    sampler = options.resolved_sampler(process)
    model_fn = in_precision(model, options.precision)
    if options.cfg_scale > 1.0:
        if config.class_dropout_prob <= 0:
            raise UserError("this model has no null class (trained without label dropout); use --cfg-scale 1")
        model_fn = ClassifierFreeGuidance(
            model_fn, options.cfg_scale, config.null_class, config.in_channels, options.guided_channels,
            interval=options.guidance_interval,
        )
    x = noise.draw((config.in_channels, config.input_size, config.input_size))
    if process.objective == "ddpm":
        diffusion = create_diffusion(str(options.num_steps), learn_sigma=config.learn_sigma)
        if sampler == "ddpm":
            return ddpm_sample(diffusion, model_fn, x, labels, noise_fn=noise, progress=progress)
        grid = gaussian_grid(diffusion, model_fn, labels)
    elif sampler in FLOW_SAMPLERS:
        stochastic = sampler in STOCHASTIC_FLOW_SAMPLERS
        times = time_grid(options.num_steps, end=1 - SIT_LAST_STEP_SIZE if stochastic else 1.0,
                          shift=options.time_shift, device=x.device)
        extra = {"noise_fn": noise} if stochastic else {}
        if sampler != "dopri5":
            extra["progress"] = progress
        return FLOW_SAMPLERS[sampler](VelocityModel(model_fn), x, times, cond={"y": labels}, **extra)
    else:  # DDIM / DPM-Solver++ on the flow's grid of num_steps model calls
        grid = flow_grid(model_fn, labels, time_grid(options.num_steps + 1, shift=options.time_shift))
    if sampler == "ddim":
        return ddim(grid, x, eta=options.eta, noise_fn=noise, progress=progress)
    return dpm_solver_pp_2m(grid, x, progress=progress)


@torch.no_grad()
def generate(
    model,
    latent_space,
    labels,
    *,
    options: SamplingOptions,
    process: ProcessSpec,
    seed: int = 0,
    indices=None,
    device: str | torch.device = "cpu",
    progress: bool = False,
    compile: bool = False,
) -> np.ndarray:
    """Sample one image per label with the model's `process` (from `load_model`'s info, or the training
    config); image k uses noise seeded by (seed, indices[k]) (default k). `compile=True` compiles the
    model's blocks in place (`fastdit.compile.compile_blocks`; the first call pays the compilation)."""
    options.validate(process)
    if compile:
        compile_blocks(model)
    labels = check_labels(labels, model.config.num_classes).to(device)
    indices = list(range(len(labels))) if indices is None else list(indices)
    noise = PerImageNoise(seed, indices, device)
    latents = sample_latents(model, labels, process=process, options=options, noise=noise, progress=progress)
    return to_uint8(latent_space.decode(latents))
