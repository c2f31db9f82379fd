"""What one side of an evaluation boils down to, how it is stored, and how two sides are compared.

`EvalStatistics` holds everything the ADM metrics need from a set of images: the pool_3 and sFID
moments (mean, covariance in float64), the pool_3 feature vectors for precision/recall (all of them
unless a subset was asked for), and the Inception Score of the images. A reference set is computed
once and stored as an `.npz` whose `mu`, `sigma`, `mu_s`, `sigma_s` use ADM's names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..io import atomic_path
from .inception import POOL_DIM, SPATIAL_DIM
from .metrics import frechet_distance, precision_recall
from .sources import STATS_FORMAT_KEY

STATS_FORMAT_VERSION = 1


@dataclass
class EvalStatistics:
    mu: np.ndarray  # (2048,) float64, mean of pool_3
    sigma: np.ndarray  # (2048, 2048) float64, covariance of pool_3
    mu_s: np.ndarray  # (2023,) float64, mean of mixed_6/conv[..., :7]
    sigma_s: np.ndarray  # (2023, 2023) float64
    num_images: int
    image_size: tuple[int, int] | None = None  # (H, W) of the images; None when unknown
    pr_features: np.ndarray | None = None  # (N, 2048) float32 pool_3 features for precision/recall
    inception_score: float | None = None
    source: str = ""

    def check(self, name: str) -> None:
        """Shapes and finiteness, with a message that says which file is wrong."""
        expected = {
            "mu": (POOL_DIM,),
            "sigma": (POOL_DIM, POOL_DIM),
            "mu_s": (SPATIAL_DIM,),
            "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
        }
        for key, shape in expected.items():
            value = getattr(self, key)
            if value.shape != shape:
                raise UserError(
                    f"{name} has '{key}' of shape {value.shape}, expected {shape}: it was not computed with the "
                    "ADM Inception features (pool_3: 2048, mixed_6/conv[..., :7]: 2023); remake it with "
                    "`fastdit evaluate --make-ref`"
                )
            if not np.isfinite(value).all():
                raise UserError(
                    f"{name} has non-finite values in '{key}'; remake it with `fastdit evaluate --make-ref`"
                )
        if self.pr_features is not None and (self.pr_features.ndim != 2 or self.pr_features.shape[1] != POOL_DIM):
            raise UserError(
                f"{name} has precision/recall features of shape {self.pr_features.shape}, expected (N, {POOL_DIM})"
            )


def statistics_file_name(path: str | Path) -> Path:
    """Where `save_statistics(stats, path)` writes: `path`, with `.npz` appended if it has another suffix."""
    path = Path(path).expanduser()
    return path if path.suffix == ".npz" else path.with_name(path.name + ".npz")


def save_statistics(stats: EvalStatistics, path: str | Path) -> Path:
    """Write `stats` as an `.npz` (atomically) to `statistics_file_name(path)`."""
    path = statistics_file_name(path)
    pr_features = stats.pr_features if stats.pr_features is not None else np.zeros((0, POOL_DIM), np.float32)
    arrays = {
        STATS_FORMAT_KEY: np.array(STATS_FORMAT_VERSION),
        "mu": stats.mu,
        "sigma": stats.sigma,
        "mu_s": stats.mu_s,
        "sigma_s": stats.sigma_s,
        "num_images": np.array(stats.num_images),
        "image_size": np.array(stats.image_size or (0, 0)),
        "pr_features": pr_features.astype(np.float32),
        "inception_score": np.array(math.nan if stats.inception_score is None else stats.inception_score),
    }
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:  # a handle: np.savez would append ".npz" to a name
        np.savez(handle, **arrays)
    return path


def load_statistics(path: str | Path) -> EvalStatistics:
    """Read a statistics file written by `save_statistics` (`fastdit evaluate --make-ref`)."""
    path = Path(path)
    with np.load(path) as archive:
        version = int(archive[STATS_FORMAT_KEY])
        if version > STATS_FORMAT_VERSION:
            raise UserError(f"{str(path)!r} was written by a newer fastdit (format {version}); upgrade fastdit")
        image_size = tuple(int(v) for v in archive["image_size"])
        pr_features = archive["pr_features"]
        inception_score = float(archive["inception_score"])
        stats = EvalStatistics(
            mu=archive["mu"].astype(np.float64),
            sigma=archive["sigma"].astype(np.float64),
            mu_s=archive["mu_s"].astype(np.float64),
            sigma_s=archive["sigma_s"].astype(np.float64),
            num_images=int(archive["num_images"]),
            image_size=image_size if image_size != (0, 0) else None,
            pr_features=pr_features if len(pr_features) else None,
            inception_score=None if math.isnan(inception_score) else inception_score,
            source=str(path),
        )
    stats.check(f"statistics file {str(path)!r}")
    return stats


def check_same_resolution(sample_size: tuple[int, int] | None, ref_size: tuple[int, int] | None, ref_name: str) -> None:
    """Samples and reference must have one resolution (unknown sizes pass): FID across sizes means nothing."""
    if sample_size and ref_size and tuple(sample_size) != tuple(ref_size):
        (sh, sw), (rh, rw) = sample_size, ref_size
        raise UserError(
            f"samples are {sh}x{sw} but the reference {ref_name} is {rh}x{rw}; compare against the reference "
            f"batch of the same resolution (e.g. VIRTUAL_imagenet{sh}_labeled.npz for ImageNet {sh}x{sw})"
        )


def compare(
    sample: EvalStatistics, ref: EvalStatistics, *, k: int = 3, device: str = "cpu", pr_distances: str = "float16"
) -> dict[str, float | int | None]:
    """The ADM metrics of `sample` against `ref`: FID, sFID, IS (of the samples), precision, recall.

    FID (Heusel et al. 2017) on pool_3 moments; sFID (Nash et al. 2021) on the first 7 channels of
    mixed_6/conv; IS (Salimans et al. 2016) from the samples' logits; precision/recall
    (Kynkäänniemi et al. 2019) on k-NN manifolds of pool_3 features, with distances in `pr_distances`
    arithmetic ("float16": ADM's, which reproduces its published numbers; see `pairwise_distances`).
    Precision and recall are None when either side carries no features.
    """
    sample.check(f"the samples ({sample.source or 'in memory'})")
    ref.check(f"the reference ({ref.source or 'in memory'})")
    check_same_resolution(sample.image_size, ref.image_size, ref.source)
    metrics: dict[str, float | int | None] = {
        "fid": frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma),
        "sfid": frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s),
        "inception_score": sample.inception_score,
        "precision": None,
        "recall": None,
        "num_samples": sample.num_images,
        "num_reference": ref.num_images,
    }
    if sample.pr_features is not None and ref.pr_features is not None:
        precision, recall = precision_recall(
            ref.pr_features, sample.pr_features, k, distances=pr_distances, device=device
        )
        metrics["precision"], metrics["recall"] = precision, recall
    return metrics
