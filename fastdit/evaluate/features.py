"""From images to `EvalStatistics`: the Inception feature extractor and the streaming accumulation.

Usable without files (training's `--eval-every` passes uint8 batches straight from the sampler):

    extractor = InceptionFeatureExtractor(device="cuda")
    ref = statistics_for_path("VIRTUAL_imagenet256_labeled.npz", extractor, reference=True)  # once
    stats = compute_statistics(batches_of_uint8_nhwc, extractor)
    metrics = compare(stats, ref)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import UserError
from ..sampling.generate import to_uint8
from .cmmd import CMMDFeatureExtractor
from .dinov2 import DinoV2FeatureExtractor
from .fdr import FDRFeatureExtractors
from .float32 import full_float32
from .inception import POOL_DIM, SPATIAL_DIM, InceptionOutputs, InceptionV3, load_inception
from .metrics import InceptionScoreAccumulator, RunningMoments, TorchFidelityInceptionScore
from .sources import NpzImages, as_uint8_nhwc, is_statistics_file, open_images, read_adm_statistics, read_fid_moments
from .statistics import REFERENCE_PIPELINES, EvalStatistics, load_statistics

IS_SPLIT_SIZE = 5_000  # ADM's `compute_inception_score(split_size=5000)`: 10 splits of the usual 50K samples


def float_images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) floats in [-1, 1] -> (N, H, W, 3) uint8, exactly as DiT's sample_ddp.py writes samples."""
    return torch.from_numpy(to_uint8(images))


