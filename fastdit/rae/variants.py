"""RAE's released latent spaces: which encoder, at which input size, which decoder, which statistics.

The files are those RAE's configs name (configs/stage1/pretrained/DINOv2-B.yaml and DINOv2-B_512.yaml),
in the Hugging Face repository `nyu-visionx/RAE-collections` that RAE's README downloads with
`hf download nyu-visionx/RAE-collections --local-dir models`. The encoder is DINOv2-B with registers
(`facebook/dinov2-with-registers-base`, fastdit's encoder name `dinov2-vitb14-reg`), frozen; RAE trained
only the decoders, with noise augmentation tau = 0.8 ("n08" in their names).
"""

from __future__ import annotations

from dataclasses import dataclass

# The epsilon RAE adds to the variance before its square root (stage1/rae.py, `eps=1e-5`).
STATS_EPS = 1e-5


@dataclass(frozen=True)
class RAEVariant:
    """One released RAE latent space.

    Latents are (latent_dim, grid, grid) with grid = encoder_input_size / 14 (DINOv2's patch), decoded
    to images of side grid * decoder patch (16)."""

    encoder: str  # a name in fastdit.encoders.ENCODERS
    encoder_input_size: int  # RAE resizes every image to this side (bicubic) before the encoder
    decoder: str  # a preset in fastdit.rae.decoder.DECODER_PRESETS
    decoder_file: str  # path in nyu-visionx/RAE-collections: the decoder's state dict (torch.save, RAE's key layout)
    stats_file: str  # path in nyu-visionx/RAE-collections: {"mean": ..., "var": ...} of the encoder's tokens on ImageNet
    image_size: int
    latent_dim: int = 768  # DINOv2-B's width
    encoder_patch: int = 14
    decoder_patch: int = 16

    @property
    def grid_size(self) -> int:
        return self.encoder_input_size // self.encoder_patch


RAE_VARIANTS = {
    # 256 px: 224-px encoder input, 16x16 tokens (configs/stage1/pretrained/DINOv2-B.yaml).
    "dinov2-b-reg": RAEVariant(
        encoder="dinov2-vitb14-reg", encoder_input_size=224, decoder="ViT-XL",
        decoder_file="decoders/dinov2/wReg_base/ViTXL_n08/model.pt",
        stats_file="stats/dinov2/wReg_base/imagenet1k/stat.pt", image_size=256),
    # 512 px: 448-px encoder input, 32x32 tokens, its own decoder and statistics (DINOv2-B_512.yaml).
    "dinov2-b-reg-512": RAEVariant(
        encoder="dinov2-vitb14-reg", encoder_input_size=448, decoder="ViT-XL",
        decoder_file="decoders/dinov2/wReg_base/ViTXL_n08_i512/model.pt",
        stats_file="stats/dinov2/wReg_base/imagenet1k_512/stat.pt", image_size=512),
}
