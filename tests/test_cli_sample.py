"""`fastdit sample` end to end (tiny models, pixel space and a tiny VAE) and its error messages."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fastdit.checkpoint import export_weights
from fastdit.errors import UserError
from fastdit.loading import load_for_sampling
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.models import build_model
from cli_runner import run_cli
from conftest import tiny_vae_config


def random_tiny(**fields):
    torch.manual_seed(0)
    model = build_model("DiT-T/2", **{"depth": 1, **fields})
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.fixture
def pixel_ckpt(tmp_path):
    model = random_tiny(input_size=8, in_channels=3, num_classes=10)
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None))
    return export_weights(model, info, tmp_path / "pixel.safetensors")


@pytest.fixture
def vae_setup(tmp_path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae_dir = tmp_path / "tiny-vae"
    AutoencoderKL(**tiny_vae_config()).save_pretrained(vae_dir)
    model = random_tiny(input_size=4, in_channels=4, num_classes=1000, depth=6)  # a plain preset
    path = tmp_path / "latent.pt"
    torch.save(model.state_dict(), path)
    return path, vae_dir


def test_pixel_sample_ddpm_writes_reproducible_png(tmp_path, pixel_ckpt):
    out1, out2 = tmp_path / "a.png", tmp_path / "b.png"
    common = ["sample", "--ckpt", pixel_ckpt, "--num-sampling-steps", 5, "--class-labels", 1, 2, 3, "--no-progress",
              "--no-upscale"]
    assert run_cli(*common, "--out", out1) == 0
    assert run_cli(*common, "--out", out2) == 0
    a, b = np.asarray(Image.open(out1)), np.asarray(Image.open(out2))
    assert a.shape == (2 + 8 + 2, 2 + 3 * (8 + 2), 3)  # one row of three 8x8 images, padding 2
    assert np.array_equal(a, b)
    assert run_cli(*common, "--out", out2, "--seed", 1) == 0
    assert not np.array_equal(a, np.asarray(Image.open(out2)))


def test_vae_sample_ddim_with_official_guidance(tmp_path, vae_setup, capsys):
    ckpt, vae_dir = vae_setup
    out = tmp_path / "grid.png"
    status = run_cli("sample", "--model", "DiT-T/2", "--ckpt", ckpt, "--image-size", 32, "--vae", vae_dir,
                     "--sampler", "ddim", "--num-sampling-steps", 4, "--cfg-scale", 1.5, "--official-guidance",
                     "--out", out, "--no-progress", "--no-upscale")
    assert status == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 + 2 * 34, 2 + 4 * 34, 3)  # the official eight labels, four per row
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "DiT-Q/2"], "unknown model 'DiT-Q/2'"),
        (["--class-labels", "3", "10"], "class label 10 is outside [0, 10)"),
        (["--cfg-scale", "0.5"], "cfg scale 0.5 < 1"),
        (["--sampler", "ddim", "--eta", "2"], "DDIM eta must be in [0, 1]"),
        (["--num-sampling-steps", "0"], "number of sampling steps must be in [2, 1000]"),
        (["--image-size", "16"], "trained at image size 8; use --image-size 8"),
        (["--out", "/proc/forbidden/x.png"], "is not a writable folder"),
        (["--out", "grid.jpg"], "should end in .png"),
        (["--cfg-scale", "nan"], "argument --cfg-scale: 'nan' is not a finite number"),
        (["--cfg-scale=-inf"], "argument --cfg-scale: '-inf' is not a finite number"),
        (["--sampler", "ddim", "--eta", "nan"], "argument --eta: 'nan' is not a finite number"),
        (["--seed", "-2"], "argument --seed: -2 is negative; seeds are integers >= 0"),
        (["--cfg-scale", "1e30"], "cfg scale 1e+30 is above 100"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    ],
)
def test_bad_input_clear_message_nothing_written(tmp_path, pixel_ckpt, capsys, extra, message):
    os.chdir(tmp_path)
    before = set(os.listdir(tmp_path))
    args = ["sample", "--ckpt", str(pixel_ckpt), "--num-sampling-steps", "2", "--no-progress", "--out", "grid.png"]
    status = run_cli(*args, *extra)
    err = capsys.readouterr().err
    assert status == 2, err
    assert message in err and "Traceback" not in err
    assert set(os.listdir(tmp_path)) == before


def test_vae_needs_image_size_divisible_by_8(tmp_path, vae_setup, capsys):
    ckpt, vae_dir = vae_setup
    status = run_cli("sample", "--model", "DiT-T/2", "--ckpt", ckpt, "--image-size", 30, "--vae", vae_dir)
    assert status == 2 and "not divisible by 8" in capsys.readouterr().err


def test_input_size_not_divisible_by_patch(tmp_path, vae_setup, capsys):
    ckpt, vae_dir = vae_setup  # image 40 -> latent 5, not divisible by patch 2
    status = run_cli("sample", "--model", "DiT-T/2", "--ckpt", ckpt, "--image-size", 40, "--vae", vae_dir)
    assert status == 2 and "input size 5 is not divisible by the patch size 2" in capsys.readouterr().err


def test_missing_truncated_and_foreign_checkpoints(tmp_path, pixel_ckpt, capsys):
    assert run_cli("sample", "--ckpt", tmp_path / "none.pt") == 2
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(pixel_ckpt.read_bytes()[:200])
    assert run_cli("sample", "--ckpt", broken) == 2
    assert "truncated or not a safetensors file" in capsys.readouterr().err
    assert run_cli("sample", "--ckpt", pixel_ckpt, "--num-classes", 5) == 2
    assert "has 10 classes, not 5" in capsys.readouterr().err


def test_offline_official_weights_give_one_clear_message(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    import fastdit.hub as hub

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))  # not the user's cache
    monkeypatch.setattr(hub, "OFFICIAL_DIT_URL", "http://127.0.0.1:9/{name}")
    assert run_cli("sample", "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "could not download DiT-XL-2-256x256.pt" in err and "--ckpt PATH" in err and "Traceback" not in err
    # The release needs the SD VAE: the message names it while it is not cached either (an empty cache here)
    # with the one VAE message of every job (extract's and train's too): the download with this installation's
    # own `hf`, where to copy the cache, a local folder, and pixels for small data.
    advice = (f"also needs the VAE stabilityai/sd-vae-ft-mse, which is not in the Hugging Face cache either. On a "
              f"machine with internet access, `{hub.hf_program()} download stabilityai/sd-vae-ft-mse config.json "
              f"diffusion_pytorch_model.safetensors` puts it into the Hugging Face cache ($HF_HOME, else "
              f"~/.cache/huggingface; copy that folder to this machine), or pass --vae PATH, a local diffusers "
              f"AutoencoderKL folder; small images (such as the 8x8 digits) need no VAE: --vae pixels trains")
    assert advice in err and "or load a local copy: --ckpt PATH" in err
    assert run_cli("sample", "--model", "DiT-B/4") == 2
    assert "no official weights for DiT-B/4" in capsys.readouterr().err
    # Python (the notebook) gets the same advice in its own words: the loader's arguments, no flag.
    with pytest.raises(UserError) as error:
        load_for_sampling(model_name="DiT-XL/2", image_size=256)
    words = str(error.value)
    assert "or load a local copy: source=PATH" in words and "vae=PATH" in words and "vae='pixels'" in words
    assert "--ckpt" not in words and "--vae" not in words


def test_the_offline_message_leaves_out_a_vae_that_is_cached(tmp_path, capsys, monkeypatch):
    from huggingface_hub import constants

    import fastdit.hub as hub

    # The Hugging Face cache's layout: models--ORG--NAME/refs/main holds the commit, snapshots/COMMIT the files
    repo = tmp_path / "hf-cache" / "models--stabilityai--sd-vae-ft-ema"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    for name in hub.VAE_FILES:
        (repo / "snapshots" / ("0" * 40)).mkdir(parents=True, exist_ok=True)
        (repo / "snapshots" / ("0" * 40) / name).write_text("{}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(hub, "OFFICIAL_DIT_URL", "http://127.0.0.1:9/{name}")
    assert run_cli("sample", "--vae", "ema", "--out", tmp_path / "x.png") == 2
    err = capsys.readouterr().err
    assert "could not download DiT-XL-2-256x256.pt" in err and "VAE" not in err
    assert run_cli("sample", "--vae", "mse", "--out", tmp_path / "x.png") == 2  # the other one is not cached
    assert "also needs the VAE stabilityai/sd-vae-ft-mse" in capsys.readouterr().err


def test_console_script_help():
    result = subprocess.run([sys.executable, "-m", "fastdit", "sample", "--help"], capture_output=True, text=True)
    assert result.returncode == 0
    for flag in ["--model", "--image-size", "--num-classes", "--ckpt", "--vae", "--cfg-scale",
                 "--num-sampling-steps", "--sampler", "--seed", "--class-labels", "--out", "--device"]:
        assert flag in result.stdout


@pytest.mark.parametrize("channels", [1, 3])
def test_plain_pixel_state_dict_samples_with_vae_pixels(tmp_path, channels, capsys):
    """The official code's format (a bare state dict), trained on pixels (CIFAR-10, digits): `--vae pixels`
    means pixel space, and the channel count comes from the patch embedding's weight."""
    model = random_tiny(input_size=8, in_channels=channels, num_classes=10, depth=6)  # the DiT-T/2 preset
    ckpt = tmp_path / "ema.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "grid.png"
    status = run_cli("sample", "--ckpt", ckpt, "--model", "DiT-T/2", "--image-size", 8, "--num-classes", 10, "--vae", "pixels",
                     "--num-sampling-steps", 2, "--class-labels", 0, 1, "--out", out, "--no-progress", "--no-upscale")
    assert status == 0, capsys.readouterr().err
    grid = Image.open(out)
    assert grid.size == (2 + 2 * (8 + 2), 2 + 8 + 2) and len(grid.getbands()) == channels


