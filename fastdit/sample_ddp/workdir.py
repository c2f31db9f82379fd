"""The work folder of a `sample-ddp` run: its settings, its chunk files, and how a rerun resumes.

    samples.npz        the result (ADM format), written last and atomically
    samples.json       the settings that made it (written just before the result)
    samples.parts/     while the run is going: settings.json and chunk-<start>-<stop>.npz files

A chunk file holds a range of global image indices inside one chunk of --chunk-size images (the whole
chunk, or the part one process sampled: `fastdit.sample_ddp.shares`), written as one small `.npz`
(images, labels) under a temporary name and renamed, so a chunk file is either complete or absent. A
killed run leaves some chunk files; the same command finds them and samples only the rest. A chunk file damaged since (cut
short by a copy, overwritten, holding other arrays) is found by reading every chunk when a run resumes,
deleted with a warning, and sampled again. A rerun whose settings differ from the recorded ones is
refused: mixing images from two settings would silently spoil the metric. The batch size, the number
of processes, the device and --compile are not settings: they change at most the rounding of the last
bits (see `fastdit.sample_ddp.runner`), so a run may be resumed with another batch size or on other GPUs.
--precision is one: bf16 images differ from fp32 ones by far more than rounding of the last bits; so
is TF32 (recorded as used: on CUDA unless --no-tf32; a record from before TF32 was used reads as none).

A --png-dir folder is written into only when sample-ddp made it or it was empty (`claim_png_dir`):
a marker file records the output it belongs to, so a rerun of that output goes on writing there and
any other folder with files in it is refused rather than written over.

One run at a time: the main process holds an exclusive lock on the work folder (`lock`) from before
it loads the model until the result is in place, so a second run on the same output stops at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from ..errors import UserError
from ..io import atomic_path, atomic_write_json, is_temporary
from ..objectives import objective_from_dict
from ..run_folder import exclusive_lock, is_lock_file, refuse_other_settings
from ..sampling import SamplingOptions

FORMAT = "fastdit.sample-ddp"
PNG_DIR_FORMAT = "fastdit.sample-ddp.png-dir"
PNG_DIR_MARKER = ".fastdit-sample-ddp.json"  # in a --png-dir: which output's PNGs the folder holds
_CHUNK_NAME = re.compile(r"chunk-(\d{8,})-(\d{8,})\.npz")


@dataclass(frozen=True, order=True)
class Chunk:
    """Global image indices [start, stop)."""

    start: int
    stop: int

    @property
    def name(self) -> str:
        return f"chunk-{self.start:08d}-{self.stop:08d}.npz"

    def __len__(self) -> int:
        return self.stop - self.start


def plan_chunks(num_samples: int, chunk_size: int) -> list[Chunk]:
    return [Chunk(start, min(start + chunk_size, num_samples)) for start in range(0, num_samples, chunk_size)]


def weights_fingerprint(model) -> str:
    """sha256 over the parameter names, shapes and bytes: the same weights read from any path match."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()


@dataclass(frozen=True)
class OutputPaths:
    npz: Path

    @property
    def settings(self) -> Path:  # beside the result, once it is finished
        return self.npz.with_suffix(".json")

    @property
    def work_dir(self) -> Path:
        return self.npz.with_suffix(".parts")

    @property
    def work_settings(self) -> Path:
        return self.work_dir / "settings.json"


def _normalized(settings: dict) -> dict:
    return json.loads(json.dumps(settings, sort_keys=True))  # tuples -> lists, as they read back


