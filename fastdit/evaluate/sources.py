"""Where evaluation images come from: ADM `.npz` batches, image folders, or our statistics files.

Every image source yields uint8 (N, H, W, 3) numpy batches (ADM's `arr_0` layout) and checks its
input once, at the edge, with a message that names the file and the fix. `.npz` batches are streamed
straight out of the zip archive, so a 50K x 256 x 256 sample batch (9.8 GB) is never held in memory.

Gray images follow fastdit's one rule (`fastdit.image_grid.as_rgb`): where RGB is needed, a gray
image is its channel repeated three times. fastdit writes its `.npz` batches so (`sample-ddp`, the
digits demo), and the readers here take gray batches, N x H x W x 1, the same way (a file written by an
older demo, or by anyone's np.savez of gray images; a 3-D array could be one H x W x 3 image, so gray
needs its channel axis).
"""

from __future__ import annotations

import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..data.images import IMAGE_EXTENSIONS, UnsupportedImageMode, to_rgb
from ..errors import UserError
from ..image_grid import as_rgb

ADM_STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")
STATS_FORMAT_KEY = "fastdit_eval_stats"  # marks a statistics file written by `fastdit evaluate --make-ref`


def as_uint8_nhwc(images: np.ndarray | torch.Tensor, who: str) -> torch.Tensor:
    """Check that `images` are uint8 N x H x W x 3, or gray N x H x W x 1 (numpy or torch), and return
    them as an RGB tensor (gray repeated, the module's rule)."""
    if isinstance(images, np.ndarray) and not images.flags.writeable:
        images = images.copy()  # batches streamed from an .npz are read-only views
    images = torch.as_tensor(images)
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise UserError(
            f"{who} takes uint8 N x H x W x 3 (or gray N x H x W x 1) images, got {images.dtype} of shape "
            f"{tuple(images.shape)}; convert [-1, 1] tensors with float_images_to_uint8"
        )
    return images.expand(*images.shape[:3], 3) if images.shape[-1] == 1 else images


def _read_npy_header(handle) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the `.npy` stream, leaving `handle` at the first data byte."""
    version = np.lib.format.read_magic(handle)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(handle)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(handle)
    raise ValueError(f"unsupported .npy format version {version}")


class NpzImages:
    """`arr_0` of an ADM `.npz` batch: uint8 N x H x W x 3, or gray N x H x W x 1 yielded as RGB, read
    batch by batch."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
                if "arr_0.npy" not in names:
                    stored = ", ".join(n.removesuffix(".npy") for n in names) or "nothing"
                    raise UserError(
                        f"{str(path)!r} has no image array 'arr_0' (it holds {stored}); save samples with "
                        "np.savez(path, images) where images is uint8 N x H x W x 3"
                    )
                with archive.open("arr_0.npy") as handle:
                    shape, fortran_order, dtype = _read_npy_header(handle)
        except (zipfile.BadZipFile, OSError, ValueError) as err:
            if isinstance(err, UserError):
                raise
            raise UserError(f"cannot read {str(path)!r} as an .npz archive ({err})") from None
        if len(shape) != 4 or shape[3] not in (1, 3):
            # An NCHW array has its channels second: say how to transpose it; anything else is not images.
            channels_first = len(shape) == 4 and shape[1] in (1, 3)
            raise UserError(
                f"'arr_0' in {str(path)!r} has shape {shape}; expected N x H x W x 3 (NHWC RGB images, as ADM's "
                "sample batches) or gray N x H x W x 1" + ("; transpose NCHW arrays with x.transpose(0, 2, 3, 1)"
                                                          if channels_first else "")
            )
        if dtype.kind == "f":
            raise UserError(
                f"'arr_0' in {str(path)!r} holds {dtype} values; expected uint8 in [0, 255]: convert with "
                "np.clip(np.round(x * 255), 0, 255).astype(np.uint8) for images in [0, 1]"
            )
        if dtype.kind not in "ui":
            raise UserError(f"'arr_0' in {str(path)!r} has dtype {dtype}; expected uint8 images in [0, 255]")
        if shape[0] == 0:
            raise UserError(f"{str(path)!r} contains no images ('arr_0' has shape {shape})")
        self.num_images = int(shape[0])
        self.image_size = (int(shape[1]), int(shape[2]))
        self.channels = int(shape[3])
        self._dtype = dtype
        self._fortran_order = fortran_order

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        total = self.num_images if limit is None else min(limit, self.num_images)
        image_bytes = int(np.prod(self.image_size)) * self.channels * self._dtype.itemsize
        with zipfile.ZipFile(self.path) as archive, archive.open("arr_0.npy") as handle:
            _read_npy_header(handle)
            if self._fortran_order:  # rare (np.asfortranarray); fall back to loading it whole
                images = np.load(self.path)["arr_0"].reshape(self.num_images, *self.image_size, self.channels)
                for start in range(0, total, batch_size):
                    yield self._checked(np.ascontiguousarray(images[start : min(start + batch_size, total)]), start)
                return
            for start in range(0, total, batch_size):
                count = min(batch_size, total - start)
                data = handle.read(count * image_bytes)
                if len(data) != count * image_bytes:
                    raise UserError(f"{str(self.path)!r} is truncated: 'arr_0' ends before image {start + count}")
                batch = np.frombuffer(data, dtype=self._dtype).reshape(count, *self.image_size, self.channels)
                yield self._checked(batch, start)

    def _checked(self, batch: np.ndarray, start: int) -> np.ndarray:
        if batch.shape[-1] == 1:
            batch = as_rgb(batch)
        if batch.dtype == np.uint8:
            return batch
        low, high = int(batch.min()), int(batch.max())
        if low < 0 or high > 255:
            raise UserError(
                f"'arr_0' in {str(self.path)!r} has values in [{low}, {high}] "
                f"(images {start}..{start + len(batch) - 1}); expected [0, 255]: save uint8 images"
            )
        return batch.astype(np.uint8)


