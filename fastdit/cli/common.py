"""Arguments and checks shared by the sampling subcommands (`sample`, `sample-ddp`, `demo`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError
from ..io import check_can_create
from ..precision import PRECISIONS, precision_warning
from .arg_types import finite_float, seed
from ..objectives import objective_names
from ..sampling import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, SamplingOptions, sampler_names, samplers_by_objective
from ..sampling.guidance import OFFICIAL_GUIDED_CHANNELS

OFFICIAL_CLASS_LABELS = [207, 360, 387, 974, 88, 979, 417, 279]


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model", default=None,
                       help="preset name, e.g. DiT-XL/2 (default for official weights), SiT-XL/2 (the official SiT weights), "
                            "DiT-B/4; read from --ckpt when it records it")
    group.add_argument("--image-size", type=int, default=None,
                       help="image side in pixels (official models: 256 or 512; default: 256, or what the checkpoint records)")
    group.add_argument("--num-classes", type=int, default=None, help="number of classes (default: 1000, or what the checkpoint records)")
    group.add_argument("--ckpt", default=None,
                       help="a .pt/.safetensors file or training checkpoint; default: the official DiT-XL-2-<size>.pt, downloaded on first use")
    group.add_argument("--vae", default=None, help="mse (default for official models), ema, a local diffusers AutoencoderKL folder, "
                            "or pixels for a model trained on pixels (needed only for plain state dicts)")
    group.add_argument("--objective", choices=objective_names(), default=None,
                       help="what a plain state dict was trained for: ddpm (DiT), flow (SiT), ...; checkpoints and "
                            "official weights record it")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")


def add_sampling_arguments(parser: argparse.ArgumentParser, cfg_default: float = OFFICIAL_CFG_SCALE) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--sampler", choices=sampler_names(), default=None,
                       help="default: the model's own (ddpm for DiT, sde-euler for SiT/flow, meanflow for MeanFlow); "
                            + "; ".join(f"{k} models: {', '.join(v)}" for k, v in samplers_by_objective().items()))
    group.add_argument("--num-sampling-steps", type=int, default=OFFICIAL_NUM_STEPS,
                       help="DDPM and DDIM/DPM-Solver++: model calls; flow ODE/SDE samplers: grid points, as SiT counts "
                            f"them; meanflow: steps of one call each, 1 the least (default: {OFFICIAL_NUM_STEPS})")
    group.add_argument("--cfg-scale", type=finite_float, default=cfg_default,
                       help=f"classifier-free guidance scale; 1 disables guidance (default: {cfg_default})")
    group.add_argument("--official-guidance", action="store_true",
                       help=f"guide only the first {OFFICIAL_GUIDED_CHANNELS} channels of the model's whole output, as the "
                            "official DiT/SiT code does (model_out[:, :3], for any number of channels; use with "
                            "--cfg-scale 1.5 to reproduce the paper's FID 2.27)")
    group.add_argument("--guidance-interval", type=finite_float, nargs=2, metavar=("LOW", "HIGH"), default=None,
                       help="guide only where the model's time is in [LOW, HIGH] (DDPM timesteps 0..999, flow time "
                            "0 noise..1 data); elsewhere one conditional forward (default: every step)")
    group.add_argument("--time-shift", type=finite_float, default=1.0,
                       help="flow models: warp the time grid toward the noise end, t' = t / (t + s (1 - t)) (default: 1, none)")
    group.add_argument("--eta", type=finite_float, default=0.0, help="DDIM eta (default: 0, deterministic)")
    group.add_argument("--seed", type=seed, default=0, help="seed of the noise (and of uniform labels); an integer >= 0 (default: 0)")
    group.add_argument("--precision", choices=PRECISIONS, default="fp32",
                       help="the model's forward under autocast (bf16, fp16: faster on GPUs, rounds differently); "
                            "the sampler's arithmetic stays float32 (default: fp32)")
    group.add_argument("--compile", action="store_true",
                       help="torch.compile each transformer block (the first batch pays the compilation)")


def sampling_options(args: argparse.Namespace) -> SamplingOptions:
    options = SamplingOptions(
        sampler=args.sampler,
        num_steps=args.num_sampling_steps,
        cfg_scale=args.cfg_scale,
        guided_channels=OFFICIAL_GUIDED_CHANNELS if args.official_guidance else None,
        guidance_interval=tuple(args.guidance_interval) if args.guidance_interval else None,
        eta=args.eta,
        time_shift=args.time_shift,
        precision=args.precision,
    )
    return options  # checked against the model's objective once it is known (`load_for_sampling`)


def warn_if_slow(device, precision: str) -> None:
    """One line on stderr when `precision` is slower than fp32 on `device` (`fastdit.precision`)."""
    warning = precision_warning(device, precision)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)


def check_output_file(path: str, suffixes: tuple[str, ...]) -> Path:
    """Fail before any work if `path` cannot be written (so nothing is computed for nothing)."""
    out = Path(path)
    if out.suffix.lower() not in suffixes:
        raise UserError(f"output {path!r} should end in {' or '.join(suffixes)}")
    if out.is_dir():
        raise UserError(f"output {path!r} is a folder; give a file name")
    check_can_create(out.parent if str(out.parent) else Path("."))
    return out


def load_for_sampling(args: argparse.Namespace, options: SamplingOptions | None = None):
    """(model, info, latent space, device) for the model flags (`fastdit.loading.load_for_sampling`);
    `options` are checked against the model's objective before the VAE is loaded."""
    from ..loading import load_for_sampling as load

    return load(args.ckpt, model_name=args.model, image_size=args.image_size, num_classes=args.num_classes,
                vae=args.vae, objective=args.objective, device=args.device, options=options)
