"""CMMD: the maximum mean discrepancy between CLIP embeddings (Jayasumana, Ramalingam, Veit, Glasner,
Chakrabarti, Kumar, "Rethinking FID: Towards a Better Evaluation Metric for Image Generation", CVPR 2024,
arXiv:2401.09603).

The definition, as the authors' code computes it (google-research/google-research `cmmd/`):

* features (`embedding.py`, `io_util.py`): each image's centre square, resized to 336 x 336 with PIL's
  bicubic filter (antialiased when shrinking, rounded to uint8), x / 255, normalised with OpenAI CLIP's
  mean and std, then the image embedding of CLIP ViT-L/14 at 336 px (scenic's `vit_l14_336px`: the
  class token after `ln_post`, times the visual projection, 768 numbers) divided by its norm
  (scenic's `encode_image(normalize=True)`);
* distance (`distance.py`): the minimum-variance ("biased") MMD^2 estimator of Gretton et al. 2012,
  Eq. 5, with the Gaussian RBF kernel k(x, y) = exp(-||x - y||^2 / (2 sigma^2)), sigma = 10, times 1000
  (the paper's scale, "to make the metric more human readable"):

      CMMD = 1000 * ( mean_{i,i'} k(x_i, x_i') + mean_{j,j'} k(y_j, y_j') - 2 mean_{i,j} k(x_i, y_j) )

  every mean over all pairs, the diagonal included. The two sets may differ in size.

Numerics. With unit-norm embeddings, ||x - y||^2 <= 4 and every kernel value lies in [0.98, 1]: CMMD is
a small difference of three numbers near 1 (the reference code sums them in float32, where the 1s alone
cost ~1e-7 * 1000 of the result). Here each term is written as 1 - k = -expm1(-||x - y||^2 / (2 sigma^2)),
so the 1s cancel exactly before anything is summed, and the rest is float64: CMMD = 1000 * (2 mean(1 - k_xy)
- mean(1 - k_xx) - mean(1 - k_yy)). Blocks of `block_size` rows bound memory.
"""

from __future__ import annotations

import numpy as np
import torch

from ..encoders import CLIP_MEAN, CLIP_STD, FrozenEncoder, load_encoder
from ..errors import UserError
from .encoder_features import EncoderFeatures, pil_bicubic

CMMD_ENCODER = "clip-vitl14-336"  # CLIP ViT-L/14 at 336 px (scenic's vit_l14_336px)
CMMD_RESOLUTION = 336
CMMD_SIGMA = 10.0  # cmmd/distance.py _SIGMA
CMMD_SCALE = 1000.0  # cmmd/distance.py _SCALE


def cmmd_preprocess(images, resolution: int = CMMD_RESOLUTION) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> (N, 3, 336, 336): centre square, PIL bicubic (uint8), x / 255, CLIP mean/std."""
    return pil_bicubic(images, resolution, CLIP_MEAN, CLIP_STD, center_crop=True, who="the CMMD preprocessing")


class CMMDFeatureExtractor(EncoderFeatures):
    """uint8 NHWC batches -> unit-norm CLIP ViT-L/14@336 image embeddings (N, 768) float32."""

    def __init__(self, encoder: str | FrozenEncoder = CMMD_ENCODER, *, device="cpu", batch_size: int = 64,
                 progress: bool = True):
        if isinstance(encoder, str):
            encoder = load_encoder(encoder, device, resolution=CMMD_RESOLUTION, progress=progress)
        if encoder.resolution != CMMD_RESOLUTION:
            raise UserError(f"CMMD feeds CLIP {CMMD_RESOLUTION}-px images; {encoder.name} is built for "
                            f"{encoder.resolution} px")
        super().__init__(encoder, cmmd_preprocess, kind="projected", unit_norm=True, device=device,
                         batch_size=batch_size, name="CLIP (CMMD)")


def _one_minus_kernel_mean(a: torch.Tensor, b: torch.Tensor, gamma: float, block_size: int) -> float:
    """mean over all pairs of 1 - exp(-gamma ||a_i - b_j||^2), in float64, block by block."""
    a_norms, b_norms = a.square().sum(1), b.square().sum(1)
    total = 0.0
    for start in range(0, len(a), block_size):
        rows = a[start : start + block_size]
        squared = (a_norms[start : start + block_size, None] + b_norms[None] - 2 * rows @ b.T).clamp_min(0)
        total += float((-torch.expm1(-gamma * squared)).sum())
    return total / (len(a) * len(b))


def mmd_rbf(
    sample_features: np.ndarray | torch.Tensor,
    ref_features: np.ndarray | torch.Tensor,
    *,
    sigma: float = CMMD_SIGMA,
    scale: float = CMMD_SCALE,
    block_size: int = 2048,
    device: str | torch.device = "cpu",
) -> float:
    """scale * MMD^2 (biased estimator, Gaussian RBF kernel of bandwidth `sigma`) between (N, D) and (M, D)."""
    x = torch.as_tensor(np.asarray(torch.as_tensor(sample_features).detach().cpu()), dtype=torch.float64).to(device)
    y = torch.as_tensor(np.asarray(torch.as_tensor(ref_features).detach().cpu()), dtype=torch.float64).to(device)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise UserError(f"CMMD features do not match: samples {tuple(x.shape)} vs reference {tuple(y.shape)}")
    if len(x) < 1 or len(y) < 1:
        raise UserError("CMMD needs at least one image per side")
    gamma = 1.0 / (2.0 * sigma * sigma)
    cross = _one_minus_kernel_mean(x, y, gamma, block_size)
    within_x = _one_minus_kernel_mean(x, x, gamma, block_size)
    within_y = _one_minus_kernel_mean(y, y, gamma, block_size)
    return scale * (2 * cross - within_x - within_y)
