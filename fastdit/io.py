"""Atomic writes: nothing the user asked us to write is ever left half-written.

Every file goes to a temporary name in the same folder, is flushed and fsynced, and is then renamed
over the final name (`os.replace` is atomic on POSIX and Windows within one filesystem). A crash,
SIGKILL or full disk leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


def ensure_writable_dir(path: str | os.PathLike) -> Path:
    """Create `path` (and parents) and check we may write there; raise a UserError otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create folder {str(path)!r}: {err.strerror}; choose a writable location") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"folder {str(path)!r} is not writable; choose a writable location")
    return path


def check_can_create(path: str | os.PathLike) -> None:
    """Raise a UserError unless `path` exists as a writable folder or could be created as one.
    Creates nothing: it probes the nearest existing ancestor with a temporary file (a real probe,
    since root passes os.access checks even on read-only or pseudo file systems)."""
    path = Path(path)
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    ok = existing.is_dir()
    if ok:
        try:
            with tempfile.TemporaryFile(dir=existing):
                pass
        except OSError:
            ok = False
    if not ok:
        raise UserError(f"cannot write into {str(path)!r}: {str(existing)!r} is not a writable folder; choose another location")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    ensure_writable_dir(folder)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        # mkstemp creates 0600 files; give the result the permissions a plain open() would have.
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the names `atomic_path` writes to before the rename (`.<name>.<random>.tmp`)."""
    name = Path(path).name
    return name.startswith(".") and name.endswith(".tmp")


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Delete the temporaries a killed writer left in `folder` (call it only while no other writer of
    this folder runs, e.g. under its run lock); returns how many were removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    stale = [path for path in folder.iterdir() if is_temporary(path) and path.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_save_png(image, path: str | os.PathLike) -> None:
    """Save a PIL image as PNG atomically."""
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
