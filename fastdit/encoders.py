"""Frozen pretrained vision encoders: REPA's alignment targets and the evaluation metrics' feature spaces.

REPA (Yu et al. 2024, "Representation Alignment for Generation", arXiv:2410.06940) pulls a projection of a
DiT's hidden tokens towards the patch tokens of a frozen self-supervised encoder (DINOv2-B/14 by default).
The evaluation metrics read other features of such encoders: FD-DINOv2 (Stein et al. 2023) the DINOv2
class token, CMMD (Jayasumana et al. 2024) CLIP's projected image embedding, FDr6 (arXiv:2604.28190) one
pooled feature in each of six spaces. This module builds those encoders; it knows nothing of the DiT,
the loss or the metrics.

* `load_encoder(spec)` turns a name, a Hugging Face model folder or a TorchScript file into a
  `FrozenEncoder`;
* `FrozenEncoder(images)` maps images in [-1, 1], (N, C, H, W), to patch tokens (N, T, D), without a
  gradient; `FrozenEncoder.class_token(x)` and `FrozenEncoder.pooled(x)` read the features the metrics use;
* `tokens_to_grid(features, side)` resamples (N, T, D) tokens to another square token count.

Every network is built with Hugging Face `transformers` (pure PyTorch, the `encoders` extra), from the
official model repositories' `config.json` and `model.safetensors`:

  spec                        architecture (transformers class)     repository
  dinov2-vit{s,b,l,g}14       DINOv2 (Dinov2Model)                  facebook/dinov2-{small,base,large,giant}
  dinov2-vit{s,b,l,g}14-reg   DINOv2 + 4 registers                  facebook/dinov2-with-registers-*
  dinov3-vit{s,s+,b,l,h+,7b}16  DINOv3 (DINOv3ViTModel)             facebook/dinov3-*-pretrain-lvd1689m
  clip-vitl14, -336           CLIP ViT-L/14 (CLIPVisionModelWith-   openai/clip-vit-large-patch14[-336]
                              Projection)
  siglip2-so400m16-256        SigLIP 2 So400m/16 (SiglipVisionModel) google/siglip2-so400m-patch16-256
  convnextv2-base             ConvNeXt V2-B (ConvNextV2Model)       facebook/convnextv2-base-22k-224
  mae-vitl16                  MAE ViT-L/16 encoder (ViTMAEModel)    facebook/vit-mae-large

What `load_encoder` accepts (`spec`):

  dinov2-vitb14                  a name in `ENCODERS`
  hf:<owner>/<repo>              any Hugging Face repository of one of the architectures above
  <name>=<folder>                a local copy: a folder with config.json and model.safetensors, e.g.
                                 dinov2-vitb14=/data/dinov2-base (split at the first "=")
  <name>=<file.safetensors>      the weights alone, with config.json beside them (or the name's own
                                 config.json, fetched into the cache when it is not there yet)
  <file.pt> or <file.ts>         a TorchScript module (torch.jit.save) whose forward maps
                                 normalised images (N, 3, R, R) to tokens (N, P + T, D), P being an
                                 int attribute `num_prefix_tokens` (0 when absent; the class token,
                                 which FD-DINOv2 reads, is token 0); a path with "=" in it is read
                                 as a path when it names a file or no encoder comes before the "="

Every encoder is probed once when it is built (`FrozenEncoder`): a blank batch of 1 and of 2 images at
its input side (at most MAX_RESOLUTION px) must give floating-point tokens (N, T, D) of one shape,
finite, at most MAX_WIDTH wide; every later output is held to that shape. Weights must be floating
point (an integer tensor in a safetensors file is refused rather than cast). `FrozenEncoder.identity`
(name, sha256 of the files, resolution, tokens, width) is what REPA records to refuse another encoder
on resume.

Named and `hf:` encoders are fetched once by `fastdit.hub.download` into `<cache>/encoders/<owner>--<repo>/`
(progress bar, `.part` file renamed when complete, one line naming the file, the address and where to
put it when offline). Weights are read from safetensors only, never unpickled.

Position embeddings. A ViT trained at one size and used at another has its learned position grid resampled
once, when it is built, bicubically with antialiasing (timm's `resample_abs_pos_embed`, which REPA calls in
its `load_encoders`), not at every forward as transformers would do (without antialiasing for DINOv2).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .hub import download
from .program import install_command

# What DINOv2, DINOv3, ConvNeXt V2 and MAE were trained with (timm.data.IMAGENET_DEFAULT_MEAN / _STD), and
# what REPA's preprocess_raw_image normalises with (sihyun-yu/REPA train.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's (clip/clip.py `_transform`; the `image_mean` / `image_std` of its preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP's: pixels mapped to [-1, 1] (big_vision `value_range(-1, 1)`; its preprocessor_config.json).
SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)

# Where a repository's files are; tests point this at a local server.
HF_HUB_URL = "https://huggingface.co/{repo}/resolve/main/{filename}"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CACHE_SUBDIR = "encoders"
TORCHSCRIPT_SUFFIXES = (".pt", ".ts")
TORCHSCRIPT_RESOLUTION = 224  # the input side of a TorchScript encoder unless `resolution` says otherwise
# Bounds on what an encoder may ask for: the probe runs one forward at the input side before anything
# else, so a file that claims a 100000-px input (120 GB of pixels) must be refused before it. The metrics
# and REPA use 224 to 518 px (DINOv2's native side, 448 for REPA at 512 px) and widths up to 4096 (DINOv3 7B).
MAX_RESOLUTION = 1024
MAX_WIDTH = 16384
PROBE_BATCH = 2  # images in the probe: a backbone whose output does not follow the batch is refused


@dataclass(frozen=True)
class EncoderEntry:
    """A named encoder: its Hugging Face repository, default input side and pixel normalisation."""

    repo: str
    resolution: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def _dinov3(size: str) -> EncoderEntry:
    return EncoderEntry(f"facebook/dinov3-vit{size}16-pretrain-lvd1689m", 256)


# DINOv2 (Oquab et al. 2023) at 224 px: REPA resizes 256-px images to 224 for DINOv2 (train.py,
# preprocess_raw_image) and resamples the 37x37 position grid to 16x16 (utils.py, load_encoders), so its
# 256 patch tokens match DiT-XL/2's 16x16 tokens at 256 px. "-reg": with 4 registers (Darcet et al. 2024),
# REPA's "dinov2-reg". DINOv3 (Siméoni et al. 2025) at 256 px: patch 16 gives the same 16x16 grid; RoPE,
# so nothing is resampled; its weights are gated by the DINOv3 licence (HTTP 401/403 until accepted: the
# message then says where to put a copy fetched by hand).
ENCODERS: dict[str, EncoderEntry] = {
    "dinov2-vits14": EncoderEntry("facebook/dinov2-small", 224),
    "dinov2-vitb14": EncoderEntry("facebook/dinov2-base", 224),
    "dinov2-vitl14": EncoderEntry("facebook/dinov2-large", 224),
    "dinov2-vitg14": EncoderEntry("facebook/dinov2-giant", 224),
    "dinov2-vits14-reg": EncoderEntry("facebook/dinov2-with-registers-small", 224),
    "dinov2-vitb14-reg": EncoderEntry("facebook/dinov2-with-registers-base", 224),
    "dinov2-vitl14-reg": EncoderEntry("facebook/dinov2-with-registers-large", 224),
    "dinov2-vitg14-reg": EncoderEntry("facebook/dinov2-with-registers-giant", 224),
    "dinov3-vits16": _dinov3("s"),
    "dinov3-vits16plus": _dinov3("splus"),
    "dinov3-vitb16": _dinov3("b"),
    "dinov3-vitl16": _dinov3("l"),
    "dinov3-vith16plus": _dinov3("hplus"),
    "dinov3-vit7b16": _dinov3("7b"),
    # OpenAI CLIP ViT-L/14 (Radford et al. 2021) at 224 px, and its 336-px fine-tune, CMMD's encoder
    # (google-research/cmmd embedding.py: scenic's `vit_l14_336px`).
    "clip-vitl14": EncoderEntry("openai/clip-vit-large-patch14", 224, CLIP_MEAN, CLIP_STD),
    "clip-vitl14-336": EncoderEntry("openai/clip-vit-large-patch14-336", 336, CLIP_MEAN, CLIP_STD),
    # FDr6's other spaces (arXiv:2604.28190; its code names timm's vit_so400m_patch16_siglip_256.v2_webli,
    # convnextv2_base.fcmae_ft_in22k_in1k and vit_large_patch16_224.mae: these are the same releases).
    "siglip2-so400m16-256": EncoderEntry("google/siglip2-so400m-patch16-256", 256, SIGLIP_MEAN, SIGLIP_STD),
    "convnextv2-base": EncoderEntry("facebook/convnextv2-base-22k-224", 224),
    "mae-vitl16": EncoderEntry("facebook/vit-mae-large", 224),
}
DEFAULT_ENCODER = "dinov2-vitb14"  # REPA's default (its --enc-type dinov2-vit-b)

_CHOICES = (
    f"choose one of {', '.join(ENCODERS)}, hf:<owner>/<repo>, NAME=FOLDER (config.json + model.safetensors), "
    "NAME=FILE.safetensors or a TorchScript file (.pt/.ts)"
)


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
        check_resolution(resolution, name)
        self.backbone = backbone
        self.resolution = int(resolution)
        self.num_prefix_tokens = int(num_prefix_tokens)
        self.name = name
        self.files: tuple[Path, ...] = ()  # the files it was built from (`load_encoder` sets them)
        self._content_hash = None
        tensors = [*backbone.parameters(), *backbone.buffers()]
        device = tensors[0].device if tensors else torch.device("cpu")
        floats = [t.dtype for t in tensors if t.is_floating_point()]
        self._dtype = floats[0] if floats else torch.float32
        # Not persistent: they follow .to(device) but are never part of a checkpoint.
        self.register_buffer("mean", torch.tensor(mean, device=device).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()
        self.num_tokens = self.dim = None  # `_tokens` checks every output against the probe's once set
        # Forwards of a blank batch tell the token count and width, whatever the backbone is; a batch of
        # one and one of PROBE_BATCH, so that an output that does not follow the batch is refused here,
        # before training starts, rather than at some step.
        probes = []
        for batch in (1, PROBE_BATCH):
            blank = torch.zeros(batch, 3, self.resolution, self.resolution, device=device, dtype=self._dtype)
            try:
                with torch.no_grad():
                    probes.append(self._tokens(blank))
            except UserError:
                raise
            except Exception as err:  # noqa: BLE001 - whatever a foreign module raises: say what it was given
                # the last line: TorchScript puts its own traceback before the error itself
                lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [""]
                reason = lines[-1][:300]
                raise UserError(
                    f"{name} fails on a blank batch of shape {tuple(blank.shape)} ({type(err).__name__}: {reason}); "
                    "an encoder maps normalised RGB images (N, 3, R, R) at its resolution R to tokens (N, T, D)"
                ) from None
        probe = probes[-1]
        if probes[0].shape[1:] != probe.shape[1:]:
            raise UserError(
                f"{name} returns tokens of shape {tuple(probes[0].shape)} for 1 image and {tuple(probe.shape)} for "
                f"{PROBE_BATCH}; an encoder's tokens (N, T, D) must not depend on the batch"
            )
        if probe.shape[1] < 1:
            raise UserError(f"{name} returns no patch tokens after dropping {num_prefix_tokens} prefix tokens "
                            f"(shape {tuple(probe.shape)}); an encoder must return patch tokens (N, T, D)")
        if not 1 <= probe.shape[2] <= MAX_WIDTH:
            raise UserError(f"{name} returns tokens {probe.shape[2]} wide; fastdit takes encoder widths 1 to "
                            f"{MAX_WIDTH} (DINOv2-g: 1536)")
        if not torch.isfinite(probe).all():
            raise UserError(f"{name} returns non-finite tokens for a blank image; its weights are damaged or it "
                            "was saved wrongly: use another copy")
        self.num_tokens = int(probe.shape[1])
        self.dim = int(probe.shape[2])
        self.grid = math.isqrt(self.num_tokens)
        if self.grid * self.grid != self.num_tokens:
            raise UserError(
                f"{name} returns {self.num_tokens} patch tokens at resolution {self.resolution}, not a square grid; "
                "REPA aligns square token grids: use an encoder (or resolution) whose patch grid is square"
            )

    @property
    def content_hash(self) -> str:
        """The sha256 of the files it was built from, one after the other ("" when built from a module):
        computed on first use, since only REPA's record needs it (a DINOv2-g is 4.5 GB to read)."""
        if self._content_hash is None:
            import hashlib

            digest = hashlib.sha256()
            for path in self.files:
                digest.update(f"{path.stat().st_size}\n".encode())  # where one file ends and the next begins
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            self._content_hash = digest.hexdigest() if self.files else ""
        return self._content_hash

    @property
    def identity(self) -> dict:
        """What tells this encoder from another: its name, the hash of its files, and what it returns
        (REPA records it in its checkpoints and refuses to resume with another)."""
        return {"name": self.name, "sha256": self.content_hash, "resolution": self.resolution,
                "tokens": self.num_tokens, "dim": self.dim}

    def train(self, mode: bool = True) -> "FrozenEncoder":
        # Frozen means frozen: a parent's .train() must not switch on dropout or drop-path in here.
        return super().train(False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) in [-1, 1], C = 1 or 3 -> (N, 3, R, R) normalised with `mean` / `std`."""
        return encoder_input(images, self.resolution, self.mean, self.std, name=self.name).to(self._dtype)

    @torch.no_grad()
    def class_token(self, x: torch.Tensor) -> torch.Tensor:
        """Images already prepared for the backbone, (N, 3, R, R) -> the class token (N, D).

        For ViTs this is the first token after the final norm: DINOv2's `x_norm_clstoken`, which its
        torch.hub model's forward returns (the head is an identity) and FD-DINOv2 reads.
        """
        if self.num_prefix_tokens < 1:
            raise UserError(
                f"{self.name} has no class token (it returns patch tokens only); pass a ViT with one, e.g. "
                "dinov2-vitl14, or a TorchScript file with the attribute num_prefix_tokens >= 1"
            )
        return self.backbone(x.to(self._dtype))[:, 0]

    @torch.no_grad()
    def pooled(self, x: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        """Images already prepared for the backbone, (N, 3, R, R) -> one feature per image (N, D').

        `kind` "pooled" is the network's own image feature (`_HFBackbone.pooled`: the class token after
        the final norm for DINOv2, DINOv3, MAE and CLIP, SigLIP's attention-pool head, ConvNeXt's mean
        over the last feature map); "projected" is CLIP's joint-space embedding (`image_embeds`, the
        pooled feature times the visual projection, not normalised).
        """
        pooled = getattr(self.backbone, "pooled", None)
        if pooled is None:
            if kind != "pooled":
                raise UserError(f"{self.name} is not a CLIP model; it has no {kind} embedding")
            return self.class_token(x)
        return pooled(x.to(self._dtype), kind)

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's patch tokens (N, T, D), checked: the one place every output passes through."""
        features = self.backbone(x)
        if not isinstance(features, torch.Tensor) or not features.is_floating_point():
            what = (f"{str(features.dtype).replace('torch.', '')} tensor" if isinstance(features, torch.Tensor)
                    else type(features).__name__)
            raise UserError(f"{self.name} returns a {what}; an encoder returns floating-point tokens (N, T, D) "
                            "or a feature map (N, D, h, w)")
        if features.ndim == 4:  # a convolutional feature map (N, D, h, w): its pixels are the tokens
            features = features.flatten(2).transpose(1, 2)
        if features.ndim != 3 or features.shape[0] != x.shape[0]:
            raise UserError(
                f"{self.name} returns shape {tuple(features.shape)} for {x.shape[0]} image(s); an encoder must "
                "return tokens (N, T, D), one row per image"
            )
        features = features[:, self.num_prefix_tokens :]
        if self.num_tokens is not None and features.shape[1:] != (self.num_tokens, self.dim):
            raise UserError(
                f"{self.name} returned {features.shape[1]} tokens {features.shape[2]} wide, but {self.num_tokens} "
                f"{self.dim} wide when it was loaded; an encoder's tokens must not change from call to call"
            )
        return features

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (N, C, H, W) -> patch tokens (N, T, D), no class or register tokens."""
        return self._tokens(self.preprocess(images))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, resolution={self.resolution}, tokens={self.grid}x{self.grid}, dim={self.dim}"


def check_resolution(resolution, name: str = "the encoder") -> None:
    """An encoder's input side: an int from 1 to MAX_RESOLUTION (the probe allocates a batch of it)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or not 1 <= resolution <= MAX_RESOLUTION:
        raise UserError(f"{name}: encoder resolution {resolution!r} is not an int from 1 to {MAX_RESOLUTION} px; "
                        "DINOv2 takes 224 (448 for REPA at 512 px)")


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
    """A `FrozenEncoder` from a name, `hf:<owner>/<repo>`, `NAME=FOLDER`, `NAME=FILE.safetensors` or a
    TorchScript file.

    `resolution` overrides the input side (the named encoder's, the model config's `image_size`, or 224
    for TorchScript): REPA at 512 px feeds DINOv2 448-px images (32x32 tokens). Files that are not in
    the cache are downloaded first (see the module docstring).
    """
    spec = str(spec).strip()
    if resolution is not None:
        check_resolution(resolution, spec)
    name, has_file, file = spec.partition("=")
    name = name.strip()
    # A TorchScript file is a path, and a path may hold "=" (run=3/encoder.pt): one that names a file, or
    # whose part before the first "=" names no encoder, is read as a path.
    torchscript = Path(spec).suffix in TORCHSCRIPT_SUFFIXES
    if has_file and not (torchscript and (Path(spec).expanduser().is_file()
                                          or (name not in ENCODERS and not _is_hf_spec(name)))):
        if name not in ENCODERS and not _is_hf_spec(name):
            raise UserError(f"unknown encoder {name!r}; {_CHOICES}")
        folder = _local_files(name, file, spec, progress)
        return _with_hash(_transformers_encoder(name, folder, device, resolution), folder / CONFIG_FILE,
                          folder / WEIGHTS_FILE)
    if spec in ENCODERS or _is_hf_spec(spec):
        folder = _hub_files(spec, progress)
        return _with_hash(_transformers_encoder(spec, folder, device, resolution), folder / CONFIG_FILE,
                          folder / WEIGHTS_FILE)
    if torchscript:
        path = _existing(spec, spec)
        return _with_hash(_torchscript_encoder(path, device, resolution), path)
    if Path(spec).suffix == ".safetensors":
        raise UserError(
            f"{spec!r} holds weights but no architecture; pass it as NAME={spec}, e.g. {DEFAULT_ENCODER}={spec}"
        )
    raise UserError(f"unknown encoder {spec!r}; {_CHOICES}")


