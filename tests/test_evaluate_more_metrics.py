"""MIND, CMMD and FDr6: each metric against an independent float64 numpy computation on features made here,
their extractors against the networks run by hand, and `fastdit evaluate` end to end with every metric at
once, where a reference made by `--make-ref` gives what comparing the two folders directly gives.

Nothing is downloaded: the encoders are tiny random transformers models (tests/tiny_encoders.py) served from
127.0.0.1 under the official repositories' names; Inception is the random one of the other evaluation tests.
"""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg

from fastdit import encoders
from fastdit.cli import main
from fastdit.encoders import CLIP_MEAN, CLIP_STD, ENCODERS, load_encoder
from fastdit.errors import UserError
from fastdit.evaluate import (
    CMMDFeatureExtractor,
    FDRFeatureExtractors,
    cmmd_preprocess,
    fdr6,
    load_statistics,
    mmd_rbf,
    monge_inception_distance,
)
from fastdit.evaluate.fdr import ENCODER_SPACES, FDR6_SPACES, fdr_preprocess
from fastdit.evaluate.inception import random_inception_state_dict
from fastdit.evaluate.mind import MIND_PROJECTIONS, MIND_SEED
from tiny_encoders import save_tiny, serve

IMAGE_SIZE = 32
# The repositories each metric fetches, and the tiny architecture standing in for each.
REPOSITORIES = {
    "openai/clip-vit-large-patch14-336": "clip",  # CMMD
    "facebook/convnextv2-base-22k-224": "convnextv2",  # FDr6's five
    "facebook/dinov2-large": "dinov2",
    "facebook/vit-mae-large": "vit_mae",
    "google/siglip2-so400m-patch16-256": "siglip",
    "openai/clip-vit-large-patch14": "clip",
}


@pytest.fixture
def hub_of_tiny_encoders(file_server, monkeypatch, tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    for seed, (repo, kind) in enumerate(REPOSITORIES.items()):
        serve(file_server, repo, save_tiny(kind, root / repo.replace("/", "--"), seed=seed))
    port = file_server.server_address[1]
    monkeypatch.setattr(encoders, "HF_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/resolve/main/{{filename}}")
    return file_server


def random_images(n, seed, side=IMAGE_SIZE):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


# --- MIND ------------------------------------------------------------------------------------------


def numpy_mind(x, y, num_projections=MIND_PROJECTIONS, seed=MIND_SEED):
    """The paper's formula with numpy in float64: 3 d * mean over directions of the mean squared difference
    of the sorted projections (equal sizes)."""
    d = x.shape[1]
    u = np.random.Generator(np.random.PCG64(seed)).standard_normal((num_projections, d))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    px, py = np.sort(x @ u.T, axis=0), np.sort(y @ u.T, axis=0)
    return 3 * d * np.mean(np.mean((px - py) ** 2, axis=0))


def test_mind_equals_the_formula_in_float64():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 40)).astype(np.float32)
    y = (1.3 * rng.standard_normal((300, 40)) + 0.2).astype(np.float32)
    expected = numpy_mind(x.astype(np.float64), y.astype(np.float64))
    # Both are float64 sums of 300 x 1000 terms (~1e-12 relative round-off); the blocks of directions change
    # only the order of the outer sum.
    assert monge_inception_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert monge_inception_distance(y, x) == pytest.approx(expected, rel=1e-10)  # symmetric
    assert monge_inception_distance(x, x) == 0.0


def test_mind_of_a_translation_is_three_d_times_the_mean_squared_projected_shift():
    # y = x + c: along every u the sorted projections differ by u.c exactly, so MIND = 3 d mean_u (u.c)^2,
    # which tends to 3 |c|^2 (E (u.c)^2 = |c|^2 / d on the sphere).
    rng = np.random.default_rng(1)
    x = rng.standard_normal((200, 16))
    c = rng.standard_normal(16)
    u = np.random.Generator(np.random.PCG64(MIND_SEED)).standard_normal((MIND_PROJECTIONS, 16))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    expected = 3 * 16 * np.mean((u @ c) ** 2)
    assert monge_inception_distance(x + c, x) == pytest.approx(expected, rel=1e-10)
    assert expected == pytest.approx(3 * c @ c, rel=0.1)  # the Monte-Carlo estimate of 3 |c|^2


