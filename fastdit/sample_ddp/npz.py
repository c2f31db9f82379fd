"""Write an ADM-style `.npz` (`arr_0`: uint8 images N×H×W×3, `arr_1`: int64 labels) block by block.

`np.savez` needs every image in memory at once (50,000 × 256² × 3 bytes = 9.8 GB). An `.npz` is only a
zip of `.npy` files, and an `.npy` is a small header followed by the raw C-order bytes, so we write
the header for the final shape and then stream each block's bytes into the zip entry. Memory stays at
one block. The archive is stored (not compressed) with zip64, like `np.savez`, and every entry carries a
fixed timestamp, so the same images always give the same bytes on disk.
"""

from __future__ import annotations

import json
import os
import zipfile
from typing import Iterable

import numpy as np

from ..io import atomic_path

_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # the zip epoch: no wall-clock time in the file


def write_npy_entry(archive: zipfile.ZipFile, name: str, blocks: Iterable[np.ndarray], *, shape: tuple[int, ...], dtype) -> None:
    """Stream `blocks` (split along the first axis) into the entry `name` as one `.npy` of `shape`."""
    dtype = np.dtype(dtype)
    header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False, "shape": tuple(int(n) for n in shape)}
    info = zipfile.ZipInfo(name, date_time=_FIXED_DATE)
    info.compress_type = zipfile.ZIP_STORED
    rows = 0
    with archive.open(info, "w", force_zip64=True) as entry:
        np.lib.format.write_array_header_1_0(entry, header)
        for block in blocks:
            if block.shape[1:] != header["shape"][1:]:
                raise ValueError(f"block of shape {block.shape} does not fit an array of shape {header['shape']}")
            entry.write(np.ascontiguousarray(block, dtype=dtype).data)
            rows += len(block)
    if rows != header["shape"][0]:
        raise ValueError(f"{name}: {rows} rows were written for an array of {header['shape'][0]}")


# The run's settings and recipe, as UTF-8 JSON bytes in a uint8 array: ADM's evaluator reads arr_0 and
# ignores other entries, and no pickle is needed to read it back (`read_settings`).
SETTINGS_ENTRY = "fastdit_settings"


def write_adm_npz(
    path: str | os.PathLike, parts: Iterable[tuple[np.ndarray, np.ndarray]], *, count: int,
    image_shape: tuple[int, int, int], settings: dict | None = None,
) -> None:
    """Write `path` atomically from `(images, labels)` parts in index order; holds one part's images at a
    time. `settings` (what made the images) is stored as a third entry (`SETTINGS_ENTRY`)."""
    labels = []  # int64 labels are small (400 kB for 50,000 images): kept for the second entry

    def images():
        for part_images, part_labels in parts:
            labels.append(np.asarray(part_labels, dtype=np.int64))
            yield part_images

    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            write_npy_entry(archive, "arr_0.npy", images(), shape=(count, *image_shape), dtype=np.uint8)
            write_npy_entry(archive, "arr_1.npy", labels, shape=(count,), dtype=np.int64)
            if settings is not None:
                text = np.frombuffer(json.dumps(settings, sort_keys=True).encode("utf-8"), dtype=np.uint8)
                write_npy_entry(archive, f"{SETTINGS_ENTRY}.npy", [text], shape=text.shape, dtype=np.uint8)


def read_settings(path: str | os.PathLike) -> dict | None:
    """The settings a `fastdit sample-ddp` `.npz` records, or None (another writer, or an older fastdit)."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            if SETTINGS_ENTRY not in archive.files:
                return None
            data = archive[SETTINGS_ENTRY]
    except (OSError, ValueError, zipfile.BadZipFile):
        return None
    try:
        settings = json.loads(data.tobytes().decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None
    return settings if isinstance(settings, dict) else None
