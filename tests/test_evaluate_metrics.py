"""The evaluation math against independent references on constructed inputs (no network)."""

import numpy as np
import pytest
import torch
from scipy import linalg
from scipy.spatial.distance import cdist

from fastdit.errors import UserError
from fastdit.evaluate.metrics import (
    InceptionScoreAccumulator,
    RunningMoments,
    frechet_distance,
    inception_score,
    pairwise_distances,
    precision_recall,
    trace_sqrt_product,
)


def random_covariance(rng, dim, num_points):
    points = rng.standard_normal((num_points, dim)) @ rng.standard_normal((dim, dim))
    return np.cov(points, rowvar=False)


def scipy_frechet(mu1, sigma1, mu2, sigma2):
    """TTUR / ADM's formula, with scipy's general matrix square root."""
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# full rank; one side rank-deficient (fewer points than dims); both rank-deficient
@pytest.mark.parametrize("num_points", [(200, 200), (10, 200), (200, 10), (12, 16)])
def test_trace_sqrt_product_matches_scipy_sqrtm(num_points):
    rng = np.random.default_rng(0)
    sigma1, sigma2 = (random_covariance(rng, 24, n) for n in num_points)
    expected = np.trace(linalg.sqrtm(sigma1 @ sigma2).real)
    assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_matches_direct_computation():
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    sigma1, sigma2 = random_covariance(rng, 32, 300), random_covariance(rng, 32, 300)
    expected = scipy_frechet(mu1, sigma1, mu2, sigma2)
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-7)


def adm_frechet_with_offset(mu1, sigma1, mu2, sigma2, eps):
    """ADM's fallback branch: eps on both diagonals inside sqrtm, the plain traces outside."""
    offset = eps * np.eye(len(mu1))
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset)).real
    diff = mu1 - mu2
    return diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)


# One or both sides singular; with as many points as dimensions (rank 31 of 32) Cholesky may succeed.
@pytest.mark.parametrize("num_points", [(10, 200), (200, 10), (12, 16), (32, 200), (200, 32)])
def test_frechet_distance_of_a_singular_product_uses_adms_offset(num_points):
    rng = np.random.default_rng(7)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    sigma1, sigma2 = (random_covariance(rng, 32, n) for n in num_points)
    expected = adm_frechet_with_offset(mu1, sigma1, mu2, sigma2, eps=1e-6)
    without_offset = scipy_frechet(mu1, sigma1, mu2, sigma2)
    # The offset moves the distance by ~2 * sqrt(eps * eigenvalue) per missing dimension, ~1e-2 here:
    # far above the ~1e-10 float64 error of either square-root method.
    assert abs(expected - without_offset) > 1e-4
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)


