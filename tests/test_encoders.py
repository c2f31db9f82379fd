"""The frozen encoders (REPA's and the metrics'): preprocessing, freezing, every architecture, every way to
name one, and the download path.

Nothing is downloaded: pretrained files are tiny randomly initialised transformers models of each
architecture (tests/tiny_encoders.py), served by an HTTP server on 127.0.0.1 (as in tests/test_hub.py) or
passed as local copies; the rest use a plain stand-in backbone.
"""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdit import encoders, hub
from fastdit.encoders import FrozenEncoder, load_encoder, tokens_to_grid
from fastdit.errors import DownloadError, UserError
from tiny_encoders import save_tiny, serve

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
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
    with pytest.raises(UserError, match="unknown encoder 'dinov9'.*dinov2-vitb14.*hf:<owner>/<repo>") as info:
        load_encoder("dinov9")
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="unknown encoder 'dinov9'"):
        load_encoder(f"dinov9={_touch(tmp_path / 'w.safetensors')}")
    with pytest.raises(UserError, match="encoder file not found"):
        load_encoder(f"dinov2-vitb14={tmp_path / 'absent.safetensors'}")
    with pytest.raises(UserError, match="must be a .safetensors file or a folder"):
        load_encoder(f"dinov2-vitb14={_touch(tmp_path / 'w.bin')}")
    with pytest.raises(UserError, match="no architecture; pass it as NAME="):
        load_encoder(str(_touch(tmp_path / "w.safetensors")))
    with pytest.raises(UserError, match="encoder file not found"):
        load_encoder(str(tmp_path / "absent.pt"))
    with pytest.raises(UserError, match="resolution 0 is not an int from 1 to 1024"):
        load_encoder("dinov2-vitb14", resolution=0)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="lacks config.json and model.safetensors.*hf download facebook/dinov2-base"):
        load_encoder(f"dinov2-vitb14={tmp_path / 'empty'}")


def _touch(path):
    path.write_bytes(b"")
    return path


def test_offline_message_is_one_line_naming_file_url_and_place(monkeypatch):
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)
    with pytest.raises(DownloadError) as info:
        load_encoder("dinov2-vitb14", progress=False)
    message = str(info.value)
    target = hub.cache_dir() / "encoders" / "facebook--dinov2-base" / "config.json"
    assert "\n" not in message
    assert "could not download config.json" in message  # the small file first: offline is known at once
    assert "http://127.0.0.1:9/facebook/dinov2-base/resolve/main/config.json" in message
    assert f"put it at {target}" in message
    assert "pass dinov2-vitb14=FOLDER" in message
    assert not list(target.parent.glob("*")) if target.parent.exists() else True


def test_every_registered_encoder_is_an_official_repository_with_its_statistics():
    url = encoders.HF_HUB_URL.format(repo=encoders.ENCODERS["dinov2-vitb14"].repo, filename=encoders.WEIGHTS_FILE)
    assert url == "https://huggingface.co/facebook/dinov2-base/resolve/main/model.safetensors"
    assert encoders.DEFAULT_ENCODER == "dinov2-vitb14"
    for name, entry in encoders.ENCODERS.items():
        owner = entry.repo.split("/")[0]
        assert owner in ("facebook", "openai", "google"), name
        if name.startswith(("dinov2", "dinov3")):
            patch = 14 if name.startswith("dinov2") else 16
            assert entry.resolution // patch == 16, name  # 16 x 16 tokens: DiT-XL/2's grid at 256 px
        expected = {"openai": encoders.CLIP_MEAN, "google": encoders.SIGLIP_MEAN}.get(owner, encoders.IMAGENET_MEAN)
        assert entry.mean == expected, name


# --- transformers models: every architecture, the download, local copies ----------------------


def _hf(kind, folder, resolution=None):
    """The transformers model of `folder` loaded directly (no fastdit), for independent references."""
    import transformers as T

    classes = {"dinov2": T.Dinov2Model, "dinov2_with_registers": T.Dinov2WithRegistersModel,
               "dinov3_vit": T.DINOv3ViTModel, "clip": T.CLIPVisionModelWithProjection,
               "siglip": T.SiglipVisionModel, "convnextv2": T.ConvNextV2Model, "vit_mae": T.ViTMAEModel}
    T.utils.logging.set_verbosity_error()
    T.utils.logging.disable_progress_bar()
    model = classes[kind].from_pretrained(str(folder)).eval()
    if kind == "vit_mae":
        model.config.mask_ratio = 0.0  # MAE's encoder on the whole image
    return model


