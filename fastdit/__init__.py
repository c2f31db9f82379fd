"""fastdit: class-conditional Diffusion Transformers (DiT) — official-exact models, fast training,
sampling and built-in evaluation.

    import fastdit
    model = fastdit.build_model("DiT-XL/2", input_size=32, num_classes=1000)
    model, info = fastdit.load_model("DiT-XL-2-256x256.pt")      # official weights, downloaded once
    diffusion = fastdit.create_diffusion("250")
"""

from .checkpoint import LatentInfo, ModelInfo, export_weights, load_model
from .diffusion import GaussianDiffusion, create_diffusion
from .errors import DownloadError, UserError
from .latents import PixelSpace, VAELatentSpace, load_latent_space
from .models import PRESETS, DiT, DiTConfig, build_model
from .sampling import SAMPLERS, ClassifierFreeGuidance, SamplingOptions, generate, get_sampler

__version__ = "0.1.0"

__all__ = [
    "PRESETS",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DiT",
    "DiTConfig",
    "DownloadError",
    "GaussianDiffusion",
    "LatentInfo",
    "ModelInfo",
    "PixelSpace",
    "SamplingOptions",
    "UserError",
    "VAELatentSpace",
    "build_model",
    "create_diffusion",
    "export_weights",
    "generate",
    "get_sampler",
    "load_latent_space",
    "load_model",
]
