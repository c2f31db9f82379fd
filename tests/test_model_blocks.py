"""The optional LightningDiT block options (issue #8, part 4): RMSNorm, SwiGLU, 2-D RoPE and QK-norm.

With every option off the model is the official DiT: tests/test_model_parity.py and tests/test_models.py
check that (same names, counts and outputs). Here: each option changes the function, trains, keeps its
promises (RoPE is relative, SwiGLU is parameter-matched), is validated, is recorded in checkpoints and
works with gradient checkpointing.
"""

import numpy as np
import pytest
import torch

from conftest import recipe_state_dict
from fastdit.checkpoint import export_weights, load_model, read_checkpoint
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.errors import UserError
from fastdit.models import LIGHTNINGDIT_BLOCKS, build_model
from fastdit.models.dit import Mlp, SwiGLUMlp, apply_rope, rope_2d_angles, swiglu_hidden
from fastdit.models.presets import SIZES

# DiT-T/2 on 8x8 inputs: width 128, 4 heads of 32 dims, 16 tokens; two blocks keep it fast.
TINY = dict(input_size=8, depth=2, num_classes=4, class_dropout_prob=0.0, learn_sigma=False)
# What each option alone does to block 0's parameters (RMSNorm and RoPE have none of their own).
ADDED_KEYS = {
    "norm": set(),
    "mlp": {f"blocks.0.mlp.{layer}.{kind}" for layer in ("fc_in", "fc_out") for kind in ("weight", "bias")},
    "rope": set(),
    # LayerNorms over each head's q and k (the kind of `norm`); with norm="rmsnorm" only the gains.
    "qk_norm": {f"blocks.0.attn.{qk}_norm.{kind}" for qk in "qk" for kind in ("weight", "bias")},
}
REMOVED_KEYS = {"mlp": {f"blocks.0.mlp.{layer}.{kind}" for layer in ("fc1", "fc2") for kind in ("weight", "bias")}}


def tiny(**options):
    torch.manual_seed(0)
    return build_model("DiT-T/2", **TINY, **options)


def with_recipe_weights(model):
    """Portable weights (the conftest recipe: the same numbers on every CPU, drawn per parameter NAME,
    so models with different options share every weight they have in common); QK-norm gains keep
    their initial 1, so switching QK-norm on changes only the normalisation."""
    state = recipe_state_dict(model)
    state.update({k: v for k, v in model.state_dict().items() if "_norm." in k})
    model.load_state_dict(state, strict=True)
    return model


def normal(*shape, seed):
    return torch.from_numpy(np.random.default_rng(seed).standard_normal(shape)).float()


def batch():
    return normal(4, 4, 8, 8, seed=1), torch.tensor([0, 10, 500, 999]), torch.tensor([0, 1, 2, 3])


def block0_keys(model):
    return {k for k in model.state_dict() if k.startswith("blocks.0.")}


def only(option):
    return {option: LIGHTNINGDIT_BLOCKS[option]}


@pytest.mark.parametrize("option", LIGHTNINGDIT_BLOCKS)
def test_each_option_changes_the_output(option):
    off = with_recipe_weights(tiny()).eval()
    on = with_recipe_weights(tiny(**only(option))).eval()
    assert block0_keys(on) - block0_keys(off) == ADDED_KEYS[option]
    assert block0_keys(off) - block0_keys(on) == REMOVED_KEYS.get(option, set())
    x, t, y = batch()
    with torch.no_grad():
        out_off, out_on = off(x, t, y), on(x, t, y)
    # Float32 rounding alone moves the output by ~1e-6 of its scale (a few ulps per op over two
    # blocks); an option that changes the function moves it by a sizeable fraction of it.
    assert (out_on - out_off).abs().max() > 1e-2 * out_off.abs().max()


@pytest.mark.parametrize(
    "options", [only(o) for o in LIGHTNINGDIT_BLOCKS] + [LIGHTNINGDIT_BLOCKS], ids=[*LIGHTNINGDIT_BLOCKS, "all"]
)
def test_each_option_trains(options):
    model = tiny(**options).train()  # the official adaLN-Zero initialisation: output 0 at step 0
    x, t, y = batch()
    target = normal(4, 4, 8, 8, seed=2)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    losses = []
    for _ in range(10):
        loss = (model(x, t, y) - target).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < 0.9 * losses[0], losses
    # Gradients reached inside the blocks, through the option's own weights where it has any.
    moved = {name for name, p in model.named_parameters() if not torch.equal(p, initial[name])}
    assert {"blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"} <= moved
    for option in options:
        assert ADDED_KEYS[option] & initial.keys() <= moved


