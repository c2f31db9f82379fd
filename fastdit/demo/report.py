"""The demo's numbers: classifier accuracy, the share of samples classified as their class, and the
Frechet distance between Gaussians fitted to classifier features (FID's formula, Heusel et al. 2017,
in a feature space made for 8x8 digits instead of Inception-v3's).

Everything here works on float64 numpy arrays, so it is tested on constructed inputs.
"""

from __future__ import annotations

import numpy as np

# The same Frechet distance as the Inception-based FID of `fastdit evaluate`.
from ..evaluate.metrics import frechet_distance
from ..text import counted


def accuracy(predicted: np.ndarray, labels: np.ndarray) -> float:
    """Share of predictions equal to the labels."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    if predicted.shape != labels.shape or predicted.size == 0:
        raise ValueError(f"need two equally long, non-empty label arrays, got shapes {predicted.shape} and {labels.shape}")
    return float(np.mean(predicted == labels))


def per_class_accuracy(predicted: np.ndarray, labels: np.ndarray, num_classes: int) -> list[float | None]:
    """Accuracy among the items of each class (None for a class with no items)."""
    predicted, labels = np.asarray(predicted), np.asarray(labels)
    shares = []
    for k in range(num_classes):
        members = labels == k
        shares.append(float(np.mean(predicted[members] == k)) if members.any() else None)
    return shares


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and unbiased covariance (D, D) of (N, D) features, in float64."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False).reshape(features.shape[1], features.shape[1])


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def format_report(report: dict) -> str:
    """The few lines the demo prints at the end."""
    fd = report["frechet_distance"]
    trained_in = report["sampling"].get("trained_guidance")  # MeanFlow's guidance, trained in
    guidance = f"cfg {report['sampling']['cfg_scale']}" if trained_in is None else f"guidance {trained_in:g} trained in"
    lines = [
        f"classifier (judge): {report['classifier']['test_accuracy']:.2%} accuracy on "
        f"{report['classifier']['num_test']} real test digits (trained on {report['classifier']['num_train']} others)",
        f"samples classified as their class: {report['class_match']:.2%} of {report['num_samples']} "
        f"({guidance}, {report['sampling']['sampler']} {counted(report['sampling']['num_steps'], 'step')})",
        f"Frechet distance in classifier features: samples vs real {fd['samples_vs_real']:.3f}, "
        f"real vs real {fd['real_vs_real']:.3f} ({fd['num_samples']} samples and {fd['num_real_compared']} real digits, "
        f"each against the same {fd['num_reference']} real digits)",
        "per class: " + "  ".join(
            f"{k}:{share:.0%}" for k, share in enumerate(report["class_match_per_class"]) if share is not None
        ),
    ]
    return "\n".join(lines)
