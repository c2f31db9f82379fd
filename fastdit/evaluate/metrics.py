"""The metric math, on features: FID/sFID, Inception Score, precision and recall.

Pure functions and small accumulators over numpy/torch arrays; nothing here knows about images,
files or the network. Everything that is summed over images is summed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError


class RunningMoments:
    """Mean and covariance of a stream of feature batches, merged exactly in float64.

    Each batch contributes its own mean and centred scatter matrix, merged with Chan et al.'s
    pairwise update; this avoids the cancellation of E[xx^T] - mu mu^T and gives the same numbers as
    `np.mean` / `np.cov(rowvar=False)` (ADM's `compute_statistics`) whatever the batch size.
    """

    def __init__(self, dim: int, device: str | torch.device = "cpu"):
        self.dim = dim
        self.count = 0
        self._mean = torch.zeros(dim, dtype=torch.float64, device=device)
        self._scatter = torch.zeros(dim, dim, dtype=torch.float64, device=device)  # sum of (x - mean)(x - mean)^T

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        batch = torch.as_tensor(features).detach().to(self._mean.device, torch.float64).flatten(1)  # (B, D)
        if batch.shape[1] != self.dim:
            raise ValueError(f"expected features of dimension {self.dim}, got {batch.shape[1]}")
        n_batch = len(batch)
        if n_batch == 0:
            return
        batch_mean = batch.mean(0)
        centred = batch - batch_mean
        total = self.count + n_batch
        delta = batch_mean - self._mean
        self._scatter += centred.T @ centred + torch.outer(delta, delta) * (self.count * n_batch / total)
        self._mean += delta * (n_batch / total)
        self.count = total

    @property
    def mean(self) -> np.ndarray:
        return self._mean.cpu().numpy().copy()

    def covariance(self) -> np.ndarray:
        """Unbiased (N - 1) covariance, as `np.cov`."""
        if self.count < 2:
            raise UserError(f"a covariance needs at least 2 images, got {self.count}; evaluate more images")
        return (self._scatter / (self.count - 1)).cpu().numpy()


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr( sqrtm(sigma1 @ sigma2) ) for covariance matrices, without scipy.

    Write sigma1 = F F^T (Cholesky, or the eigen-decomposition when sigma1 is singular). Then
    sigma1 @ sigma2 = F (F^T sigma2) has the eigenvalues of F^T sigma2 F, a symmetric PSD matrix:
    real and >= 0, and the trace of the principal square root is the sum of their square roots.
    This stays stable when the covariances are singular (fewer images than dimensions), where
    scipy's `sqrtm` (used by ADM and TTUR) can return complex or non-finite values. Computed in
    float64 with torch's LAPACK: one Cholesky and one symmetric eigensolve of a 2048 x 2048 matrix.
    """
    sigma1 = torch.as_tensor(np.asarray(sigma1), dtype=torch.float64)
    sigma2 = torch.as_tensor(np.asarray(sigma2), dtype=torch.float64)
    factor, info = torch.linalg.cholesky_ex(sigma1)
    if info.item() != 0:  # tr sqrtm(s1 s2) = tr sqrtm(s2 s1): try factoring the other one
        sigma1, sigma2 = sigma2, sigma1
        factor, info = torch.linalg.cholesky_ex(sigma1)
    if info.item() != 0:  # both singular (fewer images than dims): F = V diag(sqrt(w)), slower
        eigenvalues, eigenvectors = torch.linalg.eigh((sigma1 + sigma1.T) / 2)
        factor = eigenvectors * eigenvalues.clamp_min(0).sqrt()
    middle = factor.T @ sigma2 @ factor
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    return float(eigenvalues.clamp_min(0).sqrt().sum())


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr( (sigma1 sigma2)^(1/2) )
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(
            f"statistics do not match: mean {mu1.shape} / covariance {sigma1.shape} vs mean {mu2.shape} / "
            f"covariance {sigma2.shape}; both must come from the same Inception features"
        )
    diff = mu1 - mu2
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    # A distance is >= 0; a tiny negative value is round-off of a zero distance (square roots of
    # near-zero eigenvalues of singular covariances amplify it to ~1e-7).
    return float(max(distance, 0.0))


class InceptionScoreAccumulator:
    """Inception Score (Salimans et al. 2016) over a stream of logits, split as ADM splits it.

    IS = exp( E_x KL(p(y|x) || p(y)) ), averaged over consecutive splits of `split_size` images (ADM's
    `compute_inception_score`: 5000, i.e. 10 splits for the usual 50K samples; a last, shorter split
    counts as a split too). Per split, E_x KL = mean_x sum_y p log p - sum_y pbar log pbar with
    pbar = mean_x p(y|x), so each split needs only two running sums: nothing per image is kept.
    """

    def __init__(self, split_size: int = 5000):
        if split_size < 1:
            raise ValueError(f"split_size must be >= 1, got {split_size}")
        self.split_size = split_size
        self.split_scores: list[float] = []
        self._reset_split()

    def _reset_split(self) -> None:
        self._count = 0
        self._prob_sum: np.ndarray | None = None  # sum_x p(y|x), (C,)
        self._neg_entropy_sum = 0.0  # sum_x sum_y p log p

    def update(self, logits: np.ndarray | torch.Tensor) -> None:
        logits = torch.as_tensor(logits).detach().to("cpu", torch.float64)  # (B, C)
        while len(logits):
            take = self.split_size - self._count
            part, logits = logits[:take], logits[take:]
            log_probs = torch.log_softmax(part, dim=1)
            probs = log_probs.exp()
            prob_sum = probs.sum(0).numpy()
            self._prob_sum = prob_sum if self._prob_sum is None else self._prob_sum + prob_sum
            self._neg_entropy_sum += float((probs * log_probs).sum())
            self._count += len(part)
            if self._count == self.split_size:
                self._close_split()

    def _close_split(self) -> None:
        marginal = self._prob_sum / self._count
        marginal_term = float((marginal * np.log(np.clip(marginal, 1e-300, None))).sum())
        self.split_scores.append(float(np.exp(self._neg_entropy_sum / self._count - marginal_term)))
        self._reset_split()

    def score(self) -> float:
        scores = list(self.split_scores)
        if self._count:
            marginal = self._prob_sum / self._count
            marginal_term = float((marginal * np.log(np.clip(marginal, 1e-300, None))).sum())
            scores.append(float(np.exp(self._neg_entropy_sum / self._count - marginal_term)))
        if not scores:
            raise UserError("the Inception Score needs at least one image")
        return float(np.mean(scores))


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """Inception Score of all `logits` (N, C) at once; see `InceptionScoreAccumulator`."""
    accumulator = InceptionScoreAccumulator(split_size)
    accumulator.update(logits)
    return accumulator.score()


def _squared_distances(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """Pairwise squared Euclidean distances, clamped at 0 (ADM's `_batch_pairwise_distances`)."""
    rows_sq = (rows * rows).sum(1, keepdim=True)
    cols_sq = (cols * cols).sum(1)[None]
    return (rows_sq - 2 * rows @ cols.T + cols_sq).clamp_min_(0)


def manifold_radii(features: torch.Tensor, k: int = 3, row_block: int = 2048) -> torch.Tensor:
    """Squared distance from each feature to its k-th nearest neighbour, itself excluded (N,).

    Kynkäänniemi et al. 2019: the union of these k-NN balls estimates the support of the
    distribution. ADM takes element k of the partially sorted distance row, where element 0 is the
    point itself, i.e. the (k+1)-th smallest distance.
    """
    if len(features) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images per side, got {len(features)}")
    radii = [
        torch.kthvalue(_squared_distances(features[i : i + row_block], features), k + 1, dim=1).values
        for i in range(0, len(features), row_block)
    ]
    return torch.cat(radii)


def _fraction_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, row_block: int) -> float:
    """Fraction of `points` that fall inside at least one ball (centre, squared radius); ADM uses <=."""
    inside = 0
    for i in range(0, len(points), row_block):
        distances = _squared_distances(points[i : i + row_block], centres)  # (B, M)
        inside += int((distances <= radii[None]).any(dim=1).sum())
    return inside / len(points)


def precision_recall(
    ref_features: np.ndarray | torch.Tensor,
    sample_features: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    device: str | torch.device = "cpu",
    row_block: int = 2048,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's `compute_prec_recall`.

    precision: fraction of samples inside the reference manifold (realism);
    recall:    fraction of references inside the sample manifold (coverage).
    Distances are computed in float32 (ADM computes them in float16 and falls back to float32).
    """
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    sample = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise UserError(
            f"precision/recall features do not match: reference {tuple(ref.shape)} vs samples {tuple(sample.shape)}"
        )
    ref_radii = manifold_radii(ref, k, row_block)
    sample_radii = manifold_radii(sample, k, row_block)
    precision = _fraction_inside(sample, ref, ref_radii, row_block)
    recall = _fraction_inside(ref, sample, sample_radii, row_block)
    return precision, recall
