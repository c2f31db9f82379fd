from .ddt import DiTDH
from .dit import BLOCK_OPTIONS, MLPS, NORMS, SCALAR_CONDITIONS, DiT, DiTConfig, get_2d_sincos_pos_embed
from .presets import (DITDH_PRESETS, LIGHTNINGDIT_BLOCKS, MODEL_NAMES, PRESETS, build_from_config, build_model,
                      config_from_name, preset_of)

__all__ = [
    "BLOCK_OPTIONS",
    "DITDH_PRESETS",
    "MLPS",
    "MODEL_NAMES",
    "NORMS",
    "SCALAR_CONDITIONS",
    "DiT",
    "DiTConfig",
    "DiTDH",
    "LIGHTNINGDIT_BLOCKS",
    "PRESETS",
    "build_from_config",
    "build_model",
    "config_from_name",
    "get_2d_sincos_pos_embed",
    "preset_of",
]
