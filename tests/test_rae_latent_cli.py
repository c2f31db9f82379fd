"""An RAE latent space through the jobs: `extract` -> `train` -> `sample` / `sample-ddp` / `generate`, on a
tiny RAE folder built from stand-ins (tests/rae_latent_stand_ins.py), with the checkpoint recording the
space so that sampling needs no --vae."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from fastdit.cli import main
from fastdit.data.latent_store import LatentStore, LatentStoreDataset
from fastdit.errors import UserError
from fastdit.rae.space import load_rae_space

from cli_runner import run_cli
from conftest import make_image_folder
from rae_latent_stand_ins import IMAGE_SIZE, LATENT_SHAPE, write_tiny_rae_folder


@pytest.fixture(scope="module")
def tiny_rae(tmp_path_factory) -> str:
    return write_tiny_rae_folder(tmp_path_factory.mktemp("rae") / "tiny")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images") / "data", per_class=3)


@pytest.fixture(scope="module")
def store(tiny_rae, images, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("stores") / "rae"
    assert main(["extract", "--data-path", str(images), "--features-path", str(store), "--image-size", str(IMAGE_SIZE),
                 "--vae", tiny_rae, "--shard-size", "4", "--num-workers", "0", "--no-progress"]) == 0
    return store


def test_extract_stores_the_latents_alone(store, tiny_rae, images):
    loaded = LatentStore(store)
    assert loaded.meta["vae"] == tiny_rae and loaded.meta["posterior_std"] is False
    assert loaded.meta["dtype"] == "float16" and tuple(loaded.meta["latent_shape"]) == LATENT_SHAPE
    with safe_open(str(store / "shard-00000.safetensors"), framework="pt") as shard:
        assert set(shard.keys()) == {"mean", "label", "source"}  # no std: the encoder is deterministic
        mean = shard.get_tensor("mean")  # (n, 2, C, h, w)
    # Item 0 is the first file's crop and its flip, encoded by the space itself, then rounded to float16.
    from fastdit.data.image_folder import list_image_folder, load_crop, pixels_to_unit_range

    index = list_image_folder(images)
    crop = pixels_to_unit_range(load_crop(index.root / index.files[0], IMAGE_SIZE))[None]
    expected = load_rae_space(tiny_rae).encode(torch.cat([crop, crop.flip(-1)]))
    torch.testing.assert_close(mean[0].float(), expected, rtol=2**-10, atol=1e-3)
    # The training items are the stored latents of a random side, without posterior noise.
    latent, label = LatentStoreDataset(store, seed=0)[0]
    assert any(torch.equal(latent, mean[0, side].float()) for side in (0, 1)) and label == index.labels[0]


def test_extract_says_what_it_will_write(tiny_rae, images, tmp_path, capsys, monkeypatch):
    store = tmp_path / "store"
    assert main(["extract", "--data-path", str(images), "--features-path", str(store), "--image-size", str(IMAGE_SIZE),
                 "--vae", tiny_rae, "--num-workers", "0", "--no-progress"]) == 0
    per_image = 2 * 16 * 4 * 4 * 2 + 16  # both sides, C x h x w, float16, no std; label and source
    out = capsys.readouterr().out
    assert (f"encoding 9 images into {str(store)!r}: about {9 * per_image / 1000:.2f} kB to write (1.04 kB each: "
            "16x4x4 float16 latents of each image and its flip)") in out
    # A disk that cannot hold it refuses the job before anything is encoded, saying how much is needed.
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 100, 100))
    code = run_cli("extract", "--data-path", images, "--features-path", tmp_path / "full", "--image-size", IMAGE_SIZE,
                   "--vae", tiny_rae, "--dtype", "float32", "--num-workers", "0", "--no-progress")
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert ("the 9 images still to encode (16x4x4 float32 latents of each image and its flip) need about 18.6 kB in "
            f"{str(tmp_path / 'full')!r}, but 100 bytes are free there; free some space or choose another "
            "--features-path (--dtype float16 halves the latents)") in err
    assert not list((tmp_path / "full").glob("shard-*"))


def _export_of(out: str) -> str:
    return re.search(r"sample with: .*--ckpt (\S+)", out).group(1)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory) -> Path:
    results = tmp_path_factory.mktemp("runs")
    assert main(["train", "--features-path", str(store), "--model", "DiT-T/2", "--image-size", str(IMAGE_SIZE),
                 "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "3", "--max-steps", "2",
                 "--num-workers", "0", "--no-progress", "--no-tensorboard", "--results-dir", str(results)]) == 0
    exports = sorted(results.rglob("*.safetensors"))
    assert exports, "training wrote no export"
    return exports[-1]


def test_the_checkpoint_records_the_space(trained, tiny_rae):
    from fastdit.checkpoint import load_model

    model, info = load_model(trained)
    assert info.latent.kind == "rae" and info.latent.vae == tiny_rae and info.latent.downsample_factor == 4
    assert info.image_size == IMAGE_SIZE and model.config.in_channels == 16 and model.config.input_size == 4
    with safe_open(str(trained), framework="pt") as handle:
        record = json.loads(handle.metadata()["model_info"])
    assert record["latent"] == {"kind": "rae", "vae": tiny_rae, "scale_factor": 1.0, "downsample_factor": 4}


def test_sample_decodes_with_no_flag(trained, tmp_path):
    from PIL import Image

    out = tmp_path / "grid.png"
    assert main(["sample", "--ckpt", str(trained), "--num-sampling-steps", "2", "--class-labels", "0", "2",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    with Image.open(out) as grid:
        assert grid.mode == "RGB" and grid.height >= IMAGE_SIZE


def test_sample_ddp_and_generate(trained, tmp_path):
    from fastdit.loading import load_for_sampling
    from fastdit.sampling import SamplingOptions, generate

    out = tmp_path / "samples.npz"
    assert main(["sample-ddp", "--ckpt", str(trained), "--out", str(out), "--num-fid-samples", "4", "--chunk-size", "4",
                 "--num-sampling-steps", "2", "--batch-size", "2", "--device", "cpu", "--no-progress"]) == 0
    with np.load(out) as npz:
        assert npz["arr_0"].shape == (4, IMAGE_SIZE, IMAGE_SIZE, 3) and npz["arr_0"].dtype == np.uint8
    loaded = load_for_sampling(str(trained), device="cpu")
    assert loaded.latent_space.kind == "rae"
    images = generate(loaded.model, loaded.latent_space, [0, 1], options=SamplingOptions(num_steps=2, cfg_scale=1.0),
                      info=loaded.info)
    assert images.shape == (2, IMAGE_SIZE, IMAGE_SIZE, 3) and images.dtype == np.uint8


def test_sample_refuses_another_kind_of_space(trained, capsys):
    code = run_cli("sample", "--ckpt", trained, "--vae", "ema", "--num-sampling-steps", "2", "--no-progress")
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "records that it works on the RAE latent space" in err


def test_bad_names_are_one_line_with_the_choices(images, tmp_path, capsys):
    code = run_cli("extract", "--data-path", images, "--features-path", tmp_path / "s", "--vae", "rae:nope",
                   "--no-progress")
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1
    assert "'rae:nope'" in err and "choose rae:dinov2-b-reg, rae:dinov2-b-reg-512 or rae:FOLDER" in err


def test_wrong_image_size_is_refused_before_loading(images, tmp_path, capsys, tiny_rae):
    code = run_cli("extract", "--data-path", images, "--features-path", tmp_path / "s", "--vae", tiny_rae,
                   "--image-size", "32", "--no-progress")
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and "makes 16px images (its decoder's size), not 32px" in err
    code = run_cli("extract", "--data-path", images, "--features-path", tmp_path / "s", "--vae", "rae:dinov2-b-reg",
                   "--image-size", "512", "--no-progress")
    err = capsys.readouterr().err
    assert code != 0 and "makes 256px images" in err and "rae:dinov2-b-reg-512" in err


def test_train_from_images_on_the_fly(tiny_rae, images, tmp_path):
    from fastdit.checkpoint import load_model

    results = tmp_path / "runs"
    assert main(["train", "--data-path", str(images), "--vae", tiny_rae, "--model", "DiT-T/2", "--image-size",
                 str(IMAGE_SIZE), "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "3",
                 "--max-steps", "1", "--num-workers", "0", "--no-progress", "--no-tensorboard", "--results-dir",
                 str(results)]) == 0
    _, info = load_model(sorted(results.rglob("*.safetensors"))[-1])
    assert (info.latent.kind, info.latent.vae, info.image_size) == ("rae", tiny_rae, IMAGE_SIZE)


def test_model_info_refuses_a_damaged_rae_record():
    from fastdit.model_info import ModelInfo
    from fastdit.models import DiTConfig
    from dataclasses import asdict

    model = asdict(DiTConfig(input_size=4, in_channels=16, depth=1, hidden_size=32, num_heads=2, num_classes=3))
    for latent, expected in (({"kind": "rae", "vae": "ema", "downsample_factor": 4}, "not 'rae:...'"),
                             ({"kind": "rae", "vae": "rae:x", "downsample_factor": None}, "downsample_factor None"),
                             ({"kind": "latent"}, "latent kind 'latent', not one of 'vae', 'pixels', 'rae'")):
        with pytest.raises(UserError, match=expected):
            ModelInfo.from_dict({"model": model, "latent": latent}, source="x.safetensors")
