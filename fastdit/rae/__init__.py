"""Representation autoencoders (RAE; Zheng, Ma, Tong & Xie 2025, arXiv:2510.11690): a frozen representation
encoder's patch tokens as the diffusion model's latent space, decoded to pixels by a trained ViT decoder.

* `decoder.py`: the ViT decoder in the layout of RAE's released weights."""

from .decoder import DECODER_PRESETS, RAEDecoder, RAEDecoderConfig, decoder_config, noise_augment

__all__ = ["DECODER_PRESETS", "RAEDecoder", "RAEDecoderConfig", "decoder_config", "noise_augment"]