def _read_settings(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return _with_option_defaults(data) if isinstance(data, dict) and data.get("format") == FORMAT else None


def _with_option_defaults(recorded: dict) -> dict:
    """Settings written before a sampling option existed lack it; they were made with its default (a
    new option's default keeps the images as they were, e.g. precision fp32), so they read as such
    and a folder of an older version resumes. Likewise the objective: a DDPM model's record once
    carried the flow's settings at their defaults, and reads as the objective it names."""
    model = recorded.get("model")
    if isinstance(model, dict) and isinstance(model.get("process"), dict):
        try:
            model = {**model, "process": objective_from_dict(model["process"]).to_dict()}
        except UserError:
            pass  # not an objective this version knows: compared as written, so it is refused
        recorded = {**recorded, "model": model}
    if "tf32" not in recorded:  # written before sampling used TF32: the images were full float32
        recorded = {**recorded, "tf32": False}
    if not isinstance(recorded.get("sampling"), dict):
        return recorded
    return {**recorded, "sampling": {**_normalized(asdict(SamplingOptions())), **recorded["sampling"]}}


def _check_same(recorded: dict | None, wanted: dict, where: Path, what: str, fix: str) -> None:
    if recorded is None:
        raise UserError(f"{str(where)!r} exists but was not written by `fastdit sample-ddp`; choose another --out or remove it")
    refuse_other_settings(what, recorded, wanted, fix, ignore=("recipe",))  # provenance, not a setting


def is_finished(paths: OutputPaths, settings: dict) -> bool:
    """True if the result exists and was made with `settings`; a UserError if it was made otherwise."""
    settings = {"format": FORMAT, **_normalized(settings)}
    if not paths.npz.exists():
        return False
    _check_same(
        _read_settings(paths.settings), settings, paths.npz, f"{str(paths.npz)!r} was already written",
        f"choose another --out, or delete {str(paths.npz)!r} to sample it again",
    )
    return True


@contextlib.contextmanager
def lock(paths: OutputPaths) -> Iterator[None]:
    """Hold this output's lock (a file in the work folder, which is created for it) for the block.

    A second run on the same output gets a UserError naming the holder. A work folder that holds only
    the lock when the block ends (the run was refused, or found the result already there) is removed.
    """
    if paths.work_dir.exists() and not paths.work_dir.is_dir():
        raise UserError(f"{str(paths.work_dir)!r} is a file, not a sample-ddp work folder; choose another --out or remove it")
    with exclusive_lock(paths.work_dir, "fastdit sample-ddp"):
        try:
            yield
        finally:
            if paths.work_dir.is_dir() and not _started(paths):
                shutil.rmtree(paths.work_dir)


def _started(paths: OutputPaths) -> bool:
    """The work folder holds more than the lock file."""
    return any(not is_lock_file(entry) for entry in paths.work_dir.iterdir())


def prepare(paths: OutputPaths, settings: dict) -> None:
    """Record `settings` in the (locked, so existing) work folder, or check that the run there was started with them."""
    settings = {"format": FORMAT, **_normalized(settings)}
    if _started(paths):
        _check_same(
            _read_settings(paths.work_settings), settings, paths.work_dir, f"{str(paths.work_dir)!r} was started",
            f"rerun with the same flags to continue it, or choose another --out (or delete {str(paths.work_dir)!r}) to start over",
        )
        return
    if paths.settings.exists() and _read_settings(paths.settings) is None:  # never overwrite a file we did not write
        raise UserError(f"{str(paths.settings)!r} exists and is not a sample-ddp settings file; choose another --out")
    atomic_write_json(settings, paths.work_settings)


def chunk_files(paths: OutputPaths) -> list[Chunk]:
    """The finished chunk files in the work folder, by their first image (temporaries do not count)."""
    found = (_CHUNK_NAME.fullmatch(entry.name) for entry in paths.work_dir.iterdir())
    return sorted(Chunk(int(match[1]), int(match[2])) for match in found if match)


def pending(paths: OutputPaths, num_samples: int) -> list[Chunk]:
    """The ranges of [0, num_samples) that no finished chunk file holds, in order."""
    gaps, start = [], 0
    for chunk in chunk_files(paths):
        if chunk.start > start:
            gaps.append(Chunk(start, min(chunk.start, num_samples)))
        start = max(start, chunk.stop)
    if start < num_samples:
        gaps.append(Chunk(start, num_samples))
    return [gap for gap in gaps if len(gap) > 0]


def is_complete(paths: OutputPaths, expected: list[Chunk]) -> bool:
    """Whether every file of `expected` is on disk (the other processes' too: the filesystem is shared)."""
    return all((paths.work_dir / chunk.name).exists() for chunk in expected)


def write_chunk(paths: OutputPaths, chunk: Chunk, images: np.ndarray, labels: np.ndarray) -> None:
    with atomic_path(paths.work_dir / chunk.name) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, images=images, labels=labels)  # a handle: np.savez would append .npz to a name


