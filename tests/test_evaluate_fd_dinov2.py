"""FD-DINOv2 (Stein et al. 2023) in `fastdit evaluate`, with a tiny random ViT stand-in for DINOv2 ViT-L/14.

Nothing is downloaded: the stand-in is a one-block ViT with patch 14 and a class token, scripted and
saved as a TorchScript file (a spec `load_encoder` accepts), run at Stein et al.'s 224 px. Inception
is the random one of the other evaluation tests (or, where only the DINOv2 side is under test, a
cheap deterministic stand-in with Inception's output shapes).
"""

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from fastdit import encoders
from fastdit.cli import main
from fastdit.encoders import IMAGENET_MEAN, IMAGENET_STD, load_encoder
from fastdit.evaluate import (
    DinoV2FeatureExtractor,
    EvalStatistics,
    compare,
    compute_statistics,
    load_statistics,
    save_statistics,
    stein_preprocess,
)
from fastdit.evaluate.inception import POOL_DIM, SPATIAL_DIM, InceptionOutputs, random_inception_state_dict
from fastdit.evaluate.statistics import METRICS

pytestmark = [  # torch 2.14 deprecates torch.jit.script/load; TorchScript files still load, as tested
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),
]

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
REFUSED = "http://127.0.0.1:9/{repo}/resolve/main/{filename}"  # port 9 (discard) refuses connections
IMAGE_SIZE = 32
DIM = 32


class TinyViT(nn.Module):
    """DINOv2's shape in miniature: 14-px patches, a class token in front, one pre-norm block, a final norm.

    The int attributes are read by `load_encoder` from the TorchScript file."""

    def __init__(self, dim: int = DIM, patch: int = 14, resolution: int = 224):
        super().__init__()
        self.resolution = resolution
        self.num_prefix_tokens = 1
        grid = resolution // patch
        self.patch_embed = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, 1 + grid * grid, dim) * 0.5)
        self.block = nn.TransformerEncoderLayer(dim, nhead=2, dim_feedforward=2 * dim, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, T, D)
        tokens = torch.cat([self.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1) + self.pos_embed
        return self.norm(self.block(tokens))  # (N, 1 + T, D)


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory):
    """(path of the TorchScript file, the scripted module) of a random tiny ViT."""
    torch.manual_seed(0)
    scripted = torch.jit.script(TinyViT().eval())
    path = tmp_path_factory.mktemp("dinov2") / "tiny_vit.pt"
    scripted.save(str(path))
    return path, scripted


@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("inception") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception_state_dict(seed=0), path)
    return path


def random_images(n, seed, side=IMAGE_SIZE):
    return np.random.default_rng(seed).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def image_folder(root, images):
    root.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image).save(root / f"{i:03d}.png")
    return root