def _with_hash(encoder: FrozenEncoder, *files: Path) -> FrozenEncoder:
    """`encoder` with the files it was built from (links followed), whose bytes are its `content_hash`."""
    encoder.files = tuple(Path(os.path.realpath(path)) for path in files)
    return encoder


def _is_hf_spec(spec: str) -> bool:
    repo = spec[len("hf:"):] if spec.startswith("hf:") else ""
    return repo.count("/") == 1 and all(part.strip() for part in repo.split("/"))


def _repo_of(name: str) -> str:
    return ENCODERS[name].repo if name in ENCODERS else name[len("hf:"):]


def _existing(path: str, spec: str) -> Path:
    from .io import check_regular_file

    resolved = Path(path.strip()).expanduser()
    if not resolved.exists():
        raise UserError(f"encoder file not found: {str(resolved)!r} (from {spec!r}); check the path")
    return check_regular_file(resolved, "encoder file")


def _cache_folder(repo: str) -> str:
    return f"{CACHE_SUBDIR}/{repo.replace('/', '--')}"


def _hub_file(repo: str, filename: str, name: str, progress: bool) -> Path:
    url = HF_HUB_URL.format(repo=repo, filename=filename)
    hint = f"pass {name}=FOLDER holding a local copy of {repo}'s {CONFIG_FILE} and {WEIGHTS_FILE}"
    return download(url, filename, subdir=_cache_folder(repo), progress=progress, hint=hint)


