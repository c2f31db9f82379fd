"""RAE's discriminator: a frozen DINO ViT-S/8 read at five depths, each read by a small trained head.

RAE (arXiv:2510.11690, section 3 and appendix; `src/disc/dinodisc.py`) trains its decoder against the
discriminator of StyleGAN-T (Sauer et al. 2023): a frozen self-supervised ViT whose token features are
scored by trainable 1-D convolutional heads, one score per token and head.

* Backbone: DINO ViT-S/8 (Caron et al. 2021; 384 wide, 12 blocks, 6 heads, MLP 1536, patch 8). Images in
  [-1, 1] are resized to `input_size` (224 as RAE, whatever the training resolution: bilinear, no
  antialiasing) and normalised with the ImageNet mean and std. The MLPs use the tanh approximation of GELU
  (RAE's `MLPNoDrop`); the position table (28 x 28 at 224 px) is resampled bilinearly when the grid
  differs. The key part of every qkv bias is zeroed when loading, as RAE does (a constant added to all
  keys of a query does not change its softmax). Features: the patch tokens after blocks 2, 5, 8 and 11
  and, first, after the last block (before the final norm, which is never applied), each (N, 384, L).
* Heads (trained), one per feature: a pointwise conv block, a residual block with a `kernel_size`-wide
  circular conv ((f(h) + h) / sqrt 2), then a pointwise conv to one channel. Every conv carries spectral
  normalisation (Miyato et al. 2018; one power iteration per forward in training mode, none in eval
  mode, as `torch.nn.utils.spectral_norm`), each conv block a per-sample normalisation over the tokens
  (RAE's `BatchNormLocal` with one sample per group, eps 1e-6, affine) and LeakyReLU(0.2).
* Logits: every head's per-token scores, concatenated: (N, 5 L).

`Discriminator(backbone, heads)(images) -> logits`; only `heads` is trained and checkpointed. The
backbone's weights are the DINO layout (`cls_token`, `pos_embed`, `patch_embed.proj`, `blocks.{i}.norm1`,
`.attn.qkv`, `.attn.proj`, `.norm2`, `.mlp.fc1`, `.mlp.fc2`, `norm`), loaded with strict keys.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..rae.decoder import IMAGENET_MEAN, IMAGENET_STD
from .weights import DINO_DISC_FILE, DINO_DISC_SUBDIR, DINO_DISC_URL, fetch, load_exactly, read_state_dict

# RAE's recipe "S_8" (dinodisc.py `recipes`): ViT-S/8, features after blocks 2, 5, 8, 11.
WIDTH, DEPTH, HEADS, MLP_RATIO, PATCH = 384, 12, 6, 4.0, 8
KEY_DEPTHS = (2, 5, 8, 11)
TRAINED_SIDE = 224  # the side DINO's position table was made for (28 x 28 patches of 8 px)
NORM_EPS = 1e-6  # the backbone's LayerNorms and the heads' normalisation (RAE's norm_eps)
LEAKY_SLOPE = 0.2


class _DinoAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(WIDTH, 3 * WIDTH)
        self.proj = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).view(n, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)  # each (N, H, T, d/H)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d))


class _DinoMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(WIDTH, int(WIDTH * MLP_RATIO))
        self.fc2 = nn.Linear(int(WIDTH * MLP_RATIO), WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # RAE's MLPNoDrop: GELU(approximate='tanh')


class _DinoBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(WIDTH, eps=NORM_EPS)
        self.attn = _DinoAttention()
        self.norm2 = nn.LayerNorm(WIDTH, eps=NORM_EPS)
        self.mlp = _DinoMLP()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, WIDTH, kernel_size=PATCH, stride=PATCH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, T, D)


class DinoBackbone(nn.Module):
    """The frozen DINO ViT-S/8: images in [-1, 1] (N, 3, H, W) -> features [last, block 2, 5, 8, 11],
    each (N, 384, L) with L = (input_size / 8)**2."""

    def __init__(self, input_size: int = TRAINED_SIDE):
        super().__init__()
        if input_size < PATCH or input_size % PATCH:
            raise ValueError(f"the DINO discriminator reads images of a multiple of {PATCH} px, got {input_size}")
        self.input_size = input_size
        self.patch_embed = _PatchEmbed()
        grid = TRAINED_SIDE // PATCH
        self.cls_token = nn.Parameter(torch.zeros(1, 1, WIDTH))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, WIDTH))
        self.blocks = nn.ModuleList(_DinoBlock() for _ in range(DEPTH))
        self.norm = nn.LayerNorm(WIDTH, eps=NORM_EPS)  # in the file; RAE reads the features before it
        # [-1, 1] -> ImageNet-normalised in one affine map: ((x + 1) / 2 - mean) / std = x (0.5 / std) + (0.5 - mean) / std
        mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
        self.register_buffer("x_scale", (0.5 / std).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("x_shift", ((0.5 - mean) / std).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DinoBackbone":
        return super().train(False)  # frozen

    def position_table(self, side: int) -> torch.Tensor:
        """(1, 1 + side*side, D): the trained 28 x 28 table resampled bilinearly to side x side (RAE's
        `inter_pos_embed`), the class token's row kept."""
        grid = TRAINED_SIDE // PATCH
        if side == grid:
            return self.pos_embed
        table = self.pos_embed[0, 1:].reshape(1, grid, grid, WIDTH).permute(0, 3, 1, 2)  # (1, D, g, g)
        table = F.interpolate(table, size=(side, side), mode="bilinear", align_corners=False)
        return torch.cat([self.pos_embed[:, :1], table.permute(0, 2, 3, 1).reshape(1, side * side, WIDTH)], dim=1)

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = F.interpolate(images, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = self.patch_embed(x * self.x_scale + self.x_shift)  # (N, L, D)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], dim=1)
        x = x + self.position_table(self.input_size // PATCH)
        features = []
        for depth, block in enumerate(self.blocks):
            x = block(x)
            if depth in KEY_DEPTHS:
                features.append(x[:, 1:].transpose(1, 2))  # (N, D, L): channels first for the 1-D convs
        return [x[:, 1:].transpose(1, 2), *features]


def load_dino_state(backbone: DinoBackbone, path: Path) -> None:
    """The DINO ViT-S/8 file into `backbone`, strictly; then RAE's zeroed key biases."""
    state = read_state_dict(path, "DINO discriminator backbone")
    load_exactly(backbone, state, path, "DINO discriminator backbone")
    with torch.no_grad():
        for block in backbone.blocks:
            block.attn.qkv.bias[WIDTH:2 * WIDTH].zero_()


class LocalNorm(nn.Module):
    """Each sample's channels standardised over its tokens (RAE's `BatchNormLocal` with groups of one
    sample), then an affine map; computed in float32 whatever the autocast."""

    def __init__(self, channels: int, eps: float = NORM_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()  # (N, C, L)
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight[:, None] + self.bias[:, None]


def _spectral_conv(channels_in: int, channels_out: int, kernel_size: int) -> nn.Conv1d:
    conv = nn.Conv1d(channels_in, channels_out, kernel_size, padding=kernel_size // 2, padding_mode="circular")
    return nn.utils.spectral_norm(conv, n_power_iterations=1, eps=1e-12, dim=0)


class _ConvBlock(nn.Module):
    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.conv = _spectral_conv(channels, channels, kernel_size)
        self.norm = LocalNorm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.norm(self.conv(x)), LEAKY_SLOPE)


class DiscriminatorHead(nn.Module):
    """(N, D, L) features -> (N, L) scores."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.pointwise = _ConvBlock(channels, 1)
        self.residual = _ConvBlock(channels, kernel_size)
        self.out = _spectral_conv(channels, 1, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = self.pointwise(features)
        h = (self.residual(h) + h) * (1 / math.sqrt(2))  # RAE's ResidualBlock: the sum scaled to unit variance
        return self.out(h)[:, 0]


class DiscriminatorHeads(nn.Module):
    """The trained part: one head per backbone feature (the last block's, then blocks 2, 5, 8, 11)."""

    def __init__(self, kernel_size: int = 9):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"the discriminator's kernel size must be odd and >= 1, got {kernel_size}")
        self.heads = nn.ModuleList(DiscriminatorHead(WIDTH, kernel_size) for _ in range(1 + len(KEY_DEPTHS)))

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([head(f) for head, f in zip(self.heads, features)], dim=1)  # (N, 5 L)


class Discriminator(nn.Module):
    """Images in [-1, 1] (N, C, H, W), C = 1 or 3 -> logits (N, 5 L). `heads` is what trains."""

    def __init__(self, backbone: DinoBackbone, heads: DiscriminatorHeads):
        super().__init__()
        self.backbone = backbone
        self.heads = heads

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return self.heads(self.backbone(images))


def build_discriminator(*, input_size: int = TRAINED_SIDE, kernel_size: int = 9, backbone_path: Path | None = None,
                        progress: bool = True) -> Discriminator:
    """RAE's discriminator with the DINO ViT-S/8 weights (fetched into the cache unless a path is given)
    and freshly initialised heads (PyTorch's defaults and spectral norm's random vectors: draw them under
    the run's seed)."""
    path = backbone_path or fetch(DINO_DISC_URL, DINO_DISC_FILE, DINO_DISC_SUBDIR, progress=progress)
    backbone = DinoBackbone(input_size)
    load_dino_state(backbone, path)
    return Discriminator(backbone, DiscriminatorHeads(kernel_size))


def random_dino_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the DINO ViT-S/8 layout (a stand-in for tests and offline checks): LayerNorms
    near 1, matrices N(0, 1/fan_in), the rest small."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in DinoBackbone().state_dict().items():
        draw = torch.randn(value.shape, generator=generator)
        if "norm" in key and key.endswith("weight"):
            state[key] = 1 + 0.1 * draw
        elif value.ndim >= 2 and key.endswith("weight"):
            state[key] = draw / value[0].numel() ** 0.5
        else:
            state[key] = 0.02 * draw
    return state