class InceptionFeatureExtractor:
    """uint8 NHWC batches (numpy or torch) -> `InceptionOutputs` (float32, on the extractor's device).

    Inputs larger than `batch_size` are split, so peak memory is bounded whatever the caller passes.
    The whole network, the logits matmul included, runs in full float32 (`full_float32`: no TF32),
    as the TF graph does.
    """

    def __init__(
        self,
        weights_path: str | os.PathLike | None = None,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        model: InceptionV3 | None = None,
        progress: bool = True,
    ):
        if batch_size < 1:
            raise UserError(f"batch size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        model = model if model is not None else load_inception(weights_path, device=self.device, progress=progress)
        self.model = model.eval().requires_grad_(False).to(self.device)

    @torch.inference_mode()
    def __call__(self, images: np.ndarray | torch.Tensor) -> InceptionOutputs:
        images = as_uint8_nhwc(images, "the Inception extractor")
        outputs = []
        with full_float32():
            for start in range(0, len(images), self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device, non_blocking=True)
                result = self.model(chunk.permute(0, 3, 1, 2))  # (B, 3, H, W)
                outputs.append([result.pool, result.spatial, result.logits])
        pool, spatial, logits = (torch.cat(parts) for parts in zip(*outputs))
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


def compute_statistics(
    batches: Iterable[np.ndarray | torch.Tensor],
    extractor: InceptionFeatureExtractor,
    *,
    pr_subset: int | None = None,
    is_split_size: int = IS_SPLIT_SIZE,
    progress_total: int | None = None,
    source: str = "",
    dinov2: DinoV2FeatureExtractor | None = None,
    cmmd: CMMDFeatureExtractor | None = None,
    fdr: FDRFeatureExtractors | None = None,
    pipeline: str = "adm",
) -> EvalStatistics:
    """Stream uint8 NHWC batches through Inception into `EvalStatistics` (float64 moments).

    Every pool_3 vector is kept for precision/recall and MIND (as ADM, which feeds all sample activations:
    8 KB per image), or only the first `pr_subset`; everything else is accumulated, so the rest of
    memory does not grow with the number of images. The same batches also go through each encoder given:
    `dinov2` (FD-DINOv2: class-token moments), `cmmd` (CMMD: every CLIP embedding is kept, 3 KB per image)
    and `fdr` (FDr6: moments in its five encoder spaces), all in float64 with the same `RunningMoments`.
    `pipeline` "jit" computes the Inception Score as torch-fidelity does (see `REFERENCE_PIPELINES`).
    `progress_total` (number of images) turns on a progress bar.
    """
    image_size = []
    dinov2_moments = RunningMoments(dinov2.dim, device=dinov2.device) if dinov2 is not None else None
    fdr_moments = {name: RunningMoments(dim, device=fdr.device) for name, dim in fdr.dims.items()} if fdr else None
    cmmd_features: list[np.ndarray] = []
    bar = None
    if progress_total is not None:
        from ..progress import tqdm

        networks = " + ".join(["Inception"] + [name for name, used in (("DINOv2", dinov2), ("CLIP", cmmd),
                                                                        ("FDr6", fdr)) if used is not None])
        bar = tqdm(total=progress_total, unit="img", desc=f"{networks} {Path(source).name or 'features'}")

    def features():
        for batch in batches:
            if len(batch) == 0:
                continue
            size = tuple(int(v) for v in batch.shape[1:3])
            if image_size and size != image_size[0]:
                raise UserError(
                    f"image batches change size from {image_size[0]} to {size}; evaluate one resolution at a time"
                )
            image_size[:] = [size]
            if dinov2_moments is not None:
                dinov2_moments.update(dinov2(batch))
            if cmmd is not None:
                cmmd_features.append(cmmd(batch).cpu().numpy())
            if fdr_moments is not None:
                for name, values in fdr(batch).items():
                    fdr_moments[name].update(values)
            yield extractor(batch)
            if bar is not None:
                bar.update(len(batch))

    try:
        stats = statistics_from_features(
            features(), device=extractor.device, pr_subset=pr_subset, is_split_size=is_split_size, source=source,
            pipeline=pipeline,
        )
    finally:
        if bar is not None:
            bar.close()
    stats.image_size = image_size[0]
    if dinov2_moments is not None:
        stats.mu_dinov2, stats.sigma_dinov2 = dinov2_moments.mean, dinov2_moments.covariance()
    if cmmd is not None:
        stats.cmmd_features = np.concatenate(cmmd_features).astype(np.float32)
    if fdr_moments is not None:
        stats.fdr_moments = {name: (moments.mean, moments.covariance()) for name, moments in fdr_moments.items()}
    return stats


def statistics_from_features(
    outputs: Iterable[InceptionOutputs],
    *,
    device: str | torch.device = "cpu",
    pr_subset: int | None = None,
    is_split_size: int = IS_SPLIT_SIZE,
    image_size: tuple[int, int] | None = None,
    source: str = "",
    pipeline: str = "adm",
) -> EvalStatistics:
    """`EvalStatistics` from batches of Inception outputs (e.g. gathered from several processes)."""
    if pipeline not in REFERENCE_PIPELINES:
        raise UserError(f"unknown reference pipeline {pipeline!r}; choose one of {', '.join(REFERENCE_PIPELINES)}")
    # The float64 moments live on the network's device: on a GPU, their updates are not a CPU bottleneck.
    pool_moments = RunningMoments(POOL_DIM, device=device)
    spatial_moments = RunningMoments(SPATIAL_DIM, device=device)
    inception_score = InceptionScoreAccumulator(is_split_size) if pipeline == "adm" else TorchFidelityInceptionScore()
    kept: list[np.ndarray] = []
    num_kept = 0
    for features in outputs:
        pool_moments.update(features.pool)
        spatial_moments.update(features.spatial)
        inception_score.update(features.logits)
        if pr_subset is None or num_kept < pr_subset:
            take = len(features.pool) if pr_subset is None else min(len(features.pool), pr_subset - num_kept)
            kept.append(torch.as_tensor(features.pool[:take]).cpu().numpy())
            num_kept += take
    if pool_moments.count == 0:
        raise UserError(f"no images to evaluate{f' in {source!r}' if source else ''}")
    return EvalStatistics(
        mu=pool_moments.mean,
        sigma=pool_moments.covariance(),
        mu_s=spatial_moments.mean,
        sigma_s=spatial_moments.covariance(),
        num_images=pool_moments.count,
        image_size=image_size,
        pr_features=np.concatenate(kept) if kept else None,
        inception_score=inception_score.score(),
        source=source,
    )


def statistics_for_path(
    path: str | os.PathLike,
    extractor: InceptionFeatureExtractor | None,
    *,
    pr_subset: int | None = None,
    reference: bool = False,
    progress: bool = True,
    dinov2: DinoV2FeatureExtractor | None = None,
    cmmd: CMMDFeatureExtractor | None = None,
    fdr: FDRFeatureExtractors | None = None,
    pipeline: str = "adm",
    crop_to: int | None = None,
) -> EvalStatistics:
    """`EvalStatistics` of a statistics file, an ADM `.npz` batch, an `.npz` of FID moments only
    (`mu`, `sigma`: torch-fidelity's and JiT's `jit_in256_stats.npz`) or an image folder.

    Precomputed `mu`, `sigma`, `mu_s`, `sigma_s` in an `.npz` are used as they are (as ADM's
    `read_statistics` does). For a `reference`, its images are then only needed for precision/recall
    and MIND, so only those (all, or the first `pr_subset`) go through Inception; with a subset, no IS is
    kept. With an encoder (`dinov2`, `cmmd`, `fdr`) every image is read (ADM batches carry none of their
    features), and its statistics are added. `extractor` may be None for statistics files, which are
    returned as stored (with whatever optional statistics they hold). `crop_to`: an image folder's images
    are ADM-centre-cropped to that side (`sources.FolderImages`).
    """
    path = Path(path).expanduser()
    if is_statistics_file(path):
        return load_statistics(path)
    moments = read_fid_moments(path)
    if moments is not None:  # FID's moments and nothing else: no images to run
        return EvalStatistics(mu=moments["mu"], sigma=moments["sigma"], mu_s=moments.get("mu_s"),
                              sigma_s=moments.get("sigma_s"),
                              num_images=0, source=str(path))
    images = open_images(path, crop_to=crop_to)
    if extractor is None:
        raise ValueError("an InceptionFeatureExtractor is needed for images")
    precomputed = read_adm_statistics(path) if isinstance(images, NpzImages) else None
    every_image = dinov2 is not None or cmmd is not None or fdr is not None
    limit = pr_subset if precomputed is not None and reference and not every_image else None
    count = images.num_images if limit is None else min(limit, images.num_images)
    stats = compute_statistics(
        images.batches(extractor.batch_size, limit=limit),
        extractor,
        pr_subset=pr_subset,
        progress_total=count if progress else None,
        source=str(path),
        dinov2=dinov2,
        cmmd=cmmd,
        fdr=fdr,
        pipeline=pipeline,
    )
    if precomputed is not None:
        stats.mu, stats.sigma = precomputed["mu"], precomputed["sigma"]
        stats.mu_s, stats.sigma_s = precomputed["mu_s"], precomputed["sigma_s"]
        stats.num_images = images.num_images
        if limit is not None:
            stats.inception_score = None  # computed on a subset only
        stats.check(f"the precomputed statistics in {str(path)!r}")
    return stats
