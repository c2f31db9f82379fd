"""The metric math, on features: FID/sFID, Inception Score, precision and recall.

Pure functions and small accumulators over numpy/torch arrays; nothing here knows about images,
files or the network. Everything that is summed over images is summed in float64.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import UserError
from .float32 import full_float32


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


ADM_SINGULAR_EPS = 1e-6  # ADM's `frechet_distance(..., eps=1e-6)`


def is_singular(covariance: np.ndarray) -> bool:
    """Not positive definite: Cholesky fails, or the rank is below full with numpy's `matrix_rank`
    tolerance (max eigenvalue * dim * float64 eps).

    A covariance of N images has rank <= N - 1, so this is what fewer images than feature dimensions
    give (e.g. training-time evaluations of < 2048 images); a full-rank pool_3 covariance has its
    smallest eigenvalues many orders of magnitude above that tolerance.
    """
    covariance = torch.as_tensor(np.asarray(covariance), dtype=torch.float64)
    if torch.linalg.cholesky_ex(covariance).info.item() != 0:  # cheap, and decides most singular cases
        return True
    return int(torch.linalg.matrix_rank(covariance, hermitian=True)) < len(covariance)


def frechet_distance(
    mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, *, eps: float = ADM_SINGULAR_EPS
) -> float:
    """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, FID):

        ||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr( (sigma1 sigma2)^(1/2) )

    with ADM's fallback for a singular product: ADM adds `eps` to the diagonals of both covariances
    inside the square root (the traces keep the plain ones) when scipy's `sqrtm(sigma1 @ sigma2)` is
    not finite, which is what a singular product gave with the scipy of its time. Here the trigger is
    tested directly (`is_singular` on either factor), since newer scipy returns finite values there.
    """
    mu1, mu2 = np.asarray(mu1, dtype=np.float64), np.asarray(mu2, dtype=np.float64)
    sigma1, sigma2 = np.asarray(sigma1, dtype=np.float64), np.asarray(sigma2, dtype=np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise UserError(
            f"statistics do not match: mean {mu1.shape} / covariance {sigma1.shape} vs mean {mu2.shape} / "
            f"covariance {sigma2.shape}; both must come from the same Inception features"
        )
    diff = mu1 - mu2
    offset = eps * np.eye(len(mu1)) if is_singular(sigma1) or is_singular(sigma2) else 0.0
    trace_sqrt = trace_sqrt_product(sigma1 + offset, sigma2 + offset)
    distance = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    # A distance is >= 0; a tiny negative value is round-off of a zero distance.
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

    def _split_score(self) -> float:
        """exp(E_x KL) of the split being accumulated."""
        marginal = self._prob_sum / self._count
        marginal_term = float((marginal * np.log(np.clip(marginal, 1e-300, None))).sum())
        return float(np.exp(self._neg_entropy_sum / self._count - marginal_term))

    def _close_split(self) -> None:
        self.split_scores.append(self._split_score())
        self._reset_split()

    def score(self) -> float:
        scores = self.split_scores + ([self._split_score()] if self._count else [])
        if not scores:
            raise UserError("the Inception Score needs at least one image")
        return float(np.mean(scores))


class TorchFidelityInceptionScore:
    """The Inception Score as torch-fidelity computes it (`metric_isc.py`, the IS that JiT and MAR report):
    all logits are kept, shuffled by numpy's `RandomState(2020).permutation`, and cut into 10 splits at
    i * N // 10; per split exp(E_x KL(p(y|x) || p(y))), averaged. Same formula as ADM's, other splits:
    ADM takes consecutive splits of 5000 images, so the two differ by the split noise (a few tenths)."""

    SPLITS = 10  # torch-fidelity's isc_splits
    SEED = 2020  # torch-fidelity's rng_seed

    def __init__(self):
        self._logits: list[np.ndarray] = []

    def update(self, logits: np.ndarray | torch.Tensor) -> None:
        self._logits.append(torch.as_tensor(logits).detach().to("cpu", torch.float32).numpy())

    def score(self) -> float:
        if not self._logits:
            raise UserError("the Inception Score needs at least one image")
        logits = np.concatenate(self._logits)
        logits = torch.from_numpy(logits[np.random.RandomState(self.SEED).permutation(len(logits))]).double()
        log_probs = torch.log_softmax(logits, dim=1)
        probs = log_probs.exp()
        n, scores = len(logits), []
        for i in range(self.SPLITS):
            part, log_part = probs[i * n // self.SPLITS : (i + 1) * n // self.SPLITS], \
                log_probs[i * n // self.SPLITS : (i + 1) * n // self.SPLITS]
            if len(part) == 0:
                continue
            marginal = part.mean(0, keepdim=True)
            scores.append(float((part * (log_part - marginal.log())).sum(1).mean().exp()))
        return float(np.mean(scores))


def inception_score(logits: np.ndarray | torch.Tensor, split_size: int = 5000) -> float:
    """Inception Score of all `logits` (N, C) at once; see `InceptionScoreAccumulator`."""
    accumulator = InceptionScoreAccumulator(split_size)
    accumulator.update(logits)
    return accumulator.score()


PR_DISTANCES = ("float16", "float32")  # the arithmetic of the pairwise distances; float16 is ADM's
ADM_BLOCK_SIZE = 10_000  # ADM's ManifoldEstimator(row_batch_size=10000, col_batch_size=10000)


def _batch_pairwise_distances(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ADM's `_batch_pairwise_distances`: max(|u|^2 - 2 u v^T + |v|^2, 0), (B1, D) x (B2, D) -> (B1, B2).

    Every step is rounded to the inputs' dtype, as TF does for a float16 graph: the squares, the row
    norms, the dot products and each addition. Sums and dot products accumulate in float32, as TF's
    float16 reductions and GPU matmuls do; products of two float16 numbers are exact in float32, so the
    float32 matmul of float16 values below is a float16 GEMM with float32 accumulation on any device.
    """
    def squared_norms(x: torch.Tensor) -> torch.Tensor:
        return x.square().float().sum(1).to(x.dtype)

    dots = (u.float() @ v.float().T).to(u.dtype)
    return ((squared_norms(u)[:, None] - 2 * dots) + squared_norms(v)[None]).clamp_min(0)