def _hub_files(name: str, progress: bool) -> Path:
    """The cache folder holding `name`'s config.json and model.safetensors, fetched first if missing.
    The config comes first: it is small, and an offline machine learns at once what to fetch."""
    repo = _repo_of(name)
    config = _hub_file(repo, CONFIG_FILE, name, progress)
    _hub_file(repo, WEIGHTS_FILE, name, progress)
    return config.parent


def _local_files(name: str, path: str, spec: str, progress: bool) -> Path:
    """A folder with config.json and model.safetensors for `NAME=PATH` (a folder, or a .safetensors file)."""
    resolved = Path(path.strip()).expanduser()
    if resolved.is_dir():
        missing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if not (resolved / f).is_file()]
        if missing:
            raise UserError(
                f"{str(resolved)!r} (from {spec!r}) lacks {' and '.join(missing)}; a local encoder folder holds the "
                f"repository's {CONFIG_FILE} and {WEIGHTS_FILE} (e.g. from `hf download {_repo_of(name)} "
                f"{CONFIG_FILE} {WEIGHTS_FILE} --local-dir FOLDER`)"
            )
        return resolved
    resolved = _existing(path, spec)
    if resolved.suffix != ".safetensors":
        raise UserError(
            f"{spec!r}: local weights must be a .safetensors file or a folder, got {str(resolved)!r}; "
            "convert them with safetensors.torch.save_file (or pass a TorchScript file .pt/.ts on its own)"
        )
    config = resolved.parent / CONFIG_FILE
    if not config.is_file():
        config = _hub_file(_repo_of(name), CONFIG_FILE, name, progress)
    # transformers reads a folder: link the two files side by side in a private one (no copy of the weights).
    folder = config.parent if config.parent == resolved.parent and resolved.name == WEIGHTS_FILE else None
    if folder is None:
        import hashlib

        from .hub import cache_dir

        key = hashlib.sha256(f"{resolved.resolve()}|{config.resolve()}".encode()).hexdigest()[:16]
        folder = cache_dir() / CACHE_SUBDIR / "local" / key
        folder.mkdir(parents=True, exist_ok=True)
        for source, target in ((config, folder / CONFIG_FILE), (resolved, folder / WEIGHTS_FILE)):
            if target.is_symlink() or target.exists():
                target.unlink()
            target.symlink_to(source.resolve())
    return folder


