"""Every checkpoint format loads into the right model; broken or foreign files give clear errors."""

import argparse

import pytest
import torch
from safetensors.torch import save_file

from fastdit.checkpoint import TRAIN_FORMAT, export_weights, load_model, read_checkpoint
from fastdit.model_info import LatentInfo, ModelInfo
from fastdit.errors import UserError
from fastdit.models import build_model


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    model = build_model("DiT-T/4", input_size=16, num_classes=10)
    for p in model.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    return model


def same_weights(a, b):
    return all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())


def test_plain_state_dict_with_model_name(tmp_path, tiny):
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    model, info = load_model(path, model_name="DiT-T/4", image_size=128)
    assert same_weights(model, tiny) and not model.training
    assert info.config.depth == 6 and info.config.input_size == 16 and info.config.num_classes == 10


def test_plain_state_dict_inferred_from_shapes(tmp_path):
    model = build_model("DiT-S/8", input_size=16, num_classes=10)
    path = tmp_path / "plain.pt"
    torch.save(model.state_dict(), path)
    loaded, info = load_model(path)
    assert info.config.num_heads == 6 and info.config.depth == 12 and info.image_size == 128
    assert same_weights(loaded, model)


BLOCK_OPTIONS_IN_THE_WEIGHTS = [
    dict(mlp="swiglu"),
    dict(qk_norm=True),
    dict(qk_norm=True, norm="rmsnorm"),  # qk_norm's weights without a bias tell RMSNorm from LayerNorm
    dict(mlp="swiglu", qk_norm=True, norm="rmsnorm"),
]


@pytest.mark.parametrize("options, model_name",
                         [(options, name) for options in BLOCK_OPTIONS_IN_THE_WEIGHTS for name in (None, "DiT-T/4")]
                         + [(dict(mlp="swiglu", mlp_ratio=3.0), None)],  # a preset name fixes the ratio at 4
                         ids=lambda value: ",".join(f"{k}={v}" for k, v in value.items()) if isinstance(value, dict)
                         else str(value))
def test_plain_state_dict_of_block_options_reads_them_from_the_weights(tmp_path, options, model_name):
    torch.manual_seed(0)
    trained = build_model("DiT-T/4", input_size=16, num_classes=10, **options).eval()
    for p in trained.parameters():
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)  # not adaLN-Zero's identity blocks, so the options change the output
    path = tmp_path / "plain.pt"
    torch.save(trained.state_dict(), path)
    model, info = load_model(path, model_name=model_name, image_size=128)
    assert {name: getattr(info.config, name) for name in options} == options
    assert same_weights(model, trained)
    x, t, y = torch.randn(2, 4, 16, 16), torch.tensor([3, 700]), torch.tensor([1, 9])
    torch.testing.assert_close(model(x, t, y), trained(x, t, y))


def test_a_swiglu_width_no_mlp_ratio_gives_is_refused(tmp_path):
    state = build_model("DiT-T/4", input_size=16, num_classes=10, mlp="swiglu").state_dict()
    state["blocks.0.mlp.fc_in.weight"] = torch.zeros(26, 128)
    torch.save(state, tmp_path / "odd.pt")
    with pytest.raises(UserError, match="fc_in.weight has 26 rows, which no mlp_ratio gives"):
        load_model(tmp_path / "odd.pt")


def test_official_training_checkpoint_with_namespace_args(tmp_path, tiny):
    ema = build_model("DiT-T/4", input_size=16, num_classes=10)
    path = tmp_path / "0000100.pt"
    torch.save({"model": tiny.state_dict(), "ema": ema.state_dict(), "opt": {}, "args": argparse.Namespace(model="DiT-T/4")}, path)
    model, _ = load_model(path, model_name="DiT-T/4", image_size=128)
    assert same_weights(model, ema)
    model, _ = load_model(path, model_name="DiT-T/4", image_size=128, use_ema=False)
    assert same_weights(model, tiny)


def test_our_training_checkpoint_and_prefixes(tmp_path, tiny):
    info = ModelInfo(config=tiny.config, latent=LatentInfo(kind="pixels", vae=None))
    wrapped = {f"module._orig_mod.{k}": v for k, v in tiny.state_dict().items()}
    path = tmp_path / "train.pt"
    torch.save({"format": TRAIN_FORMAT, "version": 1, "model_info": info.to_dict(), "model": wrapped, "ema": wrapped}, path)
    model, loaded_info = load_model(path)
    assert same_weights(model, tiny)
    assert loaded_info.latent.kind == "pixels" and loaded_info.image_size == 16


