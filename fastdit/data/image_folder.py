"""Image folders laid out like ImageNet's train split: ROOT/<class name>/**/<image>.

* `list_image_folder` finds the images: class names are the sorted subfolder names (-> 0..K-1) and
  the file list is sorted, so it is the same on every machine and every process.
* `center_crop` is the ADM centre crop (guided-diffusion `center_crop_arr`, also used by DiT).
* `ImageFolderDataset` decodes on the fly and flips at random from a seedable per-item generator.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from ..errors import UserError
from ..seeding import DATA_ITEM, seeded_generator
from .images import IMAGE_EXTENSIONS, UnsupportedImageMode, to_rgb


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A CPU generator seeded from (seed, epoch, index).

    Each item draws its own randomness (flip, posterior noise) from this, so a sample depends only on
    the three numbers: not on the number of workers or processes, nor on the order items are read.
    """
    return seeded_generator(DATA_ITEM, seed, epoch, index)


@dataclass(frozen=True)
class ImageFolderIndex:
    root: Path
    files: list[str]  # paths relative to root, sorted
    labels: list[int]  # class index of each file
    class_names: list[str]  # sorted subfolder names; class i is class_names[i]


def list_image_folder(root: str | os.PathLike, *, exclude: Iterable[str | os.PathLike] = ()) -> ImageFolderIndex:
    """Find all images under ROOT/<class>/; raise a UserError naming the problem when there are none.

    Symbolic links to folders are followed, but every real folder is listed once: a link back to a
    folder already listed (`s -> .`, or two folders linking to each other) is skipped, so a loop can
    neither repeat images nor hang the listing. Folders in `exclude` (a run's results folder inside the
    data folder, a latent store being written there) are neither classes nor walked; `exclude` may map
    each folder to the option that named it ({"results": "--results-dir"}), for the messages.
    Such an output folder may not be the data folder itself (what fastdit writes there would be read as
    classes on the next start) nor a folder of images at a class's place (that class would be left out
    and the labels renumbered): both are refused (`check_outputs_outside_data`).
    """
    root = Path(root)
    if not root.exists():
        raise UserError(f"data folder {str(root)!r} does not exist; pass --data-path to a folder of class subfolders")
    if not root.is_dir():
        raise UserError(f"data path {str(root)!r} is a file; pass a folder of class subfolders (ROOT/<class>/<image>)")
    check_outputs_outside_data(root, exclude)
    # Real paths of the folders listed so far: the root, the excluded folders (never walked) and
    # every class folder, so that no class walks into the root or into another class.
    seen = {os.path.realpath(root)} | {os.path.realpath(path) for path in exclude}
    class_names = []
    for entry in sorted(os.scandir(root), key=lambda entry: entry.name):
        real = os.path.realpath(entry.path)
        if entry.is_dir() and not entry.name.startswith(".") and real not in seen:
            seen.add(real)
            class_names.append(entry.name)
    if not class_names:
        raise UserError(
            f"data folder {str(root)!r} has no class subfolders; put the images in ROOT/<class name>/, "
            f"one subfolder per class (a single class is fine)"
        )
    files, labels, empty = [], [], []
    for label, name in enumerate(class_names):
        found = sorted(_images_under(root / name, root, seen))
        if not found:
            empty.append(name)
        files += found
        labels += [label] * len(found)
    if not files:
        raise UserError(
            f"data folder {str(root)!r} has class subfolders but no images ({', '.join(IMAGE_EXTENSIONS)}); "
            f"check --data-path"
        )
    if empty:
        raise UserError(
            f"class folder(s) {_short_list(empty)} under {str(root)!r} contain no images; remove them or add images, "
            f"so that class indices match the classes that exist"
        )
    return ImageFolderIndex(root=root, files=files, labels=labels, class_names=class_names)


# A folder holding this file is a training run's folder (`fastdit train` writes it before any image).
RUN_CONFIG = "config.json"


def check_outputs_outside_data(root: str | os.PathLike, outputs) -> None:
    """Refuse an output folder (`outputs`: paths, or a mapping of path -> the option that named it) that is
    the data folder `root` itself or stands at a class's place in it holding images of its own (images
    outside the run folders fastdit wrote there). The first would make fastdit's own files classes of the
    next start (a resume then finds other classes); the second would drop a class and renumber the labels.
    An output folder elsewhere inside the data folder (a new `root/results`) is fine: it is left out of
    the listing. Call it before anything is written into the output folders."""
    root = Path(root)
    real_root = os.path.realpath(root)
    named = outputs.items() if isinstance(outputs, dict) else ((path, "the output folder") for path in outputs)
    for path, option in named:
        real = os.path.realpath(path)
        fix = f"choose a {option} outside the data folder (or a new subfolder of it)"
        if real == real_root:
            raise UserError(f"{option} {str(path)!r} is the data folder {str(root)!r} itself: what fastdit writes there "
                            f"would be read as classes when the run starts again; {fix}")
        if os.path.dirname(real) == real_root and os.path.isdir(real) and not os.path.basename(real).startswith("."):
            images = _images_outside_runs(Path(real))
            if images:
                raise UserError(f"{option} {str(path)!r} is the class folder {os.path.basename(real)!r} of the data "
                                f"folder {str(root)!r} (it holds {images[0]!r}): that class would be left out and the "
                                f"labels renumbered; {fix}")