def test_mind_cuts_the_larger_set_to_a_seeded_subset_of_the_smaller_size():
    rng = np.random.default_rng(2)
    x, y = rng.standard_normal((50, 8)), rng.standard_normal((80, 8))
    kept = np.sort(np.random.Generator(np.random.PCG64(MIND_SEED + 1)).permutation(80)[:50])
    assert monge_inception_distance(x, y) == pytest.approx(numpy_mind(x, y[kept]), rel=1e-10)
    assert monge_inception_distance(x, y) == monge_inception_distance(x, y)  # the same subset every time
    with pytest.raises(UserError, match="at least 2 images"):
        monge_inception_distance(x[:1], y)
    with pytest.raises(UserError, match="do not match"):
        monge_inception_distance(x, y[:, :4])


# --- CMMD ------------------------------------------------------------------------------------------


def numpy_cmmd(x, y, sigma=10.0, scale=1000.0):
    """google-research/cmmd distance.py's estimator, with numpy in float64: the mean of the kernel over
    all pairs, diagonals included."""
    def kernel_mean(a, b):
        squared = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-squared / (2 * sigma**2)).mean()

    return scale * (kernel_mean(x, x) + kernel_mean(y, y) - 2 * kernel_mean(x, y))


def unit(rows):
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_cmmd_equals_the_reference_estimator_in_float64():
    rng = np.random.default_rng(3)
    x = unit(rng.standard_normal((70, 24)))
    y = unit(rng.standard_normal((45, 24)) + 0.3)  # sets of different sizes, as CMMD allows
    expected = numpy_cmmd(x, y)
    # Ours cancels the 1s before summing (expm1); the reference sums kernel values near 1 and loses ~1e-16
    # each. CMMD here is ~0.1 (x 1000 of ~1e-4), so the two agree to ~1e-10 relative, not to the last ulp.
    assert mmd_rbf(x, y) == pytest.approx(expected, rel=1e-9)
    assert mmd_rbf(x, y, block_size=7) == pytest.approx(expected, rel=1e-9)  # blocks change nothing
    assert mmd_rbf(y, x) == pytest.approx(expected, rel=1e-9)
    assert abs(mmd_rbf(x, x)) < 1e-12
    assert expected > 1e-3


def test_cmmd_in_float64_keeps_digits_that_float32_loses():
    # Two close sets: CMMD ~1e-3. Summing kernel values (~1) in float32, as the reference code does, leaves
    # round-off of ~1e-7 * 1000 = 1e-4 relative to ~1e-3: ours stays at the float64 answer.
    rng = np.random.default_rng(4)
    x = unit(rng.standard_normal((300, 16)))
    y = unit(x + 0.002 * rng.standard_normal(x.shape))
    expected = numpy_cmmd(x, y)
    ours = mmd_rbf(x.astype(np.float32), y.astype(np.float32))
    exact_float32_inputs = numpy_cmmd(x.astype(np.float32).astype(np.float64), y.astype(np.float32).astype(np.float64))
    assert ours == pytest.approx(exact_float32_inputs, rel=1e-8)
    assert ours == pytest.approx(expected, rel=1e-3)


# --- FDr6 ------------------------------------------------------------------------------------------


def scipy_fd(mu1, s1, mu2, s2):
    diff = mu1 - mu2
    return diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(linalg.sqrtm(s1 @ s2).real)