# --- transformers models -------------------------------------------------------------------------------


def _import_transformers(spec: str):
    try:
        import transformers
    except ImportError as err:
        raise UserError(
            f"the encoder {spec!r} is built with Hugging Face transformers, which cannot be imported "
            f"({type(err).__name__}: {err}); {install_command('encoders')}"
        ) from None
    return transformers


# config.json's model_type -> (transformers class, default mean, std, prefix tokens from the config)
def _architectures(transformers) -> dict:
    def registers(config):
        return 1 + int(getattr(config, "num_register_tokens", 0) or 0)

    return {
        "dinov2": (transformers.Dinov2Model, IMAGENET_MEAN, IMAGENET_STD, lambda c: 1),
        "dinov2_with_registers": (transformers.Dinov2WithRegistersModel, IMAGENET_MEAN, IMAGENET_STD, registers),
        "dinov3_vit": (transformers.DINOv3ViTModel, IMAGENET_MEAN, IMAGENET_STD, registers),
        "clip": (transformers.CLIPVisionModelWithProjection, CLIP_MEAN, CLIP_STD, lambda c: 1),
        "clip_vision_model": (transformers.CLIPVisionModelWithProjection, CLIP_MEAN, CLIP_STD, lambda c: 1),
        "siglip": (transformers.SiglipVisionModel, SIGLIP_MEAN, SIGLIP_STD, lambda c: 0),
        "siglip_vision_model": (transformers.SiglipVisionModel, SIGLIP_MEAN, SIGLIP_STD, lambda c: 0),
        "convnextv2": (transformers.ConvNextV2Model, IMAGENET_MEAN, IMAGENET_STD, lambda c: 0),
        "vit_mae": (transformers.ViTMAEModel, IMAGENET_MEAN, IMAGENET_STD, lambda c: 1),
    }