def test_export_round_trip_and_plain_safetensors(tmp_path, tiny):
    info = ModelInfo(config=tiny.config, latent=LatentInfo(kind="vae", vae="ema"), class_names=[str(i) for i in range(10)])
    path = export_weights(tiny, info, tmp_path / "ema.safetensors")
    model, loaded = load_model(path)
    assert same_weights(model, tiny) and loaded.latent.vae == "ema" and loaded.class_names[3] == "3"
    plain = tmp_path / "plain.safetensors"
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(plain))
    model, _ = load_model(plain, model_name="DiT-T/4", image_size=128)
    assert same_weights(model, tiny)


def test_our_export_loads_into_official_key_layout(tmp_path, tiny):
    """The exported keys are exactly the official names (no prefixes), so the official DiT code,
    whose module tree we mirror, loads them with strict=True."""
    path = export_weights(tiny, ModelInfo(config=tiny.config), tmp_path / "ema.safetensors")
    state, _ = read_checkpoint(path)
    assert set(state) == set(tiny.state_dict())
    assert all(not k.startswith(("module.", "_orig_mod.")) for k in state)


def test_missing_truncated_and_foreign_checkpoints(tmp_path, tiny):
    with pytest.raises(UserError, match="does not exist"):
        load_model(tmp_path / "nope.pt")
    good = tmp_path / "good.pt"
    torch.save(tiny.state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(UserError, match="truncated, corrupt or not a PyTorch checkpoint"):
        load_model(truncated)
    # Depth and width differ: refused from the file's shapes, before the DiT-S/4 is built.
    with pytest.raises(UserError, match="does not fit this model.*depth 6; the model has patch 4, width 384, depth 12"):
        load_model(good, model_name="DiT-S/4", image_size=128)


def test_architecture_mismatch_names_the_keys(tmp_path):
    other = build_model("DiT-T/8", input_size=16, num_classes=10)
    path = tmp_path / "t8.pt"
    torch.save(other.state_dict(), path)
    with pytest.raises(UserError) as info:
        load_model(path, model_name="DiT-T/4", image_size=128)
    message = str(info.value)
    assert "the file holds patch 8, width 128, depth 6; the model has patch 4, width 128, depth 6" in message
    assert "shape mismatches: final_layer.linear.bias (512,) vs model (128,)" in message


def test_wrong_size_or_classes_for_recorded_config(tmp_path, tiny):
    path = export_weights(tiny, ModelInfo(config=tiny.config), tmp_path / "m.safetensors")
    with pytest.raises(UserError, match="trained at image size 128; use --image-size 128"):
        load_model(path, image_size=256)
    with pytest.raises(UserError, match="has 10 classes, not 1000"):
        load_model(path, num_classes=1000)


# ----------------------------------------------------------------------------------------------
# plain state dicts trained on pixels (`--vae pixels`)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("model_name", ["DiT-T/2", None])
def test_plain_pixel_state_dict_loads_with_vae_pixels(tmp_path, channels, model_name):
    trained = build_model("DiT-T/2", input_size=8, in_channels=channels, num_classes=10)
    path = tmp_path / "ema.pt"
    torch.save(trained.state_dict(), path)
    model, info = load_model(path, model_name=model_name, image_size=8, num_classes=10, vae="pixels")
    assert info.latent.kind == "pixels" and info.latent.downsample == 1 and info.image_size == 8
    assert model.config.in_channels == channels and model.config.input_size == 8
    assert same_weights(model, trained)


def test_vae_pixels_must_match_what_a_checkpoint_records(tmp_path, tiny):
    latent = export_weights(tiny, ModelInfo(config=tiny.config, latent=LatentInfo(kind="vae", vae="ema")), tmp_path / "latent.safetensors")
    with pytest.raises(UserError, match="records that it works on the latents of the VAE 'ema'; drop --vae pixels"):
        load_model(latent, vae="pixels")
    pixels = export_weights(tiny, ModelInfo(config=tiny.config, latent=LatentInfo(kind="pixels", vae=None)), tmp_path / "pixels.safetensors")
    with pytest.raises(UserError, match="records that it works on pixels; drop --vae mse"):
        load_model(pixels, vae="mse")
    _, info = load_model(pixels, vae="pixels")
    assert info.latent.kind == "pixels"


# ----------------------------------------------------------------------------------------------
# hostile files (#18 item 5): recorded metadata is checked against the weights before anything is
# allocated; weights of another dtype, or with a NaN, are refused
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def builds(monkeypatch):
    """Records (depth, device type) of every DiT that `load_model` builds, and fails the test at once
    when one with more than 6 blocks (the tiny file's depth) is built on a real device: that is the
    allocation the check must prevent, and failing here keeps a broken loader from allocating it."""
    from fastdit import checkpoint

    real, seen = checkpoint.build_from_config, []

    def spy(config):
        device = torch.empty(0).device.type  # the default device: "meta" inside `with torch.device("meta")`
        seen.append((config.depth, device))
        if device != "meta" and config.depth > 6:
            pytest.fail(f"load_model built the claimed depth-{config.depth} model on {device} before checking it")
        return real(config)

    monkeypatch.setattr(checkpoint, "build_from_config", spy)
    return seen


def with_metadata(path, out, edit):
    """A copy of the export `path` whose recorded config is changed by `edit(config_dict)`."""
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
        state = {key: handle.get_tensor(key) for key in handle.keys()}
    info = json.loads(meta["model_info"])
    edit(info["model"])
    save_file(state, str(out), metadata={**meta, "model_info": json.dumps(info)})
    return out


def test_an_export_whose_metadata_claims_a_huge_model_is_refused_before_building(tmp_path, tiny, builds):
    export = export_weights(tiny, ModelInfo(config=tiny.config), tmp_path / "ema.safetensors")
    hostile = with_metadata(export, tmp_path / "hostile.safetensors",
                            lambda c: c.update(depth=400, hidden_size=2048, num_heads=16))
    with pytest.raises(UserError) as info:
        load_model(hostile)
    message = str(info.value)
    assert "the file holds patch 4, width 128, depth 6; the model has patch 4, width 2048, depth 400" in message
    assert "metadata was edited" in message and "\n" not in message
    assert builds == []  # not even a skeleton: depth and width are compared from the file's shapes


def test_a_recorded_config_that_differs_elsewhere_is_compared_on_the_meta_device(tmp_path, tiny, builds):
    """Depth, width and size agree but the MLP is 64 times wider: the meta skeleton names the keys."""
    export = export_weights(tiny, ModelInfo(config=tiny.config), tmp_path / "ema.safetensors")
    hostile = with_metadata(export, tmp_path / "wide-mlp.safetensors", lambda c: c.update(mlp_ratio=256.0))
    with pytest.raises(UserError, match=r"shape mismatches: blocks\.0\.mlp\.fc1\.bias \(512,\) vs model \(32768,\)"):
        load_model(hostile)
    assert builds == [(6, "meta")]
    load_model(export)  # the untouched export still loads: the skeleton, then the model itself
    assert builds[1:] == [(6, "meta"), (6, "cpu")]


def test_a_preset_too_large_for_a_plain_state_dict_is_refused_before_building(tmp_path, tiny, builds):
    path = tmp_path / "plain.pt"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(UserError, match="width 128, depth 6; the model has patch 2, width 1152, depth 28"):
        load_model(path, model_name="DiT-XL/2", image_size=128)
    assert builds == []


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused_not_cast(tmp_path, tiny, dtype):
    state = tiny.state_dict()
    state["blocks.1.attn.qkv.weight"] = state["blocks.1.attn.qkv.weight"].to(dtype)
    path = tmp_path / "odd.pt"
    torch.save(state, path)
    name = str(dtype).replace("torch.", "")
    with pytest.raises(UserError, match=rf"holds {name} values in 'blocks.1.attn.qkv.weight'; model weights are floating point"):
        load_model(path, model_name="DiT-T/4", image_size=128)


def test_one_nan_weight_is_a_clear_error(tmp_path, tiny):
    state = tiny.state_dict()
    state["blocks.2.mlp.fc2.weight"][3, 5] = float("nan")
    export = export_weights(state, ModelInfo(config=tiny.config), tmp_path / "diverged.safetensors")
    with pytest.raises(UserError, match=r"non-finite weights \(1 NaN or inf value\(s\) in 'blocks.2.mlp.fc2.weight'\)"):
        load_model(export)
    state["blocks.2.mlp.fc2.weight"][3, 5] = float("inf")
    torch.save(state, tmp_path / "diverged.pt")
    with pytest.raises(UserError, match="diverged or the file is damaged; use an earlier checkpoint"):
        load_model(tmp_path / "diverged.pt", model_name="DiT-T/4", image_size=128)