def test_fdr6_is_the_mean_of_the_six_fds_over_the_papers_normalisers():
    assert {space.name: space.val_fd for space in FDR6_SPACES} == {
        "inception": 1.68, "convnextv2": 56.87, "dinov2": 14.19, "mae": 0.04, "siglip": 0.60, "clip": 5.60}
    rng = np.random.default_rng(5)

    def moments(dim, shift):
        points = rng.standard_normal((4 * dim, dim)) + shift
        return points.mean(0), np.cov(points, rowvar=False)

    samples = {space.name: moments(6 + i, 0.0) for i, space in enumerate(ENCODER_SPACES)}
    refs = {space.name: moments(6 + i, 0.5) for i, space in enumerate(ENCODER_SPACES)}
    results = fdr6(2.5, samples, refs)
    raw = {"inception": 2.5, **{name: scipy_fd(*samples[name], *refs[name]) for name in samples}}
    normalised = {space.name: raw[space.name] / space.val_fd for space in FDR6_SPACES}
    for name in raw:
        assert results[f"fd_{name}"] == pytest.approx(raw[name], rel=1e-8)
        assert results[f"fdr_{name}"] == pytest.approx(normalised[name], rel=1e-8)
    assert results["fdr6"] == pytest.approx(np.mean(list(normalised.values())), rel=1e-8)


# --- the extractors -----------------------------------------------------------------------------------


def test_cmmd_features_are_clip_336_embeddings_of_pil_bicubic_images_unit_norm(hub_of_tiny_encoders):
    images = random_images(3, seed=6, side=40)
    extractor = CMMDFeatureExtractor(device="cpu", batch_size=2, progress=False)
    features = extractor(images)
    assert features.shape == (3, 16)  # the tiny CLIP's projection width
    # By hand: PIL bicubic to 336 (uint8), / 255, CLIP mean/std, the model's image_embeds, divided by the norm.
    resized = np.stack([np.asarray(Image.fromarray(im).resize((336, 336), Image.Resampling.BICUBIC)) for im in images])
    x = (torch.from_numpy(resized).permute(0, 3, 1, 2).double() / 255 - torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)) \
        / torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    torch.testing.assert_close(cmmd_preprocess(images), x.float(), rtol=0, atol=1e-6)
    encoder = load_encoder("clip-vitl14-336", resolution=336, progress=False)
    embeds = encoder.pooled(x.float(), "projected").double()
    expected = (embeds / embeds.norm(dim=1, keepdim=True)).float()
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    # A non-square image is cut to its centre square first (io_util.py, _center_crop_and_resize).
    wide = random_images(1, seed=8, side=40)[:, :30]  # 30 x 40
    torch.testing.assert_close(cmmd_preprocess(wide), cmmd_preprocess(np.ascontiguousarray(wide[:, :, 5:35])))


def test_fdr_features_follow_the_papers_resize_normalisation_and_padding(hub_of_tiny_encoders):
    images = random_images(2, seed=9, side=IMAGE_SIZE)
    extractors = FDRFeatureExtractors(device="cpu", batch_size=2, progress=False)
    assert set(extractors.dims) == {"convnextv2", "dinov2", "mae", "siglip", "clip"}
    features = extractors(images)
    for space in ENCODER_SPACES:
        entry = ENCODERS[space.encoder]
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        x = F.interpolate(x, size=(space.side, space.side), mode="bicubic", align_corners=False, antialias=True)
        x = (x - torch.tensor(entry.mean).view(1, 3, 1, 1)) / torch.tensor(entry.std).view(1, 3, 1, 1)
        if space.pad_to > 1:  # DINOv2 and CLIP at 256 px, 14-px patches: zeros to 266 (timm dynamic_img_pad)
            x = F.pad(x, (0, 10, 0, 10))
            assert x.shape[-1] == 266
        torch.testing.assert_close(fdr_preprocess(images, space), x)
        encoder = extractors.extractors[space.name].encoder
        assert encoder.resolution == x.shape[-1]
        torch.testing.assert_close(features[space.name], encoder.pooled(x), rtol=1e-5, atol=1e-5)


# --- `fastdit evaluate` with every metric -----------------------------------------------------------


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), path)
    return path


def image_folder(root, images):
    root.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return root