def read_chunk(paths: OutputPaths, chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    with np.load(paths.work_dir / chunk.name) as data:
        images, labels = data["images"], data["labels"]
    if len(images) != len(chunk) or len(labels) != len(chunk):
        raise UserError(f"{str(paths.work_dir / chunk.name)!r} holds {len(images)} images, not {len(chunk)}; "
                        "rerun the same command to sample it again")
    return images, labels


def chunk_problem(path: Path, chunk: Chunk, image_shape: tuple[int, int, int]) -> str | None:
    """Why the chunk file at `path` cannot be used, or None. Reads it whole: zip checks every entry's CRC."""
    if not zipfile.is_zipfile(path):  # np.load would also take a lone .npy, or try a pickle
        return "not a zip archive"
    try:
        with np.load(path) as data:
            arrays = {name: data[name] for name in data.files}  # each entry read once, to its end
    except Exception as err:  # noqa: BLE001 - zip, CRC, .npy header and EOF errors all mean "damaged"
        return f"unreadable: {type(err).__name__}: {err}"
    found = {name: (array.shape, array.dtype) for name, array in arrays.items()}
    expected = {"images": ((len(chunk), *image_shape), np.dtype(np.uint8)), "labels": ((len(chunk),), np.dtype(np.int64))}
    if found != expected:
        return f"holds {_describe(found)}, not {_describe(expected)}"
    return None


def _describe(arrays: dict) -> str:
    return ", ".join(f"{name} {dtype} {shape}" for name, (shape, dtype) in sorted(arrays.items())) or "no arrays"


def drop_damaged_chunks(paths: OutputPaths, num_samples: int, chunk_size: int,
                        image_shape: tuple[int, int, int]) -> list[tuple[Path, str]]:
    """Delete the chunk files of a resumed run that cannot be used, so their images are sampled again;
    returns (path, why) for each: unreadable, other arrays, a range outside the run's images or across a
    chunk boundary, or one that overlaps a file kept before it. Main process only, before the pending
    images are listed."""
    dropped, covered = [], 0
    for chunk in chunk_files(paths):
        path = paths.work_dir / chunk.name
        if not 0 <= chunk.start < chunk.stop <= num_samples:
            problem = f"images {chunk.start} to {chunk.stop} are not within the run's {num_samples}"
        elif chunk.start // chunk_size != (chunk.stop - 1) // chunk_size:
            problem = f"it spans two chunks of {chunk_size} images"
        elif chunk.start < covered:
            problem = f"it overlaps images held by another chunk file (up to {covered})"
        else:
            problem = chunk_problem(path, chunk, image_shape)
        if problem is not None:
            path.unlink()
            dropped.append((path, problem))
        else:
            covered = chunk.stop
    return dropped


def remove_stale_temporaries(paths: OutputPaths) -> None:
    """A SIGKILL during assembly leaves `.samples.npz.<random>.tmp` (see `fastdit.io.atomic_path`): up to
    gigabytes, never to be used. Only the main process calls this, just before it writes a new one."""
    for stale in paths.npz.parent.glob(f".{paths.npz.name}.*.tmp"):
        stale.unlink(missing_ok=True)


def finish(paths: OutputPaths) -> None:
    """After the result is in place: keep the settings beside it and drop the chunk files."""
    shutil.rmtree(paths.work_dir)


def publish_settings(paths: OutputPaths) -> None:
    """Copy the run's settings beside the result, before the result appears (see the module doc)."""
    atomic_write_json(json.loads(paths.work_settings.read_text()), paths.settings)


def claim_png_dir(png_dir: Path, out: Path) -> None:
    """Take `png_dir` for the PNGs of the output `out`, or raise a UserError: only a new or empty
    folder, or one this output claimed before (its marker names `out`), may take them; a folder holding
    anything else would have files written over (the same rule as the demo's --out). Temporaries a
    killed writer left do not count. Call it under the output's lock, on the main process."""
    marker = png_dir / PNG_DIR_MARKER
    owner = str(Path(out).resolve())
    if marker.is_file():
        try:
            recorded = json.loads(marker.read_text())
        except (OSError, ValueError):
            recorded = None
        if not (isinstance(recorded, dict) and recorded.get("format") == PNG_DIR_FORMAT):
            raise UserError(f"--png-dir {str(png_dir)!r} has an unreadable {PNG_DIR_MARKER}; choose a new or empty folder")
        if recorded.get("out") != owner:
            raise UserError(f"--png-dir {str(png_dir)!r} holds the PNGs of another output ({recorded.get('out')!r}); "
                            "choose a new or empty folder for this one")
        return
    if png_dir.is_dir():
        found = sorted(entry.name for entry in png_dir.iterdir() if not is_temporary(entry))
        if found:
            names = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
            raise UserError(f"--png-dir {str(png_dir)!r} holds other files ({names}) and no earlier sample-ddp PNGs; "
                            "sample-ddp would write over them: choose a new or empty folder")
    png_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json({"format": PNG_DIR_FORMAT, "out": owner}, marker)
