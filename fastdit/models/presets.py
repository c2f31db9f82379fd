"""Named DiT sizes (DiT paper, Table 1) crossed with patch sizes 2/4/8, plus a tiny size; and the
DiT^DH sizes (RAE: Zheng et al. 2025), each DiT size with RAE's DDT head.

`DiT-XL/2` is XL with patch 2. `DiTDH-XL` is XL's 28 blocks of width 1152 with a head of 2 blocks of
width 2048 (16 heads), patch 1 on RAE's 16×16 tokens of 768 channels (DINOv2-B at 256 px). The tables
are the single source: the twelve official names, the DiT^DH names and the tiny ones come from them.
"""

from __future__ import annotations

import torch.nn as nn

from .ddt import DiTDH
from .dit import DiT, DiTConfig
from ..errors import UserError

# size -> (depth, hidden_size, num_heads)
SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    # Not in the paper: for tests and the CPU digits demo (pixel space, 8x8 images).
    "T": (6, 128, 4),
}
PATCH_SIZES = (2, 4, 8)
PRESETS = {f"DiT-{size}/{patch}": (size, patch) for size in SIZES for patch in PATCH_SIZES}
# Every block option on, as in LightningDiT (Yao et al. 2025): build_model("DiT-T/2", **LIGHTNINGDIT_BLOCKS).
LIGHTNINGDIT_BLOCKS = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=True)

# DiT^DH: size -> the DDT head (head_depth, head_hidden_size, head_num_heads) after that DiT size. RAE's
# configs (configs/stage2/training/ImageNet256/DiTDH-{S,XL}_DINOv2-B.yaml) give S and XL a head of 2 blocks of
# width 2048 with 16 heads; B and L take the same head (RAE releases configs of S and XL only). T is for
# tests and CPU demos.
HEADS = {"S": (2, 2048, 16), "B": (2, 2048, 16), "L": (2, 2048, 16), "XL": (2, 2048, 16), "T": (2, 256, 4)}
DITDH_PRESETS = {f"DiTDH-{size}": size for size in HEADS}
# RAE's DiT^DH blocks (the configs' use_rmsnorm, use_swiglu, use_rope on, use_qknorm off), its velocity
# output alone (out_channels = in_channels), and its latents: 16x16 tokens of 768 channels, patch 1.
DITDH_DEFAULTS = dict(norm="rmsnorm", mlp="swiglu", rope=True, qk_norm=False, learn_sigma=False, patch_size=1,
                      input_size=16, in_channels=768)
MODEL_NAMES = (*PRESETS, *DITDH_PRESETS)


def config_from_name(name: str, **overrides) -> DiTConfig:
    """`DiTConfig` for a preset name (accepts `DiT-XL/2` and the file-name form `DiT-XL-2`; `SiT-XL/2`
    names the same network, which SiT trains as a flow; `DiTDH-XL` a DiT^DH, whose defaults are RAE's)."""
    if name in DITDH_PRESETS:
        size = DITDH_PRESETS[name]
        head_depth, head_hidden, head_heads = HEADS[size]
        fields = dict(**_size_fields(size), head_depth=head_depth, head_hidden_size=head_hidden,
                      head_num_heads=head_heads, **DITDH_DEFAULTS)
    else:
        if name.startswith("SiT-"):
            name = "DiT-" + name[len("SiT-"):]
        canonical = f"DiT-{name.replace('DiT-', '').replace('-', '/')}"
        if canonical not in PRESETS:
            raise UserError(f"unknown model {name!r}; choose one of: {', '.join(MODEL_NAMES)}")
        size, patch = PRESETS[canonical]
        fields = dict(**_size_fields(size), patch_size=patch)
    unknown = set(overrides) - set(DiTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(DiTConfig.__dataclass_fields__)}")
    fields.update(overrides)
    return DiTConfig(**fields)


def _size_fields(size: str) -> dict:
    depth, hidden, heads = SIZES[size]
    return dict(depth=depth, hidden_size=hidden, num_heads=heads)


def build_from_config(config: DiTConfig) -> nn.Module:
    """The network a config describes: a `DiT`, or a `DiTDH` when it has a DDT head."""
    return DiTDH(config) if config.has_head else DiT(config)


def build_model(name: str = "DiT-XL/2", **overrides) -> nn.Module:
    """Build a DiT (or DiT^DH) by preset name, e.g. `build_model("DiT-XL/2", input_size=32, num_classes=1000)`."""
    return build_from_config(config_from_name(name, **overrides))


def preset_of(config: DiTConfig) -> str | None:
    """The preset name whose size, patch and head match `config`, if any (a DiT^DH: its size and head,
    at any patch size)."""
    body = (config.depth, config.hidden_size, config.num_heads)
    if config.has_head:
        head = (config.head_depth, config.head_hidden_size, config.head_num_heads)
        return next((name for name, size in DITDH_PRESETS.items() if SIZES[size] == body and HEADS[size] == head), None)
    for name, (size, patch) in PRESETS.items():
        if SIZES[size] == body and patch == config.patch_size:
            return name
    return None