def test_rope_scores_depend_only_on_relative_positions():
    head_dim = 16
    q, k = normal(2, 6, head_dim, seed=3).double(), normal(2, 6, head_dim, seed=4).double()
    rows, cols = torch.tensor([0, 1, 2, 3, 4, 5]), torch.tensor([5, 3, 0, 2, 4, 1])

    def rotate(x, rows, cols):
        angles = rope_2d_angles(rows, cols, head_dim)
        return apply_rope(x, angles.cos(), angles.sin())

    def scores(q_shift, k_shift):  # (dr, dc) added to the query and to the key positions
        return rotate(q, rows + q_shift[0], cols + q_shift[1]) @ rotate(k, rows + k_shift[0], cols + k_shift[1]).mT

    reference = scores((0, 0), (0, 0))
    # In float64 (u = 1.1e-16): angles up to 12 rad are off by <= 12u, cos/sin add an ulp, so each
    # rotated entry is off by <= ~30u·|x|; a score sums 16 products of entries below 5: <= ~1e-12.
    for shift in [(7, -3), (0, 4), (-2, 0)]:
        torch.testing.assert_close(scores(shift, shift), reference, rtol=0, atol=1e-11)
    # ... but moving only the keys changes the scores (O(1), not rounding): positions do count.
    assert (scores((0, 0), (1, 2)) - reference).abs().max() > 0.1
    # Axial: a column shift leaves the row half of each head (dims 0..d/2-1) alone, and turns the rest.
    moved_cols = rotate(q, rows, cols + 3) - rotate(q, rows, cols)
    assert moved_cols[..., : head_dim // 2].abs().max() == 0
    assert moved_cols[..., head_dim // 2 :].abs().max() > 0.1


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_is_bitwise_the_pairwise_rotation(dtype):
    """apply_rope computes x * (cos, cos) + (x2, x1) * (-sin, sin): the same products and one sum of two
    each, so its output equals the pairwise rotation (x1 cos - x2 sin, x1 sin + x2 cos) to the bit (IEEE
    addition commutes and negation is exact), on any kernel width."""
    idx = torch.arange(16)
    angles = rope_2d_angles(idx // 4, idx % 4, 32)
    cos, sin = angles.cos().float(), angles.sin().float()
    x = normal(3, 4, 16, 32, seed=5).to(dtype)
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    pairwise = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(dtype)
    assert torch.equal(apply_rope(x, cos, sin), pairwise)


def test_rope_tables_follow_the_grid_and_are_not_saved():
    model = tiny(rope=True)
    grid = model.config.grid_size
    rows, cols = torch.arange(grid).repeat_interleave(grid), torch.arange(grid).repeat(grid)  # row-major tokens
    angles = rope_2d_angles(rows, cols, model.config.head_dim)
    # Computed in float64 and rounded once: equal to float32 rounding of the exact values.
    assert torch.equal(model.rope_cos, angles.cos().float()) and torch.equal(model.rope_sin, angles.sin().float())
    assert not any("rope" in key for key in model.state_dict())
    # A model built on the meta device (as sharded training does) gets them back from initialize_weights.
    with torch.device("meta"):
        lazy = build_model("DiT-T/2", **TINY, rope=True)
    lazy.to_empty(device="cpu")
    lazy.initialize_weights()
    assert torch.equal(lazy.rope_cos, model.rope_cos) and torch.equal(lazy.rope_sin, model.rope_sin)


@pytest.mark.parametrize("size", SIZES)
def test_swiglu_is_parameter_matched(size):
    _, hidden, _ = SIZES[size]
    with torch.device("meta"):
        gelu, swiglu = Mlp(hidden, 4 * hidden), SwiGLUMlp(hidden, 4 * hidden)

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert abs(count(swiglu) / count(gelu) - 1) < 0.02
    assert swiglu.fc_out.in_features == swiglu_hidden(4 * hidden) and swiglu_hidden(4 * hidden) % 8 == 0


def test_swiglu_xl_model_has_the_official_size():
    with torch.device("meta"):
        model = build_model("DiT-XL/2", input_size=32, num_classes=1000, mlp="swiglu")
    assert model.blocks[0].mlp.fc_out.in_features == 3072  # exactly 2/3 of 4608
    count = sum(p.numel() for p in model.parameters())
    assert abs(count / 675_129_632 - 1) < 1e-3  # the official DiT-XL/2 count; only the MLP biases differ


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(norm="batchnorm"), r"norm must be one of layernorm, rmsnorm, got 'batchnorm'"),
        (dict(mlp="relu"), r"mlp must be one of gelu, swiglu, got 'relu'"),
        (dict(rope="yes"), r"rope must be true or false, got 'yes'"),
        (dict(qk_norm=1), r"qk_norm must be true or false, got 1"),
        (dict(rope=True, hidden_size=72, num_heads=4), r"rope needs a head dimension .* = 18\) divisible by 4"),
        (dict(rope=True, hidden_size=60, num_heads=4), r"rope needs a head dimension .* = 15\) divisible by 4"),
    ],
)
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(UserError, match=message):
        build_model("DiT-T/2", **TINY, **options)


def test_head_dim_18_is_fine_without_rope():
    assert build_model("DiT-T/2", **TINY, hidden_size=72, num_heads=4).config.head_dim == 18


def test_options_round_trip_through_checkpoints(tmp_path):
    model = with_recipe_weights(tiny(**LIGHTNINGDIT_BLOCKS)).eval()
    info = ModelInfo(config=model.config, latent=LatentInfo(kind="pixels", vae=None))
    path = export_weights(model, info, tmp_path / "ema.safetensors")
    assert not any("rope" in key for key in read_checkpoint(path)[0])
    loaded, loaded_info = load_model(path)
    assert loaded_info.config == model.config
    assert {k: getattr(loaded.config, k) for k in LIGHTNINGDIT_BLOCKS} == LIGHTNINGDIT_BLOCKS
    x, t, y = batch()
    with torch.no_grad():  # same weights, same shapes, same kernels: the same numbers
        assert torch.equal(loaded(x, t, y), model(x, t, y))


def test_metadata_from_before_the_options_means_the_official_blocks():
    recorded = ModelInfo(config=tiny(**LIGHTNINGDIT_BLOCKS).config).to_dict()
    for name in LIGHTNINGDIT_BLOCKS:
        del recorded["model"][name]
    assert ModelInfo.from_dict(recorded).config == tiny().config
