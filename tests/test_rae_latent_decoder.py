"""The RAE ViT decoder (`fastdit.rae.decoder`) against RAE's own `GeneralDecoder` (fixtures made by its code,
see tests/fixtures/rae/README.md): the released file layout loads strict, the sin-cos table is RAE's, and
the outputs agree within float32 tolerances derived in the README."""

import importlib.util
from pathlib import Path

import pytest
import torch

from fastdit.rae.decoder import (
    DECODER_PRESETS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RAEDecoder,
    RAEDecoderConfig,
    decoder_config,
    noise_augment,
    sincos_position_table,
)

FIXTURES = Path(__file__).parent / "fixtures" / "rae"
GOLDEN = torch.load(FIXTURES / "rae_golden.pt", weights_only=True)
# make_fixtures.py's shapes and weight recipe (it imports RAE's code only inside main()).
_spec = importlib.util.spec_from_file_location("rae_make_fixtures", FIXTURES / "make_fixtures.py")
MAKE = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MAKE)

# Tolerances relative to max|reference| (README, "Tolerances"): float32 GEMMs and attention summed in
# another order (SDPA here, matmul + softmax in RAE) differ by ~sqrt(K)·2^-24 per layer (K ≤ 4096 terms).
TINY_REL = 2e-6
VITB_REL = 1e-5

TINY = RAEDecoderConfig(latent_dim=MAKE.TINY_DECODER["hidden_size"], hidden_size=32, depth=2, num_heads=4, mlp_size=64,
                        patch_size=4, grid_size=MAKE.TINY_GRID)


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    error = (actual - expected).abs().max().item()
    bound = rel * expected.abs().max().item()
    assert error <= bound, f"max error {error:.3g} > {bound:.3g} ({rel} of max |ref|)"


def test_released_layout_loads_strict():
    # decoder_tiny_model.pt is RAE's decoder state dict saved with torch.save, as the released model.pt files.
    state = torch.load(FIXTURES / "decoder_tiny_model.pt", weights_only=True)
    decoder = RAEDecoder(TINY)
    assert {k: tuple(v.shape) for k, v in decoder.state_dict().items()} == {k: tuple(v.shape) for k, v in state.items()}
    decoder.load_state_dict(state, strict=True)
    assert torch.equal(decoder.decoder_pred.weight, state["decoder_pred.weight"])


def test_vitb_preset_has_raes_keys_and_shapes():
    reference = GOLDEN["decoder_vitb"]
    decoder = RAEDecoder(decoder_config("ViT-B", latent_dim=768, grid_size=MAKE.VITB_GRID))
    assert sorted(decoder.state_dict()) == reference["keys"]
    assert {k: list(v.shape) for k, v in decoder.state_dict().items()} == reference["shapes"]


def test_position_table_is_raes():
    torch.testing.assert_close(RAEDecoder(TINY).decoder_pos_embed.data, GOLDEN["decoder_tiny"]["initial_pos_embed"],
                               rtol=0, atol=1e-7)
    torch.testing.assert_close(sincos_position_table(768, MAKE.VITB_GRID)[17],
                               GOLDEN["decoder_vitb"]["initial_pos_embed_row_17"], rtol=0, atol=1e-7)
    # The class token's row is zero; the table is not trained.
    decoder = RAEDecoder(TINY)
    assert not decoder.decoder_pos_embed.requires_grad and torch.all(decoder.decoder_pos_embed[0, 0] == 0)