def load_pretrained_model(name: str, folder: Path) -> tuple[nn.Module, str]:
    """The float32 transformers model in `folder` (config.json + model.safetensors) and its model_type,
    every weight of the architecture present and of its shape (a UserError naming the file otherwise).
    `name` is what messages call it. Also the loader of RAE's frozen encoder (`fastdit.rae.encoder`)."""
    transformers = _import_transformers(name)
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {str(folder / CONFIG_FILE)!r} for {name} ({err}); delete it to fetch it again") from None
    model_type = config.get("model_type")
    architectures = _architectures(transformers)
    if model_type not in architectures:
        raise UserError(
            f"{name}'s {CONFIG_FILE} describes a {model_type!r} model; fastdit's encoders are "
            f"{', '.join(sorted(architectures))}"
        )
    model_class = architectures[model_type][0]
    _check_safetensors(folder / WEIGHTS_FILE, name)
    options = {}
    if model_type == "clip":  # a whole CLIP repository: its vision tower, with the joint space's width
        options["config"] = transformers.CLIPVisionConfig(
            **{**config.get("vision_config", {}), "projection_dim": config.get("projection_dim", 512)})
    try:
        with _quiet(transformers):
            model, info = model_class.from_pretrained(str(folder), output_loading_info=True, dtype=torch.float32,
                                                      **options)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        reason = " ".join(str(err).split())
        raise UserError(f"{str(folder)!r} does not fit {name} ({model_type}): {reason[:300]}") from None
    problems = [f"{kind} {', '.join(sorted(keys)[:2])}" for kind, keys in
                (("missing", info.get("missing_keys")), ("misshapen", info.get("mismatched_keys"))) if keys]
    if problems:
        raise UserError(f"{str(folder / WEIGHTS_FILE)!r} does not fit {name} ({model_type}): {'; '.join(problems)}; "
                        "pass the weights of that model")
    return model.eval(), model_type


