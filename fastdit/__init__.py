"""fastdit: class-conditional Diffusion Transformers (DiT) — official-exact models, fast training,
sampling and built-in evaluation.

    import fastdit
    model = fastdit.build_model("DiT-XL/2", input_size=32, num_classes=1000)
    model, info, latent_space, device = fastdit.load_for_sampling("DiT-XL-2-256x256.pt")  # downloaded once
    images = fastdit.generate(model, latent_space, labels, options=fastdit.SamplingOptions(), objective=info.objective)
    diffusion = fastdit.create_diffusion("250")                   # DiT's process; FlowMatching() is SiT's
"""

from .checkpoint import export_weights, load_model
from .diffusion import FlowMatching, GaussianDiffusion, create_diffusion
from .errors import DownloadError, UserError
from .latents import PixelSpace, VAELatentSpace, load_latent_space
from .loading import load_for_sampling
from .model_info import LatentInfo, ModelInfo
from .models import PRESETS, DiT, DiTConfig, build_model
from .objectives import OBJECTIVES, Objective, build_objective, register_objective
from .sampling import SAMPLERS, ClassifierFreeGuidance, SamplingOptions, generate, register_sampler

__version__ = "0.1.0"

__all__ = [
    "OBJECTIVES",
    "PRESETS",
    "SAMPLERS",
    "ClassifierFreeGuidance",
    "DiT",
    "DiTConfig",
    "DownloadError",
    "FlowMatching",
    "GaussianDiffusion",
    "LatentInfo",
    "ModelInfo",
    "PixelSpace",
    "Objective",
    "SamplingOptions",
    "UserError",
    "VAELatentSpace",
    "build_model",
    "build_objective",
    "create_diffusion",
    "export_weights",
    "generate",
    "load_for_sampling",
    "load_latent_space",
    "load_model",
    "register_objective",
    "register_sampler",
]
