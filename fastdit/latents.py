"""Latent spaces the diffusion model lives in.

* `VAELatentSpace`: the Stable Diffusion VAE (`stabilityai/sd-vae-ft-mse` or `-ema`, or a local
  diffusers folder) used by DiT: 8x spatial downsampling, 4 channels, latents multiplied by 0.18215
  so that they have roughly unit variance (Rombach et al. 2022; DiT section 3).
* `PixelSpace`: the identity, for small datasets trained directly on pixels (the digits demo).
* `fastdit.rae.space.RAELatentSpace` ("rae:..." names): a frozen representation encoder's normalised
  patch tokens, decoded by a ViT (Zheng et al. 2025, "Diffusion Transformers with Representation
  Autoencoders"): 768 channels on a 16x16 grid at 256 px.

All map images in [-1, 1] of shape (N, C, H, W) to model inputs and back, and say which `kind` of space
they are ("vae", "pixels", "rae"). `diffusers` is imported only when a VAE is actually used, transformers
only for an RAE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import FetchError, UserError, template_text
from .hub import hf_hub_unreachable, vae_fetch_advice
from .program import install_command
from .rae.space import is_rae_name

SD_VAE_SCALE = 0.18215
VAE_DOWNSAMPLE = 8
OFFICIAL_VAES = {"mse": "stabilityai/sd-vae-ft-mse", "ema": "stabilityai/sd-vae-ft-ema"}
VAE_CHOICES = "'mse', 'ema', a Hugging Face hub id (namespace/name) or a local diffusers AutoencoderKL folder"
PIXEL_SPACE_NAMES = ("", "none", "pixels")  # --vae values that mean "no VAE: the model works on pixels"


def latent_side(image_size: int, downsample: int = VAE_DOWNSAMPLE) -> int:
    """The model-input side for an image side; a UserError unless the VAE's factor divides it."""
    if image_size % downsample:
        nearest = max(downsample, image_size // downsample * downsample)
        raise UserError(
            f"image size {image_size} is not divisible by {downsample}, the VAE's downsampling factor; "
            f"use a multiple of {downsample} such as {nearest}"
        )
    return image_size // downsample


def check_image_size(vae: str | None, image_size: int) -> None:
    """Refuse, before anything is loaded, an image size the space `vae` cannot make: not a multiple of the
    SD VAE's factor, or not the size an RAE space decodes to. Pixel space takes any size."""
    if vae is None or vae in PIXEL_SPACE_NAMES:
        return
    if is_rae_name(vae):
        from .rae.space import check_image_size as check_rae_size

        check_rae_size(vae, image_size)
    else:
        latent_side(image_size)


@dataclass(frozen=True)
class PixelSpace:
    """Model directly on pixels in [-1, 1]."""

    channels: int = 3
    name: str = "pixels"
    scale_factor: float = 1.0
    downsample: int = 1
    kind = "pixels"
    deterministic = True

    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return images, torch.zeros_like(images)

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def latent_size(self, image_size: int) -> int:
        return image_size

    def to(self, device) -> "PixelSpace":
        return self


class VAELatentSpace:
    """The SD VAE through `diffusers.AutoencoderKL`; `scale_factor` maps posterior samples to unit variance."""

    downsample = VAE_DOWNSAMPLE
    kind = "vae"
    deterministic = False  # a posterior: mean and std are stored, a sample drawn at every read

    def __init__(self, vae, name: str, scale_factor: float = SD_VAE_SCALE):
        # Images in and out are RGB (the crops `extract` encodes, the uint8 images sampling writes): a
        # VAE made for other images would fail deep inside a convolution, or write wrong-channel images.
        image_channels = (int(vae.config.in_channels), int(vae.config.out_channels))
        if image_channels != (3, 3):
            raise UserError(f"VAE {name!r} encodes {image_channels[0]}-channel and decodes {image_channels[1]}-channel "
                            f"images; fastdit's images are RGB (3 channels): use an RGB VAE such as 'ema' or 'mse'")
        self.vae = vae.eval().requires_grad_(False)
        self.name = name
        self.scale_factor = scale_factor
        self.channels = int(vae.config.latent_channels)

    def to(self, device) -> "VAELatentSpace":
        self.vae.to(device)
        return self

    @torch.no_grad()
    def encode_moments(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and std of q(z | image), already multiplied by the scale factor."""
        posterior = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return posterior.mean * self.scale_factor, posterior.std * self.scale_factor

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latents.to(self.vae.dtype) / self.scale_factor).sample.float()

    def latent_size(self, image_size: int) -> int:
        return latent_side(image_size, self.downsample)


def check_latent_channels(space, model_channels: int, *, what: str = "the model") -> None:
    """The latent space makes the inputs `what` takes: a VAE with 16 latent channels (SD3's) cannot decode
    what a 4-channel DiT samples, and would fail inside its first convolution."""
    if space.channels != model_channels:
        noun, fix = ("RAE latent space", "space") if space.kind == "rae" else ("VAE", "VAE")
        raise UserError(f"the {noun} {space.name!r} has {space.channels} latent channels but {what} works on "
                        f"{model_channels}; use the {fix} it was trained with")


def load_latent_space(name: str | None, *, channels: int | None = None, device: str | torch.device = "cpu"):
    """`None`/"pixels" -> PixelSpace of `channels` channels; "mse"/"ema" -> the official SD VAEs; "rae:..."
    -> an RAE latent space (`fastdit.rae.space`); else a hub id or local folder.

    Pixel space has no channel count of its own: it is the model's (`info.config.in_channels`; 1 for the
    digits), so it must be given rather than guessed.
    """
    if name is None or name in PIXEL_SPACE_NAMES:
        if channels is None:
            raise UserError(
                f"pixel space ({name!r}) takes the model's channel count: pass channels=info.config.in_channels "
                "(1 for the digits, 3 for RGB)"
            )
        return PixelSpace(channels=channels)
    if is_rae_name(name):
        from .rae.space import load_rae_space

        return load_rae_space(name, device=device)
    repo = OFFICIAL_VAES.get(name, name)
    return VAELatentSpace(load_vae(repo), name=repo).to(device)


def load_vae(repo_or_folder: str):
    """Load an `AutoencoderKL` from a local folder or the Hugging Face cache, with a clear offline error."""
    try:
        from diffusers import AutoencoderKL
    except ImportError:
        raise UserError(f"the VAE needs the 'diffusers' package: {install_command('vae')}") from None
    if Path(repo_or_folder).is_dir():
        try:
            return _from_pretrained(AutoencoderKL, repo_or_folder)
        except (OSError, ValueError) as err:
            raise UserError(
                f"VAE folder {repo_or_folder!r} is not a diffusers AutoencoderKL folder ({err}); --vae takes "
                f"{VAE_CHOICES}"
            ) from None
    if os.path.exists(repo_or_folder):
        raise UserError(f"VAE {repo_or_folder!r} is a file; --vae takes {VAE_CHOICES}")
    if not _is_hub_id(repo_or_folder):  # so it can only have meant a local folder
        raise UserError(f"VAE folder {repo_or_folder!r} does not exist; --vae takes {VAE_CHOICES}")
    # The cache first, without the network; then one look at the hub, so that an offline machine fails
    # in seconds rather than after huggingface_hub's retries; then one download.
    try:
        return _from_pretrained(AutoencoderKL, repo_or_folder, local_files_only=True)
    except Exception:  # noqa: BLE001 - not (or not wholly) cached: diffusers raises OSError or ValueError
        pass
    fetch = f"{vae_fetch_advice(repo_or_folder)}. {{vae}} takes {template_text(VAE_CHOICES)}"
    unreachable = hf_hub_unreachable()
    if unreachable is not None:
        raise FetchError(template_text(f"the VAE {repo_or_folder!r} is not in the Hugging Face cache and the hub cannot "
                                       f"be reached ({unreachable}). ") + fetch, "vae")
    try:
        return _from_pretrained(AutoencoderKL, repo_or_folder)
    except Exception as err:  # noqa: BLE001 - hub errors have many types (404, auth, HTTP)
        raise FetchError(template_text(
            f"could not load the VAE {repo_or_folder!r} from the Hugging Face hub ({type(err).__name__}: "
            f"{_first_line(err)}), and no local folder of that name exists. ") + fetch, "vae") from None


def _from_pretrained(cls, repo: str, **options):
    import warnings

    from diffusers.utils import is_accelerate_available

    if not is_accelerate_available():
        # What diffusers falls back to without accelerate, asked for: it then loads the same way without
        # a multi-line tip to install accelerate before fastdit's own lines.
        options.setdefault("low_cpu_mem_usage", False)
    with warnings.catch_warnings():
        # diffusers passes an argument that huggingface_hub >= 0.23 ignores and warns about on every load
        warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
        return cls.from_pretrained(repo, **options)


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no message"


def _is_hub_id(name: str) -> bool:
    """Whether `name` is spelled like a hub repository id ("name" or "namespace/name")."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True

