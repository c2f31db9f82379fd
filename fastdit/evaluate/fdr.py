"""FDr6: the Fréchet distance in six representation spaces, each divided by its reference value, averaged
(Yang, Geng, Ju, Tian, Wang, "Representation Fréchet Loss for Visual Generation", arXiv:2604.28190, 2026,
"FDr^k").

    FDr_X  = FD_X / valFD_X                         for each space X
    FDr6   = (1/6) sum_X FDr_X                      over the six spaces below

FD_X is the Fréchet distance of Heusel et al. between Gaussians fitted to the samples' and the reference's
features in space X (the same float64 moments and `frechet_distance` as FID). valFD_X is the paper's
normaliser: the FD of the 50K ImageNet validation images (256 px, ADM centre crop) against the ImageNet
reference statistics in that space, so FDr_X = 1 means "as far from the training set as real held-out
images are". The six spaces, the features and the preprocessing are those of the authors' code
(FD-Loss `eval_all_fds.py`, `frechet_distance/repr_models.py`, `scripts/ref/compute_valfd.py`, read in a
public copy of the repository):

  space       network (timm name in their code)                    input          feature        valFD
  inception   Inception-v3 2015 (ADM evaluator, VIRTUAL ref)       ADM's          pool_3 (= FID)  1.68
  convnextv2  ConvNeXt V2-B (convnextv2_base.fcmae_ft_in22k_in1k)   224            mean of map    56.87
  dinov2      DINOv2 ViT-L/14 (vit_large_patch14_dinov2.lvd142m)   256 -> pad 266  class token    14.19
  mae         MAE ViT-L/16 (vit_large_patch16_224.mae)             224            class token     0.04
  siglip      SigLIP 2 So400m/16 (vit_so400m_patch16_siglip_256.   224            attention pool  0.60
              v2_webli)
  clip        CLIP ViT-L/14 (vit_large_patch14_clip_224.openai)    256 -> pad 266  class token     5.60

"input": uint8 pixels / 255, bicubic with antialiasing to that side (torch), the network's mean/std
(ImageNet's; CLIP's; SigLIP's 0.5), then zeros to a multiple of the patch (timm's `dynamic_img_pad`),
with the learned position grid resampled to the padded size (timm's `dynamic_img_size`); "class token"
is the token after the final norm (CLIP's `ln_post`), ConvNeXt's feature the spatial mean of the last
stage (timm `forward_features`, no head norm), SigLIP's its attention-pool head (timm `pool`).

What differs from the authors' runs, stated rather than hidden: their encoders (all but Inception) run
under bf16 autocast on the GPU, here in full float32; the weights come from the same releases through
transformers instead of timm. The normalisers are the paper's rounded values (two decimals; MAE's 0.04
leaves its FDr_X with one significant digit of normaliser) and mean something only for ImageNet 256 x 256
against the paper's reference statistics: for other data or references FDr6 is still defined, but it is
no longer "relative to held-out real images". The per-space raw FDs are reported beside it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import numpy as np

from ..encoders import ENCODERS, load_encoder
from ..errors import UserError
from .encoder_features import EncoderFeatures, torch_bicubic
from .metrics import frechet_distance


@dataclass(frozen=True)
class FDRSpace:
    name: str
    encoder: str  # a `fastdit.encoders` name ("" for Inception, whose moments are FID's)
    side: int  # the resize target
    pad_to: int  # zero padding to a multiple of this (the patch size; 1: none)
    val_fd: float  # the paper's normaliser valFD


FDR6_SPACES = (
    FDRSpace("inception", "", 299, 1, 1.68),
    FDRSpace("convnextv2", "convnextv2-base", 224, 1, 56.87),
    FDRSpace("dinov2", "dinov2-vitl14", 256, 14, 14.19),
    FDRSpace("mae", "mae-vitl16", 224, 1, 0.04),
    FDRSpace("siglip", "siglip2-so400m16-256", 224, 1, 0.60),
    FDRSpace("clip", "clip-vitl14", 256, 14, 5.60),
)
ENCODER_SPACES = tuple(space for space in FDR6_SPACES if space.encoder)  # the five besides Inception


def fdr_preprocess(images, space: FDRSpace):
    entry = ENCODERS[space.encoder]
    return torch_bicubic(images, space.side, entry.mean, entry.std, pad_to=space.pad_to,
                         who=f"the FDr6 {space.name} preprocessing")


def _padded(space: FDRSpace) -> int:
    return space.side + (-space.side) % space.pad_to


class FDRFeatureExtractors:
    """uint8 NHWC batches -> {space: (N, D) float32 features} for FDr6's five encoder spaces.

    `encoders` maps a space name to a `load_encoder` spec (default: the table's names, downloaded once; a
    local copy as NAME=FOLDER) or to a built `FrozenEncoder`.
    """

    def __init__(self, encoders: dict | None = None, *, device="cpu", batch_size: int = 64, progress: bool = True):
        encoders = dict(encoders or {})
        unknown = sorted(set(encoders) - {space.name for space in ENCODER_SPACES})
        if unknown:
            raise UserError(f"FDr6 has no space {unknown[0]!r}; its encoder spaces are "
                            f"{', '.join(space.name for space in ENCODER_SPACES)}")
        self.extractors: dict[str, EncoderFeatures] = {}
        for space in ENCODER_SPACES:
            encoder = encoders.get(space.name, space.encoder)
            if isinstance(encoder, str):
                encoder = load_encoder(encoder, device, resolution=_padded(space), progress=progress)
            self.extractors[space.name] = EncoderFeatures(
                encoder, partial(fdr_preprocess, space=space), device=device, batch_size=batch_size,
                name=f"FDr6 {space.name}", prepare_on_device=True)
        self.device = next(iter(self.extractors.values())).device
        self.dims = {name: extractor.dim for name, extractor in self.extractors.items()}

    def __call__(self, images) -> dict:
        return {name: extractor(images) for name, extractor in self.extractors.items()}


def fdr6(fid: float, sample_moments: dict, ref_moments: dict) -> dict[str, float]:
    """{"fdr6": mean, "fd_<space>": raw FD, "fdr_<space>": normalised FD} from FID and the five spaces'
    (mu, sigma) of each side."""
    results = {"fd_inception": float(fid)}
    for space in ENCODER_SPACES:
        (mu1, sigma1), (mu2, sigma2) = sample_moments[space.name], ref_moments[space.name]
        if np.shape(mu1) != np.shape(mu2):
            raise UserError(f"the samples' FDr6 {space.name} features have {len(mu1)} dimensions but the "
                            f"reference's {len(mu2)}: they come from different encoders")
        results[f"fd_{space.name}"] = frechet_distance(mu1, sigma1, mu2, sigma2)
    for space in FDR6_SPACES:
        results[f"fdr_{space.name}"] = results[f"fd_{space.name}"] / space.val_fd
    results["fdr6"] = float(np.mean([results[f"fdr_{space.name}"] for space in FDR6_SPACES]))
    return results
