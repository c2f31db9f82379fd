"""The frozen vision encoder that REPA aligns a DiT's hidden tokens with.

REPA (Yu et al. 2024, "Representation Alignment for Generation: Training Diffusion Transformers Is
Easier Than You Think", arXiv:2410.06940) adds a loss that pulls a projection of the DiT's hidden
tokens towards the patch features of a pretrained self-supervised encoder (DINOv2-B/14 by default),
computed on the clean image and never trained. This module builds that encoder and computes its
targets; it knows nothing of the DiT or the loss.

* `load_encoder(spec)` turns a name, a timm model or a local file into a `FrozenEncoder`;
* `FrozenEncoder(images)` maps images in [-1, 1], (N, C, H, W), to patch tokens (N, T, D), without
  a gradient;
* `tokens_to_grid(features, side)` resamples (N, T, D) tokens to another square token count.

What `load_encoder` accepts (`spec`):

  dinov2-vitb14                  a name in `ENCODERS` (DINOv2 and DINOv3 ViTs, built with timm)
  timm:<model>[.<tag>]           any timm model, e.g. timm:vit_small_patch14_dinov2.lvd142m
  <name>=<file.safetensors>      a local state dict for either of the above, e.g.
                                 dinov2-vitb14=/data/dinov2_vitb14.safetensors
                                 (split at the first "=": names never contain one, paths may)
  <file.pt> or <file.ts>         a TorchScript module (torch.jit.save) whose forward maps
                                 ImageNet-normalised images (N, 3, R, R) to patch tokens (N, T, D),
                                 behind P class/register tokens if it has an int attribute
                                 `num_prefix_tokens` = P (the class token is what FD-DINOv2 reads)

Named and timm models take their weights from timm's safetensors file on the Hugging Face hub
(`https://huggingface.co/timm/<model>/resolve/main/model.safetensors`), fetched once by
`fastdit.hub.download` into `<cache>/encoders/` (progress bar, `.part` file renamed when complete,
one-line error naming the file, the URL and where to put it when offline). Weights are read with
safetensors, never unpickled. timm is imported only here, when an encoder is built
(the `repa` extra).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .hub import download
from .program import install_command

# timm.data.IMAGENET_DEFAULT_MEAN / _STD: what DINOv2 and DINOv3 were trained with, and what REPA's
# preprocess_raw_image normalises with (sihyun-yu/REPA train.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The file timm keeps on the hub for each pretrained model; tests point this at a local server.
HF_HUB_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
HUB_FILENAME = "model.safetensors"
CACHE_SUBDIR = "encoders"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts")
TORCHSCRIPT_RESOLUTION = 224  # the input side of a TorchScript encoder unless `resolution` says otherwise


@dataclass(frozen=True)
class EncoderEntry:
    """A named encoder: the timm model (with its pretrained tag), the input side, extra timm kwargs."""

    timm_name: str
    resolution: int
    model_kwargs: dict = field(default_factory=dict)

    @property
    def hub_repo(self) -> str:
        return f"timm/{self.timm_name}"


# DINOv2 (Oquab et al. 2023) at 224 px: REPA resizes 256-px images to 224 for DINOv2 (train.py,
# preprocess_raw_image) and resamples the 37x37 position embedding to 16x16 (utils.py,
# load_encoders), so its 256 patch tokens match SiT/DiT-XL/2's 16x16 tokens at 256 px. timm's
# checkpoint filter does the same resampling (bicubic, antialiased) when the model is built with
# img_size=224. The "-reg" models are DINOv2 with 4 register tokens (Darcet et al. 2024), which REPA
# also offers ("dinov2-reg").
#
# DINOv3 (Siméoni et al. 2025) at 256 px: patch 16 gives the same 16x16 grid; it is also timm's input
# size for these weights. DINOv3 uses RoPE, so no position embedding is resampled. Its weights are
# published under the DINOv3 licence; where the hub asks for it to be accepted first, the download
# fails with HTTP 401/403 and the message says where to put a copy fetched by hand.
ENCODERS: dict[str, EncoderEntry] = {
    "dinov2-vits14": EncoderEntry("vit_small_patch14_dinov2.lvd142m", 224),
    "dinov2-vitb14": EncoderEntry("vit_base_patch14_dinov2.lvd142m", 224),
    "dinov2-vitl14": EncoderEntry("vit_large_patch14_dinov2.lvd142m", 224),
    "dinov2-vitg14": EncoderEntry("vit_giant_patch14_dinov2.lvd142m", 224),
    "dinov2-vits14-reg": EncoderEntry("vit_small_patch14_reg4_dinov2.lvd142m", 224),
    "dinov2-vitb14-reg": EncoderEntry("vit_base_patch14_reg4_dinov2.lvd142m", 224),
    "dinov2-vitl14-reg": EncoderEntry("vit_large_patch14_reg4_dinov2.lvd142m", 224),
    "dinov2-vitg14-reg": EncoderEntry("vit_giant_patch14_reg4_dinov2.lvd142m", 224),
    "dinov3-vits16": EncoderEntry("vit_small_patch16_dinov3.lvd1689m", 256),
    "dinov3-vits16plus": EncoderEntry("vit_small_plus_patch16_dinov3.lvd1689m", 256),
    "dinov3-vitb16": EncoderEntry("vit_base_patch16_dinov3.lvd1689m", 256),
    "dinov3-vitl16": EncoderEntry("vit_large_patch16_dinov3.lvd1689m", 256),
    "dinov3-vith16plus": EncoderEntry("vit_huge_plus_patch16_dinov3.lvd1689m", 256),
    "dinov3-vit7b16": EncoderEntry("vit_7b_patch16_dinov3.lvd1689m", 256),
}
DEFAULT_ENCODER = "dinov2-vitb14"  # REPA's default (its --enc-type dinov2-vit-b)


class FrozenEncoder(nn.Module):
    """A pretrained encoder that is never trained: images in [-1, 1] -> patch tokens (N, T, D).

    `backbone` maps normalised images (N, 3, R, R) to tokens (N, P + T, D), or to a feature map
    (N, D, h, w) for a convolutional network; the first `num_prefix_tokens` (P: class and register
    tokens) are dropped. The wrapper stays in eval mode (a parent's `.train()` does not reach it),
    its parameters never require a gradient, and features are computed under `torch.no_grad()`.

    Attributes: `dim` (D), `resolution` (R), `num_tokens` (T), `grid` (the token grid's side,
    T = grid**2), `name`, and the normalisation `mean` / `std` (buffers of shape (1, 3, 1, 1)).
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        resolution: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        num_prefix_tokens: int = 0,
        name: str = "encoder",
    ):
        super().__init__()
        if resolution < 1:
            raise UserError(f"encoder resolution must be >= 1, got {resolution}")
        self.backbone = backbone
        self.resolution = int(resolution)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.name = name
        tensors = [*backbone.parameters(), *backbone.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        self._dtype = floats[0] if floats else torch.float32
        # Not persistent: they follow .to(device) but are never part of a checkpoint.
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        # One forward of a blank image tells the token count and width, whatever the backbone is.
        with torch.no_grad():
            probe = self._tokens(torch.zeros(1, 3, self.resolution, self.resolution, device=device, dtype=self._dtype))
        if probe.ndim != 3 or probe.shape[1] < 1:
            raise UserError(
                f"{name} returns shape {tuple(probe.shape)} after dropping {num_prefix_tokens} prefix tokens; "
                "an encoder must return patch tokens (N, T, D)"
            )
        self.num_tokens = int(probe.shape[1])
        self.dim = int(probe.shape[2])
        self.grid = math.isqrt(self.num_tokens)
        if self.grid * self.grid != self.num_tokens:
            raise UserError(
                f"{name} returns {self.num_tokens} patch tokens at resolution {self.resolution}, not a square grid; "
                "REPA aligns square token grids: use an encoder (or resolution) whose patch grid is square"
            )

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means frozen: a parent's .train() must not switch on dropout or drop-path in here.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1], C = 1 or 3 -> (N, 3, R, R) normalised with `mean` / `std`."""
        return encoder_input(images, self.resolution, self.mean, self.std, name=self.name).to(self._dtype)

    @torch.no_grad()
    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Images already prepared for the backbone, (N, 3, R, R) -> the class token (N, D).

        For timm's ViTs this is the first token after the final norm: DINOv2's `x_norm_clstoken`,
        which its torch.hub model's forward returns (the head is an identity) and FD-DINOv2 reads.
        """
        if self.num_prefix_tokens < 1:
            raise UserError(
                f"{self.name} has no class token (it returns patch tokens only); pass a ViT with one, e.g. "
                "dinov2-vitl14, or a TorchScript file with the attribute num_prefix_tokens >= 1"
            )
        return self.backbone(x.to(self._dtype))[:, 0]

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        if features.ndim == 4:  # a convolutional feature map (N, D, h, w): its pixels are the tokens
            features = features.flatten(2).transpose(1, 2)
        return features[:, self.num_prefix_tokens :]

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W) -> patch tokens (N, T, D), no class or register tokens."""
        return self._tokens(self.preprocess(images))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}, tokens={self.grid}x{self.grid}, dim={self.dim}"


