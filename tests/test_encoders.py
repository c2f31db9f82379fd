"""The frozen REPA encoder: preprocessing, freezing, every way to name one, and the download path.

Nothing is downloaded: pretrained files are tiny randomly initialised models saved here, served by an
HTTP server on 127.0.0.1 (as in tests/test_hub.py) or passed as local files. Tests that build timm
models skip where timm cannot be imported; the rest use a plain stand-in backbone.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from fastdit import encoders, hub
from fastdit.encoders import EncoderEntry, FrozenEncoder, load_encoder, tokens_to_grid
from fastdit.errors import DownloadError, UserError

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Tiny DINOv2-shaped ViTs: patch 14, layer scale, 2 blocks of width 48 (timm kwargs).
TINY_VIT = dict(depth=2, embed_dim=48, num_heads=3)
REFUSED = "http://127.0.0.1:9/{repo}/resolve/main/{filename}"  # port 9 (discard) refuses connections

# torch 2.14 marks torch.jit.script and torch.jit.load as deprecated; TorchScript files still load, and
# that is what is tested.
pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated"),
    pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated"),
]


class PatchTokens(nn.Module):
    """A stand-in ViT: 8x8 patches -> 16-wide tokens behind `prefix` class tokens, with a dropout that
    only eval mode switches off and a buffer that must not change."""

    def __init__(self, prefix: int = 1, patch: int = 8, dim: int = 16):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, prefix, dim))
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(0.5)
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)
        tokens = torch.cat([self.cls.expand(len(tokens), -1, -1), tokens], dim=1)
        return self.drop(self.norm(tokens)) * self.scale


def images(n=2, channels=3, side=48, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, channels, side, side, generator=generator) * 2 - 1


@pytest.fixture
def encoder():
    torch.manual_seed(0)
    return FrozenEncoder(PatchTokens(), resolution=32, num_prefix_tokens=1, name="stand-in")


# --- FrozenEncoder -----------------------------------------------------------------------------


def test_shapes_and_attributes(encoder):
    assert (encoder.resolution, encoder.grid, encoder.num_tokens, encoder.dim) == (32, 4, 16, 16)
    for side in (32, 48, 64):  # resized to 32 px first, whatever the input size
        assert encoder(images(side=side)).shape == (2, 16, 16)
    assert "tokens=4x4" in repr(encoder)


def test_parameters_and_buffers_stay_frozen_through_a_backward(encoder):
    before = {k: v.clone() for k, v in encoder.backbone.state_dict().items()}
    head = nn.Linear(encoder.dim, 1)
    x = images().requires_grad_(True)
    encoder.train()  # a parent's .train() must not unfreeze dropout
    assert not any(module.training for module in encoder.modules())
    features = encoder(x)
    assert not features.requires_grad  # computed under no_grad: nothing flows back into the encoder
    head(features).pow(2).mean().backward()
    optimizer = torch.optim.SGD([*head.parameters(), *encoder.parameters()], lr=1.0)
    optimizer.step()
    assert head.weight.grad is not None
    for name, parameter in encoder.named_parameters():
        assert not parameter.requires_grad and parameter.grad is None, name
    after = encoder.backbone.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(features, encoder(x))  # eval mode: the dropout is off, the output deterministic


def test_gray_images_are_repeated_to_three_channels(encoder):
    gray = images(channels=1)
    assert torch.equal(encoder(gray), encoder(gray.repeat(1, 3, 1, 1)))


def test_normalisation_is_imagenet_then_bicubic_resize(encoder):
    x = images(side=48)
    # [-1, 1] -> [0, 1] -> ImageNet mean/std -> bicubic to 32 px without antialias (REPA's order).
    expected = F.interpolate(((x + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD, size=32, mode="bicubic")
    torch.testing.assert_close(encoder.preprocess(x), expected, rtol=0, atol=1e-6)
    # Resizing first gives the same (bicubic weights sum to one), up to rounding.
    resized_first = (F.interpolate((x + 1) / 2, size=32, mode="bicubic") - IMAGENET_MEAN) / IMAGENET_STD
    torch.testing.assert_close(encoder.preprocess(x), resized_first, rtol=0, atol=1e-5)
    # At the encoder's own size nothing is resampled, and the class token is dropped.
    x32 = images(side=32)
    torch.testing.assert_close(encoder.preprocess(x32), ((x32 + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD)
    with torch.no_grad():
        direct = encoder.backbone(((x32 + 1) / 2 - IMAGENET_MEAN) / IMAGENET_STD)[:, 1:]
    torch.testing.assert_close(encoder(x32), direct)


@pytest.mark.parametrize("shape", [(2, 4, 32, 32), (2, 2, 32, 32), (3, 32, 32)])
def test_wrong_image_shapes_are_user_errors(encoder, shape):
    with pytest.raises(UserError, match=r"C = 1 or 3.*" + str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        encoder(torch.zeros(shape))


def test_an_encoder_without_a_square_token_grid_is_refused():
    with pytest.raises(UserError, match="15 patch tokens.*not a square grid"):
        FrozenEncoder(PatchTokens(prefix=1), resolution=32, num_prefix_tokens=2, name="odd")


# --- tokens_to_grid ----------------------------------------------------------------------------


def test_tokens_to_grid_halving_averages_each_two_by_two_block():
    grid = torch.randn(2, 5, 8, 8)  # (N, D, side, side)
    tokens = grid.flatten(2).transpose(1, 2)  # (N, 64, D), row-major like patch tokens
    halved = tokens_to_grid(tokens, 4)
    torch.testing.assert_close(halved, F.avg_pool2d(grid, 2).flatten(2).transpose(1, 2))
    assert tokens_to_grid(tokens, 8) is tokens
    assert tokens_to_grid(tokens, 12).shape == (2, 144, 5)
    constant = torch.full((1, 16, 3), 0.25)
    torch.testing.assert_close(tokens_to_grid(constant, 7), torch.full((1, 49, 3), 0.25))


def test_tokens_to_grid_rejects_what_is_not_a_square_grid():
    with pytest.raises(UserError, match="square token count, got 17"):
        tokens_to_grid(torch.zeros(1, 17, 4), 4)
    with pytest.raises(UserError, match=r"\(N, T, D\)"):
        tokens_to_grid(torch.zeros(17, 4), 4)
    with pytest.raises(UserError, match="side >= 1"):
        tokens_to_grid(torch.zeros(1, 16, 4), 0)


# --- load_encoder: TorchScript, spec errors, the offline message ---------------------------------


class PatchOnly(nn.Module):
    """TorchScript encoders return the patch tokens only (TorchScript has no super(): composition)."""

    def __init__(self):
        super().__init__()
        self.inner = PatchTokens()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, 1:]


@pytest.mark.parametrize("suffix", [".pt", ".ts"])
def test_torchscript_file(tmp_path, suffix):
    torch.manual_seed(0)
    scripted = torch.jit.script(PatchOnly().eval())
    path = tmp_path / f"encoder{suffix}"
    scripted.save(str(path))
    encoder = load_encoder(str(path), resolution=32)
    assert (encoder.resolution, encoder.grid, encoder.dim, encoder.num_prefix_tokens) == (32, 4, 16, 0)
    x = images(side=64)
    with torch.no_grad():
        expected = scripted(encoder.preprocess(x))
    torch.testing.assert_close(encoder(x), expected)
    assert load_encoder(str(path)).resolution == 224  # the documented default for TorchScript


def test_a_pickle_named_pt_is_not_loaded_as_torchscript(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(PatchTokens().state_dict(), path)
    with pytest.raises(UserError, match="is not a TorchScript file.*NAME=FILE.safetensors"):
        load_encoder(str(path))


def test_spec_errors_name_the_value_and_the_choices(tmp_path):
    with pytest.raises(UserError, match="unknown encoder 'dinov9'.*dinov2-vitb14.*timm:<timm model name>") as info:
        load_encoder("dinov9")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="unknown encoder 'dinov9'"):
        load_encoder(f"dinov9={_touch(tmp_path / 'w.safetensors')}")
    with pytest.raises(UserError, match="encoder file not found"):
        load_encoder(f"dinov2-vitb14={tmp_path / 'absent.safetensors'}")
    with pytest.raises(UserError, match="must be a .safetensors file"):
        load_encoder(f"dinov2-vitb14={_touch(tmp_path / 'w.bin')}")
    with pytest.raises(UserError, match="no architecture; pass it as NAME="):
        load_encoder(str(_touch(tmp_path / "w.safetensors")))
    with pytest.raises(UserError, match="encoder file not found"):
        load_encoder(str(tmp_path / "absent.pt"))
    with pytest.raises(UserError, match="resolution must be >= 1"):
        load_encoder("dinov2-vitb14", resolution=0)


def _touch(path):
    path.write_bytes(b"")
    return path


def test_offline_message_is_one_line_naming_file_url_and_place(monkeypatch):
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)
    with pytest.raises(DownloadError) as info:
        load_encoder("dinov2-vitb14", progress=False)
    message = str(info.value)
    target = hub.cache_dir() / "encoders" / "vit_base_patch14_dinov2.lvd142m.safetensors"
    assert "\n" not in message
    assert "could not download vit_base_patch14_dinov2.lvd142m.safetensors" in message
    assert "http://127.0.0.1:9/timm/vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors" in message
    assert f"put it at {target}" in message
    assert "pass dinov2-vitb14=PATH" in message
    assert not target.exists() and not list(target.parent.glob("*.part"))


def test_the_hub_url_is_timms_safetensors_file():
    entry = encoders.ENCODERS["dinov2-vitb14"]
    url = encoders.HF_HUB_URL.format(repo=entry.hub_repo, filename=encoders.HUB_FILENAME)
    assert url == "https://huggingface.co/timm/vit_base_patch14_dinov2.lvd142m/resolve/main/model.safetensors"
    assert encoders.DEFAULT_ENCODER == "dinov2-vitb14"


# --- timm models: the registry, the download, local files -------------------------------------


@pytest.fixture
def timm():
    try:
        import timm
    except (ImportError, RuntimeError) as err:  # RuntimeError: a torchvision built for another torch
        pytest.skip(f"timm cannot be imported here ({type(err).__name__}: {err})")
    return timm


def test_every_registered_encoder_is_a_timm_model_with_imagenet_statistics_and_16x16_tokens(timm):
    for name, entry in encoders.ENCODERS.items():
        cfg = timm.get_pretrained_cfg(entry.timm_name)
        assert cfg is not None and cfg.hf_hub_id == entry.hub_repo, name
        assert tuple(cfg.mean) == encoders.IMAGENET_MEAN and tuple(cfg.std) == encoders.IMAGENET_STD, name
        patch = 14 if name.startswith("dinov2") else 16
        assert f"patch{patch}" in entry.timm_name and entry.resolution // patch == 16, name


def _save_tiny(timm, path, architecture, seed=0, **kwargs):
    torch.manual_seed(seed)
    model = timm.create_model(architecture, pretrained=False, **kwargs)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    return state


def test_registered_encoder_downloads_once_and_drops_register_tokens(timm, file_server, monkeypatch, tmp_path):
    # A DINOv2-with-registers stand-in saved at 56 px (4x4 patches of 14), used at 28 px (2x2).
    state = _save_tiny(timm, tmp_path / "model.safetensors", "vit_small_patch14_reg4_dinov2",
                       img_size=56, num_classes=0, **TINY_VIT)
    timm_name = "vit_small_patch14_reg4_dinov2.lvd142m"
    file_server.files[f"/timm/{timm_name}/resolve/main/model.safetensors"] = (tmp_path / "model.safetensors").read_bytes()
    monkeypatch.setitem(encoders.ENCODERS, "test-dinov2-reg", EncoderEntry(timm_name, 28, TINY_VIT))
    port = file_server.server_address[1]
    monkeypatch.setattr(encoders, "HF_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/resolve/main/{{filename}}")

    encoder = load_encoder("test-dinov2-reg", progress=False)
    cached = hub.cache_dir() / "encoders" / f"{timm_name}.safetensors"
    assert cached.read_bytes() == (tmp_path / "model.safetensors").read_bytes()
    assert file_server.requests == [f"/timm/{timm_name}/resolve/main/model.safetensors"]
    assert (encoder.resolution, encoder.grid, encoder.dim, encoder.num_prefix_tokens) == (28, 2, 48, 5)
    model = encoder.backbone.model
    # Registers (no_embed_class): the 4x4 position grid is resampled to 2x2 as REPA does.
    resampled = timm.layers.resample_abs_pos_embed(state["pos_embed"], [2, 2], num_prefix_tokens=0)
    torch.testing.assert_close(model.pos_embed, resampled)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, state["blocks.1.mlp.fc2.weight"])
    x = images(side=64)
    with torch.no_grad():
        tokens = model.forward_features(encoder.preprocess(x))  # (N, 1 + 4 + 4, D)
    assert tokens.shape == (2, 9, 48)
    torch.testing.assert_close(encoder(x), tokens[:, 5:])

    # Cached: the second load needs no server.
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)
    again = load_encoder("test-dinov2-reg", progress=False)
    torch.testing.assert_close(again(x), encoder(x))


def test_local_safetensors_for_a_registered_name_resamples_like_repa(timm, monkeypatch, tmp_path):
    path = tmp_path / "dinov2 tiny=v1.safetensors"  # a space and an "=" in the path: split at the first "="
    state = _save_tiny(timm, path, "vit_small_patch14_dinov2", img_size=56, num_classes=0, **TINY_VIT)
    monkeypatch.setitem(encoders.ENCODERS, "test-dinov2", EncoderEntry("vit_small_patch14_dinov2.lvd142m", 28, TINY_VIT))
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)  # a local file never touches the network

    encoder = load_encoder(f"test-dinov2={path}")
    assert (encoder.grid, encoder.num_prefix_tokens) == (2, 1)
    # REPA (utils.py, load_encoders): resample_abs_pos_embed(pos_embed, [16, 16]) with its defaults,
    # the class token's position kept; here [2, 2] for the 28-px stand-in.
    repa = timm.layers.resample_abs_pos_embed(state["pos_embed"], [2, 2])
    torch.testing.assert_close(encoder.backbone.model.pos_embed, repa)
    assert load_encoder(f"test-dinov2={path}", resolution=42).grid == 3  # 512-px style override

    wrong = tmp_path / "deeper.safetensors"
    _save_tiny(timm, wrong, "vit_small_patch14_dinov2", img_size=56, num_classes=0, depth=3, embed_dim=48, num_heads=3)
    with pytest.raises(UserError, match=r"does not fit test-dinov2 .*blocks\.2\.") as info:
        load_encoder(f"test-dinov2={wrong}")
    assert "\n" not in str(info.value)


def test_timm_prefix_downloads_from_the_model_hub_id_and_uses_its_statistics(timm, file_server, monkeypatch, tmp_path):
    # timm's own test model (371k parameters, mean/std 0.5): weights saved with their classifier head.
    _save_tiny(timm, tmp_path / "model.safetensors", "test_vit")
    file_server.files["/timm/test_vit.r160_in1k/resolve/main/model.safetensors"] = (
        tmp_path / "model.safetensors"
    ).read_bytes()
    port = file_server.server_address[1]
    monkeypatch.setattr(encoders, "HF_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/resolve/main/{{filename}}")
    encoder = load_encoder("timm:test_vit", progress=False)  # no tag: timm's default one
    assert (hub.cache_dir() / "encoders" / "test_vit.r160_in1k.safetensors").is_file()
    assert encoder.resolution == 160 and encoder.num_prefix_tokens == 1
    torch.testing.assert_close(encoder.mean, torch.full((1, 3, 1, 1), 0.5))
    torch.testing.assert_close(encoder.std, torch.full((1, 3, 1, 1), 0.5))
    assert encoder(images(side=40)).shape == (2, encoder.grid**2, encoder.dim)


def test_timm_convnet_feature_map_becomes_tokens(timm, tmp_path):
    path = tmp_path / "convnext.safetensors"
    _save_tiny(timm, path, "test_convnext")
    encoder = load_encoder(f"timm:test_convnext.r160_in1k={path}", resolution=64)
    assert encoder.num_prefix_tokens == 0
    x = images(side=64)
    with torch.no_grad():
        feature_map = encoder.backbone.model.forward_features(encoder.preprocess(x))  # (N, D, h, w)
    assert encoder(x).shape == (2, math.prod(feature_map.shape[2:]), feature_map.shape[1])
    torch.testing.assert_close(encoder(x), feature_map.flatten(2).transpose(1, 2))


def test_timm_name_errors(timm, tmp_path):
    with pytest.raises(UserError, match="has no model 'vit_nonexistent_patch14'"):
        load_encoder("timm:vit_nonexistent_patch14")
    with pytest.raises(UserError, match="knows no pretrained weights 'test_vit.nonexistent_tag'"):
        load_encoder("timm:test_vit.nonexistent_tag")
    with pytest.raises(UserError, match="unknown encoder 'timm:'"):
        load_encoder("timm:")
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read .*broken.safetensors.* as safetensors"):
        load_encoder(f"timm:test_vit={broken}")
