"""Reproducible noise: every image draws from its own generator seeded by (seed, global index), so an
image does not depend on the batch it was sampled in, nor on the number of processes (EDM2 practice)."""

from __future__ import annotations

import torch

from ..seeding import IMAGE_NOISE, seeded_generator


class PerImageNoise:
    """`noise(x)` draws one N(0, I) tensor per image from that image's generator."""

    def __init__(self, seed: int, indices, device: str | torch.device = "cpu"):
        self.generators = [seeded_generator(IMAGE_NOISE, seed, int(i)) for i in indices]
        self.device = torch.device(device)

    def draw(self, shape_per_image: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        # Drawn on the CPU so the numbers are the same on every device, then moved.
        noise = torch.stack([torch.randn(shape_per_image, generator=g, dtype=torch.float32) for g in self.generators])
        return noise.to(device=self.device, dtype=dtype)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.draw(tuple(like.shape[1:]), like.dtype)
