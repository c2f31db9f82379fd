"""The images a decoder trains and is evaluated on: a folder (class subfolders, or the images themselves:
a decoder needs no labels) or the digits, cropped as fastdit crops (ADM centre crop, `fastdit.data`).

Item i is an image (C, S, S) in [-1, 1]; a training set flips it with probability 1/2, drawn from
`item_generator(seed, epoch, i)` (call `set_epoch`), so an image depends on nothing but those numbers.
RAE's own loader resizes to 384 px and takes a random 256-px crop; fastdit's centre crop keeps one crop
pipeline for every job (the latent store is extracted with it).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..data import DigitsDataset, item_generator, list_image_folder, load_image
from ..data.image_folder import check_outputs_outside_data
from ..data.images import IMAGE_EXTENSIONS
from ..errors import UserError
from ..train.data_record import image_folder_digest

DIGITS = "digits"
DIGITS_SIZE = 8


class FolderImages(torch.utils.data.Dataset):
    def __init__(self, root: Path, files: list[str], image_size: int, *, flip: bool, seed: int):
        self.root, self.files, self.image_size, self.flip, self.seed = root, files, image_size, flip, seed
        self.epoch = 0
        self.channels = 3

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> torch.Tensor:
        image = load_image(self.root / self.files[i], self.image_size)
        if self.flip and torch.randint(2, (), generator=item_generator(self.seed, self.epoch, i)):
            image = image.flip(-1)
        return image

    @property
    def digest(self) -> str:
        return image_folder_digest(self.root, self.files)


class DigitImages(torch.utils.data.Dataset):
    """The digits (1, 8, 8), one split; never flipped (a mirrored digit is not a digit)."""

    channels = 1

    def __init__(self, split: str, seed: int):
        self.images = DigitsDataset(split, seed=seed).images

    def set_epoch(self, epoch: int) -> None:
        pass

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i]

    @property
    def digest(self) -> str:
        return DIGITS


def image_files(root: str | os.PathLike, exclude=()) -> tuple[Path, list[str]]:
    """(root, sorted relative paths) of a folder's images: under its class subfolders
    (`fastdit.data.list_image_folder`), or at its top level when it has no subfolders."""
    root = Path(root)
    if root.is_dir():
        check_outputs_outside_data(root, exclude)
        skipped = {os.path.realpath(path) for path in exclude}
        subfolders = [e for e in os.scandir(root) if e.is_dir() and not e.name.startswith(".")
                      and os.path.realpath(e.path) not in skipped]
        if not subfolders:
            files = sorted(e.name for e in os.scandir(root) if e.is_file() and not e.name.startswith(".")
                           and e.name.lower().endswith(IMAGE_EXTENSIONS))
            if not files:
                raise UserError(f"image folder {str(root)!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}) and no "
                                "subfolders; pass a folder of images")
            return root, files
    index = list_image_folder(root, exclude=exclude)
    return index.root, index.files


def open_images(source: str, image_size: int, *, train: bool, seed: int, limit: int = 0, exclude=()):
    """The training set (`train`: flipped at random; digits: the training split) or a held-out set (no flip;
    digits: the held-out split) of `source`, the first `limit` images when given."""
    if source == DIGITS:
        if image_size != DIGITS_SIZE:
            raise UserError(f"the digits are {DIGITS_SIZE}x{DIGITS_SIZE} px; pass --image-size {DIGITS_SIZE}")
        dataset = DigitImages("train" if train else "heldout", seed)
        if limit:
            dataset.images = dataset.images[:limit]
        return dataset
    root, files = image_files(source, exclude)
    return FolderImages(root, files[:limit] if limit else files, image_size, flip=train, seed=seed)
