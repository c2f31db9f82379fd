"""What `--vae` accepts, and the message for each way a VAE name can be wrong (no network: HF_HUB_OFFLINE)."""

import pytest

from fastdit.errors import UserError
from fastdit.latents import load_latent_space

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


def test_a_hub_id_that_cannot_be_fetched_offline(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name either
    message = vae_error("someone/some-vae")
    assert "could not load the VAE 'someone/some-vae' from the Hugging Face hub" in message
    assert "no local folder of that name exists" in message
    assert "huggingface-cli download someone/some-vae" in message and message.endswith(ACCEPTED)



@pytest.mark.parametrize("field, count", [("out_channels", 1), ("in_channels", 4)])
def test_a_vae_for_other_than_rgb_images_is_refused_at_load(tmp_path, field, count):
    from diffusers import AutoencoderKL

    from fastdit.latents import tiny_vae_config

    folder = tmp_path / "vae"
    AutoencoderKL(**{**tiny_vae_config(), field: count}).save_pretrained(folder)
    message = vae_error(folder)
    assert "-channel images; fastdit's images are RGB (3 channels)" in message
    assert f"{count}-channel" in message