class FolderImages:
    """Every image file under a folder (recursively, sorted by path), decoded to RGB; with `crop_to`, each
    ADM-centre-cropped to crop_to x crop_to (`fastdit.data.image_folder.center_crop`: a folder of photos of
    many sizes as a reference, prepared as ADM prepares ImageNet's; an image of that size already is kept
    as it is, since Pillow returns a same-size resize unchanged)."""

    def __init__(self, path: Path, num_workers: int = 4, crop_to: int | None = None):
        self.path = path
        self.crop_to = crop_to
        self.files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if not self.files:
            raise UserError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in folder {str(path)!r}; point to a folder of "
                "samples or an .npz batch"
            )
        self.num_images = len(self.files)
        self.image_size = (crop_to, crop_to) if crop_to else self._read(self.files[0]).shape[:2]
        self.num_workers = num_workers

    def stored_sizes(self) -> set[tuple[int, int]]:
        """The (height, width) of every image as stored, read from the headers only (no pixels decoded)."""
        from PIL import Image

        sizes = set()
        for file in self.files:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                    with Image.open(file) as image:
                        sizes.add((image.height, image.width))
            except (OSError, Image.DecompressionBombError) as err:
                raise UserError(f"cannot decode image {str(file)!r}: {err}") from None
        return sizes

    def _read(self, file: Path) -> np.ndarray:
        from PIL import Image

        try:
            # Pillow only warns between MAX_IMAGE_PIXELS and twice that (and refuses beyond): a sample
            # that large is no sample, and decoding it could take gigabytes, so it is refused here, with
            # our one line instead of Pillow's warning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                image = Image.open(file)
            with image:
                if image.width * image.height > Image.MAX_IMAGE_PIXELS:
                    raise Image.DecompressionBombError(image.size)
                if self.crop_to:
                    from ..data.image_folder import center_crop

                    return np.asarray(center_crop(image, self.crop_to))
                return np.asarray(to_rgb(image))  # by the image's real range: 16-bit is scaled, not clipped
        except Image.DecompressionBombError:
            raise UserError(
                f"image {str(file)!r} is too large to be a sample (over Pillow's limit of {Image.MAX_IMAGE_PIXELS:,} "
                f"pixels, a guard against decompression bombs); remove it from the folder"
            ) from None
        except OSError as err:
            raise UserError(f"cannot decode image {str(file)!r}: {err}") from None
        except UnsupportedImageMode as err:
            raise UserError(f"{str(file)!r}: {err}") from None

    def batches(self, batch_size: int, limit: int | None = None) -> Iterator[np.ndarray]:
        files = self.files if limit is None else self.files[:limit]
        # PIL decodes outside the GIL, so a few threads keep the network fed.
        with ThreadPoolExecutor(self.num_workers) as pool:
            for start in range(0, len(files), batch_size):
                chunk = files[start : start + batch_size]
                images = list(pool.map(self._read, chunk))
                for file, image in zip(chunk, images):
                    if image.shape[:2] != self.image_size:
                        raise UserError(
                            f"{str(file)!r} is {image.shape[1]}x{image.shape[0]} but {str(self.files[0])!r} is "
                            f"{self.image_size[1]}x{self.image_size[0]}; all images in a folder must share one size"
                        )
                yield np.stack(images)


