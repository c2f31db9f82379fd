"""Atomic writes: a full disk is one clear message, the old file stays, no temporary is left."""

import errno
import os
from pathlib import Path

import pytest
import torch

from fastdit.errors import UserError
from fastdit.io import (
    NoSpaceError,
    atomic_path,
    atomic_torch_save,
    is_temporary,
    no_space_reason,
    remove_stale_temporaries,
)

DEV_FULL = Path("/dev/full")  # a device whose every write fails with ENOSPC: a real full disk
needs_dev_full = pytest.mark.skipif(not DEV_FULL.is_char_device(), reason="needs /dev/full (Linux)")


def wrapped(outer: Exception, inner: Exception) -> Exception:
    """`outer` raised while handling `inner`, as torch.save raises its RuntimeError."""
    try:
        try:
            raise inner
        except Exception:
            raise outer
    except Exception as err:
        return err


@pytest.mark.parametrize("error, reason", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on the device"),
    (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk quota exceeded"),
    (wrapped(RuntimeError("unexpected pos 704 vs 598"), OSError(errno.ENOSPC, "x")), "no space left on the device"),
    # safetensors' own exception type carries only the text of Rust's io::Error
    (Exception("Error while serializing: I/O error: No space left on device (os error 28)"), "no space left on the device"),
    (OSError(errno.EACCES, "Permission denied"), None),
    (wrapped(RuntimeError("unexpected pos 704 vs 598"), ValueError("other")), None),
])
def test_no_space_reason(error, reason):
    assert no_space_reason(error) == reason


def test_full_disk_in_atomic_path_keeps_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")
    with pytest.raises(NoSpaceError) as info:
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(errno.ENOSPC, "No space left on device")
    message = str(info.value)
    assert f"cannot write {str(target)!r}: no space left on the device" in message
    assert f"free in {str(tmp_path)!r}" in message and "\n" not in message
    assert isinstance(info.value, UserError)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_other_errors_pass_through_unchanged(tmp_path):
    with pytest.raises(KeyError):
        with atomic_path(tmp_path / "file.bin"):
            raise KeyError("a bug, not a full disk")
    assert list(tmp_path.iterdir()) == []


@needs_dev_full
def test_torch_save_onto_a_full_device_is_recognised(tmp_path, monkeypatch):
    """torch.save through a file name reports only "unexpected pos"; through our handle the ENOSPC
    from the kernel stays on the exception chain."""
    import tempfile

    real_mkstemp = tempfile.mkstemp

    def full_temporary(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        os.unlink(name)
        os.symlink(DEV_FULL, name)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", full_temporary)
    target = tmp_path / "state.pt"
    with pytest.raises(NoSpaceError, match="state.pt'?: no space left on the device"):
        atomic_torch_save({"weights": torch.zeros(100_000)}, target)
    assert list(tmp_path.iterdir()) == []


def test_stale_temporaries_are_ours_and_the_libraries(tmp_path):
    names = [".0000004.pt.k2j3_x.tmp", ".tmpAb3xZ9", "0000002.pt", "config.json", ".fastdit.lock", ".tmp_notes"]
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    assert [is_temporary(name) for name in names] == [True, True, False, False, False, False]
    assert remove_stale_temporaries(tmp_path) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])
