"""Atomic writes: nothing the user asked us to write is ever left half-written.

Every file goes to a temporary name in the same folder, is flushed and fsynced, and is then renamed
over the final name (`os.replace` is atomic on POSIX and Windows within one filesystem). A crash,
SIGKILL or full disk leaves either the old file or the new one, never a truncated mix.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
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


def check_regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` if it is a regular file (links followed); else a UserError naming it. The one check before
    fastdit opens a file it did not write in this process (checkpoints, snapshots, store shards, encoder
    weights, records): opening a named pipe waits for a writer forever and a device never ends, so
    anything else would hang, or read without end, instead of being refused."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UserError(f"{what} {str(path)!r} does not exist; check the path") from None
    except OSError as err:
        raise UserError(f"cannot read {what} {str(path)!r}: {err.strerror}") from None
    if stat.S_ISDIR(mode):
        raise UserError(f"{what} {str(path)!r} is a folder; pass a file")
    if not stat.S_ISREG(mode):
        raise UserError(f"{what} {str(path)!r} is not a regular file (a named pipe, socket or device, which could "
                        f"block or never end); pass a file")
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


class NoSpaceError(UserError):
    """A write failed because the disk (or the user's quota) is full; the file was not changed."""

    def __init__(self, path: Path, reason: str):
        self.path, self.reason = path, reason
        self.free = free_space_text(path.parent)
        super().__init__(
            f"cannot write {str(path)!r}: {reason} ({self.free}); free some space or choose another location, "
            f"then run the same command again"
        )


def check_free_space(folder: str | os.PathLike, needed: int, what: str, fix: str) -> None:
    """Refuse, before the work, a job whose files cannot fit: a UserError saying `what` needs `needed`
    bytes in `folder` (or its nearest existing ancestor), how much is free, and `fix`. A job that would
    fill the disk after hours of sampling is told so at once."""
    existing = Path(folder)
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        return  # nothing to go by: the writes themselves report a full disk (`NoSpaceError`)
    if needed > free:
        raise UserError(f"{what} need about {_bytes_text(needed)} in {str(folder)!r}, but {_bytes_text(free)} are "
                        f"free there; {fix}")


def _bytes_text(amount: int) -> str:
    # kB and bytes for tiny jobs, which would otherwise read "0.0 MB are needed, 0.0 MB are free".
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if amount >= size:
            return f"{amount / size:.2f} {unit}" if unit == "GB" else f"{amount / size:.1f} {unit}"
    return f"{amount} bytes"


# What a full disk or quota looks like: the OSError errno, or its text where a library wraps it in its
# own exception (safetensors: "I/O error: No space left on device (os error 28)").
_NO_SPACE_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded"}
_NO_SPACE_TEXTS = {os.strerror(code).lower(): reason for code, reason in _NO_SPACE_ERRNOS.items()}


def no_space_reason(error: BaseException) -> str | None:
    """What is full (the device or the quota) if `error`, or an exception it was raised from or while
    handling, says so; else None. torch.save reports a failed write of its file handle as a
    RuntimeError ("unexpected pos ...") raised while handling the OSError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE_ERRNOS:
            return _NO_SPACE_ERRNOS[error.errno]
        text = str(error).lower()
        for marker, reason in _NO_SPACE_TEXTS.items():
            if marker in text:
                return reason
        error = error.__cause__ or error.__context__
    return None


def free_space_text(folder: str | os.PathLike) -> str:
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "free space unknown"
    return f"{_bytes_text(free)} free in {str(folder)!r}"


@contextlib.contextmanager
def full_disk_as_user_error(path: str | os.PathLike) -> Iterator[None]:
    """Turn a full disk or quota while writing `path` into a `NoSpaceError` (one line at the CLI)."""
    try:
        yield
    except BaseException as err:
        reason = None if isinstance(err, NoSpaceError) else no_space_reason(err)
        if reason is None:
            raise
        raise NoSpaceError(Path(path), reason) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success rename it to `path`, on error delete it.
    A full disk becomes a `NoSpaceError`, whichever library wrote the file."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    ensure_writable_dir(folder)
    with full_disk_as_user_error(path):
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


def append_text(text: str, path: str | os.PathLike) -> None:
    """Append to a log file (a log grows line by line; a full disk still gives the one-line message)."""
    with full_disk_as_user_error(path), open(path, "a") as handle:
        handle.write(text)


# safetensors writes through its own temporary, `.tmp` and 6 random characters (Rust's
# tempfile crate), which a kill inside `save_file` leaves behind too.
_LIBRARY_TEMPORARY = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def is_temporary(path: str | os.PathLike) -> bool:
    """True for the names `atomic_path` writes to before the rename (`.<name>.<random>.tmp`) and for
    the temporaries of the libraries that write there."""
    name = Path(path).name
    return (name.startswith(".") and name.endswith(".tmp")) or _LIBRARY_TEMPORARY.fullmatch(name) is not None


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

    # Through a Python file handle: its OSError (e.g. ENOSPC) stays attached to the RuntimeError that
    # torch raises; given a file name, torch's C++ writer reports only "unexpected pos".
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        torch.save(obj, handle)


def atomic_write_text(text: str, path: str | os.PathLike) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write_json(obj: Any, path: str | os.PathLike) -> None:
    atomic_write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", path)


def atomic_save_png(image, path: str | os.PathLike, text: dict[str, str] | None = None) -> None:
    """Save a PIL image as PNG atomically; `text` goes into tEXt chunks (what made the picture)."""
    from PIL.PngImagePlugin import PngInfo

    info = None
    if text:
        info = PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG", pnginfo=info)
