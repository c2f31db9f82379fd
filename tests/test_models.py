"""Presets, parameter counts, state-dict round trips and gradient checkpointing."""

import pytest
import torch

from fastdit.errors import UserError
from fastdit.models import PRESETS, DiT, build_model

# Official counts at input 32 (256px latents), 1000 classes (DiT paper / released code).
OFFICIAL_PARAMS = {
    "DiT-XL/2": 675_129_632,
    "DiT-L/2": 458_102_816,
    "DiT-B/2": 130_512_416,
    "DiT-S/2": 32_963_360,
    "DiT-S/8": 33_148_160,
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds_with_official_parameter_count(name):
    with torch.device("meta"):  # shapes only: XL/2 in real memory would take seconds to initialise
        model = build_model(name, input_size=32, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    if name in OFFICIAL_PARAMS:
        assert count == OFFICIAL_PARAMS[name]
    assert model.config.out_channels == 8
    assert model.pos_embed.shape == (1, (32 // model.config.patch_size) ** 2, model.config.hidden_size)


def test_preset_aliases_and_overrides():
    assert build_model("DiT-T-4", input_size=8, depth=1).config.patch_size == 4
    model = build_model("DiT-T/2", input_size=8, in_channels=3, depth=1, num_classes=10, learn_sigma=False)
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1, 999]), torch.tensor([0, 9]))
    assert out.shape == (2, 3, 8, 8)


@pytest.mark.parametrize("size", [8, 12, 64])
def test_any_input_size_divisible_by_patch(size):
    model = build_model("DiT-T/4", input_size=size, depth=1)
    assert model(torch.randn(1, 4, size, size), torch.tensor([3]), torch.tensor([5])).shape == (1, 8, size, size)


def test_bad_model_arguments_are_user_errors():
    with pytest.raises(UserError, match="unknown model 'DiT-Q/2'"):
        build_model("DiT-Q/2")
    with pytest.raises(UserError, match="not divisible by the patch size 4"):
        build_model("DiT-T/4", input_size=10)
    with pytest.raises(UserError, match="unknown model option"):
        build_model("DiT-T/2", hidden=3)


def test_state_dict_round_trip_strict():
    torch.manual_seed(0)
    a = build_model("DiT-T/2", input_size=8, depth=2)
    b = build_model("DiT-T/2", input_size=8, depth=2)
    b.load_state_dict(a.state_dict(), strict=True)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
    keys = set(a.state_dict())
    assert {"pos_embed", "x_embedder.proj.weight", "t_embedder.mlp.0.weight", "t_embedder.mlp.2.bias",
            "y_embedder.embedding_table.weight", "blocks.1.attn.qkv.weight", "blocks.1.attn.proj.bias",
            "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "blocks.0.adaLN_modulation.1.weight",
            "final_layer.linear.weight", "final_layer.adaLN_modulation.1.bias"} <= keys
    assert not list(a.buffers())


def test_label_dropout_only_in_training():
    model = build_model("DiT-T/2", input_size=8, depth=1, class_dropout_prob=0.5)
    assert model.y_embedder.embedding_table.num_embeddings == 1001
    labels = torch.zeros(1000, dtype=torch.long)
    table = model.y_embedder.embedding_table.weight
    torch.manual_seed(0)
    dropped = model.y_embedder(labels, train=True)
    share = (dropped == table[1000]).all(dim=1).float().mean().item()
    assert 0.4 < share < 0.6
    kept = model.y_embedder(labels, train=False)
    assert torch.equal(kept, table[labels])
    forced = model.y_embedder(labels[:4], train=True, force_drop_ids=torch.tensor([1, 0, 1, 0]))
    assert torch.equal(forced, table[torch.tensor([1000, 0, 1000, 0])])
    no_null = build_model("DiT-T/2", input_size=8, depth=1, class_dropout_prob=0.0, num_classes=1)
    assert no_null.y_embedder.embedding_table.num_embeddings == 1


def test_generic_constructor_matches_official_signature():
    model = DiT(input_size=16, patch_size=4, in_channels=4, hidden_size=96, depth=2, num_heads=4, num_classes=10)
    assert model.config.learn_sigma and model.config.null_class == 10