def test_the_command_fastdit_prints_runs_as_printed_without_the_environment_on_path(tmp_path):
    # After `make demo`, .venv/bin is not on PATH: the printed "sample with:" command must still run,
    # from the folder the user is in, with the PATH the user has.
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    venv_bin = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p != venv_bin)
    env = {**os.environ, "PATH": path}
    train = subprocess.run(
        [sys.executable, "-m", "fastdit", "train", "--data-path", "digits", "--model", "DiT-T/2", "--image-size", "8",
         "--num-classes", "10", "--depth", "1", "--hidden-size", "32", "--num-heads", "2", "--global-batch-size", "8",
         "--num-workers", "0", "--max-steps", "1", "--no-progress", "--no-tensorboard", "--results-dir", "runs"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    printed = train.stdout.split("sample with: ")[-1].strip()
    assert not printed.startswith("fastdit ")  # `fastdit` is not on this PATH
    words = [*shlex.split(printed), "--num-sampling-steps", "2", "--class-labels", "1", "2", "--out", "grid.png",
             "--no-progress"]
    subprocess.run(words, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=True)
    assert (tmp_path / "grid.png").stat().st_size > 0


def test_the_printed_program_is_fastdit_only_where_that_name_is_this_installation(monkeypatch, tmp_path):
    import os
    import sys
    from pathlib import Path

    from fastdit.program import program_words

    script = Path(sys.executable).parent / "fastdit"
    monkeypatch.setenv("PATH", os.pathsep.join([str(script.parent), os.environ.get("PATH", "")]))
    assert program_words() == ["fastdit"]
    monkeypatch.setenv("PATH", str(tmp_path))  # nothing called fastdit there
    monkeypatch.chdir(script.parent.parent)
    assert program_words() == [str(Path(script.parent.name) / "fastdit")]  # e.g. .venv/bin/fastdit from the repo


def test_sample_runs_in_batches_of_batch_size(tmp_path, pixel_ckpt, monkeypatch):
    import importlib

    generate_module = importlib.import_module("fastdit.sampling.generate")
    real, sizes = generate_module.sample_latents, []
    monkeypatch.setattr(generate_module, "sample_latents",
                        lambda model, labels, **kw: sizes.append(len(labels)) or real(model, labels, **kw))
    out = tmp_path / "grid.png"
    assert run_cli("sample", "--ckpt", pixel_ckpt, "--num-sampling-steps", 2, "--class-labels", 1, 2, 3, 4, 5,
                   "--batch-size", 2, "--no-progress", "--out", out) == 0
    assert sizes == [2, 2, 1] and out.exists()


def test_an_overflowing_model_writes_no_png(tmp_path, capsys):
    """Finite weights that overflow float32 in the forward pass: exit 2 and one line, not a black PNG."""
    model = random_tiny(input_size=8, in_channels=3, num_classes=10)
    with torch.no_grad():
        model.final_layer.linear.bias.fill_(3e38)
    ckpt = export_weights(model, ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None)),
                          tmp_path / "overflowing.safetensors")
    out = tmp_path / "grid.png"
    status = run_cli("sample", "--ckpt", ckpt, "--num-sampling-steps", 2, "--no-progress", "--out", out)
    err = capsys.readouterr().err
    assert status == 2 and "non-finite latents (NaN or inf)" in err and "Traceback" not in err
    assert not out.exists()


