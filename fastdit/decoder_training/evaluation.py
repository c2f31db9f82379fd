"""Reconstruction quality of the EMA decoder on held-out images: rFID and PSNR.

rFID (the FID RAE reports for its decoders): the Fréchet distance between the Inception pool_3 features
of the held-out images and those of their reconstructions, decoder(encoder(image)) without noise, both
as 8-bit images, with fastdit's ADM evaluator (`fastdit.evaluate`: the TF-converted Inception-v3,
float64 moments). PSNR: the mean over images of 20 log10(1 / RMSE) on [0, 1] pixels (RAE's
`calculate_psnr`). Each process reconstructs the images i = rank, rank + W, ...; the main process
merges the features in image order, so the numbers do not depend on the number of processes beyond
float rounding. The held-out images' own moments are computed once per run and kept.
"""

from __future__ import annotations

import torch
import torch.distributed as torch_dist

from .. import distributed
from ..errors import UserError
from ..evaluate import InceptionFeatureExtractor, float_images_to_uint8, frechet_distance
from ..evaluate.metrics import RunningMoments
from ..evaluate.inception import POOL_DIM
from ..precision import autocast

PSNR_MIN_MSE = 1e-10  # RAE clamps the MSE there: a perfect reconstruction scores 100 dB, not infinity


def _as_rgb_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return float_images_to_uint8(images)  # (N, H, W, 3)


class ReconstructionEvaluator:
    """`evaluate(ema, encoder) -> {"rfid", "psnr"}` on the main process (None on the others)."""

    def __init__(self, dataset, *, dist, batch_size: int, precision: str, inception_weights=None):
        self.dataset, self.dist, self.batch_size, self.precision = dataset, dist, batch_size, precision
        self.extractor = InceptionFeatureExtractor(inception_weights, device=dist.device, batch_size=batch_size,
                                                   progress=dist.is_main)
        self.reference = None  # (mean, covariance) of the held-out images, once

    @torch.no_grad()
    def evaluate(self, ema, encoder) -> dict[str, float] | None:
        dist, device = self.dist, self.dist.device
        mine = list(range(dist.rank, len(self.dataset), dist.world_size))
        indices, fake_features, real_features, psnr = [], [], [], []
        for start in range(0, len(mine), self.batch_size):
            chunk = mine[start:start + self.batch_size]
            images = torch.stack([self.dataset[i] for i in chunk]).to(device)
            with autocast(device, self.precision):
                reconstructions = ema(encoder(images))
            real, fake = _as_rgb_uint8(images), _as_rgb_uint8(reconstructions.float())
            fake_features.append(self.extractor(fake).pool.double().cpu())
            if self.reference is None:
                real_features.append(self.extractor(real).pool.double().cpu())
            error = (real.double() / 255 - fake.double() / 255).square().mean(dim=(1, 2, 3)).clamp_min(PSNR_MIN_MSE)
            psnr.append(20 * torch.log10(1 / error.sqrt()))
            indices += chunk
        gathered = self._gather((indices, fake_features, real_features, psnr))
        distributed.barrier()
        if not dist.is_main:
            return None
        order = torch.tensor([i for part in gathered for i in part[0]]).argsort()

        def in_order(position: int) -> torch.Tensor:
            parts = [t for part in gathered for t in part[position]]
            return torch.cat(parts)[order] if parts else torch.zeros(0)

        fake_moments = _moments(in_order(1), device)
        if self.reference is None:
            self.reference = _moments(in_order(2), device)
        rfid = frechet_distance(*fake_moments, *self.reference)
        return {"rfid": float(rfid), "psnr": float(in_order(3).mean()), "images": len(order)}

    def _gather(self, part):
        if not self.dist.is_distributed:
            return [part]
        gathered = [None] * self.dist.world_size if self.dist.is_main else None
        torch_dist.gather_object(part, gathered, dst=0)
        return gathered


def _moments(features: torch.Tensor, device) -> tuple:
    moments = RunningMoments(POOL_DIM, device=device)
    for start in range(0, len(features), 1024):  # fixed chunks: the same sums whatever the process count
        moments.update(features[start:start + 1024])
    return moments.mean, moments.covariance()


def check_eval_size(count: int, source: str) -> None:
    """At least two images: a covariance needs them."""
    if count < 2:
        raise UserError(f"the held-out set {source!r} has {count} image(s); the rFID needs at least 2 (its "
                        "covariance): pass more --eval-images or another --eval-data")
