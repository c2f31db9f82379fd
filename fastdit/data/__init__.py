"""Training data: latent stores (fastest), image folders encoded on the fly, and the digits demo set.

Every dataset yields (x, label) with x float32 of shape `sample_shape`, and has `class_names`,
`num_classes` and `set_epoch(epoch)` (per-item randomness is seeded by (seed, epoch, index)).
`LatentStoreDataset(..., with_images=True)` adds the image each latent was encoded from.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError
from .digits import DigitsDataset, load_digits_tensors, split_digits
from .image_folder import (
    CorruptImageError,
    ImageFolderDataset,
    center_crop,
    item_generator,
    list_image_folder,
    load_image,
)
from .latent_store import LatentStore, LatentStoreDataset

__all__ = [
    "CorruptImageError",
    "DigitsDataset",
    "ImageFolderDataset",
    "LatentStore",
    "LatentStoreDataset",
    "center_crop",
    "is_latent_store",
    "item_generator",
    "list_image_folder",
    "load_digits_tensors",
    "load_image",
    "open_dataset",
    "split_digits",
]


def is_latent_store(path: str | os.PathLike) -> bool:
    """True for a folder written by `fastdit extract` (finished or not)."""
    path = Path(path)
    return (path / "meta.json").is_file() or (path / "plan.json").is_file()


def open_dataset(source: str | os.PathLike, *, image_size: int | None = None, vae: str | None = None, seed: int = 0,
                 exclude=()):
    """"digits" -> DigitsDataset (train split); a latent store -> LatentStoreDataset, checked against
    `vae` and `image_size`; any other folder -> ImageFolderDataset at `image_size` (pixels in [-1, 1],
    to be encoded by the training loop when it uses a VAE). `exclude`: folders inside an image folder
    that are not classes (the run's own results folder)."""
    if str(source) == "digits":
        return DigitsDataset("train", seed=seed)
    if is_latent_store(source):
        return LatentStoreDataset(source, seed=seed, vae=vae, image_size=image_size)
    if image_size is None:
        raise UserError(f"an image folder ({str(source)!r}) needs an image size; pass --image-size")
    return ImageFolderDataset(source, image_size, seed=seed, exclude=exclude)
