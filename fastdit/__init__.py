"""fastdit: class-conditional Diffusion Transformers (DiT) — official-exact models, fast training,
sampling and built-in evaluation.

    import fastdit
    model = fastdit.build_model("DiT-XL/2", input_size=32, num_classes=1000)
    model, info, latent_space, device = fastdit.load_for_sampling("DiT-XL-2-256x256.pt")  # downloaded once
    images = fastdit.generate(model, latent_space, labels, options=fastdit.SamplingOptions(), objective=info.objective)
    diffusion = fastdit.create_diffusion("250")                   # DiT's process; FlowMatching() is SiT's
"""

import importlib

# The public API, imported on first use (PEP 562): `import fastdit` and `fastdit --help`/`--version` stay
# quick, without torch; `fastdit.generate` (or `from fastdit import generate`) imports what it needs.
_API = {
    "export_weights": "checkpoint", "load_model": "checkpoint",
    "FlowMatching": "diffusion", "GaussianDiffusion": "diffusion", "create_diffusion": "diffusion",
    "DownloadError": "errors", "UserError": "errors",
    "PixelSpace": "latents", "VAELatentSpace": "latents", "load_latent_space": "latents",
    "load_for_sampling": "loading",
    "LatentInfo": "model_info", "ModelInfo": "model_info",
    "PRESETS": "models", "DiT": "models", "DiTConfig": "models", "build_model": "models",
    "OBJECTIVES": "objectives", "Objective": "objectives", "build_objective": "objectives",
    "register_objective": "objectives",
    "SAMPLERS": "sampling", "ClassifierFreeGuidance": "sampling", "SamplingOptions": "sampling", "generate": "sampling",
    "register_sampler": "sampling",
    "make_grid": "image_grid",
    "DemoConfig": "demo.run", "run_demo": "demo.run", "find_demo_checkpoint": "app.models",
    "format_report": "demo.report",
}


def __getattr__(name: str):
    if name in _API:
        value = getattr(importlib.import_module(f".{_API[name]}", __name__), name)
        globals()[name] = value  # once imported, an ordinary attribute
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_API])


__version__ = "0.1.0"

__all__ = [
    "DemoConfig",
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
    "find_demo_checkpoint",
    "format_report",
    "generate",
    "load_for_sampling",
    "load_latent_space",
    "load_model",
    "make_grid",
    "register_objective",
    "register_sampler",
    "run_demo",
]
