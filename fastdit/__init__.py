"""fastdit: class-conditional Diffusion Transformers (DiT) — official-exact models, fast training,
sampling and built-in evaluation.

    import fastdit
    model = fastdit.build_model("DiT-XL/2", input_size=32, num_classes=1000)
    model, info = fastdit.load_model("DiT-XL-2-256x256.pt")      # official weights, downloaded once
    images = fastdit.generate(model, latent_space, labels, options=fastdit.SamplingOptions(), process=info.process)
    diffusion = fastdit.create_diffusion("250")                   # DiT's process; FlowMatching() is SiT's
"""

from .checkpoint import export_weights, load_model
from .diffusion import FlowMatching, GaussianDiffusion, create_diffusion
from .errors import DownloadError, UserError
from .latents import PixelSpace, VAELatentSpace, load_latent_space
from .model_info import LatentInfo, ModelInfo
from .models import PRESETS, DiT, DiTConfig, build_model
from .process import ALL_SAMPLERS, ProcessSpec
from .sampling import ClassifierFreeGuidance, SamplingOptions, generate

__version__ = "0.1.0"

__all__ = [
    "ALL_SAMPLERS",
    "PRESETS",
    "ClassifierFreeGuidance",
    "DiT",
    "DiTConfig",
    "DownloadError",
    "FlowMatching",
    "GaussianDiffusion",
    "LatentInfo",
    "ModelInfo",
    "PixelSpace",
    "ProcessSpec",
    "SamplingOptions",
    "UserError",
    "VAELatentSpace",
    "build_model",
    "create_diffusion",
    "export_weights",
    "generate",
    "load_latent_space",
    "load_model",
]