def run_cli_error(argv, capsys):
    """Run the CLI expecting a user error; return its message (one line, no traceback)."""
    with pytest.raises(SystemExit) as exit_info:
        main([str(arg) for arg in argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and "\n" not in err, err
    return err


# --- the preprocessing ---------------------------------------------------------------------------


def test_preprocessing_is_an_antialiased_bicubic_resize_to_224_then_imagenet_normalisation():
    images = random_images(3, seed=0, side=256)  # noise: the hardest case for a resize
    x = stein_preprocess(images)
    assert x.shape == (3, 3, 224, 224) and x.dtype == torch.float32
    # PIL's bicubic (a = -0.5, antialiased when shrinking) is what torch's antialiased bicubic
    # reimplements. PIL resizes the width, then the height, clipping and rounding to uint8 after each
    # pass; done so here, the two differ only by PIL's fixed-point weights, at most one level of 255.
    def to_uint8(x):
        return x.round().clamp(0, 255)

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    wide = to_uint8(F.interpolate(pixels, size=(256, 224), mode="bicubic", antialias=True))
    torch_aa = to_uint8(F.interpolate(wide, size=(224, 224), mode="bicubic", antialias=True))
    levels = (x.double() * STD + MEAN) * 255  # back to the resized image's levels
    assert (levels - torch_aa).abs().max() <= 1.0 + 1e-3  # 1e-3: float32 normalisation round trip
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # the resized image is uint8, as PIL's
    # ... and it is not the encoder's REPA input (normalise, then bicubic without antialias).
    repa = encoders.encoder_input(pixels.float() / 127.5 - 1, 224, MEAN, STD)
    assert (repa - x).abs().mean() > 0.1

    # An image already 224 x 224 is only normalised: the levels come back exactly.
    exact = random_images(2, seed=1, side=224)
    levels = (stein_preprocess(exact).double() * STD + MEAN) * 255
    torch.testing.assert_close(levels, torch.from_numpy(exact).permute(0, 3, 1, 2).double(), rtol=0, atol=1e-3)


# --- the encoder: a TorchScript stand-in through load_encoder -------------------------------------


def test_the_feature_is_the_class_token_of_the_encoder_loaded_at_224(stand_in):
    path, scripted = stand_in
    encoder = load_encoder(str(path))
    assert (encoder.resolution, encoder.num_prefix_tokens, encoder.grid, encoder.dim) == (224, 1, 16, DIM)
    extractor = DinoV2FeatureExtractor(str(path), batch_size=2)
    images = random_images(3, seed=2)
    with torch.no_grad():
        expected = scripted(stein_preprocess(images))[:, 0]  # (N, D)
    # Batches of 2 + 1 against one batch of 3: the same per-image arithmetic up to float32 round-off.
    torch.testing.assert_close(extractor(images), expected, rtol=1e-5, atol=1e-5)


class PatchTokensOnly(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 14, stride=14)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def test_an_encoder_without_a_class_token_is_refused(tmp_path):
    path = tmp_path / "patches.pt"
    torch.jit.script(PatchTokensOnly()).save(str(path))
    with pytest.raises(ValueError, match="reads the class token.*has none; use dinov2-vitl14") as info:
        DinoV2FeatureExtractor(str(path))
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="has no class token"):
        load_encoder(str(path)).class_token(torch.zeros(1, 3, 224, 224))
    module = PatchTokensOnly()
    module.num_prefix_tokens = -1
    torch.jit.script(module).save(str(path))
    with pytest.raises(ValueError, match="num_prefix_tokens = -1; it must be an int >= 0"):
        load_encoder(str(path))


# --- the streamed statistics ------------------------------------------------------------------------


class FakeInception:
    """Inception's output shapes from a fixed random projection of the pixels: cheap, deterministic."""

    device = torch.device("cpu")
    batch_size = 4

    def __call__(self, images):
        x = torch.as_tensor(np.asarray(images)).float().flatten(1)[:, :64] / 255  # (N, 64)
        g = torch.Generator().manual_seed(0)
        pool, spatial, logits = (x @ torch.randn(64, d, generator=g) for d in (POOL_DIM, SPATIAL_DIM, 1008))
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


def test_streamed_dinov2_moments_equal_a_direct_float64_computation(stand_in):
    path, scripted = stand_in
    images = random_images(11, seed=3)
    extractor = DinoV2FeatureExtractor(str(path), batch_size=2)
    chunks = [images[:5], images[5:6], images[6:]]  # uneven batches: 5 (= 2 + 2 + 1), 1, 5
    stats = compute_statistics(iter(chunks), FakeInception(), dinov2=extractor)

    with torch.no_grad():
        features = scripted(stein_preprocess(images))[:, 0].double().numpy()  # (11, D), one batch
    assert features.std(0).min() > 1e-3  # the features vary: the comparison below is not 0 == 0
    # The features match to float32 round-off (relative ~1e-6, |feature| ~ 1 after the final norm); the
    # float64 moments add nothing beyond that: a tolerance of 1e-5 covers a few ulps of float32 per term.
    np.testing.assert_allclose(stats.mu_dinov2, features.mean(0), rtol=0, atol=1e-5)
    np.testing.assert_allclose(stats.sigma_dinov2, np.cov(features, rowvar=False), rtol=0, atol=1e-5)
    assert stats.mu_dinov2.dtype == np.float64 and stats.sigma_dinov2.shape == (DIM, DIM)
    assert stats.num_images == 11


# --- the statistics file and `fastdit evaluate` -----------------------------------------------------


def evaluate(argv, tmp_path, name):
    """Run `fastdit evaluate ARGV --out-json` and return the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    assert main(["evaluate", *map(str, argv), "--no-progress", "--out-json", str(out)]) == 0
    return json.loads(out.read_text())


def test_make_ref_round_trips_fd_dinov2(tmp_path, stand_in, inception_weights):
    samples = image_folder(tmp_path / "samples", random_images(6, seed=4))
    ref_images = random_images(6, seed=5)
    ref_images[:, : IMAGE_SIZE // 2] //= 2  # a darker top half: a reference distribution unlike the samples
    ref = image_folder(tmp_path / "ref", ref_images)
    options = ["--inception-weights", inception_weights, "--fd-dinov2-encoder", stand_in[0], "--batch-size", 4]
    metrics = ["--metrics", "fd-dinov2,fid"]

    direct = evaluate([samples, ref, *metrics, *options], tmp_path, "direct")
    argv = ["evaluate", "--make-ref", str(ref), str(tmp_path / "ref_stats.npz"), *map(str, metrics + options)]
    assert main([*argv, "--no-progress"]) == 0
    stored = load_statistics(tmp_path / "ref_stats.npz")
    assert stored.mu_dinov2.shape == (DIM,) and stored.sigma_dinov2.shape == (DIM, DIM)
    via_file = evaluate([samples, tmp_path / "ref_stats.npz", *metrics, *options], tmp_path, "via_file")

    assert set(direct) >= {"fd_dinov2", "fid"} and "sfid" not in direct and "precision" not in direct
    assert direct["metrics"] == ["fid", "fd-dinov2"]
    assert direct["fd_dinov2"] > 1e-3  # different image sets: a distance that can be compared
    # The same features in the same batches; the file keeps the float64 moments as they are, so only
    # the Fréchet distance's own float64 round-off (relative ~1e-12 here) may differ.
    assert via_file["fd_dinov2"] == pytest.approx(direct["fd_dinov2"], rel=1e-9)
    assert via_file["fid"] == pytest.approx(direct["fid"], rel=1e-9)
    # A folder against itself: the same moments, a distance of 0 (up to the square root's round-off).
    itself = evaluate([ref, tmp_path / "ref_stats.npz", "--metrics", "fd-dinov2", *options], tmp_path, "itself")
    assert itself["fd_dinov2"] == pytest.approx(0.0, abs=1e-6)


def test_a_reference_without_dinov2_moments_loads_and_says_how_to_remake_it(tmp_path, capsys):
    rng = np.random.default_rng(6)
    pool, spatial = rng.random((4, POOL_DIM)), rng.random((4, SPATIAL_DIM))
    old = EvalStatistics(
        mu=pool.mean(0), sigma=np.cov(pool, rowvar=False), mu_s=spatial.mean(0), sigma_s=np.cov(spatial, rowvar=False),
        num_images=4, image_size=(IMAGE_SIZE, IMAGE_SIZE), pr_features=pool.astype(np.float32), inception_score=1.5,
    )  # fmt: skip
    path = save_statistics(old, tmp_path / "old_ref.npz")
    with np.load(path) as archive:  # exactly the keys files had before FD-DINOv2
        assert sorted(archive.files) == sorted(
            ["fastdit_eval_stats", "mu", "sigma", "mu_s", "sigma_s", "num_images", "image_size", "pr_features",
             "inception_score"]
        )  # fmt: skip
    loaded = load_statistics(path)
    assert not loaded.has_dinov2
    assert compare(loaded, loaded)["fid"] == pytest.approx(0.0, abs=1e-6)  # still usable for the ADM metrics

    err = run_cli_error(["evaluate", path, path, "--metrics", "fid,fd-dinov2"], capsys)  # before any network
    assert "has no DINOv2 statistics" in err and f"--make-ref --metrics {','.join(METRICS)}" in err
    with pytest.raises(ValueError, match="has no DINOv2 statistics"):
        compare(loaded, loaded, metrics=("fd-dinov2",))

    with_dinov2 = EvalStatistics(**{**vars(old), "mu_dinov2": np.zeros(DIM), "sigma_dinov2": np.eye(DIM)})
    loaded = load_statistics(save_statistics(with_dinov2, tmp_path / "new_ref.npz"))
    np.testing.assert_array_equal(loaded.sigma_dinov2, np.eye(DIM))
    other = EvalStatistics(**{**vars(old), "mu_dinov2": np.zeros(8), "sigma_dinov2": np.eye(8)})
    with pytest.raises(ValueError, match="32 dimensions but the reference's 8.*--fd-dinov2-encoder"):
        compare(loaded, other, metrics=("fd-dinov2",))


def test_offline_or_missing_encoder_is_a_one_line_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)
    np.savez(tmp_path / "s.npz", random_images(2, seed=7))
    samples = str(tmp_path / "s.npz")
    err = run_cli_error(["evaluate", samples, samples, "--metrics", "fd-dinov2", "--no-progress"], capsys)
    assert "could not download config.json from http://127.0.0.1:9/facebook/dinov2-large/resolve/main/config.json" in err
    assert "pass dinov2-vitl14=FOLDER" in err

    missing = f"dinov2-vitl14={tmp_path / 'absent.safetensors'}"
    err = run_cli_error(["evaluate", samples, samples, "--metrics", "fd-dinov2", "--fd-dinov2-encoder", missing], capsys)
    assert "encoder file not found" in err and "absent.safetensors" in err


def test_unknown_metric_names_the_value_and_the_choices(tmp_path, capsys):
    np.savez(tmp_path / "s.npz", random_images(2, seed=8))
    samples = str(tmp_path / "s.npz")
    err = run_cli_error(["evaluate", samples, samples, "--metrics", "fid,fd-dino"], capsys)
    assert "unknown metric 'fd-dino'" in err and ",".join(METRICS) in err
