from .dit import BLOCK_OPTIONS, MLPS, NORMS, SCALAR_CONDITIONS, DiT, DiTConfig, get_2d_sincos_pos_embed
from .presets import LIGHTNINGDIT_BLOCKS, PRESETS, build_model, config_from_name, preset_of

__all__ = [
    "BLOCK_OPTIONS",
    "MLPS",
    "NORMS",
    "SCALAR_CONDITIONS",
    "DiT",
    "DiTConfig",
    "LIGHTNINGDIT_BLOCKS",
    "PRESETS",
    "build_model",
    "config_from_name",
    "get_2d_sincos_pos_embed",
    "preset_of",
]
