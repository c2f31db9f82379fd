"""The demo's numbers: classifier accuracy, the share of samples classified as their class, and the
Frechet distance between Gaussians fitted to classifier features (FID's formula, Heusel et al. 2017,
in a feature space made for 8x8 digits instead of Inception-v3's).

Everything here is plain numpy in float64 on arrays, so it is tested on constructed inputs.
"""

from __future__ import annotations

import numpy as np


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


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix by its eigendecomposition.

    Round-off can leave tiny negative eigenvalues in a covariance estimated from few samples; they are
    clipped to 0 (the true matrix is PSD, so they carry no information).
    """
    symmetric = (matrix + matrix.T) / 2
    eigenvalues, eigenvectors = np.linalg.eigh(symmetric)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """d² = |μ1 − μ2|² + tr(Σ1) + tr(Σ2) − 2 tr((Σ1 Σ2)^½).

    tr((Σ1 Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½): Σ1 Σ2 is not symmetric, but it is similar to the symmetric
    PSD matrix Σ1^½ Σ2 Σ1^½, so both traces are the sum of square roots of the same non-negative
    eigenvalues. That needs only symmetric eigendecompositions (no scipy.linalg.sqrtm, whose complex
    round-off FID code has to discard), and is exact for singular covariances too.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"mismatched statistics: means {mu1.shape}, {mu2.shape}; covariances {sigma1.shape}, {sigma2.shape}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_sqrt
    return float(max(distance, 0.0))  # tiny negative values are round-off of a zero distance


def frechet_distance_of_features(features1: np.ndarray, features2: np.ndarray) -> float:
    return frechet_distance(*gaussian_stats(features1), *gaussian_stats(features2))


def format_report(report: dict) -> str:
    """The few lines the demo prints at the end."""
    fd = report["frechet_distance"]
    lines = [
        f"classifier (judge): {report['classifier']['test_accuracy']:.2%} accuracy on "
        f"{report['classifier']['num_test']} real test digits (trained on {report['classifier']['num_train']} others)",
        f"samples classified as their class: {report['class_match']:.2%} of {report['num_samples']} "
        f"(cfg {report['sampling']['cfg_scale']}, {report['sampling']['sampler']} {report['sampling']['num_steps']} steps)",
        f"Frechet distance in classifier features: samples vs real {fd['samples_vs_real']:.3f}, "
        f"real vs real {fd['real_vs_real']:.3f} ({fd['num_samples']} samples and {fd['num_real_compared']} real digits, "
        f"each against the same {fd['num_reference']} real digits)",
        "per class: " + "  ".join(
            f"{k}:{share:.0%}" for k, share in enumerate(report["class_match_per_class"]) if share is not None
        ),
    ]
    return "\n".join(lines)
