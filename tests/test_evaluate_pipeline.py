"""The evaluation pipeline end to end, with a randomly initialised Inception saved in the published layout.

The real weights are not downloaded here: the random ones exercise every layer, the resize, the
batching, the streaming statistics, the file formats and the CLI; only the numbers differ.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fastdit.cli import main
from fastdit.evaluate import (
    EvalStatistics,
    InceptionFeatureExtractor,
    compute_statistics,
    float_images_to_uint8,
    inception_score,
    load_statistics,
    resize_bilinear_tf1,
    save_statistics,
    statistics_for_path,
    statistics_from_features,
)
from fastdit.evaluate import features as features_module
from fastdit.evaluate.inception import (
    InceptionOutputs,
    InceptionV3,
    load_inception_weights,
    random_inception_state_dict,
)

IMAGE_SIZE = 32  # small inputs; the resize to 299 makes every image cost the same anyway


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    """A random Inception in pytorch-fid's layout: a plain state dict, no `num_batches_tracked`."""
    path = tmp_path_factory.mktemp("weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), path)
    return path


@pytest.fixture(scope="module")
def extractor(weights_file):
    return InceptionFeatureExtractor(weights_file, batch_size=4)


@pytest.fixture(scope="module")
def images():
    # 5 images: the fewest for which precision/recall with k=3 is defined on both sides.
    return np.random.default_rng(0).integers(0, 256, (5, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)


def test_both_published_layouts_load(weights_file):
    state = torch.load(weights_file)
    # torch-fidelity's file: the same torchvision names; BatchNorm bookkeeping may be present.
    with_bookkeeping = dict(state)
    for key in [k for k in state if k.endswith("bn.running_var")]:
        with_bookkeeping[key.replace("running_var", "num_batches_tracked")] = torch.tensor(0)
    for layout in (state, with_bookkeeping, {"state_dict": state}):
        model = load_inception_weights(InceptionV3(), layout)
        assert torch.equal(model.Mixed_6d.branch1x1.conv.weight, state["Mixed_6d.branch1x1.conv.weight"])


def test_feature_shapes_and_unbiased_logits(extractor, images):
    out = extractor(images[:3])
    assert out.pool.shape == (3, 2048)
    assert out.spatial.shape == (3, 7 * 17 * 17)  # sFID: mixed_6/conv[..., :7]
    assert out.logits.shape == (3, 1008)
    # ADM's softmax graph multiplies pool_3 by the classifier weight without adding the bias.
    weight = extractor.model.fc.weight
    torch.testing.assert_close(out.logits, out.pool @ weight.T, rtol=1e-5, atol=1e-5)


def test_spatial_features_are_mixed_6d_branch1x1_in_nhwc_order(extractor, images):
    captured = []
    hook = extractor.model.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        out = extractor(images[:2])
    finally:
        hook.remove()
    branch = captured[0]  # (N, 192, 17, 17), after the ReLU
    expected = branch[:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF: spatial[..., :7].reshape(N, -1)
    torch.testing.assert_close(out.spatial, expected)


def tf1_resize_reference(image, size):
    """TF1 ResizeBilinear, pixel by pixel (align_corners=False, no half-pixel centres)."""
    in_h, in_w = image.shape
    out = np.zeros((size, size), np.float32)
    for i in range(size):
        for j in range(size):
            y = np.float32(i) * (np.float32(in_h) / np.float32(size))
            x = np.float32(j) * (np.float32(in_w) / np.float32(size))
            y0, x0 = int(np.floor(y)), int(np.floor(x))
            y1, x1 = min(y0 + 1, in_h - 1), min(x0 + 1, in_w - 1)
            dy, dx = np.float32(y - y0), np.float32(x - x0)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * dx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * dx
            out[i, j] = top + (bottom - top) * dy
    return out


def test_resize_has_tf1_semantics():
    row = torch.tensor([[[[0.0, 10.0], [20.0, 30.0]]]])
    # TF1 samples at i * in/out = 0, 0.5, 1, 1.5 and clamps the right neighbour.
    expected = torch.tensor([0.0, 5.0, 10.0, 10.0])
    torch.testing.assert_close(resize_bilinear_tf1(row, 4)[0, 0, 0], expected)
    # ... which is not PyTorch's half-pixel bilinear.
    assert not torch.allclose(F.interpolate(row, size=4, mode="bilinear", align_corners=False)[0, 0, 0], expected)

    image = torch.rand(1, 1, 13, 9, generator=torch.Generator().manual_seed(0)) * 255
    ours = resize_bilinear_tf1(image, 31)[0, 0].numpy()
    np.testing.assert_allclose(ours, tf1_resize_reference(image[0, 0].numpy(), 31), rtol=0, atol=1e-4)
    at_size = torch.rand(2, 3, 299, 299) * 255
    assert torch.equal(resize_bilinear_tf1(at_size, 299), at_size)  # identity at 299


def test_features_do_not_depend_on_batch_size(weights_file, images):
    batch_of_5 = InceptionFeatureExtractor(weights_file, batch_size=5)(images)
    batch_of_2 = InceptionFeatureExtractor(weights_file, batch_size=2)(images)  # 2 + 2 + 1
    for a, b in [(batch_of_5.pool, batch_of_2.pool), (batch_of_5.spatial, batch_of_2.spatial)]:
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    # and one image alone gives the same features as inside a batch
    alone = InceptionFeatureExtractor(weights_file, batch_size=1)(images[3:4])
    torch.testing.assert_close(alone.logits, batch_of_5.logits[3:4], rtol=1e-4, atol=1e-5)


def test_streaming_statistics_equal_all_at_once(extractor, images):
    features = extractor(images)
    pool = features.pool.double().numpy()
    chunks = [images[:1], images[1:4], images[4:]]  # uneven batches, as a sampler may yield
    stats = compute_statistics(iter(chunks), extractor, pr_subset=3, is_split_size=2)
    np.testing.assert_allclose(stats.mu, pool.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(stats.sigma, np.cov(pool, rowvar=False), rtol=1e-5, atol=1e-9)
    spatial = features.spatial.double().numpy()
    np.testing.assert_allclose(stats.sigma_s, np.cov(spatial, rowvar=False), rtol=1e-5, atol=1e-9)
    assert stats.num_images == 5 and stats.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    np.testing.assert_allclose(stats.pr_features, features.pool[:3].numpy(), rtol=1e-5, atol=1e-6)
    expected_is = inception_score(features.logits, split_size=2)  # splits of 2, 2, 1 across the batches
    assert stats.inception_score == pytest.approx(expected_is, rel=1e-6)


def fake_outputs(n, pool=None):
    pool = torch.zeros(n, 2048) if pool is None else pool
    return InceptionOutputs(pool=pool, spatial=torch.zeros(n, 2023), logits=torch.zeros(n, 1008))


class _CheapMoments:
    """Stands in for the float64 moments, whose 2048 x 2048 updates would dominate a 10K-image test."""

    def __init__(self, dim, device="cpu"):
        self.dim, self.count, self.mean = dim, 0, np.zeros(dim)

    def update(self, features):
        self.count += len(features)

    def covariance(self):
        return np.eye(self.dim)


def test_precision_recall_keeps_every_image_by_default(monkeypatch):
    # ADM computes precision/recall from all sample activations; the old default kept the first 10K.
    monkeypatch.setattr(features_module, "RunningMoments", _CheapMoments)
    num_images, batch = 10_050, 2_010
    index = torch.arange(num_images, dtype=torch.float32)

    def outputs():
        for start in range(0, num_images, batch):
            rows = index[start : start + batch, None]
            yield fake_outputs(len(rows), pool=rows.expand(-1, 2048))

    everything = statistics_from_features(outputs())
    np.testing.assert_array_equal(everything.pr_features[:, 0], index.numpy())
    subset = statistics_from_features(outputs(), pr_subset=3_000)  # the flag for a subset: the first N
    np.testing.assert_array_equal(subset.pr_features[:, 0], index[:3_000].numpy())


def test_extractor_runs_in_full_float32_and_restores_the_callers_settings(monkeypatch):
    seen = []

    class Spy(torch.nn.Module):
        def forward(self, images):
            seen.append((torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32))
            return fake_outputs(len(images))

    # The caller (e.g. `train` with TF32 on) has both kinds of TF32 switched on.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    previous_precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        InceptionFeatureExtractor(model=Spy(), batch_size=2)(np.zeros((3, 8, 8, 3), np.uint8))
        after = (
            torch.get_float32_matmul_precision(),
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
        )
    finally:
        torch.set_float32_matmul_precision(previous_precision)
    assert seen == [(False, False), (False, False)]  # both batches, the logits matmul included
    assert after == ("high", True, True)


def test_float_images_to_uint8_matches_dit_sampling():
    x = torch.tensor([-1.5, -1.0, 0.0, 0.99, 1.0]).view(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert float_images_to_uint8(x)[0, 0, :, 0].tolist() == [0, 0, 128, 254, 255]


def write_folder(folder, images):
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f"{i:06d}.png")
    return folder


def test_cli_npz_against_folder_of_the_same_images(tmp_path, weights_file, images, capsys):
    np.savez(tmp_path / "samples.npz", images, np.arange(len(images)))  # arr_0 images, arr_1 labels
    folder = write_folder(tmp_path / "ref", images)
    out_json = tmp_path / "metrics.json"
    argv = ["evaluate", str(tmp_path / "samples.npz"), str(folder), "--inception-weights", str(weights_file)]
    assert main([*argv, "--out-json", str(out_json), "--no-progress", "--batch-size", "3"]) == 0
    table = capsys.readouterr().out
    for name in ("Inception Score", "FID", "sFID", "Precision", "Recall"):
        assert name in table
    metrics = json.loads(out_json.read_text())
    # The same pixels through both readers: identical statistics.
    assert metrics["fid"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["sfid"] == pytest.approx(0.0, abs=1e-3)
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0
    assert metrics["num_samples"] == 5 and metrics["num_reference"] == 5
    assert (metrics["pr_subset"], metrics["pr_distances"]) == (None, "float16")  # ADM's: all images, float16


def assert_same_statistics(a, b, rtol=1e-6):
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pr_features"):
        np.testing.assert_allclose(getattr(a, key), getattr(b, key), rtol=rtol, atol=1e-9)
    assert (a.num_images, a.image_size) == (b.num_images, b.image_size)


def test_make_ref_writes_what_the_images_give(tmp_path, weights_file, extractor):
    ref_images = np.random.default_rng(1).integers(0, 128, (3, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    np.savez(tmp_path / "ref.npz", ref_images)
    argv = ["evaluate", "--make-ref", str(tmp_path / "ref.npz"), str(tmp_path / "ref_stats")]
    assert main([*argv, "--inception-weights", str(weights_file), "--no-progress"]) == 0
    # A statistics file written by fastdit may be remade in place (anything else is refused).
    assert main([*argv, "--inception-weights", str(weights_file), "--no-progress"]) == 0
    from_file = statistics_for_path(tmp_path / "ref_stats.npz", extractor=None)  # no network needed
    from_images = statistics_for_path(tmp_path / "ref.npz", extractor, progress=False)
    assert_same_statistics(from_file, from_images)
    assert from_file.pr_features.shape == (3, 2048)


def test_adm_reference_batch_statistics_are_used(tmp_path, extractor, images):
    rng = np.random.default_rng(2)
    mu, mu_s = rng.standard_normal(2048), rng.standard_normal(2023)
    sigma, sigma_s = np.eye(2048) * 2.0, np.eye(2023) * 3.0
    # An ADM reference batch: images plus precomputed moments (unrelated to the images here).
    precomputed = {"mu": mu.astype(np.float32), "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    np.savez(tmp_path / "VIRTUAL_ref.npz", arr_0=images, **precomputed)
    ref = statistics_for_path(tmp_path / "VIRTUAL_ref.npz", extractor, reference=True, progress=False, pr_subset=2)
    np.testing.assert_allclose(ref.mu, mu.astype(np.float32))
    np.testing.assert_array_equal(ref.sigma_s, sigma_s)
    assert ref.num_images == 5 and ref.image_size == (IMAGE_SIZE, IMAGE_SIZE)
    # Only the 2 images needed for precision/recall went through Inception.
    np.testing.assert_allclose(ref.pr_features, extractor(images[:2]).pool.numpy(), rtol=1e-5, atol=1e-6)


def test_statistics_file_round_trip(tmp_path):
    rng = np.random.default_rng(3)
    pool, spatial = rng.random((4, 2048)), rng.random((4, 2023))
    stats = EvalStatistics(
        mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False),
        num_images=4, image_size=(32, 32), pr_features=pool.astype(np.float32), inception_score=1.5,
    )  # fmt: skip
    path = save_statistics(stats, tmp_path / "stats")
    assert path.name == "stats.npz"
    loaded = load_statistics(path)
    for key in ("mu", "sigma", "mu_s", "sigma_s", "pr_features"):
        np.testing.assert_array_equal(getattr(loaded, key), getattr(stats, key))
    assert (loaded.num_images, loaded.image_size, loaded.inception_score) == (4, (32, 32), 1.5)
    assert not list(tmp_path.glob(".*tmp"))  # written atomically, nothing left behind
