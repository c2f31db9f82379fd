"""The ViT pixel decoder of a representation autoencoder (RAE).

RAE (Zheng, Ma, Tong & Xie 2025, "Diffusion Transformers with Representation Autoencoders",
arXiv:2510.11690, section 3) keeps a pretrained representation encoder (DINOv2-B with registers) frozen
and trains only a ViT decoder that maps its patch tokens back to pixels. The decoder is MAE's decoder
(He et al. 2022) without the mask tokens: a linear embedding of every token, fixed 2-D sin-cos position
embeddings, a learned class token in front, pre-norm ViT blocks, a final LayerNorm and a linear head that
predicts each token's p x p x 3 pixels. It reads tokens on a 16x16 grid at 256 px (32x32 at 512 px) and
upsamples each to a 16x16 pixel patch, so the image side is 16 x the grid side.

The parameter names are those of RAE's `GeneralDecoder` (which keeps transformers' ViTMAE layer names),
so the released `model.pt` files load with `strict=True`:

    decoder_embed.{weight,bias}                       Linear(latent_dim -> hidden_size)
    decoder_pos_embed                                 (1, 1 + grid**2, hidden_size), fixed sin-cos
    trainable_cls_token                               (1, 1, hidden_size)
    decoder_layers.{i}.layernorm_before / _after      LayerNorm(hidden_size)
    decoder_layers.{i}.attention.attention.{query,key,value}
    decoder_layers.{i}.attention.output.dense
    decoder_layers.{i}.intermediate.dense             Linear(hidden_size -> mlp_size), exact GELU after
    decoder_layers.{i}.output.dense                   Linear(mlp_size -> hidden_size)
    decoder_norm                                      LayerNorm(hidden_size)
    decoder_pred                                      Linear(hidden_size -> patch_size**2 * 3)

API (kept stable: the decoder training of `fastdit train-decoder` builds on it)
-----------------------------------------------------------------------------
``RAEDecoderConfig(latent_dim=768, hidden_size=1152, depth=28, num_heads=16, mlp_size=4096,
patch_size=16, grid_size=16, channels=3, layer_norm_eps=1e-12, pixel_mean=IMAGENET_MEAN,
pixel_std=IMAGENET_STD)``; ``decoder_config(name, latent_dim=768, grid_size=16)`` builds one from a
preset in ``DECODER_PRESETS`` ("ViT-B", "ViT-L", "ViT-XL": RAE's configs/decoder/ViT{B,L,XL}).
``config.image_size`` = patch_size * grid_size (256 for the 16x16 grid).

``RAEDecoder(config)``; ``decoder(tokens) -> images``:
    tokens   the encoder's raw patch tokens, NOT the diffusion model's normalised latents: either
             (N, T, latent_dim) with T = grid_size**2 in row-major order, or a grid (N, latent_dim,
             grid_size, grid_size); float32 (or the module's dtype).
    images   (N, channels, image_size, image_size) in fastdit's range [-1, 1] (not clipped: a decoder
             may overshoot). RAE's own decoder output is ImageNet-normalised pixels, which RAE maps to
             [0, 1] with the encoder's mean and std; fastdit goes on to 2 * x - 1.
``decoder.predict_patches(tokens) -> (N, T, patch_size**2 * channels)`` is the head's output before
unpatchify and de-normalisation (RAE's `logits`); ``decoder.unpatchify(patches)`` lays it out as an image.

Fresh weights are PyTorch's default initialisation (as RAE's, which is a plain nn.Module), a zero class
token and the fixed sin-cos table. ``noise_augment(tokens, noise_tau)`` is RAE's training-time noise
on the encoder tokens (section 4.1, "noise-augmented decoding"; tau = 0.8 in its decoder training
config): each sample gets sigma ~ U(0, tau) and z + sigma * eps. Gradient checkpointing, compile and
mixed precision are applied from outside, as for the DiT.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# What DINOv2 normalises pixels with (its preprocessor_config.json: timm's IMAGENET_DEFAULT_MEAN / _STD);
# RAE de-normalises the decoder's output with the same numbers (stage1/rae.py, `decode`).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# RAE's decoder configs (configs/decoder/ViT{B,L,XL}/config.json: decoder_hidden_size,
# decoder_num_hidden_layers, decoder_num_attention_heads, decoder_intermediate_size).
# name -> (hidden_size, depth, num_heads, mlp_size)
DECODER_PRESETS = {
    "ViT-B": (768, 12, 12, 3072),
    "ViT-L": (1024, 24, 16, 4096),
    "ViT-XL": (1152, 28, 16, 4096),
}


@dataclass(frozen=True)
class RAEDecoderConfig:
    """The decoder's shape. Defaults: the ViT-XL decoder on DINOv2-B tokens at 256 px."""

    latent_dim: int = 768  # width of the encoder tokens it reads (RAE's `hidden_size`)
    hidden_size: int = 1152  # RAE's `decoder_hidden_size`
    depth: int = 28
    num_heads: int = 16
    mlp_size: int = 4096  # RAE's `decoder_intermediate_size`
    patch_size: int = 16  # pixels per token side (RAE's `decoder_patch_size`)
    grid_size: int = 16  # tokens per side: 224 px / 14 for DINOv2 at 256 px, 448 / 14 at 512 px
    channels: int = 3
    layer_norm_eps: float = 1e-12  # ViTMAE's default, which RAE's configs keep
    pixel_mean: tuple[float, ...] = IMAGENET_MEAN
    pixel_std: tuple[float, ...] = IMAGENET_STD

    def __post_init__(self):
        for field in ("latent_dim", "hidden_size", "depth", "num_heads", "mlp_size", "patch_size", "grid_size",
                      "channels"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RAEDecoderConfig.{field} must be a positive int, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"RAEDecoderConfig: hidden_size {self.hidden_size} is not divisible by "
                             f"num_heads {self.num_heads}")
        if self.hidden_size % 4:
            raise ValueError(f"RAEDecoderConfig: hidden_size {self.hidden_size} must be divisible by 4 for the "
                             "2-D sin-cos position embedding")
        if len(self.pixel_mean) != self.channels or len(self.pixel_std) != self.channels:
            raise ValueError(f"RAEDecoderConfig: pixel_mean and pixel_std need {self.channels} values each")

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def image_size(self) -> int:
        return self.patch_size * self.grid_size


