"""One feature per image from a frozen encoder (`fastdit.encoders`), with a metric's own preprocessing.

The metrics beside the ADM suite read pretrained encoders, each through the pipeline its reference code
uses; the resize in particular moves the numbers, so it is part of each metric's definition:

* `pil_bicubic`: PIL's bicubic resize of the uint8 image (antialiased when shrinking; the result is
  rounded back to uint8), what torchvision's `Resize` does to a PIL image. FD-DINOv2 (dgm-eval) and CMMD
  (google-research/cmmd `io_util.py`) resize this way.
* `torch_bicubic`: `F.interpolate(x / 255, mode="bicubic", antialias=True)` on float pixels, what the FDr6
  code (FD-Loss `frechet_distance/repr_models.py`, `_preprocess`) does.

An `EncoderFeatures` runs in full float32 (no TF32, as Inception) and splits its input into batches of
`batch_size`, so peak memory is bounded whatever the caller passes; a feature does not depend on which
batch an image came in beyond float32 rounding (tests/test_evaluate_guards.py).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from ..encoders import FrozenEncoder
from ..errors import UserError
from .float32 import full_float32
from .sources import as_uint8_nhwc


def _normalise(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean, std = (torch.tensor(v, dtype=x.dtype, device=x.device).view(1, 3, 1, 1) for v in (mean, std))
    return (x - mean) / std


def pil_bicubic(images: np.ndarray | torch.Tensor, resolution: int, mean, std, *, center_crop: bool = False,
                who: str = "the preprocessing") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, R, R) float32: [the centre square,] PIL bicubic to R x R (uint8), x / 255,
    then (x - mean) / std. Images already R x R are only normalised (PIL would return a copy)."""
    from PIL import Image

    pixels = as_uint8_nhwc(images, who).cpu().numpy()
    resized = []
    for image in pixels:
        if center_crop and image.shape[0] != image.shape[1]:
            side = min(image.shape[:2])
            top, left = (image.shape[0] - side) // 2, (image.shape[1] - side) // 2
            image = image[top : top + side, left : left + side]
        if image.shape[:2] != (resolution, resolution):
            image = np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))
        resized.append(image)
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R) in [0, 1]
    return _normalise(x, mean, std)


def torch_bicubic(images: np.ndarray | torch.Tensor, resolution: int, mean, std, *, pad_to: int = 1,
                  who: str = "the preprocessing") -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, R', R') float32: x / 255, bicubic (antialiased) to R x R unless already
    there, (x - mean) / std, then zeros on the right and bottom up to a multiple of `pad_to` (timm's
    `dynamic_img_pad`, which FDr6's ViTs use at 256 px with 14-px patches: 256 -> 266)."""
    x = as_uint8_nhwc(images, who).permute(0, 3, 1, 2).float() / 255
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False, antialias=True)
    x = _normalise(x, mean, std)
    pad = (-resolution) % pad_to
    return F.pad(x, (0, pad, 0, pad)) if pad else x


class EncoderFeatures:
    """uint8 NHWC batches (numpy or torch) -> one feature per image (N, D) float32, on the encoder's device.

    `prepare` maps a uint8 batch to the encoder's input; `kind` is what `FrozenEncoder.pooled` reads
    ("pooled" or "projected"); `unit_norm` divides each feature by its Euclidean norm (CMMD's CLIP
    embeddings). `encoder` must be built for the side `prepare` produces. `prepare_on_device`: the
    uint8 batch goes to the device before `prepare` (torch resizes; PIL's run on the CPU).
    """

    def __init__(self, encoder: FrozenEncoder, prepare: Callable[[torch.Tensor], torch.Tensor], *,
                 kind: str = "pooled", unit_norm: bool = False, device: str | torch.device = "cpu",
                 batch_size: int = 64, name: str = "", prepare_on_device: bool = False):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.encoder = encoder.to(self.device)
        self.prepare = prepare
        self.kind = kind
        self.unit_norm = unit_norm
        self.batch_size = batch_size
        self.name = name or encoder.name
        self.prepare_on_device = prepare_on_device
        with torch.no_grad():
            probe = self.encoder.pooled(torch.zeros(1, 3, encoder.resolution, encoder.resolution, device=self.device),
                                        kind)
        self.dim = int(probe.shape[-1])

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        images = as_uint8_nhwc(images, f"the {self.name} extractor")
        features = []
        with full_float32():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size]
                if self.prepare_on_device:
                    chunk = chunk.to(self.device, non_blocking=True)
                x = self.prepare(chunk).to(self.device, non_blocking=True)
                feature = self.encoder.pooled(x, self.kind).float()  # (B, D)
                if self.unit_norm:
                    feature = feature / feature.norm(dim=-1, keepdim=True)
                features.append(feature)
        return torch.cat(features) if features else torch.zeros(0, self.dim, device=self.device)
