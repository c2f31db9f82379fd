"""Tiny random stand-ins for the pretrained encoders (`fastdit.encoders`), one per architecture, saved as a
Hugging Face model folder (config.json + model.safetensors) exactly as the official repositories hold them.
Nothing is downloaded: tests serve these folders from 127.0.0.1 or pass them as local copies."""

from pathlib import Path

import torch

# One block of width 32: every architecture builds in milliseconds.
VIT = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)


def tiny_model(kind: str, seed: int = 0, depth: int = 1):
    """A random transformers model of `kind` (a config model_type), small enough for a unit test."""
    import transformers as T

    torch.manual_seed(seed)
    vit = {**VIT, "num_hidden_layers": depth}
    if kind == "dinov2":  # trained at 56 px: a 4 x 4 grid of 14-px patches
        return T.Dinov2Model(T.Dinov2Config(image_size=56, patch_size=14, layerscale_value=1.0, **vit))
    if kind == "dinov2_with_registers":
        return T.Dinov2WithRegistersModel(T.Dinov2WithRegistersConfig(image_size=56, patch_size=14,
                                                                      num_register_tokens=4, **vit))
    if kind == "dinov3_vit":
        return T.DINOv3ViTModel(T.DINOv3ViTConfig(image_size=32, patch_size=16, num_register_tokens=4, **vit))
    if kind == "clip":  # the whole CLIP, as openai's repositories hold it (text tower included)
        text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32, vocab_size=64,
                    bos_token_id=0, eos_token_id=1, pad_token_id=1)
        return T.CLIPModel(T.CLIPConfig(vision_config=dict(image_size=28, patch_size=14, projection_dim=16, **vit),
                                        text_config=text, projection_dim=16))
    if kind == "siglip":
        return T.SiglipVisionModel(T.SiglipVisionConfig(image_size=32, patch_size=16, **vit))
    if kind == "convnextv2":
        return T.ConvNextV2Model(T.ConvNextV2Config(num_channels=3, hidden_sizes=[8, 16], depths=[1, depth],
                                                    num_stages=2, image_size=32))
    if kind == "vit_mae":
        return T.ViTMAEModel(T.ViTMAEConfig(image_size=32, patch_size=16, **vit))
    raise ValueError(kind)


def save_tiny(kind: str, folder, seed: int = 0, depth: int = 1) -> Path:
    """`tiny_model(kind)` saved into `folder` (config.json + model.safetensors); returns the folder."""
    import transformers

    folder = Path(folder)
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    try:
        tiny_model(kind, seed, depth).save_pretrained(folder)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
        transformers.utils.logging.enable_progress_bar()
    return folder


def serve(file_server, repo: str, folder) -> None:
    """Put `folder`'s two files where the hub keeps `repo`'s, on the test server."""
    for name in ("config.json", "model.safetensors"):
        file_server.files[f"/{repo}/resolve/main/{name}"] = (Path(folder) / name).read_bytes()
