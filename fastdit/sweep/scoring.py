"""How a sweep scores a sample set: one number to minimise (the metric), and others shown beside it.

* "mind" and "fid": Inception-v3 features of the samples against a reference (`fastdit evaluate`'s
  definitions, `fastdit.evaluate`): MIND (sliced Wasserstein, arXiv 2605.06797) is the cheap one its
  authors propose, 5K samples ranking models as FID-50K does; FID on a few thousand samples is biased
  upwards by the count but ranks settings at one count.
* "digits": the demo's judge (`fastdit.demo.run.digits_judge`): the Fréchet distance of the samples'
  features in the digit classifier against real digits the DiT never saw, and the share classified as
  their class beside it.

A scorer is built once, on the process that scores (rank 0), and reads a sample-ddp `.npz`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError

METRICS = ("mind", "fid", "digits")
JUDGE_SEED = 0  # the demo's default seed: its judge's split and training


@dataclass(frozen=True)
class Columns:
    """How a metric is shown: `metric` the key of the number to minimise, `label` its name, `others`
    (key, name, format) of the numbers shown beside it."""

    metric: str
    label: str
    others: tuple = ()


def scorer_columns(metric: str) -> Columns:
    return {
        "digits": Columns("fd", "Fréchet (digit classifier)", (("class_match", "class match", "{:.1%}"),
                                                                 ("fd_floor", "real floor", "{:.1f}"))),
        "mind": Columns("mind", "MIND", (("fid", "FID", "{:.2f}"),)),
        "fid": Columns("fid", "FID"),
    }[metric]


class DigitsScorer:
    def __init__(self, seed: int = JUDGE_SEED):
        from ..demo.run import digits_judge

        self.judge = digits_judge(seed)

    def score(self, path: Path) -> dict:
        images, labels = _read(path)
        if images.shape[1:] != (8, 8, 3) or not (images == images[..., :1]).all():
            raise UserError(f"{str(path)!r} does not hold 8x8 gray digits (shape {images.shape[1:]}); --metric digits "
                            "judges a model trained on the digits")
        report = self.judge.report(images[..., :1], labels)  # sample-ddp writes gray as RGB: one channel back
        fd = report["frechet_distance"]
        return {"fd": fd["samples_vs_real"], "fd_floor": fd["real_vs_real"], "class_match": report["class_match"]}


class InceptionScorer:
    def __init__(self, metric: str, ref: str, *, inception_weights: str | None = None, device="cpu", batch_size: int = 64):
        from ..evaluate import InceptionFeatureExtractor

        self.device = device
        self.metrics = ("fid", "mind") if metric == "mind" else ("fid",)
        self.extractor = InceptionFeatureExtractor(inception_weights, device=device, batch_size=batch_size)
        self.ref_path, self.ref = ref, None  # read with the first samples: a folder is cropped to their side

    def score(self, path: Path) -> dict:
        from ..evaluate import compare, statistics_for_path
        from ..evaluate.sources import open_images, reference_crop_side

        if self.ref is None:
            crop = reference_crop_side(self.ref_path, tuple(open_images(path).image_size))
            self.ref = statistics_for_path(self.ref_path, self.extractor, reference=True, progress=False, crop_to=crop)
        stats = statistics_for_path(path, self.extractor, progress=False)
        results = compare(stats, self.ref, metrics=self.metrics, device=str(self.device))
        return {name: float(results[name]) for name in self.metrics}


def scorer_identity(metric: str, ref: str | None) -> dict:
    """What the scores depend on besides the samples (a resumed sweep must match it)."""
    if metric == "digits":
        from ..demo.classifier import ClassifierOptions

        return {"metric": "digits", "judge_seed": JUDGE_SEED, "judge_epochs": ClassifierOptions.epochs}
    return {"metric": metric, "ref": str(Path(ref).resolve()) if ref else None}


def check_metric(metric: str, ref: str | None) -> None:
    if metric not in METRICS:
        raise UserError(f"unknown metric {metric!r}; choose one of {', '.join(METRICS)}")
    if metric != "digits" and not ref:
        raise UserError(f"--metric {metric} compares with reference images: pass --ref (an ADM .npz batch, an image "
                        "folder, or statistics from `fastdit evaluate --make-ref --metrics fid,mind`)")
    if metric == "digits" and ref:
        raise UserError("--metric digits compares with the real digits itself: leave --ref out")
    if ref and not Path(ref).exists():
        raise UserError(f"--ref {ref!r} does not exist")


def make_scorer(metric: str, ref: str | None, *, inception_weights=None, device="cpu"):
    if metric == "digits":
        return DigitsScorer()
    return InceptionScorer(metric, ref, inception_weights=inception_weights, device=device)


def _read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as data:
        return data["arr_0"], data["arr_1"]