def _transformers_encoder(name: str, folder: Path, device, resolution: int | None) -> FrozenEncoder:
    model, model_type = load_pretrained_model(name, folder)
    _, default_mean, default_std, prefix_tokens = _architectures(_import_transformers(name))[model_type]
    entry = ENCODERS.get(name)
    native = _native_side(model.config, model_type)
    resolution = int(resolution or (entry.resolution if entry else None) or native)
    backbone = _HFBackbone(model, model_type)
    backbone.fit_position_grid(resolution)
    backbone.to(device)
    return FrozenEncoder(
        backbone,
        resolution=resolution,
        mean=entry.mean if entry else default_mean,
        std=entry.std if entry else default_std,
        num_prefix_tokens=prefix_tokens(model.config),
        name=name,
    )


@contextlib.contextmanager
def _quiet(transformers):
    """No progress bar nor load report from transformers while an encoder is built (fastdit reports
    what matters itself: a missing or misshapen tensor is an error); the caller's settings come back."""
    logging = transformers.utils.logging
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(verbosity)
        if bars:
            logging.enable_progress_bar()


# Integer tensors a vision model may hold (index tables, counters), which are no weights.
_INDEX_TENSORS = ("position_ids", "num_batches_tracked")


def _check_safetensors(path: Path, name: str) -> None:
    """A readable safetensors file whose weights are floating point: transformers casts whatever the file
    holds to the model's float32, so integer weights (a quantised or converted file) would load silently
    as other numbers (`fastdit.state_dicts.check_weight_values` refuses them in checkpoints alike)."""
    from safetensors import SafetensorError, safe_open

    from .io import check_regular_file

    check_regular_file(path, f"the weights of {name}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            dtypes = {key: handle.get_slice(key).get_dtype() for key in handle.keys()}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"cannot read {str(path)!r} as safetensors for {name} ({err}); delete it to download it again, "
            "or pass a complete file"
        ) from None
    floats = ("F16", "BF16", "F32", "F64")
    wrong = sorted(key for key, dtype in dtypes.items() if dtype not in floats and not key.endswith(_INDEX_TENSORS))
    if wrong:
        raise UserError(
            f"{str(path)!r} holds {dtypes[wrong[0]]} values in {wrong[0]!r}"
            + (f" and {len(wrong) - 1} more tensor(s)" if len(wrong) > 1 else "")
            + f"; {name}'s weights are floating point: pass the original (unquantised) weights"
        )


