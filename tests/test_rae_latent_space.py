"""The RAE latent space (`fastdit.rae.space`) against RAE's own `RAE.encode` / `RAE.decode` (fixtures made
by its code, tests/fixtures/rae/README.md), and its names, files and errors."""

import json
from pathlib import Path

import pytest
import torch

from fastdit import hub
from fastdit.errors import UserError, flag_namer
from fastdit.latents import load_latent_space
from fastdit.rae.space import (
    RAELatentSpace,
    check_image_size,
    describe,
    load_decoder_weights,
    load_rae_space,
    load_stats,
)
from fastdit.rae.decoder import DECODER_PRESETS, RAEDecoder
from fastdit.rae.variants import RAE_VARIANTS

from rae_latent_stand_ins import FIXTURES, IMAGE_SIZE, LATENT_SHAPE, TINY, write_tiny_rae_folder

# Relative to max |reference| (README, "Tolerances"): two tiny transformer stacks in float32.
TINY_REL = 2e-6


def _close(actual, expected, rel=TINY_REL):
    error = (actual - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert error <= bound, f"max error {error:.3g} > {bound:.3g} ({rel} of max |ref|)"


@pytest.fixture(scope="module")
def tiny_name(tmp_path_factory):
    return write_tiny_rae_folder(tmp_path_factory.mktemp("rae") / "tiny")


@pytest.fixture(scope="module")
def space(tiny_name) -> RAELatentSpace:
    return load_rae_space(tiny_name)


def test_encoder_tokens_match_rae(space):
    # RAE's images are [0, 1] at 16 px, resized (bicubic) to the encoder's 8 px; fastdit's are [-1, 1].
    tokens = space.encoder(TINY["images01"] * 2 - 1)  # (N, C, h, w)
    reference = TINY["raw_tokens"]  # (N, T, C): class token and 4 registers dropped
    _close(tokens, reference.transpose(1, 2).reshape(tokens.shape))


def test_normalised_latents_match_rae(space):
    latents = space.encode(TINY["images01"] * 2 - 1)
    assert latents.shape == (3, *LATENT_SHAPE)
    _close(latents, TINY["latents"])
    mean, std = space.encode_moments(TINY["images01"] * 2 - 1)
    assert torch.equal(mean, latents) and torch.equal(std, torch.zeros_like(latents))


def test_decoded_images_match_rae(space):
    images = space.decode(TINY["latents"])
    assert images.shape == (3, 3, IMAGE_SIZE, IMAGE_SIZE)
    _close(images, TINY["decoded01"] * 2 - 1)  # RAE decodes to [0, 1]; fastdit's range is [-1, 1]


def test_normalisation_is_raes(space):
    # z = (tokens - mean) / sqrt(var + eps), with RAE's eps 1e-5 (its stat.pt holds var, not std).
    tokens = space.encoder(TINY["images01"] * 2 - 1)
    stats = TINY["stats"]
    expected = (tokens - stats["mean"]) / torch.sqrt(stats["var"] + TINY["eps"])
    torch.testing.assert_close(space.encode(TINY["images01"] * 2 - 1), expected, rtol=0, atol=0)
    assert TINY["eps"] == space.eps == 1e-5


def test_space_through_load_latent_space(tiny_name):
    space = load_latent_space(tiny_name, channels=None)
    assert (space.kind, space.channels, space.downsample, space.latent_size(IMAGE_SIZE)) == ("rae", 16, 4, 4)
    with pytest.raises(UserError, match=r"makes 16px images .*not 32px; use image size 16$"):
        space.latent_size(32)


def test_released_variants_are_described_without_downloads():
    spec = describe("rae:dinov2-b-reg")
    assert (spec.latent_shape, spec.image_size, spec.encoder_input_size, spec.downsample) == ((768, 16, 16), 256, 224, 16)
    assert (spec.decoder.hidden_size, spec.decoder.depth) == (1152, 28)  # ViT-XL
    assert spec.decoder_weights == "decoders/dinov2/wReg_base/ViTXL_n08/model.pt"
    assert spec.stats == "stats/dinov2/wReg_base/imagenet1k/stat.pt"
    big = describe("rae:dinov2-b-reg-512")
    assert (big.latent_shape, big.image_size, big.encoder_input_size) == ((768, 32, 32), 512, 448)
    assert big.decoder_weights.endswith("ViTXL_n08_i512/model.pt")
    assert set(RAE_VARIANTS) == {"dinov2-b-reg", "dinov2-b-reg-512"}
    with pytest.raises(UserError, match="makes 256px images.*not 512px.*rae:dinov2-b-reg-512$"):
        check_image_size("rae:dinov2-b-reg", 512)


@pytest.mark.parametrize("name", ["rae:nope", "rae:", "rae:/no/such/folder"])
def test_unknown_name_lists_the_choices(name):
    with pytest.raises(UserError) as info:
        load_latent_space(name, channels=None)
    message = str(info.value)
    assert "\n" not in message and repr(name) in message
    assert "rae:dinov2-b-reg, rae:dinov2-b-reg-512 or rae:FOLDER (a folder with rae.json)" in message


def test_offline_error_is_one_line(monkeypatch):
    # Nothing cached, nothing reachable: the first file (the encoder's config) is named with its address and
    # destination, and the message says what a local RAE folder holds instead.
    monkeypatch.setattr(hub, "RAE_FILES_URL", "http://127.0.0.1:9/rae/{path}")
    monkeypatch.setattr("fastdit.encoders.HF_HUB_URL", "http://127.0.0.1:9/{repo}/{filename}")
    with pytest.raises(UserError) as info:
        load_latent_space("rae:dinov2-b-reg", channels=None)
    message = str(info.value)
    assert "\n" not in message
    destination = hub.cache_dir() / "encoders" / "facebook--dinov2-with-registers-base" / "config.json"
    assert "could not download config.json from http://127.0.0.1:9/facebook/dinov2-with-registers-base/config.json" in message
    assert f"put it at {destination}" in message
    # Each edge names the argument its way: vae='rae:FOLDER' in Python, --vae rae:FOLDER on the command line.
    advice = "a folder with rae.json naming the encoder, decoder and statistics files"
    assert message.endswith(f"or use a local copy: vae='rae:FOLDER', {advice}")
    assert info.value.at_edge(flag_namer()).endswith(f"or use a local copy: --vae rae:FOLDER, {advice}")


def test_offline_error_names_the_released_file(monkeypatch, tmp_path):
    # With the encoder's files in the cache, the next file to fetch is the statistics.
    tiny = Path(write_tiny_rae_folder(tmp_path / "tiny")[len("rae:"):])
    encoder_cache = hub.cache_dir() / "encoders" / "facebook--dinov2-with-registers-base"
    encoder_cache.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (encoder_cache / name).write_bytes((tiny / "encoder" / name).read_bytes())
    monkeypatch.setattr(hub, "RAE_FILES_URL", "http://127.0.0.1:9/rae/{path}")
    with pytest.raises(UserError) as info:
        load_rae_space("rae:dinov2-b-reg")
    message = str(info.value)
    assert "\n" not in message
    assert "could not download stat.pt from http://127.0.0.1:9/rae/stats/dinov2/wReg_base/imagenet1k/stat.pt" in message
    assert f"put it at {hub.cache_dir() / 'rae' / 'stats/dinov2/wReg_base/imagenet1k' / 'stat.pt'}" in message


def test_released_files_come_from_the_cache(monkeypatch, tmp_path):
    # A released variant whose files are all cached loads without the network: here the tiny stand-ins,
    # described as a variant, in the cache paths of the released ones.
    from fastdit.rae import variants

    tiny = Path(write_tiny_rae_folder(tmp_path / "tiny")[len("rae:"):])
    encoder_cache = hub.cache_dir() / "encoders" / "facebook--dinov2-with-registers-base"
    encoder_cache.mkdir(parents=True)
    for name in ("config.json", "model.safetensors"):
        (encoder_cache / name).write_bytes((tiny / "encoder" / name).read_bytes())
    for source, path in (("model.pt", "decoders/x/model.pt"), ("stat.pt", "stats/x/stat.pt")):
        target = hub.cache_dir() / "rae" / path
        target.parent.mkdir(parents=True)
        target.write_bytes((tiny / source).read_bytes())
    monkeypatch.setitem(DECODER_PRESETS, "tiny", (32, 2, 4, 64))
    monkeypatch.setitem(variants.RAE_VARIANTS, "tiny", variants.RAEVariant(
        encoder="dinov2-vitb14-reg", encoder_input_size=8, decoder="tiny", decoder_file="decoders/x/model.pt",
        stats_file="stats/x/stat.pt", image_size=16, latent_dim=16, encoder_patch=2, decoder_patch=4))
    monkeypatch.setattr(hub, "RAE_FILES_URL", "http://127.0.0.1:9/rae/{path}")
    monkeypatch.setattr("fastdit.encoders.HF_HUB_URL", "http://127.0.0.1:9/{repo}/{filename}")
    space = load_rae_space("rae:tiny")
    assert space.name == "rae:tiny"
    _close(space.encode(TINY["images01"] * 2 - 1), TINY["latents"])
    _close(space.decode(TINY["latents"]), TINY["decoded01"] * 2 - 1)


def test_decoder_file_that_does_not_fit(tmp_path):
    state = torch.load(FIXTURES / "decoder_tiny_model.pt", weights_only=True)
    decoder = RAEDecoder(describe(write_tiny_rae_folder(tmp_path / "t")).decoder)
    del state["decoder_norm.weight"]
    state["extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(UserError) as info:
        load_decoder_weights(decoder, tmp_path / "bad.pt")
    assert "missing decoder_norm.weight; unexpected extra" in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="cannot read the RAE decoder .*junk.pt"):
        load_decoder_weights(decoder, tmp_path / "junk.pt")


def test_decoder_weights_as_safetensors(tmp_path):
    from safetensors.torch import save_file

    state = torch.load(FIXTURES / "decoder_tiny_model.pt", weights_only=True)
    save_file(state, str(tmp_path / "decoder.safetensors"))
    decoder = RAEDecoder(describe(write_tiny_rae_folder(tmp_path / "t")).decoder)
    load_decoder_weights(decoder, tmp_path / "decoder.safetensors")
    assert torch.equal(decoder.decoder_embed.weight, state["decoder_embed.weight"])


def test_stats_shapes(tmp_path):
    mean, var = torch.randn(16, 4, 4), torch.rand(16, 4, 4)
    torch.save({"mean": mean[None], "var": var[None]}, tmp_path / "batched.pt")  # (1, C, h, w)
    got_mean, got_var = load_stats(tmp_path / "batched.pt", (16, 4, 4))
    assert torch.equal(got_mean, mean) and torch.equal(got_var, var)
    torch.save({"mean": mean}, tmp_path / "mean_only.pt")  # RAE: a missing var is 1
    assert torch.equal(load_stats(tmp_path / "mean_only.pt", (16, 4, 4))[1], torch.ones(16, 4, 4))
    torch.save({"mean": torch.zeros(8, 4, 4), "var": var}, tmp_path / "wrong.pt")
    with pytest.raises(UserError, match=r"mean of shape \(8, 4, 4\), which does not fit latents of shape \(16, 4, 4\)"):
        load_stats(tmp_path / "wrong.pt", (16, 4, 4))
    torch.save({"mean": mean, "var": -var}, tmp_path / "negative.pt")
    with pytest.raises(UserError, match="non-finite or negative var"):
        load_stats(tmp_path / "negative.pt", (16, 4, 4))


def test_bad_rae_json(tmp_path):
    name = write_tiny_rae_folder(tmp_path / "t")
    folder = Path(name[len("rae:"):])
    record = json.loads((folder / "rae.json").read_text())
    for change, expected in ((dict(encoder_input_size=7), "not a multiple of the encoder's patch 2"),
                             (dict(decoder="ViT-H"), "unknown decoder preset 'ViT-H'"),
                             (dict(colour="red"), r"unknown field\(s\) \['colour'\]"),
                             (dict(encoder="missing"), "names the encoder .*missing'?, which has no config.json")):
        (folder / "rae.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(UserError, match=expected):
            describe(name)
    (folder / "rae.json").write_text(json.dumps({**record, "stats": "gone.pt"}))
    with pytest.raises(UserError, match="statistics .*gone.pt' does not exist"):
        load_rae_space(name)


def test_decode_refuses_other_shapes(space):
    with pytest.raises(UserError, match=r"decodes latents \(N, 16, 4, 4\), got \(1, 4, 4, 4\)"):
        space.decode(torch.zeros(1, 4, 4, 4))