def _images_outside_runs(folder: Path) -> list[str]:
    """An image under `folder` that is not inside a run folder (one holding RUN_CONFIG), or []."""
    for dirpath, dirnames, filenames in os.walk(folder):
        if RUN_CONFIG in filenames and dirpath != str(folder):
            dirnames[:] = []
            continue
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for filename in filenames:
            if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                return [str(Path(dirpath, filename).relative_to(folder))]
    return []


def _images_under(folder: Path, root: Path, seen: set[str]) -> list[str]:
    """Image paths (relative to root) under `folder`, whose real path is already in `seen`; every
    subfolder whose real path is in `seen` is skipped, and those walked are added to it."""
    paths = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        kept = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if not d.startswith(".") and real not in seen:
                seen.add(real)  # before descending: a second link to it, at any depth, is skipped
                kept.append(d)
        dirnames[:] = kept
        for filename in filenames:
            if filename.lower().endswith(IMAGE_EXTENSIONS) and not filename.startswith("."):
                paths.append(Path(dirpath, filename).relative_to(root).as_posix())
    return paths


def _short_list(names: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(name) for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def center_crop(image, image_size: int):
    """ADM centre crop (guided-diffusion `center_crop_arr`): returns an RGB PIL image of image_size^2.

    The image is first made 8-bit RGB by its mode's real range (`fastdit.data.images.to_rgb`).
    Halving with a BOX filter while the short side is at least twice the target avoids aliasing that a
    single large BICUBIC downscale would cause; the BICUBIC resize then makes the short side exactly
    `image_size`, and the centre crop takes the middle of the long side.
    """
    from PIL import Image

    image = to_rgb(image)
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top : top + image_size, left : left + image_size])


class CorruptImageError(UserError):
    """An image file that Pillow cannot decode, or whose pixel mode we refuse (`images.to_rgb`)."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot read image {self.path!r}: {reason}")


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode, centre-crop and scale an image to a (3, image_size, image_size) float tensor in [-1, 1]."""
    return pixels_to_unit_range(load_crop(path, image_size))


def _is_regular_file(path: str | os.PathLike) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)  # follows symlinks: a link to an image is fine
    except OSError:
        return True  # missing or unreadable: Image.open reports it with its own reason


def pixels_to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 in [-1, 1]: the one conversion every reader of a crop uses,
    so a crop stored as bytes gives back exactly the floats the VAE encoded."""
    return pixels.float().div_(127.5).sub_(1.0)


def load_crop(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Decode and centre-crop an image to (3, image_size, image_size) uint8 RGB pixels."""
    from PIL import Image

    if not _is_regular_file(path):
        # Opening a FIFO waits for a writer forever; a device never ends: neither is an image file.
        raise CorruptImageError(path, "not a regular file (a named pipe, socket or device)")
    try:
        with Image.open(path) as image:
            image = center_crop(image, image_size)  # decodes fully, so truncated files fail here
    except UnsupportedImageMode as err:
        raise CorruptImageError(path, str(err)) from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise CorruptImageError(path, f"{type(err).__name__}: {err}") from None
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)  # (3, H, W) uint8


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images decoded on the fly: item i is (image (3, S, S) in [-1, 1], label).

    With `flip=True` the image is mirrored with probability 1/2, drawn from `item_generator(seed,
    epoch, i)`: call `set_epoch(epoch)` every epoch (as with DistributedSampler) for fresh flips that
    are still bit-reproducible. `exclude` names folders that are not data (`list_image_folder`).
    Corrupt files, and files of a mode `images.to_rgb` refuses, raise a `CorruptImageError` naming the file.
    """

    def __init__(self, root: str | os.PathLike, image_size: int, *, flip: bool = True, seed: int = 0,
                 exclude: Iterable[str | os.PathLike] = ()):
        if image_size < 1:
            raise UserError(f"image size must be positive, got {image_size}")
        self.index = list_image_folder(root, exclude=exclude)
        self.image_size = image_size
        self.flip = flip
        self.seed = seed
        self.epoch = 0

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def num_classes(self) -> int:
        return len(self.index.class_names)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.index.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        image = load_image(self.index.root / self.index.files[i], self.image_size)
        if self.flip and torch.randint(2, (), generator=item_generator(self.seed, self.epoch, i)):
            image = image.flip(-1)
        return image, self.index.labels[i]