def test_frechet_distance_closed_form_for_diagonal_gaussians():
    # For commuting (diagonal) covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    expected = 1 + 4 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_rejects_mismatched_dimensions():
    with pytest.raises(UserError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.parametrize("splits", [[100], [1, 99], [7, 13, 31, 49], [50, 50]])
def test_running_moments_equal_numpy_whatever_the_batching(splits):
    rng = np.random.default_rng(2)
    # A large common offset: the naive E[xx^T] - mu mu^T would lose most digits here.
    features = 1e4 + rng.standard_normal((100, 6)).astype(np.float32)
    moments = RunningMoments(6)
    for chunk in np.split(features, np.cumsum(splits)[:-1]):
        moments.update(torch.from_numpy(chunk))
    assert moments.count == 100
    np.testing.assert_allclose(moments.mean, features.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(moments.covariance(), np.cov(features.astype(np.float64), rowvar=False), rtol=1e-9)


def test_running_moments_need_two_images():
    moments = RunningMoments(3)
    moments.update(np.ones((1, 3)))
    with pytest.raises(UserError, match="at least 2 images"):
        moments.covariance()


def adm_inception_score(logits, split_size):
    """ADM's `compute_inception_score`, written out with numpy from softmax probabilities."""
    logits = np.asarray(logits, dtype=np.float64)
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i : i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_known_values():
    num_classes = 10
    # Identical predictions for every image: p(y|x) = p(y), KL = 0, IS = 1.
    assert inception_score(np.zeros((40, num_classes)), split_size=20) == pytest.approx(1.0)
    # Confident predictions spread evenly over all classes: IS = number of classes.
    confident = 60.0 * np.eye(num_classes)[np.arange(50) % num_classes]
    assert inception_score(confident, split_size=50) == pytest.approx(num_classes, rel=1e-6)
    # Confident but all the same class: IS = 1.
    same = 60.0 * np.eye(num_classes)[np.zeros(50, dtype=int)]
    assert inception_score(same, split_size=50) == pytest.approx(1.0, rel=1e-6)


def test_inception_score_matches_adm_splits_and_streaming():
    logits = np.random.default_rng(3).standard_normal((23, 17)) * 3
    expected = adm_inception_score(logits, split_size=5)  # splits of 5, 5, 5, 5, 3
    assert inception_score(logits, split_size=5) == pytest.approx(expected, rel=1e-10)
    streamed = InceptionScoreAccumulator(split_size=5)
    for chunk in np.split(logits, [3, 4, 11, 19]):
        streamed.update(torch.from_numpy(chunk))
    assert streamed.score() == pytest.approx(expected, rel=1e-10)
    assert len(streamed.split_scores) == 4  # the short last split is added when scoring
    # Splitting matters: one split of everything is a different (here larger) number.
    assert inception_score(logits, split_size=100) != pytest.approx(expected, rel=1e-3)


def test_precision_recall_on_a_line_with_known_answer():
    # Reference: 20 points at x = 0..19; samples: the first 10 of them.
    ref = np.stack([np.arange(20.0), np.zeros(20)], axis=1)
    samples = ref[:10].copy()
    precision, recall = precision_recall(ref, samples, k=3)
    # Every sample sits on a reference point.
    assert precision == 1.0
    # Sample radii (3rd neighbour, self excluded): 2 inside the run, 3 at its ends, so the ball of
    # x=9 reaches x=12 (<=, as ADM). Reference points 0..12 are covered: 13 of 20.
    assert recall == pytest.approx(13 / 20)


def test_precision_recall_of_identical_and_disjoint_sets():
    rng = np.random.default_rng(4)
    cloud = rng.standard_normal((50, 8))
    assert precision_recall(cloud, cloud) == (1.0, 1.0)
    assert precision_recall(cloud, cloud + 100.0) == (0.0, 0.0)


def brute_force_precision_recall(ref, samples, k):
    def radii(points):
        return np.sort(cdist(points, points, "sqeuclidean"), axis=1)[:, k]

    ref_radii, sample_radii = radii(ref), radii(samples)
    distances = cdist(samples, ref, "sqeuclidean")  # (samples, ref)
    precision = (distances <= ref_radii[None]).any(1).mean()
    recall = (distances.T <= sample_radii[None]).any(1).mean()
    return precision, recall


def test_precision_recall_matches_brute_force_in_bounded_blocks(monkeypatch):
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((120, 16))
    samples = 0.8 * rng.standard_normal((90, 16)) + 0.3
    expected = brute_force_precision_recall(ref, samples, k=3)
    block_shapes = []

    def recording(u, v, arithmetic):
        block_shapes.append((len(u), len(v)))
        return pairwise_distances(u, v, arithmetic)

    monkeypatch.setattr("fastdit.evaluate.metrics.pairwise_distances", recording)
    # float32 distances of unit-scale Gaussians: the nearest float64 tie is far beyond float32 round-off.
    got = precision_recall(ref, samples, k=3, distances="float32", block_size=32)
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # a case where both can be wrong
    # Memory stays bounded: never more than one 32 x 32 block of distances (ADM: row batch x column batch).
    assert max(block_shapes) == (32, 32) and len(block_shapes) > 3 * 4


def adm_float16_distances(u, v):
    """ADM's DistanceBlock in float16, step by step with numpy's float16 (each operation rounded to float16)."""
    u16, v16 = np.asarray(u).astype(np.float16), np.asarray(v).astype(np.float16)
    norm_u = (u16 * u16).astype(np.float64).sum(1).astype(np.float16)
    norm_v = (v16 * v16).astype(np.float64).sum(1).astype(np.float16)
    dots = (u16.astype(np.float64) @ v16.astype(np.float64).T).astype(np.float16)
    return np.maximum((norm_u[:, None] - np.float16(2) * dots) + norm_v[None], np.float16(0))


def test_float16_distances_round_every_step_as_adm():
    # Small integers: every float32 sum below is exact (< 2^24), so the result does not depend on the
    # summation order; norms and dot products up to 24 * 15^2 = 5400 are rounded to float16 (steps of 4).
    rng = np.random.default_rng(6)
    u, v = rng.integers(0, 16, (40, 24)).astype(np.float32), rng.integers(0, 16, (30, 24)).astype(np.float32)
    ours = pairwise_distances(torch.from_numpy(u), torch.from_numpy(v), "float16")
    expected = adm_float16_distances(u, v).astype(np.float32)
    np.testing.assert_array_equal(ours.numpy(), expected)
    exact = cdist(u, v, "sqeuclidean")
    assert not np.array_equal(expected, exact)  # the float16 rounding shows on these inputs
    np.testing.assert_array_equal(pairwise_distances(torch.from_numpy(u), torch.from_numpy(v), "float32"), exact)


# Two references 20 apart (each is the other's nearest neighbour: squared radius 400), a sample just
# outside the ball of the first one (squared distance 20.0025^2 = 400.1) and one far away. In float16,
# 20.0025 is 20 (steps of 1/64 there): the first sample ties with the radius and counts as inside.
TIE_REF = np.array([[0.0, 0.0], [20.0, 0.0]])
TIE_SAMPLES = np.array([[-20.0025, 0.0], [100.0, 0.0]])


def test_float16_ties_count_inside_as_in_adm():
    assert precision_recall(TIE_REF, TIE_SAMPLES, k=1, distances="float16") == (0.5, 1.0)
    assert precision_recall(TIE_REF, TIE_SAMPLES, k=1, distances="float32") == (0.0, 1.0)
    assert precision_recall(TIE_REF, TIE_SAMPLES, k=1) == (0.5, 1.0)  # ADM's float16 is the default


def test_float16_overflow_falls_back_to_float32():
    # Scaled by 100, squared norms (up to 1e8) overflow float16 (max 65504): ADM recomputes the
    # block in float32, where 2000.25^2 = 4001000.06 is clearly outside the radius 2000^2.
    scaled_ref, scaled_samples = 100 * TIE_REF, 100 * TIE_SAMPLES
    assert precision_recall(scaled_ref, scaled_samples, k=1, distances="float16") == (0.0, 1.0)
    distances = pairwise_distances(torch.tensor(scaled_ref), torch.tensor(scaled_samples), "float16")
    assert distances.dtype == torch.float32 and bool(torch.isfinite(distances).all())


def test_unknown_distance_arithmetic():
    with pytest.raises(UserError, match="unknown precision/recall distances 'float8'.*float16, float32"):
        precision_recall(TIE_REF, TIE_SAMPLES, k=1, distances="float8")


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(UserError, match="more than 3 images"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