ARCHITECTURES = {  # name used for the spec, model_type, native side, prefix tokens
    "dinov2-vitb14": ("dinov2", 56, 1),
    "dinov2-vitb14-reg": ("dinov2_with_registers", 56, 5),
    "dinov3-vitb16": ("dinov3_vit", 32, 5),
    "clip-vitl14": ("clip", 28, 1),
    "siglip2-so400m16-256": ("siglip", 32, 0),
    "convnextv2-base": ("convnextv2", 32, 0),
    "mae-vitl16": ("vit_mae", 32, 1),
}


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_each_architecture_at_its_own_size_gives_the_models_own_features(name, tmp_path):
    kind, side, prefix = ARCHITECTURES[name]
    folder = save_tiny(kind, tmp_path / kind)
    encoder = load_encoder(f"{name}={folder}", resolution=side)
    assert (encoder.resolution, encoder.num_prefix_tokens) == (side, prefix)
    model = _hf(kind, folder)
    x = encoder.preprocess(images(side=side))  # already at the side: no resize, nothing resampled
    with torch.no_grad():
        if kind == "vit_mae":
            patches = (side // 16) ** 2
            out = model(pixel_values=x, noise=torch.arange(patches).float().expand(2, -1))
        else:
            out = model(pixel_values=x)
    if kind == "convnextv2":
        expected_tokens = out.last_hidden_state.flatten(2).transpose(1, 2)
        expected_pooled = out.last_hidden_state.mean(dim=(2, 3))
    elif kind == "clip":
        normed = model.vision_model.post_layernorm(out.last_hidden_state)
        expected_tokens, expected_pooled = normed[:, prefix:], normed[:, 0]
        torch.testing.assert_close(encoder.pooled(x, "projected"), out.image_embeds)
    elif kind == "siglip":
        expected_tokens, expected_pooled = out.last_hidden_state, out.pooler_output
    else:
        expected_tokens, expected_pooled = out.last_hidden_state[:, prefix:], out.last_hidden_state[:, 0]
    torch.testing.assert_close(encoder(images(side=side)), expected_tokens)
    torch.testing.assert_close(encoder.pooled(x), expected_pooled)
    if prefix:
        torch.testing.assert_close(encoder.class_token(x), encoder.backbone(x)[:, 0])
    if kind != "clip":
        with pytest.raises(UserError, match="no projected embedding"):
            encoder.pooled(x, "projected")


def test_mae_keeps_every_patch_in_grid_order(tmp_path):
    folder = save_tiny("vit_mae", tmp_path / "mae")
    encoder = load_encoder(f"mae-vitl16={folder}", resolution=32)
    x = encoder.preprocess(images(side=32))
    model = _hf("vit_mae", folder)
    model.config.mask_ratio = 0.0
    with torch.no_grad():  # MAE's random shuffle with every patch kept: the class token cannot tell
        shuffled = model(pixel_values=x, noise=torch.rand(2, 4, generator=torch.Generator().manual_seed(1)))
    torch.testing.assert_close(encoder.pooled(x), shuffled.last_hidden_state[:, 0], rtol=1e-5, atol=1e-5)
    assert encoder(images(side=32)).shape == (2, 4, 32)  # all 4 patches, none masked


@pytest.mark.parametrize("name", ["dinov2-vitb14", "dinov2-vitb14-reg", "clip-vitl14", "siglip2-so400m16-256"])
def test_position_grid_is_resampled_once_bicubic_antialiased_like_timm_and_repa(name, tmp_path):
    kind, side, prefix = ARCHITECTURES[name]
    folder = save_tiny(kind, tmp_path / kind)
    model = _hf(kind, folder)
    patch = model.config.patch_size
    small = (side // patch - 1) * patch  # one patch fewer per side: the grid shrinks by one
    encoder = load_encoder(f"{name}={folder}", resolution=small)
    if kind.startswith("dinov2"):
        old, new = model.embeddings.position_embeddings, encoder.backbone.model.embeddings.position_embeddings
        keep = 1
    else:
        embeddings = getattr(model, "vision_model", model).embeddings
        new_embeddings = getattr(encoder.backbone.model, "vision_model", encoder.backbone.model).embeddings
        old, new = embeddings.position_embedding.weight[None], new_embeddings.position_embedding.weight[None]
        keep = 1 if kind == "clip" else 0
    g_old, g_new = side // patch, small // patch
    grid = old[:, keep:].reshape(1, g_old, g_old, -1).permute(0, 3, 1, 2)
    # timm.layers.resample_abs_pos_embed's defaults (what REPA calls): bicubic, antialias=True.
    expected = F.interpolate(grid, size=(g_new, g_new), mode="bicubic", align_corners=False, antialias=True)
    expected = torch.cat([old[:, :keep], expected.permute(0, 2, 3, 1).reshape(1, g_new * g_new, -1)], dim=1)
    torch.testing.assert_close(new, expected)
    assert encoder.grid == g_new and encoder(images(side=40)).shape == (2, g_new * g_new, 32)


def test_registered_encoder_downloads_once_and_drops_register_tokens(file_server, monkeypatch, tmp_path):
    folder = save_tiny("dinov2_with_registers", tmp_path / "reg")
    serve(file_server, "facebook/dinov2-with-registers-base", folder)
    port = file_server.server_address[1]
    monkeypatch.setattr(encoders, "HF_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/resolve/main/{{filename}}")

    encoder = load_encoder("dinov2-vitb14-reg", progress=False, resolution=28)
    cached = hub.cache_dir() / "encoders" / "facebook--dinov2-with-registers-base"
    assert sorted(p.name for p in cached.iterdir()) == ["config.json", "model.safetensors"]  # no .part left
    assert (cached / "model.safetensors").read_bytes() == (folder / "model.safetensors").read_bytes()
    assert file_server.requests == [f"/facebook/dinov2-with-registers-base/resolve/main/{name}"
                                    for name in ("config.json", "model.safetensors")]
    assert (encoder.resolution, encoder.grid, encoder.dim, encoder.num_prefix_tokens) == (28, 2, 32, 5)
    x = images(side=64)
    with torch.no_grad():
        tokens = encoder.backbone(encoder.preprocess(x))  # (N, 1 + 4 + 4, D)
    assert tokens.shape == (2, 9, 32)
    torch.testing.assert_close(encoder(x), tokens[:, 5:])

    # Cached: the second load needs no server.
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)
    again = load_encoder("dinov2-vitb14-reg", progress=False, resolution=28)
    torch.testing.assert_close(again(x), encoder(x))


def test_hf_prefix_takes_any_repository_of_a_known_architecture(file_server, monkeypatch, tmp_path):
    folder = save_tiny("dinov2", tmp_path / "any")
    serve(file_server, "someone/my-dinov2", folder)
    port = file_server.server_address[1]
    monkeypatch.setattr(encoders, "HF_HUB_URL", f"http://127.0.0.1:{port}/{{repo}}/resolve/main/{{filename}}")
    encoder = load_encoder("hf:someone/my-dinov2", progress=False)
    assert encoder.resolution == 56 and encoder.grid == 4  # the config's own image_size
    assert (hub.cache_dir() / "encoders" / "someone--my-dinov2" / "model.safetensors").is_file()
    torch.testing.assert_close(encoder.mean, torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1))


