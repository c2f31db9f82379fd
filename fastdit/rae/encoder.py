"""RAE's frozen encoder: DINOv2 with registers, read exactly as RAE reads it.

RAE (arXiv:2510.11690, section 3; stage1/rae.py `encode` and stage1/encoders/dinov2.py `Dinov2withNorm`):

1. images in [0, 1] are resized to the encoder's input side (224 px at 256, 448 at 512) with bicubic
   interpolation (align_corners=False, no antialiasing) when they are not that size already;
2. normalised with DINOv2's ImageNet mean and std;
3. run through transformers' `Dinov2WithRegistersModel`, whose final LayerNorm has its affine weight and
   bias removed (RAE's `normalize=True`): every token is standardised over its channels, nothing more;
   the position table (37x37 at DINOv2's 518 px) is resampled by transformers at every forward;
4. the class token and the 4 registers are dropped, leaving the patch tokens (N, T, C), row-major.

fastdit's images are in [-1, 1], mapped to [0, 1] first. The tokens are returned as a grid (N, C, h, w),
RAE's `reshape_to_2d`. The latent normalisation with RAE's statistics is `space.py`'s.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import UserError
from .decoder import IMAGENET_MEAN, IMAGENET_STD

ENCODER_MODEL_TYPE = "dinov2_with_registers"


class RAEEncoder(nn.Module):
    """A frozen `Dinov2WithRegistersModel` as RAE uses it: images in [-1, 1] (N, 3, H, W) -> patch tokens
    (N, C, h, w) with h = w = input_size / patch."""

    def __init__(self, model: nn.Module, input_size: int, name: str = "the RAE encoder"):
        super().__init__()
        config = model.config
        patch = int(config.patch_size)
        if input_size % patch:
            raise UserError(f"{name}: encoder input size {input_size} is not a multiple of its patch size {patch}; "
                            f"use a multiple of {patch} such as {max(patch, input_size // patch * patch)}")
        # RAE's Dinov2withNorm(normalize=True): the final LayerNorm without its learned scale and shift.
        norm = model.layernorm
        model.layernorm = nn.LayerNorm(norm.normalized_shape, eps=norm.eps, elementwise_affine=False)
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.input_size = input_size
        self.patch_size = patch
        self.grid_size = input_size // patch
        self.dim = int(config.hidden_size)
        self.num_prefix_tokens = 1 + int(getattr(config, "num_register_tokens", 0) or 0)  # class + registers
        self.register_buffer("pixel_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise UserError(f"{self.name} takes RGB images (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        x = (images.float() + 1) / 2  # RAE's images come from ToTensor: [0, 1]
        if x.shape[-2:] != (self.input_size, self.input_size):
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        x = (x - self.pixel_mean) / self.pixel_std
        tokens = self.model(pixel_values=x).last_hidden_state[:, self.num_prefix_tokens:]  # (N, T, C)
        n, t, c = tokens.shape
        side = math.isqrt(t)
        return tokens.transpose(1, 2).reshape(n, c, side, side)  # (N, C, h, w)


def load_rae_encoder(folder, input_size: int, name: str) -> RAEEncoder:
    """RAE's encoder from a folder holding a transformers DINOv2-with-registers config.json and
    model.safetensors (`name` is what messages call it)."""
    from ..encoders import load_pretrained_model

    model, model_type = load_pretrained_model(name, folder)
    if model_type != ENCODER_MODEL_TYPE:
        raise UserError(f"RAE encoder {name!r} is a {model_type!r} model; RAE's latent spaces are made by DINOv2 with "
                        f"registers ({ENCODER_MODEL_TYPE}), e.g. dinov2-vitb14-reg")
    return RAEEncoder(model, input_size, name=f"RAE encoder {name!r}")
