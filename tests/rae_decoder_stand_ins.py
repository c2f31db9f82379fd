"""Portable random weights for the decoder-training networks (LPIPS's VGG16 and heads, the DINO ViT-S/8
discriminator backbone and heads, RAE's decoder): the recipe shared by `tests/fixtures/rae-decoder/
make_fixtures.py` (which runs RAE's code with them) and the tests (which run fastdit's).

Each tensor is drawn by numpy's PCG64 seeded with `seed + crc32(key)` in float64 and cast to float32, so
it is the same on every CPU whatever torch's kernels (torch.randn's float32 values are not). By key:

  *norm*.weight (LayerNorm, the heads' local norm)   1 + 0.1 N(0, 1)
  *.weight_u, *.weight_v (spectral norm's vectors)   N(0, 1) scaled to unit length
  lin*.weight (LPIPS heads)                          |N(0, 1)| / channels (LPIPS's heads are non-negative)
  other tensors of >= 2 dims                         N(0, 1) / sqrt(fan_in)
  the rest (biases, tokens, position tables)         0.02 N(0, 1)

Only numpy and torch are imported here (the fixture script runs it in RAE's environment).
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def recipe_tensor(key: str, shape, seed: int = 0) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed + zlib.crc32(key.encode("utf-8"))))
    draw = rng.standard_normal(tuple(shape))
    name = key.rsplit(".", 1)[-1]
    if name in ("weight_u", "weight_v"):
        value = draw / np.linalg.norm(draw)
    elif "norm" in key and name == "weight":
        value = 1 + 0.1 * draw
    elif key.split(".")[0].startswith("lin") and name == "weight":
        value = np.abs(draw) / shape[1]
    elif len(shape) >= 2:
        value = draw / np.sqrt(np.prod(shape[1:]))
    else:
        value = 0.02 * draw
    return torch.from_numpy(np.asarray(value)).float()


def recipe_state(shapes: dict, seed: int = 0, keep: dict | None = None) -> dict[str, torch.Tensor]:
    """{key: recipe_tensor(key, shape, seed)} for `shapes` ({key: shape}); `keep` ({key: tensor}) as given."""
    keep = keep or {}
    return {key: keep[key].clone() if key in keep else recipe_tensor(key, shape, seed) for key, shape in shapes.items()}


# torchvision's VGG16 `features`: (index, in, out) of each 3x3 convolution.
VGG16_CONVS = ((0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
               (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512))
LPIPS_CHANNELS = (64, 128, 256, 512, 512)


def vgg16_file_shapes() -> dict:
    """The `features.*` entries of torchvision's vgg16-397923af.pth."""
    shapes = {}
    for index, c_in, c_out in VGG16_CONVS:
        shapes[f"features.{index}.weight"] = (c_out, c_in, 3, 3)
        shapes[f"features.{index}.bias"] = (c_out,)
    return shapes


def lpips_lin_file_shapes() -> dict:
    """The entries of LPIPS's vgg.pth."""
    return {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}


def dino_s8_file_shapes(depth: int = 12, width: int = 384, mlp: int = 1536, grid: int = 28) -> dict:
    """The entries of RAE's dino_vit_small_patch8_224.pth (DINO ViT-S/8)."""
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, 1 + grid * grid, width),
              "patch_embed.proj.weight": (width, 3, 8, 8), "patch_embed.proj.bias": (width,)}
    for i in range(depth):
        shapes.update({
            f"blocks.{i}.norm1.weight": (width,), f"blocks.{i}.norm1.bias": (width,),
            f"blocks.{i}.attn.qkv.weight": (3 * width, width), f"blocks.{i}.attn.qkv.bias": (3 * width,),
            f"blocks.{i}.attn.proj.weight": (width, width), f"blocks.{i}.attn.proj.bias": (width,),
            f"blocks.{i}.norm2.weight": (width,), f"blocks.{i}.norm2.bias": (width,),
            f"blocks.{i}.mlp.fc1.weight": (mlp, width), f"blocks.{i}.mlp.fc1.bias": (mlp,),
            f"blocks.{i}.mlp.fc2.weight": (width, mlp), f"blocks.{i}.mlp.fc2.bias": (width,),
        })
    shapes.update({"norm.weight": (width,), "norm.bias": (width,)})
    return shapes


# RAE's discriminator head parameters (dinodisc.py: heads.{i} = Sequential(block k=1, ResidualBlock(block k=ks),
# spectral Conv1d(C, 1, 1)); each block = Sequential(spectral Conv1d, BatchNormLocal, LeakyReLU)) and the names
# fastdit gives them (fastdit.decoder_training.discriminator.DiscriminatorHeads).
HEAD_PARTS = {"0.0": "pointwise.conv", "0.1": "pointwise.norm", "1.fn.0": "residual.conv", "1.fn.1": "residual.norm",
              "2": "out"}


def rae_head_key_to_fastdit(key: str) -> str:
    """`heads.3.1.fn.0.weight_orig` -> `heads.3.residual.conv.weight_orig`."""
    _, index, rest = key.split(".", 2)
    for theirs, ours in HEAD_PARTS.items():
        if rest.startswith(theirs + "."):
            return f"heads.{index}.{ours}.{rest[len(theirs) + 1:]}"
    raise KeyError(key)
