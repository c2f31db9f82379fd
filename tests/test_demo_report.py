"""The demo's report math on constructed inputs: accuracy, class match, Frechet distance, the judge."""

import numpy as np
import pytest
import torch

from fastdit.demo import report
from fastdit.demo.classifier import ClassifierOptions, DigitClassifier, classify, random_shift, train_classifier, uint8_to_model_input
from fastdit.sampling import to_uint8


def test_accuracy_and_per_class():
    labels = np.array([0, 0, 1, 1, 2, 2])
    predicted = np.array([0, 1, 1, 1, 0, 0])
    assert report.accuracy(predicted, labels) == pytest.approx(3 / 6)
    assert report.per_class_accuracy(predicted, labels, num_classes=4) == [0.5, 1.0, 0.0, None]
    with pytest.raises(ValueError):
        report.accuracy(predicted[:3], labels)


def test_frechet_distance_of_known_gaussians():
    # Diagonal covariances commute: d² = |Δμ|² + Σ_i (√a_i − √b_i)².
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    expected = 1.0 + 4.0 + (1 - 2) ** 2 + (2 - 1) ** 2 + 0.0
    assert report.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_matches_the_scipy_formula():
    scipy_linalg = pytest.importorskip("scipy.linalg")  # scipy is a test dependency only
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(200, 6)), rng.normal(size=(150, 6)) @ rng.normal(size=(6, 6)) + 0.5
    mu1, s1 = report.gaussian_stats(x)
    mu2, s2 = report.gaussian_stats(y)
    root = scipy_linalg.sqrtm(s1 @ s2).real
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(root)
    assert report.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_is_symmetric_zero_on_itself_and_handles_singular_covariances():
    rng = np.random.default_rng(1)
    few = rng.normal(size=(5, 16))  # 5 samples in 16 dimensions: covariance of rank 4
    other = rng.normal(size=(40, 16))
    assert report.frechet_distance_of_features(few, few) == pytest.approx(0.0, abs=1e-9)
    d1 = report.frechet_distance_of_features(few, other)
    assert np.isfinite(d1) and d1 > 0
    # Square roots of near-zero eigenvalues amplify round-off (√1e-16 = 1e-8), so symmetry holds to ~1e-8.
    assert d1 == pytest.approx(report.frechet_distance_of_features(other, few), rel=1e-6)


def test_frechet_distance_grows_with_a_mean_shift():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    near = report.frechet_distance_of_features(x, y)
    far = report.frechet_distance_of_features(x, y + 3.0)
    assert near < 0.2
    # A shift leaves the covariances alone: only the |Δμ|² term changes.
    delta = x.mean(axis=0) - y.mean(axis=0)
    assert far - near == pytest.approx(np.sum((delta - 3.0) ** 2) - np.sum(delta**2), rel=1e-9)


def test_gaussian_stats_rejects_too_few_rows():
    with pytest.raises(ValueError):
        report.gaussian_stats(np.zeros((1, 3)))


def test_random_shift_moves_content_and_fills_background():
    image = -torch.ones(1, 1, 8, 8)
    image[0, 0, 3, 4] = 1.0
    generator = torch.Generator().manual_seed(0)
    shifted = random_shift(image.repeat(64, 1, 1, 1), 1, generator)
    assert shifted.shape == (64, 1, 8, 8)
    bright = torch.nonzero(shifted[:, 0] == 1.0)[:, 1:]  # (row, col) of the bright pixel in each image
    assert len(bright) == 64 and set(map(tuple, bright.tolist())) <= {(r, c) for r in (2, 3, 4) for c in (3, 4, 5)}
    assert len(set(map(tuple, bright.tolist()))) > 1  # shifts differ between images
    assert torch.equal(random_shift(image, 0, generator), image)


def test_uint8_round_trip():
    images = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)
    back = uint8_to_model_input(to_uint8(images))
    assert back.shape == images.shape
    assert torch.allclose(back, images, atol=1 / 127.5)


def test_classifier_learns_separable_classes_deterministically():
    # Two classes of 8x8 "digits": a bright left half or a bright right half, with noise.
    rng = np.random.default_rng(0)
    labels = torch.from_numpy(rng.integers(0, 2, size=96))
    images = torch.full((96, 1, 8, 8), -1.0)
    for i, k in enumerate(labels.tolist()):
        images[i, 0, :, (0 if k == 0 else 4) : (4 if k == 0 else 8)] = 1.0
    images += 0.3 * torch.from_numpy(rng.normal(size=images.shape)).float()
    options = ClassifierOptions(epochs=8, batch_size=32, seed=0)
    model = train_classifier(images, labels, options, num_classes=2)
    predicted, features = classify(model, images)
    assert isinstance(model, DigitClassifier)
    assert report.accuracy(predicted, labels.numpy()) == 1.0
    assert features.shape == (96, 64) and features.dtype == np.float64
    again, _ = classify(train_classifier(images, labels, options, num_classes=2), images)
    np.testing.assert_array_equal(predicted, again)
