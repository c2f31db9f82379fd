"""Named DiT sizes (DiT paper, Table 1) crossed with patch sizes 2/4/8, plus a tiny size.

`DiT-XL/2` is XL with patch 2. The table is the single source: the twelve official names and the
tiny ones are generated from it.
"""

from __future__ import annotations

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


def config_from_name(name: str, **overrides) -> DiTConfig:
    """`DiTConfig` for a preset name (accepts `DiT-XL/2` and the file-name form `DiT-XL-2`; `SiT-XL/2`
    names the same network, which SiT trains as a flow)."""
    if name.startswith("SiT-"):
        name = "DiT-" + name[len("SiT-"):]
    canonical = name.replace("DiT-", "").replace("-", "/")
    canonical = f"DiT-{canonical}"
    if canonical not in PRESETS:
        raise UserError(f"unknown model {name!r}; choose one of: {', '.join(PRESETS)}")
    size, patch = PRESETS[canonical]
    depth, hidden, heads = SIZES[size]
    fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch)
    unknown = set(overrides) - set(DiTConfig.__dataclass_fields__)
    if unknown:
        raise UserError(f"unknown model option(s) {sorted(unknown)}; valid: {sorted(DiTConfig.__dataclass_fields__)}")
    fields.update(overrides)
    return DiTConfig(**fields)


def build_model(name: str = "DiT-XL/2", **overrides) -> DiT:
    """Build a DiT by preset name, e.g. `build_model("DiT-XL/2", input_size=32, num_classes=1000)`."""
    return DiT(config_from_name(name, **overrides))


def preset_of(config: DiTConfig) -> str | None:
    """The preset name whose size and patch match `config`, if any."""
    for name, (size, patch) in PRESETS.items():
        if SIZES[size] == (config.depth, config.hidden_size, config.num_heads) and patch == config.patch_size:
            return name
    return None