def read_adm_statistics(path: Path) -> dict[str, np.ndarray] | None:
    """ADM's precomputed `mu`, `sigma`, `mu_s`, `sigma_s` from an `.npz`, if it has them."""
    try:
        with np.load(path) as archive:
            if "mu" not in archive.files:
                return None
            missing = [key for key in ADM_STAT_KEYS if key not in archive.files]
            if missing:
                raise UserError(
                    f"{str(path)!r} has 'mu' but lacks {', '.join(missing)}; it is not an ADM reference batch"
                )
            return {key: archive[key].astype(np.float64) for key in ADM_STAT_KEYS}
    except (zipfile.BadZipFile, OSError, ValueError) as err:
        if isinstance(err, UserError):
            raise
        raise UserError(f"cannot read {str(path)!r} as an .npz archive ({err})") from None


def read_fid_moments(path: Path) -> dict[str, np.ndarray] | None:
    """The moments of an `.npz` that holds statistics but no images: torch-fidelity's and JiT's
    (`jit_in256_stats.npz`: `mu`, `sigma`), or ADM's four without `arr_0`. None for anything else."""
    path = Path(path)
    if path.suffix != ".npz" or not path.is_file() or is_statistics_file(path):
        return None
    try:
        with np.load(path) as archive:
            if "arr_0" in archive.files or "mu" not in archive.files or "sigma" not in archive.files:
                return None
            return {key: archive[key].astype(np.float64) for key in ADM_STAT_KEYS if key in archive.files}
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


def is_statistics_file(path: Path) -> bool:
    """Whether `path` is a statistics file written by `fastdit evaluate --make-ref`."""
    if path.suffix != ".npz" or not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as archive:
            return f"{STATS_FORMAT_KEY}.npy" in archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False


def reference_crop_side(path: str | Path, sample_size: tuple[int, int] | None) -> int | None:
    """The side to which a reference folder of other or mixed image sizes is cropped: the samples' (square)
    side, each image ADM-centre-cropped as ADM prepares ImageNet's reference batches, with a note saying
    so; None when the reference is no folder, already holds only images of the samples' size, or the
    samples are not square (then the usual resolution check speaks)."""
    path = Path(path).expanduser()
    if not path.is_dir() or not sample_size or sample_size[0] != sample_size[1]:
        return None
    side = int(sample_size[0])
    sizes = FolderImages(path).stored_sizes()
    if sizes == {(side, side)}:
        return None
    shown = ", ".join(f"{w}x{h}" for h, w in sorted(sizes)[:3]) + (" ..." if len(sizes) > 3 else "")
    print(f"note: the reference images in {str(path)!r} are {shown}, not all {side}x{side} as the samples: each is "
          f"centre-cropped to {side}x{side} as ADM prepares ImageNet's reference (short side resized, middle kept)")
    return side


def open_images(path: str | Path, crop_to: int | None = None) -> NpzImages | FolderImages:
    """An image folder (`crop_to`: see `FolderImages`) or an ADM `.npz` batch."""
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderImages(path, crop_to=crop_to)
    if path.is_file() and path.suffix == ".npz":
        return NpzImages(path)
    if not path.exists():
        raise UserError(f"{str(path)!r} does not exist; pass an image folder, an .npz batch or a statistics file")
    raise UserError(f"{str(path)!r} is neither an image folder nor an .npz file")