def _unit_to_fastdit(normalised: torch.Tensor) -> torch.Tensor:
    """RAE's output (ImageNet-normalised pixels) mapped as RAE's decode does ([0, 1]), then to [-1, 1]."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (normalised * std + mean) * 2 - 1


def test_tiny_decoder_matches_rae():
    reference = GOLDEN["decoder_tiny"]
    decoder = RAEDecoder(TINY).eval()
    decoder.load_state_dict(torch.load(FIXTURES / "decoder_tiny_model.pt", weights_only=True), strict=True)
    with torch.no_grad():
        patches = decoder.predict_patches(reference["tokens"])
        images = decoder(reference["tokens"])
        grid = reference["tokens"].transpose(1, 2).reshape(len(patches), TINY.latent_dim, TINY.grid_size, TINY.grid_size)
        from_grid = decoder(grid)
    _close(patches, reference["patches"], TINY_REL)
    _close(decoder.unpatchify(patches), reference["images_normalised"], TINY_REL)
    _close(images, _unit_to_fastdit(reference["images_normalised"]), TINY_REL)
    assert images.shape == (3, 3, TINY.image_size, TINY.image_size)
    torch.testing.assert_close(from_grid, images, rtol=0, atol=0)  # a grid is the row-major token sequence


def test_vitb_decoder_matches_rae():
    reference = GOLDEN["decoder_vitb"]
    torch.manual_seed(0)
    decoder = RAEDecoder(decoder_config("ViT-B", latent_dim=768, grid_size=MAKE.VITB_GRID)).eval()
    MAKE.fill_weights(decoder, seed=3)
    tokens = MAKE.normals(4, 1, MAKE.VITB_GRID**2, 768)
    with torch.no_grad():
        normalised = decoder.unpatchify(decoder.predict_patches(tokens))
    _close(normalised, reference["images_normalised"], VITB_REL)


def test_presets_are_raes_configs():
    # configs/decoder/ViT{B,L,XL}/config.json: decoder_hidden_size, layers, heads, intermediate size.
    assert DECODER_PRESETS == {"ViT-B": (768, 12, 12, 3072), "ViT-L": (1024, 24, 16, 4096),
                               "ViT-XL": (1152, 28, 16, 4096)}
    config = decoder_config("ViT-XL", grid_size=32)
    assert (config.image_size, config.num_tokens, config.latent_dim) == (512, 1024, 768)
    with pytest.raises(ValueError, match="ViT-B, ViT-L, ViT-XL"):
        decoder_config("ViT-H")


@pytest.mark.parametrize("bad", [dict(hidden_size=30, num_heads=4), dict(depth=0), dict(grid_size=True),
                                 dict(hidden_size=34, num_heads=2), dict(channels=1)])
def test_bad_config_is_refused(bad):
    fields = dict(latent_dim=8, hidden_size=32, depth=1, num_heads=4, mlp_size=16, patch_size=2, grid_size=2)
    with pytest.raises(ValueError, match="RAEDecoderConfig"):
        RAEDecoderConfig(**{**fields, **bad})


def test_wrong_token_shape_is_refused():
    decoder = RAEDecoder(TINY)
    with pytest.raises(ValueError, match=r"\(N, 16, 16\) or a grid \(N, 16, 4, 4\), got \(2, 9, 16\)"):
        decoder(torch.zeros(2, 9, 16))


def test_noise_augment():
    tokens = torch.zeros(4000, 2, 3)
    assert noise_augment(tokens, 0.0) is tokens
    noisy = noise_augment(tokens, 0.8, torch.Generator().manual_seed(0))
    again = noise_augment(tokens, 0.8, torch.Generator().manual_seed(0))
    assert torch.equal(noisy, again)
    # One sigma ~ U(0, 0.8) per sample: E[sigma^2] = 0.8^2 / 3; no sample's noise is much larger than 0.8.
    second_moment = noisy.pow(2).mean().item()
    assert abs(second_moment - 0.64 / 3) < 0.02
    per_sample = noisy.flatten(1).abs().amax(1)
    assert per_sample.max() < 0.8 * 6


def test_gradients_reach_the_trained_weights():
    decoder = RAEDecoder(TINY)
    decoder(torch.randn(2, 16, 16)).square().mean().backward()
    trained = [name for name, p in decoder.named_parameters() if p.requires_grad]
    assert "decoder_pos_embed" not in trained
    assert all(decoder.get_parameter(name).grad is not None for name in trained)