def test_local_copies_as_a_folder_or_a_weights_file(monkeypatch, tmp_path):
    monkeypatch.setattr(encoders, "HF_HUB_URL", REFUSED)  # a local copy never touches the network
    folder = save_tiny("dinov2", tmp_path / "dinov2 tiny=v1")  # a space and an "=" in the path
    from_folder = load_encoder(f"dinov2-vitb14={folder}", resolution=28)
    from_file = load_encoder(f"dinov2-vitb14={folder / 'model.safetensors'}", resolution=28)  # config beside it
    x = images(side=40)
    torch.testing.assert_close(from_file(x), from_folder(x))
    assert load_encoder(f"dinov2-vitb14={folder}", resolution=42).grid == 3  # 512-px style override

    renamed = tmp_path / "weights" / "dinov2.safetensors"  # another name, config.json beside it
    renamed.parent.mkdir()
    renamed.write_bytes((folder / "model.safetensors").read_bytes())
    (renamed.parent / "config.json").write_bytes((folder / "config.json").read_bytes())
    torch.testing.assert_close(load_encoder(f"dinov2-vitb14={renamed}", resolution=28)(x), from_folder(x))


def test_weights_of_another_model_and_broken_files_are_one_line_errors(tmp_path):
    # A config of three blocks beside the weights of two: the third block's tensors are missing (transformers
    # alone would initialise them at random and go on).
    wrong = save_tiny("dinov2", tmp_path / "wrong", depth=2)
    config = (wrong / "config.json").read_text()
    assert '"num_hidden_layers": 2' in config
    (wrong / "config.json").write_text(config.replace('"num_hidden_layers": 2', '"num_hidden_layers": 3'))
    with pytest.raises(UserError, match=r"does not fit dinov2-vitb14 \(dinov2\): missing .*layer\.2\.") as info:
        load_encoder(f"dinov2-vitb14={wrong}")
    assert "\n" not in str(info.value)
    broken = save_tiny("dinov2", tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="cannot read .*model.safetensors.* as safetensors"):
        load_encoder(f"dinov2-vitb14={broken}")
    other = save_tiny("dinov2", tmp_path / "other")
    (other / "config.json").write_text('{"model_type": "bert"}')
    with pytest.raises(UserError, match="describes a 'bert' model"):
        load_encoder(f"dinov2-vitb14={other}")
