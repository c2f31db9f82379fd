"""What `--vae` accepts, and the message for each way a VAE name can be wrong (no network: HF_HUB_OFFLINE)."""

import contextlib
import socket
import time

import pytest

from fastdit.errors import UserError
from fastdit.latents import load_latent_space
from conftest import tiny_vae_config

ACCEPTED = "'mse', 'ema', a Hugging Face hub id (namespace/name) or a local diffusers AutoencoderKL folder"


def vae_error(name) -> str:
    with pytest.raises(UserError) as info:
        load_latent_space(str(name))
    return str(info.value)


@pytest.mark.parametrize("spelling", ["absolute", "relative"])
def test_a_missing_local_folder_is_named_as_missing(tmp_path, monkeypatch, spelling):
    monkeypatch.chdir(tmp_path)
    name = str(tmp_path / "vaes" / "mine") if spelling == "absolute" else "./vaes/mine"
    message = vae_error(name)
    assert message == f"VAE folder {name!r} does not exist; --vae takes {ACCEPTED}"


def test_a_folder_or_file_that_is_not_a_vae(tmp_path):
    (tmp_path / "notes.txt").write_text("not a VAE")
    message = vae_error(tmp_path)
    assert message.startswith(f"VAE folder {str(tmp_path)!r} is not a diffusers AutoencoderKL folder (")
    assert message.endswith(f"; --vae takes {ACCEPTED}")
    assert vae_error(tmp_path / "notes.txt") == f"VAE {str(tmp_path / 'notes.txt')!r} is a file; --vae takes {ACCEPTED}"


def test_a_hub_id_that_cannot_be_fetched_offline(tmp_path, monkeypatch, capsys):
    from fastdit.cli import main
    from fastdit.hub import hf_program

    monkeypatch.chdir(tmp_path)  # no local folder of that name either
    message = vae_error("someone/some-vae")  # HF_HUB_OFFLINE=1 (conftest)
    assert message.startswith("the VAE 'someone/some-vae' is not in the Hugging Face cache and the hub cannot be "
                              "reached (HF_HUB_OFFLINE is set). ")
    # This installation's own `hf` (`.venv/bin/hf` when it is not on PATH), where the cache is to be copied,
    # a local folder, and pixels for small data; in Python the loader's argument, vae=..., names them.
    fetch = f"`{hf_program()} download someone/some-vae config.json diffusion_pytorch_model.safetensors`"
    assert fetch in message and "huggingface-cli" not in message and message.endswith(f"vae takes {ACCEPTED}")
    assert "copy that folder to this machine), or pass vae=PATH, a local diffusers" in message
    assert "need no VAE: vae='pixels' trains and samples them in pixel space" in message
    # The command line (here extract, as train) gives the same message with its flags.
    from PIL import Image

    (tmp_path / "data" / "a").mkdir(parents=True)
    Image.new("RGB", (16, 16)).save(tmp_path / "data" / "a" / "x.png")
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["extract", "--data-path", str(tmp_path / "data"), "--features-path", str(tmp_path / "store"),
              "--image-size", "16", "--vae", "someone/some-vae", "--no-progress"])
    err = capsys.readouterr().err
    assert fetch in err and "or pass --vae PATH, a local diffusers" in err and "need no VAE: --vae pixels trains" in err
    assert err.strip().endswith(f"--vae takes {ACCEPTED}")



@pytest.mark.parametrize("field, count", [("out_channels", 1), ("in_channels", 4)])
def test_a_vae_for_other_than_rgb_images_is_refused_at_load(tmp_path, field, count):
    from diffusers import AutoencoderKL

    folder = tmp_path / "vae"
    AutoencoderKL(**{**tiny_vae_config(), field: count}).save_pretrained(folder)
    message = vae_error(folder)
    assert "-channel images; fastdit's images are RGB (3 channels)" in message
    assert f"{count}-channel" in message


class _Unanswered:
    """A socket that listens but never accepts: the kernel completes the TCP handshake, then nothing is
    ever sent back, as behind a firewall that drops packets (the slow way of being offline)."""

    def __enter__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(1)
        return f"http://127.0.0.1:{self.socket.getsockname()[1]}"

    def __exit__(self, *exc):
        self.socket.close()


@pytest.mark.parametrize("blocked", ["refused", "unanswered"])
def test_an_unreachable_hub_fails_in_seconds_without_a_download_attempt(tmp_path, monkeypatch, blocked):
    from diffusers import AutoencoderKL
    from huggingface_hub import constants

    from fastdit import hub

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "HUB_PROBE_SECONDS", 0.5)
    attempts = []
    original = AutoencoderKL.from_pretrained.__func__

    def recording(cls, name, **options):
        attempts.append(options)
        return original(cls, name, **options)

    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(recording))
    with contextlib.ExitStack() as stack:
        # port 9 (discard) on 127.0.0.1 refuses at once; the listening socket never answers
        endpoint = "http://127.0.0.1:9" if blocked == "refused" else stack.enter_context(_Unanswered())
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        started = time.perf_counter()
        message = vae_error("someone/some-vae")
        seconds = time.perf_counter() - started
    assert f"the hub cannot be reached (no answer from {endpoint}: " in message
    assert f"{hub.hf_program()} download someone/some-vae config.json" in message
    assert attempts == [{"local_files_only": True}]  # the cache only: no download was tried
    # The probe's 0.5 s plus the cache lookup; huggingface_hub's retries took ~75 s. 10 s leaves room for
    # a loaded machine without letting any retry loop through.
    assert seconds < 10



def test_pixel_space_has_the_model_channel_count(tmp_path):
    import torch

    from fastdit.checkpoint import export_weights
    from fastdit.latents import PixelSpace
    from fastdit.loading import load_for_sampling
    from fastdit.model_info import LatentInfo, ModelInfo
    from fastdit.models import build_model

    assert load_latent_space(None, channels=1) == PixelSpace(channels=1)
    with pytest.raises(UserError, match=r"pass channels=info.config.in_channels"):
        load_latent_space(None)  # no silent 3: pixel space is as wide as the model's input
    torch.manual_seed(0)
    digits_like = build_model("DiT-T/2", input_size=8, in_channels=1, num_classes=10, depth=1)
    info = ModelInfo(config=digits_like.config, latent=LatentInfo(kind="pixels", vae=None))
    path = export_weights(digits_like, info, tmp_path / "digits.safetensors")
    assert load_for_sampling(str(path), device="cpu").latent_space == PixelSpace(channels=1)


def test_no_tip_about_accelerate_before_fastdits_lines(tmp_path, monkeypatch, capfd):
    """Without accelerate, diffusers would print a multi-line tip to install it on every VAE load; fastdit
    asks for what diffusers falls back to (low_cpu_mem_usage=False), which loads the same weights quietly."""
    import diffusers.models.modeling_utils as modeling_utils
    import diffusers.utils
    from diffusers import AutoencoderKL

    AutoencoderKL(**tiny_vae_config()).save_pretrained(tmp_path / "vae")
    monkeypatch.setattr(diffusers.utils, "is_accelerate_available", lambda: False)
    monkeypatch.setattr(modeling_utils, "is_accelerate_available", lambda: False)
    capfd.readouterr()
    space = load_latent_space(str(tmp_path / "vae"))
    assert space.channels == 4 and "accelerate" not in "".join(capfd.readouterr())