def output_normalisation(channels: int) -> dict[str, tuple[float, ...]]:
    """The `pixel_mean` / `pixel_std` a decoder of `channels` channels undoes: ImageNet's for RGB (RAE's),
    and for gray images the average of ImageNet's three (a gray image is RGB with three equal channels)."""
    if channels == 3:
        return {"pixel_mean": IMAGENET_MEAN, "pixel_std": IMAGENET_STD}
    return {"pixel_mean": (sum(IMAGENET_MEAN) / 3,) * channels, "pixel_std": (sum(IMAGENET_STD) / 3,) * channels}


def decoder_config(name: str, *, latent_dim: int = 768, grid_size: int = 16, **overrides) -> RAEDecoderConfig:
    """`RAEDecoderConfig` of a preset in `DECODER_PRESETS` ("ViT-B", "ViT-L", "ViT-XL")."""
    if name not in DECODER_PRESETS:
        raise ValueError(f"unknown RAE decoder {name!r}; choose one of: {', '.join(DECODER_PRESETS)}")
    hidden_size, depth, num_heads, mlp_size = DECODER_PRESETS[name]
    fields = dict(latent_dim=latent_dim, grid_size=grid_size, hidden_size=hidden_size, depth=depth,
                  num_heads=num_heads, mlp_size=mlp_size)
    fields.update(overrides)
    return RAEDecoderConfig(**fields)


