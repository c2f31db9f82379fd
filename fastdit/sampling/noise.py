"""Reproducible noise: every image draws from its own generator seeded by (seed, global index), so an
image's noise does not depend on the batch it was sampled in, nor on the number of processes (EDM2
practice), nor on the machine.

The draws come from numpy's PCG64 and its float32 ziggurat normals, which are the same on every CPU.
`torch.randn` is not used here: its float32 normals are computed by vectorised kernels whose last bits
depend on the CPU's vector width (AVX-512, AVX2, ARM), so the "same seed" would be other noise elsewhere.
"""

from __future__ import annotations

import numpy as np
import torch

from ..seeding import IMAGE_NOISE, derive_seed


class PerImageNoise:
    """`noise(x)` draws one N(0, I) tensor per image from that image's generator; image k's draws are
    x_T first, then one tensor per sampler step that needs fresh noise."""

    def __init__(self, seed: int, indices, device: str | torch.device = "cpu"):
        self.generators = [np.random.Generator(np.random.PCG64(derive_seed(IMAGE_NOISE, seed, int(i)))) for i in indices]
        self.device = torch.device(device)

    def draw(self, shape_per_image: tuple[int, ...], dtype=torch.float32) -> torch.Tensor:
        noise = np.stack([g.standard_normal(shape_per_image, dtype=np.float32) for g in self.generators])
        return torch.from_numpy(noise).to(device=self.device, dtype=dtype)

    def __call__(self, like: torch.Tensor) -> torch.Tensor:
        return self.draw(tuple(like.shape[1:]), like.dtype)