def encoder_input(images: torch.Tensor, resolution: int, mean: torch.Tensor, std: torch.Tensor,
                  name: str = "the encoder") -> torch.Tensor:
    """What an encoder sees of images in [-1, 1], (N, C, H, W) with C = 1 or 3: (N, 3, R, R) float32
    normalised with `mean` / `std` (tensors of shape (1, 3, 1, 1)). Also what an encoder trained here
    (the digits demo's) trains on, so that it is used as it was trained."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise UserError(
            f"{name} takes images (N, C, H, W) with C = 1 or 3, got shape {tuple(images.shape)}; "
            "pass RGB or gray images in [-1, 1]"
        )
    x = images.float()
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)  # a gray image is the RGB image with three equal channels
    # REPA (sihyun-yu/REPA train.py, preprocess_raw_image, "dinov2" branch): x / 255 on uint8
    # images, i.e. [0, 1], then Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), then
    # F.interpolate(x, 224, mode="bicubic") - PyTorch's default antialias=False, kept here so the
    # targets are REPA's. (Bicubic weights sum to one, so normalising first or last is the same.)
    x = ((x + 1) / 2 - mean.to(x.device)) / std.to(x.device)
    if x.shape[-2:] != (resolution, resolution):
        x = F.interpolate(x, size=(resolution, resolution), mode="bicubic", align_corners=False)
    return x


def tokens_to_grid(features: torch.Tensor, side: int) -> torch.Tensor:
    """Resample square-grid tokens (N, T, D) to (N, side**2, D), bilinearly on the 2-D grid.

    REPA itself avoids a mismatch by picking the encoder's input size (224 px for 16x16 tokens at
    256 px, 448 at 512 px); this is for models whose token count differs anyway (DiT-XL/4 has 8x8
    tokens at 256 px). Plain bilinear (no antialias, align_corners=False) halves a side by averaging
    each 2x2 block of tokens exactly.
    """
    if features.ndim != 3:
        raise UserError(f"tokens_to_grid takes tokens (N, T, D), got shape {tuple(features.shape)}")
    if side < 1:
        raise UserError(f"tokens_to_grid needs a grid side >= 1, got {side}")
    n, t, d = features.shape
    old = math.isqrt(t)
    if old * old != t:
        raise UserError(f"tokens_to_grid needs a square token count, got {t} tokens; pass the patch tokens only")
    if old == side:
        return features
    grid = features.transpose(1, 2).reshape(n, d, old, old)  # (N, D, old, old), row-major like the patches
    grid = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=False)
    return grid.flatten(2).transpose(1, 2)  # (N, side*side, D)


def load_encoder(
    spec: str,
    device: str | torch.device = "cpu",
    *,
    resolution: int | None = None,
    progress: bool = True,
) -> FrozenEncoder:
    """A `FrozenEncoder` from a name, `timm:<model>`, `NAME=FILE.safetensors` or a TorchScript file.

    `resolution` overrides the input side (the named encoder's, timm's pretrained input size, or 224
    for TorchScript): REPA at 512 px feeds DINOv2 448-px images (32x32 tokens). Weights that are not
    in the cache are downloaded first (see the module docstring).
    """
    spec = str(spec).strip()
    if resolution is not None and int(resolution) < 1:
        raise UserError(f"encoder resolution must be >= 1, got {resolution}")
    name, has_file, file = spec.partition("=")
    if has_file:
        path = _existing_file(file, spec)
        if path.suffix != ".safetensors":
            raise UserError(
                f"{spec!r}: a local state dict must be a .safetensors file, got {str(path)!r}; "
                "convert it with safetensors.torch.save_file (or pass a TorchScript file .pt/.ts on its own)"
            )
        return _timm_encoder(name.strip(), path, device, resolution, progress)
    if spec in ENCODERS or spec.startswith("timm:"):
        return _timm_encoder(spec, None, device, resolution, progress)
    if Path(spec).suffix in TORCHSCRIPT_SUFFIXES:
        return _torchscript_encoder(_existing_file(spec, spec), device, resolution)
    if Path(spec).suffix == ".safetensors":
        raise UserError(
            f"{spec!r} holds weights but no architecture; pass it as NAME={spec}, e.g. {DEFAULT_ENCODER}={spec}"
        )
    raise UserError(f"unknown encoder {spec!r}; {_CHOICES}")


_CHOICES = (
    f"choose one of {', '.join(ENCODERS)}, timm:<timm model name>, NAME=FILE.safetensors "
    "or a TorchScript file (.pt/.ts)"
)


def _existing_file(path: str, spec: str) -> Path:
    resolved = Path(path.strip()).expanduser()
    if not resolved.is_file():
        raise UserError(f"encoder file not found: {str(resolved)!r} (from {spec!r}); check the path")
    return resolved


def _import_timm(spec: str):
    try:
        import timm
    except (ImportError, RuntimeError) as err:
        # RuntimeError: timm imports torchvision, which fails this way when it was built for another torch.
        raise UserError(
            f"the encoder {spec!r} is built with timm, which cannot be imported ({type(err).__name__}: {err}); "
            f"{install_command('repa')}, with a torchvision that matches your torch"
        ) from None
    return timm


def _cache_filename(repo: str) -> str:
    # timm/<model>.<tag> -> <model>.<tag>.safetensors; another owner keeps its name: owner--model.safetensors
    owner, _, model = repo.partition("/")
    return f"{model if owner == 'timm' else repo.replace('/', '--')}.safetensors"


def _hub_weights(repo: str, filename: str, name: str, progress: bool) -> Path:
    url = HF_HUB_URL.format(repo=repo, filename=filename)
    hint = f"pass {name}=PATH to a local copy of {repo}'s {filename}"
    return download(url, _cache_filename(repo), subdir=CACHE_SUBDIR, progress=progress, hint=hint)


def _timm_encoder(
    name: str, weights: Path | None, device, resolution: int | None, progress: bool
) -> FrozenEncoder:
    """Build a timm model by registered name or `timm:<model>`, with `weights` or its hub file."""
    if name in ENCODERS:
        entry = ENCODERS[name]
        timm_name, model_kwargs = entry.timm_name, dict(entry.model_kwargs)
        resolution = resolution or entry.resolution
        if weights is None:
            # The download comes first: it needs no timm, and an offline machine learns what to fetch.
            weights = _hub_weights(entry.hub_repo, HUB_FILENAME, name, progress)
        timm = _import_timm(name)
    elif name.startswith("timm:") and name[len("timm:") :].strip():
        timm_name, model_kwargs = name[len("timm:") :].strip(), {}
        timm = _import_timm(name)
    else:
        raise UserError(f"unknown encoder {name!r}; {_CHOICES}")

    architecture = timm_name.split(".")[0]
    if not timm.is_model(architecture):
        raise UserError(
            f"timm {timm.__version__} has no model {architecture!r} (from {name!r}); "
            f"check the name with timm.list_models('{architecture.split('_')[0]}*') or upgrade timm"
        )
    try:
        cfg = timm.get_pretrained_cfg(timm_name)
    except RuntimeError:  # an unknown pretrained tag
        cfg = None
    if cfg is None:
        raise UserError(
            f"timm {timm.__version__} knows no pretrained weights {timm_name!r} (from {name!r}); "
            f"list them with timm.list_pretrained('{architecture}*')"
        )
    if weights is None:
        if not cfg.hf_hub_id:
            raise UserError(f"timm has no Hugging Face hub weights for {timm_name!r}; pass {name}=FILE.safetensors")
        filename = cfg.hf_hub_filename or HUB_FILENAME
        if not filename.endswith(".safetensors"):
            raise UserError(
                f"timm's weights for {timm_name!r} are {filename}, not safetensors (never unpickled here); "
                f"convert them with safetensors.torch.save_file and pass {name}=FILE.safetensors"
            )
        weights = _hub_weights(cfg.hf_hub_id, filename, name, progress)
    resolution = int(resolution or cfg.input_size[-1])

    state = _read_safetensors(weights, name)
    # The classifier head is never used (features only): drop it, and tell timm the pretrained model
    # has none, so that its load stays strict about every other tensor.
    heads = (cfg.classifier,) if isinstance(cfg.classifier, str) else tuple(cfg.classifier or ())
    state = {k: v for k, v in state.items() if not any(k.startswith(head + ".") for head in heads)}
    if not state:
        raise UserError(f"{str(weights)!r} holds no tensors besides a classifier head; it is not {name}'s weights")
    # pretrained=True with the state dict in the config runs the model's own checkpoint filter: for
    # ViTs it resamples the position embedding to img_size (bicubic, antialiased: what REPA does with
    # timm.layers.resample_abs_pos_embed) and converts Meta's original DINOv2 key names.
    options = dict(pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(state_dict=state, num_classes=0))
    try:
        try:
            model = timm.create_model(timm_name, img_size=resolution, **options, **model_kwargs)
        except TypeError as err:
            if "img_size" not in str(err):
                raise
            model = timm.create_model(timm_name, **options, **model_kwargs)  # a convnet: any input size
    except (RuntimeError, KeyError, ValueError) as err:
        reason = " ".join(str(err).split())
        raise UserError(
            f"{str(weights)!r} does not fit {name} ({timm_name}): {reason[:300]}; pass the weights of that model"
        ) from None
    model.to(device)
    return FrozenEncoder(
        _ForwardFeatures(model),
        resolution=resolution,
        mean=tuple(cfg.mean or IMAGENET_MEAN),
        std=tuple(cfg.std or IMAGENET_STD),
        num_prefix_tokens=getattr(model, "num_prefix_tokens", 0),
        name=name,
    )


class _ForwardFeatures(nn.Module):
    """timm's `forward_features`: all tokens after the final norm (DINOv2's x_norm_* outputs), no head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_features(x)


