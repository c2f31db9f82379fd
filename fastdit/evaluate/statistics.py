"""What one side of an evaluation boils down to, how it is stored, and how two sides are compared.

`EvalStatistics` holds everything the metrics need from a set of images: the pool_3 and sFID
moments (mean, covariance in float64), the pool_3 feature vectors for precision/recall and MIND (all of
them unless a subset was asked for), and the Inception Score of the images; and, for the metrics that
read other encoders, only when they were asked for: the moments of the DINOv2 class token (FD-DINOv2),
every image's CLIP embedding (CMMD), the moments in FDr6's five encoder spaces. A reference set is
computed once and stored as an `.npz` whose `mu`, `sigma`, `mu_s`, `sigma_s` use ADM's names; the other
keys (`mu_dinov2`, `sigma_dinov2`, `cmmd_features`, `mu_fdr_<space>`, `sigma_fdr_<space>`) are present
only in files made with those metrics, so files made before (or without them) still load.

Two reference pipelines (`REFERENCE_PIPELINES`) name the two ways ImageNet FIDs are published:
"adm", the ADM evaluator's (DiT, SiT, REPA, LightningDiT, RAE; the default): the reference batch
`VIRTUAL_imagenet256_labeled.npz` (its precomputed moments for FID/sFID, its 10K images for
precision/recall), IS over consecutive splits of 5000; and "jit", what JiT, MAR and iMF-style code
reports: FID with torch-fidelity against a file of FID moments only (`jit_in256_stats.npz`, computed from
the ImageNet training images), IS over 10 splits of a seeded shuffle. The network (the 2015 Inception) is
the same; the reference moments are not, so the same samples get two different FIDs.
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

STATS_FORMAT_VERSION = 1  # the DINOv2 moments are optional keys: older readers ignore them, so still 1

ADM_METRICS = ("fid", "sfid", "is", "pr")  # what `compare` computes unless told otherwise
METRICS = (*ADM_METRICS, "fd-dinov2", "mind", "cmmd", "fdr6")
REFERENCE_PIPELINES = ("adm", "jit")
PIPELINE_METRICS = {"adm": ADM_METRICS, "jit": ("fid", "is")}  # each pipeline's default --metrics
ENCODER_METRICS = ("fd-dinov2", "cmmd", "fdr6")  # the metrics that run an encoder besides Inception


@dataclass
class EvalStatistics:
    mu: np.ndarray  # (2048,) float64, mean of pool_3
    sigma: np.ndarray  # (2048, 2048) float64, covariance of pool_3
    mu_s: np.ndarray | None  # (2023,) float64, mean of mixed_6/conv[..., :7]; None in a file of FID moments only
    sigma_s: np.ndarray | None  # (2023, 2023) float64
    num_images: int
    image_size: tuple[int, int] | None = None  # (H, W) of the images; None when unknown
    pr_features: np.ndarray | None = None  # (N, 2048) float32 pool_3 features for precision/recall
    inception_score: float | None = None
    source: str = ""
    mu_dinov2: np.ndarray | None = None  # (D,) float64, mean of the DINOv2 class token (D = 1024 for ViT-L/14)
    sigma_dinov2: np.ndarray | None = None  # (D, D) float64
    cmmd_features: np.ndarray | None = None  # (N, 768) float32 unit-norm CLIP embeddings (CMMD)
    fdr_moments: dict | None = None  # {space: (mu (D,), sigma (D, D))} float64, FDr6's five encoder spaces

    @property
    def has_dinov2(self) -> bool:
        return self.mu_dinov2 is not None

    def has(self, metric: str) -> bool:
        """Whether these statistics carry what `metric` needs from this side."""
        return {
            "fid": True,
            "sfid": self.mu_s is not None,
            "is": True,
            "pr": True,
            "fd-dinov2": self.has_dinov2,
            "mind": self.pr_features is not None,
            "cmmd": self.cmmd_features is not None,
            "fdr6": self.fdr_moments is not None,
        }[metric]

    def check(self, name: str) -> None:
        """Shapes and finiteness, with a message that says which file is wrong."""
        expected = {
            "mu": (POOL_DIM,),
            "sigma": (POOL_DIM, POOL_DIM),
            "mu_s": (SPATIAL_DIM,),
            "sigma_s": (SPATIAL_DIM, SPATIAL_DIM),
        }
        if (self.mu_s is None) != (self.sigma_s is None):
            raise UserError(f"{name} has only one of mu_s / sigma_s; remake it with `fastdit evaluate --make-ref`")
        for key, shape in expected.items():
            value = getattr(self, key)
            if value is None:  # sFID's moments, absent from a file of FID moments only
                continue
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
        if (self.mu_dinov2 is None) != (self.sigma_dinov2 is None):
            raise UserError(f"{name} has only one of mu_dinov2 / sigma_dinov2; remake it with `fastdit evaluate --make-ref`")
        if self.has_dinov2:
            dim = self.mu_dinov2.shape[0] if self.mu_dinov2.ndim == 1 else -1
            if self.mu_dinov2.ndim != 1 or self.sigma_dinov2.shape != (dim, dim):
                raise UserError(
                    f"{name} has DINOv2 moments of shapes {self.mu_dinov2.shape} and {self.sigma_dinov2.shape}, "
                    "expected (D,) and (D, D); remake it with `fastdit evaluate --make-ref`"
                )
            if not (np.isfinite(self.mu_dinov2).all() and np.isfinite(self.sigma_dinov2).all()):
                raise UserError(f"{name} has non-finite DINOv2 moments; remake it with `fastdit evaluate --make-ref`")
        if self.cmmd_features is not None and (self.cmmd_features.ndim != 2 or not np.isfinite(self.cmmd_features).all()):
            raise UserError(f"{name} has CMMD features of shape {self.cmmd_features.shape} (or non-finite ones), "
                            "expected finite (N, D); remake it with `fastdit evaluate --make-ref`")
        if self.fdr_moments is not None:
            from .fdr import ENCODER_SPACES

            spaces = sorted(space.name for space in ENCODER_SPACES)
            if sorted(self.fdr_moments) != spaces:
                raise UserError(f"{name} has FDr6 moments for {sorted(self.fdr_moments)}, expected {spaces}; "
                                "remake it with `fastdit evaluate --make-ref`")
            for space, (mu, sigma) in self.fdr_moments.items():
                if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
                    raise UserError(f"{name} has FDr6 {space} moments of shapes {mu.shape} and {sigma.shape} (or non-finite "
                                    "values), expected finite (D,) and (D, D); remake it with `fastdit evaluate --make-ref`")

    def require_dinov2(self, role: str) -> None:
        """FD-DINOv2 was asked of these statistics: say how to get them where they are missing."""
        self.require("fd-dinov2", role)

    def require(self, metric: str, role: str) -> None:
        """`metric` was asked of these statistics: say how to get what it needs where that is missing."""
        if self.has(metric):
            return
        where = f" {self.source!r}" if self.source else ""
        what = {
            "fd-dinov2": "no DINOv2 statistics (made without fd-dinov2)",
            "mind": "no pool_3 feature vectors (MIND reads them; a file of FID moments only has none)",
            "cmmd": "no CLIP embeddings (made without cmmd)",
            "fdr6": "no FDr6 statistics (made without fdr6)",
            "sfid": "no sFID moments (a file of FID moments only)",
        }[metric]
        raise UserError(
            f"the {role}{where} has {what}; remake it with "
            f"`fastdit evaluate --make-ref --metrics {','.join(METRICS)} IMAGES OUT.npz`, or pass the images"
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
        **({"mu_s": stats.mu_s, "sigma_s": stats.sigma_s} if stats.mu_s is not None else {}),
        "num_images": np.array(stats.num_images),
        "image_size": np.array(stats.image_size or (0, 0)),
        "pr_features": pr_features.astype(np.float32),
        "inception_score": np.array(math.nan if stats.inception_score is None else stats.inception_score),
    }
    if stats.has_dinov2:
        arrays["mu_dinov2"], arrays["sigma_dinov2"] = stats.mu_dinov2, stats.sigma_dinov2
    if stats.cmmd_features is not None:
        arrays["cmmd_features"] = stats.cmmd_features.astype(np.float32)
    for space, (mu, sigma) in (stats.fdr_moments or {}).items():
        arrays[f"mu_fdr_{space}"], arrays[f"sigma_fdr_{space}"] = mu, sigma
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
            mu_s=archive["mu_s"].astype(np.float64) if "mu_s" in archive.files else None,
            sigma_s=archive["sigma_s"].astype(np.float64) if "sigma_s" in archive.files else None,
            num_images=int(archive["num_images"]),
            image_size=image_size if image_size != (0, 0) else None,
            pr_features=pr_features if len(pr_features) else None,
            inception_score=None if math.isnan(inception_score) else inception_score,
            source=str(path),
        )
        if "mu_dinov2" in archive.files:  # absent from files made without FD-DINOv2
            stats.mu_dinov2 = archive["mu_dinov2"].astype(np.float64)
            stats.sigma_dinov2 = archive["sigma_dinov2"].astype(np.float64) if "sigma_dinov2" in archive.files else None
        if "cmmd_features" in archive.files:  # absent from files made without CMMD
            stats.cmmd_features = archive["cmmd_features"]
        spaces = sorted(key[len("mu_fdr_"):] for key in archive.files if key.startswith("mu_fdr_"))
        if spaces:  # absent from files made without FDr6
            stats.fdr_moments = {space: (archive[f"mu_fdr_{space}"].astype(np.float64),
                                         archive[f"sigma_fdr_{space}"].astype(np.float64)) for space in spaces}
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


def check_metric_names(names) -> tuple[str, ...]:
    """`names` (e.g. from `--metrics fid,fd-dinov2`) in `METRICS` order, or a UserError naming the bad one."""
    names = [name.strip().lower() for name in names if name.strip()]
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise UserError(f"unknown metric {unknown[0]!r}; choose from {','.join(METRICS)}")
    if not names:
        raise UserError(f"no metric asked for; choose from {','.join(METRICS)}")
    return tuple(name for name in METRICS if name in names)


def compare(
    sample: EvalStatistics,
    ref: EvalStatistics,
    *,
    k: int = 3,
    device: str = "cpu",
    pr_distances: str = "float16",
    metrics: tuple[str, ...] = ADM_METRICS,
) -> dict[str, float | int | None]:
    """The `metrics` of `sample` against `ref` (default: the ADM ones), under these keys:

    "fid": FID (Heusel et al. 2017) on pool_3 moments; "sfid": sFID (Nash et al. 2021) on the first 7
    channels of mixed_6/conv; "inception_score" ("is"): IS (Salimans et al. 2016) from the samples'
    logits; "precision", "recall" ("pr"): Kynkäänniemi et al. 2019, on k-NN manifolds of pool_3
    features, with distances in `pr_distances` arithmetic ("float16": ADM's, which reproduces its
    published numbers; see `pairwise_distances`), None when either side carries no features;
    "fd_dinov2" ("fd-dinov2"): the same Fréchet distance on DINOv2 class-token moments (Stein et al.
    2023, see `fastdit.evaluate.dinov2`); "mind": the Monge Inception Distance on pool_3 features
    (`fastdit.evaluate.mind`); "cmmd": CMMD on CLIP embeddings (`fastdit.evaluate.cmmd`); "fdr6": FDr6,
    with each space's raw "fd_<space>" and normalised "fdr_<space>" (`fastdit.evaluate.fdr`).
    Metrics not asked for are left out of the dict.
    """
    metrics = check_metric_names(metrics)
    sample.check(f"the samples ({sample.source or 'in memory'})")
    ref.check(f"the reference ({ref.source or 'in memory'})")
    check_same_resolution(sample.image_size, ref.image_size, ref.source)
    for metric in metrics:  # before minutes of precision/recall, not after
        if metric in ("sfid", "fd-dinov2", "mind", "cmmd", "fdr6"):
            sample.require(metric, "samples")
            ref.require(metric, "reference")
    results: dict[str, float | int | None] = {}
    if "fid" in metrics or "fdr6" in metrics:
        fid = frechet_distance(sample.mu, sample.sigma, ref.mu, ref.sigma)
        if "fid" in metrics:
            results["fid"] = fid
    if "sfid" in metrics:
        results["sfid"] = frechet_distance(sample.mu_s, sample.sigma_s, ref.mu_s, ref.sigma_s)
    if "is" in metrics:
        results["inception_score"] = sample.inception_score
    if "pr" in metrics:
        results["precision"] = results["recall"] = None
        if sample.pr_features is not None and ref.pr_features is not None:
            results["precision"], results["recall"] = precision_recall(
                ref.pr_features, sample.pr_features, k, distances=pr_distances, device=device
            )
    if "fd-dinov2" in metrics:
        if sample.mu_dinov2.shape != ref.mu_dinov2.shape:
            raise UserError(
                f"the samples' DINOv2 features have {len(sample.mu_dinov2)} dimensions but the reference's "
                f"{len(ref.mu_dinov2)}: they come from different encoders; use the same --fd-dinov2-encoder for both"
            )
        results["fd_dinov2"] = frechet_distance(sample.mu_dinov2, sample.sigma_dinov2, ref.mu_dinov2, ref.sigma_dinov2)
    if "mind" in metrics:
        from .mind import monge_inception_distance

        results["mind"] = monge_inception_distance(sample.pr_features, ref.pr_features, device=device)
    if "cmmd" in metrics:
        from .cmmd import mmd_rbf

        results["cmmd"] = mmd_rbf(sample.cmmd_features, ref.cmmd_features, device=device)
    if "fdr6" in metrics:
        from .fdr import fdr6

        results.update(fdr6(fid, sample.fdr_moments, ref.fdr_moments))
    results["num_samples"], results["num_reference"] = sample.num_images, ref.num_images
    return results
