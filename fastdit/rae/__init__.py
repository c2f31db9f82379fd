"""Representation autoencoders (RAE; Zheng, Ma, Tong & Xie 2025, arXiv:2510.11690): a frozen representation
encoder's patch tokens as the diffusion model's latent space, decoded to pixels by a trained ViT decoder.

* `decoder.py`: the ViT decoder, in the key layout of RAE's released weights;
* `encoder.py`: DINOv2 with registers, read as RAE reads it (resize, normalisation, final norm, tokens);
* `variants.py`: the released spaces and their files;
* `space.py`: `RAELatentSpace` (encode / decode with RAE's latent statistics), names and files.

Importing this package loads no weights; transformers is imported only when an encoder is built.
"""

from .decoder import DECODER_PRESETS, RAEDecoder, RAEDecoderConfig, decoder_config, noise_augment
from .space import RAELatentSpace, describe, is_rae_name, load_rae_space
from .variants import RAE_VARIANTS

__all__ = ["DECODER_PRESETS", "RAE_VARIANTS", "RAEDecoder", "RAEDecoderConfig", "RAELatentSpace", "decoder_config",
           "describe", "is_rae_name", "load_rae_space", "noise_augment"]