def _native_side(config, model_type: str) -> int:
    return int(getattr(config, "image_size", 0) or 224)


class _HFBackbone(nn.Module):
    """A transformers vision model as `FrozenEncoder` sees it: normalised images -> all tokens (N, P + T, D)
    after the final norm (a feature map (N, D, h, w) for ConvNeXt), and `pooled` for the image features."""

    def __init__(self, model: nn.Module, model_type: str):
        super().__init__()
        self.model = model.eval()
        self.model_type = model_type
        if model_type == "vit_mae":
            # All patches kept (MAE's encoder on the whole image): no masking, and no shuffle either, so
            # the tokens come back in grid order (the noise argument decides the order; see `_run`).
            self.model.config.mask_ratio = 0.0

    def _run(self, x: torch.Tensor):
        if self.model_type == "vit_mae":
            patch = self.model.config.patch_size
            count = (x.shape[-2] // patch) * (x.shape[-1] // patch)
            noise = torch.arange(count, device=x.device, dtype=x.dtype).expand(len(x), -1)  # argsort = identity
            return self.model(pixel_values=x, noise=noise)
        return self.model(pixel_values=x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output = self._run(x)
        if self.model_type in ("clip", "clip_vision_model"):
            # CLIP's last_hidden_state precedes its final norm (post_layernorm), which the others include.
            return self.model.vision_model.post_layernorm(output.last_hidden_state)
        return output.last_hidden_state

    def pooled(self, x: torch.Tensor, kind: str = "pooled") -> torch.Tensor:
        output = self._run(x)
        if self.model_type in ("clip", "clip_vision_model"):
            if kind == "projected":
                return output.image_embeds  # visual_projection(post_layernorm(class token))
            return self.model.vision_model.post_layernorm(output.last_hidden_state[:, 0])
        if kind != "pooled":
            raise UserError(f"a {self.model_type} encoder has no {kind} embedding (only CLIP has one)")
        if self.model_type in ("siglip", "siglip_vision_model"):
            return output.pooler_output  # the attention-pool head (MAP) over the normed tokens
        if self.model_type == "convnextv2":
            # timm's forward_features (stages, no head norm) averaged over the map: what FDr6 reads.
            return output.last_hidden_state.mean(dim=(2, 3))
        return output.last_hidden_state[:, 0]  # the class token after the final norm

    def fit_position_grid(self, side: int) -> None:
        """Resample a learned position grid to `side` px once (bicubic, antialiased, as timm and REPA)."""
        patch = getattr(self.model.config, "patch_size", None)
        if self.model_type in ("dinov3_vit", "convnextv2") or not patch:
            return  # RoPE / convolutions: any size
        grid = side // patch
        if self.model_type in ("dinov2", "dinov2_with_registers", "vit_mae"):
            embeddings = self.model.embeddings
            old = embeddings.position_embeddings.data  # (1, 1 + g*g, D)
            new = torch.cat([old[:, :1], _resample_grid(old[:, 1:], grid)], dim=1)
            if new.shape != old.shape or not torch.equal(new, old):
                embeddings.position_embeddings = nn.Parameter(new, requires_grad=False)
            if self.model_type == "vit_mae":  # MAE checks the input size against these
                embeddings.image_size = embeddings.patch_embeddings.image_size = (side, side)
                embeddings.patch_embeddings.num_patches = grid * grid
                self.model.config.image_size = side
            return
        embeddings = getattr(self.model, "vision_model", self.model).embeddings
        prefix = 1 if self.model_type in ("clip", "clip_vision_model") else 0
        embeddings.image_size = side  # CLIP checks the input size against it
        old = embeddings.position_embedding.weight.data[None]  # (1, P + g*g, D)
        if old.shape[1] == prefix + grid * grid:
            return
        new = torch.cat([old[:, :prefix], _resample_grid(old[:, prefix:], grid)], dim=1)[0]
        embeddings.position_embedding = nn.Embedding.from_pretrained(new, freeze=True)
        embeddings.num_patches = grid * grid
        embeddings.num_positions = len(new)
        embeddings.register_buffer("position_ids", torch.arange(len(new), device=new.device)[None], persistent=False)


def _resample_grid(tokens: torch.Tensor, side: int) -> torch.Tensor:
    """(1, g*g, D) position embeddings -> (1, side*side, D), bicubic with antialiasing (timm's
    `resample_abs_pos_embed` defaults), computed in float32."""
    old = math.isqrt(tokens.shape[1])
    if old == side:
        return tokens
    dim = tokens.shape[-1]
    grid = tokens.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, side * side, dim).to(tokens.dtype)


# --- TorchScript ----------------------------------------------------------------------------------------


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
    if recorded is not None:
        check_resolution(recorded, f"{str(path)!r}'s attribute `resolution`")
    resolution = resolution or recorded or TORCHSCRIPT_RESOLUTION
    prefix = getattr(module, "num_prefix_tokens", 0)
    if isinstance(prefix, bool) or not isinstance(prefix, int) or not 0 <= prefix <= 4096:
        raise UserError(f"{str(path)!r} has num_prefix_tokens = {prefix!r}; it must be an int >= 0 (at most 4096)")
    # A scripted module runs its weights as they are: an integer one (a quantised copy) would meet float
    # images in the probe, or compute other numbers; refused as in safetensors files.
    for key, tensor in module.named_parameters():
        if not tensor.is_floating_point():
            raise UserError(f"{str(path)!r} holds {str(tensor.dtype).replace('torch.', '')} weights in {key!r}; an "
                            "encoder's weights are floating point: save the original (unquantised) module")
    return FrozenEncoder(module, resolution=resolution, num_prefix_tokens=prefix, name=os.fspath(path))


__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "DEFAULT_ENCODER",
    "ENCODERS",
    "EncoderEntry",
    "FrozenEncoder",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SIGLIP_MEAN",
    "SIGLIP_STD",
    "load_encoder",
    "load_pretrained_model",
    "tokens_to_grid",
]
