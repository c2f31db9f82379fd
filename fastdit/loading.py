"""Load a model ready to sample, from plain arguments: the one path shared by the CLI, the app and the notebook.

Everything cheap is checked before anything heavy (a download, the weights, the VAE), and the messages
name values, not command-line flags: each caller words its own edge.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from .errors import UserError
from .sampling import SamplingOptions


class LoadedModel(NamedTuple):
    model: torch.nn.Module
    info: object  # model_info.ModelInfo: config, latent space, objective
    latent_space: object  # decodes latents to pixels (VAELatentSpace, PixelSpace or rae.RAELatentSpace)
    device: torch.device


def official_checkpoint_name(model_name: str | None, image_size: int | None) -> str:
    """The released file for `model_name` (default DiT-XL/2) at `image_size` (default 256), e.g.
    SiT-XL/2 -> SiT-XL-2-256x256.pt; a model that was never released is refused."""
    from .hub import OFFICIAL_CHECKPOINTS, official_dit_name

    model_name, image_size = model_name or "DiT-XL/2", image_size or 256
    name = official_dit_name(model_name, image_size)
    if name not in OFFICIAL_CHECKPOINTS:
        released = ", ".join(f"{m} at {s}" for m, s in OFFICIAL_CHECKPOINTS.values())
        raise UserError(f"no official weights for {model_name} at {image_size}px (released: {released}); "
                        "use a local checkpoint instead")
    return name


def load_for_sampling(
    source: str | None = None,
    *,
    model_name: str | None = None,
    image_size: int | None = None,
    num_classes: int | None = None,
    vae: str | None = None,
    objective: str | None = None,
    device: str | torch.device = "auto",
    options: SamplingOptions | Callable[[object], SamplingOptions] | None = None,
) -> LoadedModel:
    """(model, info, latent space, device) for a checkpoint path, or, with `source=None`, the official
    weights of `model_name` at `image_size` (downloaded on first use). `options`, when given, are checked
    against the model's objective before the VAE is loaded; a callable is given the model's info first
    and returns them (the command line's: a recipe resolved with the checkpoint's own and checked,
    `fastdit.cli.common.RecipePlan.options_for`). See `checkpoint.load_model` for the rest."""
    from .checkpoint import load_model
    from .devices import resolve_device
    from .latents import check_image_size, check_latent_channels, load_latent_space

    device = resolve_device(device) if isinstance(device, str) else device
    if image_size is not None and image_size <= 0:
        raise UserError(f"image size must be positive, got {image_size}")
    if num_classes is not None and num_classes < 1:
        raise UserError(f"number of classes must be >= 1, got {num_classes}")
    if source is None:
        source = official_checkpoint_name(model_name, image_size)
    if vae is not None and image_size is not None:
        check_image_size(vae, image_size)  # before loading anything: the VAE's factor must divide the size,
        # an RAE space makes one size
    model, info = load_model(source, model_name=model_name, image_size=image_size, num_classes=num_classes,
                             vae=vae, objective=objective, device=device)
    if callable(options):
        options = options(info)
    if options is not None:
        options.validate(info.objective)  # at once for options the callable checked
        if options.guidance_model is not None and options.cfg_scale > 1:  # AutoGuidance: its weaker model, checked
            from .checkpoint import load_guidance_model

            options.attach_guidance_network(load_guidance_model(options.guidance_model, info, vae=vae, device=device))
    name = None if info.latent.kind == "pixels" else (vae or info.latent.vae)
    latent_space = load_latent_space(name, channels=info.config.in_channels, device=device)
    if name is not None:
        check_latent_channels(latent_space, info.config.in_channels, what=f"the model {str(source)!r}")
    return LoadedModel(model, info, latent_space, device)
