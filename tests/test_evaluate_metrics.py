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


def test_precision_recall_matches_brute_force_with_blocks():
    rng = np.random.default_rng(5)
    ref = rng.standard_normal((120, 16))
    samples = 0.8 * rng.standard_normal((90, 16)) + 0.3
    expected = brute_force_precision_recall(ref, samples, k=3)
    got = precision_recall(ref, samples, k=3, row_block=32)  # several row blocks
    assert got == pytest.approx(expected, abs=1e-12)
    assert 0.0 < got[0] < 1.0 and 0.0 < got[1] < 1.0  # a non-trivial case


def test_precision_recall_needs_more_than_k_points():
    with pytest.raises(UserError, match="more than 3 images"):
        precision_recall(np.zeros((3, 4)), np.zeros((10, 4)))