def pairwise_distances(u: torch.Tensor, v: torch.Tensor, arithmetic: str = "float16") -> torch.Tensor:
    """Squared Euclidean distances as ADM's `DistanceBlock` computes them (float32 result).

    "float16" (ADM's evaluator, the default): the features are cast to float16 and the distances
    computed in float16; only if some distance of the block is not finite (float16 overflows at
    65504), the whole block is recomputed in float32 (ADM's `tf.cond(reduce_all(is_finite(...)))`).
    The float16 distances are coarse (steps of 0.25 between 256 and 512, for instance), so many
    of them tie with a k-NN radius and count as inside it (<=): this is why precision/recall computed
    in float16 are slightly higher than in float32, and why only "float16" reproduces published ADM
    numbers. "float32": the same formula in float32.
    """
    if arithmetic == "float16":
        distances = _batch_pairwise_distances(u.half(), v.half())
        if bool(torch.isfinite(distances).all()):
            return distances.float()
    return _batch_pairwise_distances(u.float(), v.float())


def _blocks(features: torch.Tensor, block_size: int):
    for start in range(0, len(features), block_size):
        yield slice(start, start + block_size), features[start : start + block_size]


def manifold_radii(
    features: torch.Tensor, k: int = 3, *, arithmetic: str = "float16", block_size: int = ADM_BLOCK_SIZE
) -> torch.Tensor:
    """Squared distance from each feature to its k-th nearest neighbour, itself excluded (N,).

    Kynkäänniemi et al. 2019: the union of these k-NN balls estimates the support of the
    distribution. ADM takes element k of the partially sorted distance row, where element 0 is the
    point itself, i.e. the (k+1)-th smallest distance. Distances are computed block by block
    (block_size x block_size) and only the k+1 smallest per row are kept, so memory does not grow
    with N^2.
    """
    if len(features) <= k:
        raise UserError(f"precision/recall with k={k} needs more than {k} images per side, got {len(features)}")
    radii = []
    for _, rows in _blocks(features, block_size):
        nearest = rows.new_empty(len(rows), 0)  # the k+1 smallest distances so far, per row
        for _, cols in _blocks(features, block_size):
            candidates = torch.cat([nearest, pairwise_distances(rows, cols, arithmetic)], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(
    ref_features: np.ndarray | torch.Tensor,
    sample_features: np.ndarray | torch.Tensor,
    k: int = 3,
    *,
    distances: str = "float16",
    device: str | torch.device = "cpu",
    block_size: int = ADM_BLOCK_SIZE,
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019), as ADM's `compute_prec_recall`.

    precision: fraction of samples inside the reference manifold (realism);
    recall:    fraction of references inside the sample manifold (coverage).
    Every feature counts (ADM feeds all sample activations). `distances` is the arithmetic of the
    pairwise distances, see `pairwise_distances`: "float16" (ADM's, reproduces its published numbers)
    or "float32". Memory is bounded by block_size x block_size distances (ADM's ManifoldEstimator).
    """
    if distances not in PR_DISTANCES:
        raise UserError(f"unknown precision/recall distances {distances!r}; choose one of {', '.join(PR_DISTANCES)}")
    if block_size < 1:
        raise UserError(f"block size must be >= 1, got {block_size}")
    ref = torch.as_tensor(np.asarray(ref_features), dtype=torch.float32, device=device)
    sample = torch.as_tensor(np.asarray(sample_features), dtype=torch.float32, device=device)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise UserError(
            f"precision/recall features do not match: reference {tuple(ref.shape)} vs samples {tuple(sample.shape)}"
        )
    with full_float32():  # the float32 dot products must not become TF32 on a GPU
        ref_radii = manifold_radii(ref, k, arithmetic=distances, block_size=block_size)
        sample_radii = manifold_radii(sample, k, arithmetic=distances, block_size=block_size)
        # ADM's `evaluate_pr`: one distance block serves both directions; ties count as inside (<=).
        ref_inside = torch.zeros(len(ref), dtype=torch.bool, device=ref.device)
        sample_inside = torch.zeros(len(sample), dtype=torch.bool, device=ref.device)
        for ref_slice, ref_block in _blocks(ref, block_size):
            for sample_slice, sample_block in _blocks(sample, block_size):
                block = pairwise_distances(ref_block, sample_block, distances)  # (refs, samples)
                ref_inside[ref_slice] |= (block <= sample_radii[sample_slice][None]).any(dim=1)
                sample_inside[sample_slice] |= (block <= ref_radii[ref_slice][:, None]).any(dim=0)
    return float(sample_inside.double().mean()), float(ref_inside.double().mean())