def sincos_position_table(dim: int, grid_size: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position embeddings with a zero row for the class token: (1 + g*g, dim).

    Token k = row * g + col. MAE (models_mae / pos_embed.py) builds the grid with np.meshgrid(w, h), so the
    first dim/2 channels encode the column and the last dim/2 the row; each half is [sin | cos] of
    position * 10000^(-i / (dim/4)), i < dim/4 (Vaswani et al. 2017). Computed in float64, as MAE's NumPy.
    """
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # (dim/4,)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")  # (g, g) each

    def embed(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.reshape(-1, 1) * omega  # (g*g, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (g*g, dim/2)

    table = torch.cat([embed(cols), embed(rows)], dim=1)  # (g*g, dim)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table], dim=0).float()


class _SelfAttention(nn.Module):
    # Separate query / key / value projections, as ViTMAE (and so RAE's checkpoints) name them.
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(n, t, self.num_heads, d // self.num_heads).transpose(1, 2)  # (N, H, T, d/H)

        out = F.scaled_dot_product_attention(heads(self.query(x)), heads(self.key(x)), heads(self.value(x)))
        return out.transpose(1, 2).reshape(n, t, d)


class _Dense(nn.Module):
    # One Linear under the name `dense`: the nesting ViTMAE's state dict keys spell out.
    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.dense = nn.Linear(in_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(x)


class _Attention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.attention = _SelfAttention(hidden_size, num_heads)
        self.output = _Dense(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.attention(x))


class DecoderBlock(nn.Module):
    """A pre-norm ViT block: x + Attn(LN(x)), then x + MLP(LN(x)) with an exact-GELU MLP."""

    def __init__(self, config: RAEDecoderConfig):
        super().__init__()
        self.attention = _Attention(config.hidden_size, config.num_heads)
        self.intermediate = _Dense(config.hidden_size, config.mlp_size)
        self.output = _Dense(config.mlp_size, config.hidden_size)
        self.layernorm_before = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.layernorm_after = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.layernorm_before(x))
        return x + self.output(F.gelu(self.intermediate(self.layernorm_after(x))))


class RAEDecoder(nn.Module):
    """RAE's ViT decoder: encoder tokens -> images in [-1, 1] (see the module docstring for the API)."""

    def __init__(self, config: RAEDecoderConfig):
        super().__init__()
        self.config = config
        d = config.hidden_size
        self.decoder_embed = nn.Linear(config.latent_dim, d)
        # A Parameter that is never trained (MAE's choice), so it is in the state dict and the checkpoints.
        self.decoder_pos_embed = nn.Parameter(sincos_position_table(d, config.grid_size)[None], requires_grad=False)
        self.decoder_layers = nn.ModuleList(DecoderBlock(config) for _ in range(config.depth))
        self.decoder_norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.decoder_pred = nn.Linear(d, config.patch_size**2 * config.channels)
        self.trainable_cls_token = nn.Parameter(torch.zeros(1, 1, d))
        # Not in the state dict (the released files do not hold them): the pixel normalisation to undo.
        shape = (1, config.channels, 1, 1)
        self.register_buffer("pixel_mean", torch.tensor(config.pixel_mean).view(shape), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.pixel_std).view(shape), persistent=False)

    @property
    def blocks(self) -> nn.ModuleList:
        """The transformer blocks under the name fastdit's training setup wraps from outside (activation
        checkpointing, regional compile: `fastdit.train.setup.prepare_model`); no parameter of its own."""
        return self.decoder_layers

    def _token_sequence(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, C) or a grid (N, C, g, g) -> (N, T, C), checked against the config."""
        c, g = self.config.latent_dim, self.config.grid_size
        if tokens.ndim == 4 and tokens.shape[1:] == (c, g, g):
            return tokens.flatten(2).transpose(1, 2)  # row-major, as the encoder's patch tokens
        if tokens.ndim == 3 and tokens.shape[1:] == (g * g, c):
            return tokens
        raise ValueError(
            f"the RAE decoder takes tokens (N, {g * g}, {c}) or a grid (N, {c}, {g}, {g}), got {tuple(tokens.shape)}"
        )

    def predict_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """(N, T, C) tokens or (N, C, g, g) grid -> per-token pixels (N, T, p*p*channels), normalised."""
        x = self.decoder_embed(self._token_sequence(tokens))  # (N, T, D)
        cls = self.trainable_cls_token.expand(len(x), -1, -1)
        x = torch.cat([cls, x], dim=1) + self.decoder_pos_embed  # (N, 1 + T, D)
        for block in self.decoder_layers:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:]  # (N, T, p*p*channels), class token dropped

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        """(N, g*g, p*p*c) -> (N, c, g*p, g*p); each token's values are ordered (row, col, channel)."""
        n, g, p, c = len(patches), self.config.grid_size, self.config.patch_size, self.config.channels
        x = patches.reshape(n, g, g, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(n, c, g * p, g * p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Encoder tokens (N, T, C) or (N, C, g, g) -> images (N, channels, H, W) in [-1, 1]."""
        normalised = self.unpatchify(self.predict_patches(tokens))
        unit = normalised * self.pixel_std + self.pixel_mean  # RAE's output range, [0, 1]
        return unit * 2 - 1


def noise_augment(tokens: torch.Tensor, noise_tau: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """RAE's noise-augmented decoder training (section 4.1): z + sigma * eps with one sigma ~ U(0, noise_tau)
    per sample, eps ~ N(0, I), applied to the encoder's raw tokens (before any latent normalisation), so
    the decoder learns to read the slightly-off latents a diffusion model samples. tau = 0.8 in RAE."""
    if noise_tau <= 0:
        return tokens
    shape = (len(tokens),) + (1,) * (tokens.ndim - 1)
    sigma = noise_tau * torch.rand(shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    eps = torch.randn(tokens.shape, generator=generator, device=tokens.device, dtype=tokens.dtype)
    return tokens + sigma * eps


__all__ = [
    "DECODER_PRESETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DecoderBlock",
    "RAEDecoder",
    "RAEDecoderConfig",
    "decoder_config",
    "noise_augment",
    "output_normalisation",
    "sincos_position_table",
]