def test_a_vae_with_other_latent_channels_is_refused_at_load(tmp_path, vae_setup, capsys):
    from diffusers import AutoencoderKL

    ckpt, _ = vae_setup  # a 4-channel DiT
    wide = tmp_path / "vae-16"
    AutoencoderKL(**{**tiny_vae_config(), "latent_channels": 16}).save_pretrained(wide)
    status = run_cli("sample", "--model", "DiT-T/2", "--ckpt", ckpt, "--image-size", 32, "--vae", wide,
                     "--num-sampling-steps", 2, "--out", tmp_path / "grid.png", "--no-progress")
    err = capsys.readouterr().err
    assert status == 2 and "Traceback" not in err
    assert f"the VAE {str(wide)!r} has 16 latent channels but the model" in err and "works on 4" in err


def test_the_install_command_adds_an_extra_to_this_installation(monkeypatch, tmp_path):
    import shlex
    import sys
    from pathlib import Path

    from fastdit.program import install_command

    source = Path(__file__).resolve().parent.parent  # this checkout: fastdit runs from it (editable)
    monkeypatch.chdir(source)
    words = shlex.split(install_command("app"))
    # this interpreter's pip keeps the torch installed beside it; the extra comes from the source folder
    assert Path(words[0]).resolve() == Path(sys.executable).resolve() and words[1:] == ["-m", "pip", "install", "-e", ".[app]"]
    monkeypatch.chdir(tmp_path)
    assert shlex.split(install_command("vae"))[-1] == f"{source}[vae]"


@pytest.mark.parametrize("command", ["sample", "sample-ddp"])
def test_a_preset_for_your_own_model_asks_for_the_checkpoint_before_any_download(tmp_path, capsys, monkeypatch, command):
    import fastdit.hub as hub

    monkeypatch.setattr(hub, "download", lambda *a, **k: pytest.fail("a preset without a model downloaded DiT-XL/2"))
    out = tmp_path / ("x.png" if command == "sample" else "x.npz")
    assert run_cli(command, "--preset", "repa-sde-250", "--out", out) == 2
    assert ("preset repa-sde-250 samples flow models you trained, but without --ckpt the official DiT-XL/2 weights "
            "would be sampled, a ddpm model; pass --ckpt with a flow model") in capsys.readouterr().err