def evaluate(argv, tmp_path, name):
    out = tmp_path / f"{name}.json"
    assert main(["evaluate", *map(str, argv), "--no-progress", "--out-json", str(out)]) == 0
    return json.loads(out.read_text())


ALL = "fid,sfid,is,pr,fd-dinov2,mind,cmmd,fdr6"


@pytest.mark.slow
def test_every_metric_in_one_call_and_a_made_reference_gives_what_the_folders_give(
    tmp_path, hub_of_tiny_encoders, inception_weights, capsys
):
    samples = image_folder(tmp_path / "samples", random_images(6, seed=10))
    ref_images = random_images(6, seed=11)
    ref_images[:, : IMAGE_SIZE // 2] //= 2  # a darker top half: a reference unlike the samples
    ref = image_folder(tmp_path / "ref", ref_images)
    options = ["--inception-weights", inception_weights, "--batch-size", 4, "--metrics", ALL,
               "--fd-dinov2-encoder", "dinov2-vitl14"]

    direct = evaluate([samples, ref, *options], tmp_path, "direct")
    table = capsys.readouterr().out
    for row in ("Inception Score", "FID", "sFID", "Precision", "Recall", "FD-DINOv2", "MIND", "CMMD", "FDr6"):
        assert row in table
    assert main(["evaluate", "--make-ref", str(ref), str(tmp_path / "ref_stats.npz"), *map(str, options),
                 "--no-progress"]) == 0
    assert "with DINOv2 moments, CLIP embeddings, FDr6 moments" in capsys.readouterr().out
    stored = load_statistics(tmp_path / "ref_stats.npz")
    assert stored.cmmd_features.shape == (6, 16) and sorted(stored.fdr_moments) == sorted(
        space.name for space in ENCODER_SPACES)
    via_file = evaluate([samples, tmp_path / "ref_stats.npz", *options], tmp_path, "via_file")

    assert direct["metrics"] == ALL.split(",")
    for key in ("fid", "sfid", "fd_dinov2", "mind", "cmmd", "fdr6", *(f"fd_{s.name}" for s in FDR6_SPACES)):
        assert direct[key] > 0, key  # different image sets: distances that can be compared
        # The same features in the same batches; the file keeps float64 moments and float32 features as
        # they are, so only the distances' own float64 round-off (relative ~1e-12 here) may differ.
        assert via_file[key] == pytest.approx(direct[key], rel=1e-9), key
    assert (via_file["precision"], via_file["recall"]) == (direct["precision"], direct["recall"])
    assert via_file["inception_score"] == direct["inception_score"]
    # A folder against its own statistics: every distance is 0 (up to the square roots' round-off).
    itself = evaluate([ref, tmp_path / "ref_stats.npz", *options], tmp_path, "itself")
    for key in ("fid", "mind", "cmmd", "fdr6"):
        assert itself[key] == pytest.approx(0.0, abs=1e-6), key


def test_a_reference_without_what_a_metric_needs_says_how_to_remake_it(tmp_path, inception_weights, capsys):
    ref = image_folder(tmp_path / "ref", random_images(4, seed=12))
    argv = ["evaluate", "--make-ref", str(ref), str(tmp_path / "plain.npz"), "--inception-weights",
            str(inception_weights), "--no-progress"]
    assert main(argv) == 0
    capsys.readouterr()
    for metric, what in (("cmmd", "no CLIP embeddings"), ("fdr6", "no FDr6 statistics")):
        with pytest.raises(SystemExit):
            main(["evaluate", str(tmp_path / "plain.npz"), str(tmp_path / "plain.npz"), "--metrics", metric])
        err = capsys.readouterr().err.strip()
        assert what in err and "--make-ref --metrics" in err and "\n" not in err
    # MIND reads the pool_3 vectors every statistics file keeps: it needs nothing more.
    out = evaluate([tmp_path / "plain.npz", tmp_path / "plain.npz", "--metrics", "mind"], tmp_path, "mind")
    assert out["mind"] == 0.0
