"""Batches of uint8 images as pictures: a grid (what `torchvision.utils.save_image` would do), and the
one rule for gray images (`as_rgb`)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1 or 3) -> (N, H, W, 3): fastdit's one rule for gray images wherever RGB is needed (the
    `.npz` batches of `sample-ddp` and the demo, ADM's evaluator, Inception): the channel repeated."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def make_grid(images: np.ndarray, nrow: int, padding: int = 2, pad_value: int = 0) -> Image.Image:
    """(N, H, W, C) uint8 -> a PIL image with `nrow` images per row and `padding` pixels between."""
    n, h, w, c = images.shape
    ncol = min(nrow, n)
    nrows = -(-n // ncol)
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, dtype=np.uint8
    )
    for k in range(n):
        row, col = divmod(k, ncol)
        top, left = padding + row * (h + padding), padding + col * (w + padding)
        grid[top : top + h, left : left + w] = images[k]
    return Image.fromarray(grid[..., 0] if c == 1 else grid, mode="L" if c == 1 else "RGB")


# A grid of images smaller than this (the 8x8 digits) opens as a speck: `fastdit sample` enlarges it.
MIN_SHOWN_SIDE = 64


def upscale_factor(side: int, min_side: int = MIN_SHOWN_SIDE) -> int:
    """The whole factor that shows an image of `side` pixels at least `min_side` wide (1 for larger ones)."""
    return max(1, -(-min_side // side))


def enlarge(grid: Image.Image, factor: int) -> Image.Image:
    """Nearest-neighbour enlargement: every pixel becomes a factor x factor block, nothing is smoothed."""
    return grid if factor == 1 else grid.resize((grid.width * factor, grid.height * factor), Image.NEAREST)