def _read_safetensors(path: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read {str(path)!r} as safetensors for {name} ({err}); delete it to download it again, "
            "or pass a complete file"
        ) from None


def _torchscript_encoder(path: Path, device, resolution: int | None) -> FrozenEncoder:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as err:  # noqa: BLE001 - any failure means "not a TorchScript archive"; say which file
        raise UserError(
            f"{str(path)!r} is not a TorchScript file ({type(err).__name__}); save the encoder with "
            "torch.jit.script(model).save(PATH), or pass a state dict as NAME=FILE.safetensors"
        ) from None
    # A scripted module may carry its input side as an int attribute `resolution` (the digits demo's
    # encoder does: 8 px); else 224, DINOv2's at 256 px. Likewise `num_prefix_tokens`: the class and
    # register tokens in front of the patch tokens (0 when absent: patch tokens only).
    recorded = getattr(module, "resolution", None)
    resolution = resolution or (recorded if isinstance(recorded, int) else None) or TORCHSCRIPT_RESOLUTION
    prefix = getattr(module, "num_prefix_tokens", 0)
    if not isinstance(prefix, int) or prefix < 0:
        raise UserError(f"{str(path)!r} has num_prefix_tokens = {prefix!r}; it must be an int >= 0")
    return FrozenEncoder(module, resolution=resolution, num_prefix_tokens=prefix, name=os.fspath(path))


__all__ = [
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncoderEntry",
    "FrozenEncoder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "load_encoder",
    "tokens_to_grid",
]
