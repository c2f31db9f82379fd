"""LPIPS (Zhang, Isola, Efros, Shechtman & Wang 2018, "The Unreasonable Effectiveness of Deep Features
as a Perceptual Metric"), the VGG variant, as RAE's decoder training uses it (its `disc/lpips.py`, the
copy in taming-transformers that VQGAN trains with).

    d(x, y) = sum_l mean_{h,w} w_l . (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|)^2        (paper, eq. 1)

f_l are the activations of VGG16 after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 on the images
shifted and scaled by LPIPS's constants, each normalised to unit length over its channels (+1e-10), and
w_l a learned non-negative 1x1 convolution per layer (the `vgg.pth` heads). Images are in [-1, 1];
gray images are taken as RGB with three equal channels. The network is frozen: it is never trained, and
its weights are never part of a checkpoint.

Weights: torchvision's ImageNet VGG16 (`features.*` of `vgg16-397923af.pth`; its classifier is not used
and not read) and the linear heads (`lin{0..4}.model.1.weight`, each (1, C, 1, 1)), both fetched into
the cache (`fastdit.decoder_training.weights`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from .weights import (LPIPS_LIN_FILE, LPIPS_LIN_URL, LPIPS_SUBDIR, VGG16_FILE, VGG16_URL, fetch, load_exactly,
                      read_state_dict)

# VGG16's convolutions ("D" of Simonyan & Zisserman 2015): widths, "M" a 2x2 max-pool. Built as
# torchvision builds `vgg16().features`, so that its file's `features.{i}` keys are this module's.
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
# Indices in `features` of the ReLUs LPIPS reads: relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.
TAPS = (3, 8, 15, 22, 29)
CHANNELS = (64, 128, 256, 512, 512)
# LPIPS's input scaling (its ScalingLayer): (x - shift) / scale maps [-1, 1] images to roughly the
# ImageNet-normalised range VGG was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10
MIN_SIDE = 16  # relu5_3 follows four 2x2 max-pools: 16 px gives a 1x1 map


def vgg16_features() -> nn.Sequential:
    """VGG16's convolutional layers up to relu5_3 (the final max-pool is never reached), torchvision's indices."""
    layers, channels = [], 3
    for width in VGG16_LAYOUT:
        if width == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            channels = width
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """`lpips(x, y) -> (N,)` perceptual distances between images in [-1, 1], (N, C, H, W), C = 1 or 3."""

    def __init__(self):
        super().__init__()
        self.features = vgg16_features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in CHANNELS)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "LPIPS":
        return super().train(False)  # frozen: no mode of it trains

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (x - self.shift) / self.scale
        taps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in TAPS:
                taps.append(x)
                if index == TAPS[-1]:
                    break
        return taps

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"LPIPS compares two image batches (N, 1 or 3, H, W) of one shape, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        if min(x.shape[-2:]) < MIN_SIDE:
            raise ValueError(f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} px, got {tuple(x.shape[-2:])}")
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        distance = 0
        for lin, fx, fy in zip(self.lins, self._taps(x), self._taps(y)):
            fx = fx / (fx.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)  # unit length over channels
            fy = fy / (fy.pow(2).sum(dim=1, keepdim=True).sqrt() + NORM_EPS)
            distance = distance + lin((fx - fy) ** 2).mean(dim=(2, 3))  # (N, 1): the spatial average
        return distance[:, 0]


def lin_state(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The heads file's keys (`lin{k}.model.1.weight`: a Dropout at model.0 in the original) as this
    module's (`lins.{k}.weight`); other keys are kept as they are, so that they are reported unexpected."""
    state = {}
    for key, value in raw.items():
        parts = key.split(".")
        if len(parts) == 4 and parts[0].startswith("lin") and parts[1:] == ["model", "1", "weight"]:
            key = f"lins.{parts[0][3:]}.weight"
        state[key] = value
    return state


def load_lpips(*, vgg_path: Path | None = None, lin_path: Path | None = None, progress: bool = True) -> LPIPS:
    """LPIPS with the published weights (fetched into the cache unless paths are given), frozen, on the CPU."""
    vgg_path = vgg_path or fetch(VGG16_URL, VGG16_FILE, LPIPS_SUBDIR, progress=progress)
    lin_path = lin_path or fetch(LPIPS_LIN_URL, LPIPS_LIN_FILE, LPIPS_SUBDIR, progress=progress)
    model = LPIPS()
    vgg = {key: value for key, value in read_state_dict(vgg_path, "VGG16 weights").items()
           if not key.startswith("classifier.")}  # the ImageNet classifier: LPIPS reads the features only
    load_exactly(model.features, {key.removeprefix("features."): value for key, value in vgg.items()},
                 vgg_path, "VGG16 weights")
    load_exactly(model.lins, {key.removeprefix("lins."): value
                              for key, value in lin_state(read_state_dict(lin_path, "LPIPS heads")).items()},
                 lin_path, "LPIPS heads")
    return model.requires_grad_(False).eval()


def random_vgg16_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in torchvision's VGG16 layout (`features.*` only), He-scaled so activations stay O(1):
    a stand-in for tests and offline checks, written where the real file would be."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in vgg16_features().state_dict().items():
        if key.endswith("weight"):
            fan_in = value[0].numel()
            state[f"features.{key}"] = torch.randn(value.shape, generator=generator) * (2 / fan_in) ** 0.5
        else:
            state[f"features.{key}"] = 0.01 * torch.randn(value.shape, generator=generator)
    return state


def random_lin_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random non-negative heads in the `vgg.pth` layout (`lin{k}.model.1.weight`), for tests."""
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c for k, c in enumerate(CHANNELS)}
