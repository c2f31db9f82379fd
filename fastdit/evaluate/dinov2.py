"""FD-DINOv2 features: the DINOv2 ViT-L/14 class token of each image, as Stein et al. 2023 compute it.

Stein et al., "Exposing flaws of generative model evaluation metrics and their unfair treatment of
diffusion models" (NeurIPS 2023, arXiv:2306.04675), replace Inception by DINOv2 ViT-L/14 for the
Fréchet distance. Their code (layer6ai-labs/dgm-eval, `dgm_eval/models/dinov2.py`, the
`DINOv2Encoder` with its defaults `arch="vitl14"`, `clean_resize=False`) defines the features:

  * each decoded RGB image (a PIL image) is resized to 224 x 224 with torchvision's
    `Resize((224, 224), InterpolationMode.BICUBIC)`, which on a PIL image is PIL's own bicubic
    resize: antialiased when shrinking, and rounded back to uint8 (the result is still an image);
  * `ToTensor` (x / 255), then `Normalize` with the ImageNet mean (0.485, 0.456, 0.406) and
    std (0.229, 0.224, 0.225);
  * the feature is what the torch.hub DINOv2 model returns (facebookresearch/dinov2,
    `dinov2/models/vision_transformer.py`, `forward`: `self.head(ret["x_norm_clstoken"])` with an
    identity head), i.e. the class token after the final norm: 1024 numbers for ViT-L/14.

FD-DINOv2 is then the Fréchet distance of Heusel et al. between Gaussians fitted to these features,
computed here with the same float64 moments and the same `frechet_distance` as FID.

The encoder comes from `fastdit.encoders.load_encoder` (`dinov2-vitl14`: Meta's facebook/dinov2-large
through transformers, downloaded once; `dinov2-vitl14=FOLDER` for a local copy; or a TorchScript file).
One known difference from the torch.hub model: the 37 x 37 position embedding of the released weights is
resampled to the 16 x 16 grid of a 224-px input once, when the encoder is built (bicubic, antialiased, to
the size 16, as timm and REPA do), where DINOv2's own `interpolate_pos_encoding` does it at each forward
(bicubic, not antialiased, scale factor (16 + 0.1) / 37); the features differ by that resampling, so
FD-DINOv2 here is close to, not bit-identical with, dgm-eval's.
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoders import IMAGENET_MEAN, IMAGENET_STD, FrozenEncoder, load_encoder
from ..errors import UserError
from .float32 import full_float32
from .sources import as_uint8_nhwc

FD_DINOV2_ENCODER = "dinov2-vitl14"  # Stein et al.'s ViT-L/14 (dgm-eval's default arch "vitl14")
FD_DINOV2_RESOLUTION = 224  # dgm-eval: TF.Resize((224, 224), BICUBIC)


def stein_preprocess(images: np.ndarray | torch.Tensor, resolution: int = FD_DINOV2_RESOLUTION) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, R, R) float32 as dgm-eval's DINOv2Encoder.transform prepares a PIL image.

    PIL's bicubic resize (what torchvision's Resize does to a PIL image) on the uint8 image, then
    x / 255 and the ImageNet mean/std. Images already R x R are left as they are (PIL returns a copy).
    """
    from PIL import Image

    pixels = as_uint8_nhwc(images, "the DINOv2 preprocessing").cpu().numpy()
    resized = [
        np.asarray(Image.fromarray(image).resize((resolution, resolution), Image.Resampling.BICUBIC))
        if image.shape[:2] != (resolution, resolution)
        else image
        for image in pixels
    ]
    x = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).float() / 255  # (N, 3, R, R) in [0, 1]
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class DinoV2FeatureExtractor:
    """uint8 NHWC batches (numpy or torch) -> FD-DINOv2 features (N, D) float32, on the extractor's device.

    `encoder` is a spec for `load_encoder` (default: Stein et al.'s DINOv2 ViT-L/14, downloaded once)
    or an already built `FrozenEncoder` with a class token. Inputs larger than `batch_size` are split;
    the network runs in full float32 (`full_float32`: no TF32), as for Inception.
    """

    def __init__(
        self,
        encoder: str | FrozenEncoder = FD_DINOV2_ENCODER,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        if isinstance(encoder, str):
            encoder = load_encoder(encoder, self.device, resolution=FD_DINOV2_RESOLUTION, progress=progress)
        if encoder.num_prefix_tokens < 1:
            raise UserError(
                f"FD-DINOv2 reads the class token, and the encoder {encoder.name} has none; "
                f"use {FD_DINOV2_ENCODER} (or a local copy: {FD_DINOV2_ENCODER}=FOLDER)"
            )
        self.encoder = encoder.to(self.device)
        self.dim = encoder.dim

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> torch.Tensor:
        images = as_uint8_nhwc(images, "the DINOv2 extractor")
        features = []
        with full_float32():
            for start in range(0, len(images), self.batch_size):
                x = stein_preprocess(images[start : start + self.batch_size])
                features.append(self.encoder.class_token(x.to(self.device, non_blocking=True)).float())  # (B, D)
        return torch.cat(features) if features else torch.zeros(0, self.dim, device=self.device)
