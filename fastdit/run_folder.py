"""Folders that hold one job (a training run, a sample-ddp work folder, a latent store, a demo).

Two rules keep a user's work safe there:

* a folder continues only the job it was started with: `refuse_other_settings` compares the recorded
  settings with the requested ones and names what differs;
* one process tree at a time: `exclusive_lock` takes an advisory `flock` on a lock file in the folder,
  so a second `train` or `sample-ddp` on the same folder stops with a message instead of interleaving
  its writes with the first. The kernel drops the lock when its holder dies (SIGKILL included), so a
  killed run never leaves a stale lock behind. Under torchrun, `exclusive_lock_for_all_ranks` lets
  rank 0 hold it for the whole job.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
from typing import Iterator, Mapping

from . import distributed
from .distributed import DistInfo
from .errors import UserError
from .io import ensure_writable_dir, full_disk_as_user_error

LOCK_NAME = ".fastdit.lock"
_MAX_LISTED = 5


def setting_differences(recorded: Mapping, requested: Mapping, ignore=(), prefix: str = "") -> list[str]:
    """`key: old -> new` for every key whose value differs (nested mappings compared key by key)."""
    found = []
    for key in sorted(set(recorded) | set(requested)):
        if key in ignore:
            continue
        old, new = recorded.get(key), requested.get(key)
        if isinstance(old, Mapping) and isinstance(new, Mapping):
            found += setting_differences(old, new, prefix=f"{prefix}{key}.")
        elif old != new:
            found.append(f"{prefix}{key}: {_short(old)} -> {_short(new)}")
    return found


def refuse_other_settings(what: str, recorded: Mapping, requested: Mapping, fix: str, ignore=()) -> None:
    """Raise `UserError("<what> with other settings (a: 1 -> 2; ...); <fix>")` if any setting differs."""
    changed = setting_differences(recorded, requested, ignore)
    if changed:
        listed = "; ".join(changed[:_MAX_LISTED])
        if len(changed) > _MAX_LISTED:
            listed += f"; and {len(changed) - _MAX_LISTED} more"
        raise UserError(f"{what} with other settings ({listed}); {fix}")


def _short(value) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, job: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the duration of the block.

    `job` names the command in the message a second process gets (e.g. "fastdit train"). On systems
    without `fcntl` (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = ensure_writable_dir(folder) / LOCK_NAME
    with full_disk_as_user_error(lock_path):
        handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise UserError(
                f"{str(folder)!r} is in use by {holder}; wait for it to finish (or stop it), or choose another folder"
            ) from None
        # Who holds it, for the message above (the host too: the folder may be on a shared filesystem).
        with full_disk_as_user_error(lock_path):
            handle.seek(0)
            handle.truncate()
            handle.write(f"{job} (pid {os.getpid()} on {socket.gethostname()})")
            handle.flush()
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


@contextlib.contextmanager
def exclusive_lock_for_all_ranks(folder: str | os.PathLike, job: str, dist: DistInfo) -> Iterator[None]:
    """`exclusive_lock` for a job of one or many processes (torchrun): rank 0 takes it for all of them.

    If it is refused, rank 0 raises the UserError (printed as one line by the CLI) and the other
    ranks leave with exit status 2 too, instead of waiting for rank 0 at their next collective call.
    """
    with contextlib.ExitStack() as held:
        refusal = None
        if dist.is_main:
            try:
                held.enter_context(exclusive_lock(folder, job))
            except UserError as err:
                refusal = err
        if distributed.is_initialized():
            import torch.distributed

            refused = [refusal is not None]
            torch.distributed.broadcast_object_list(refused, src=0)  # also keeps the others until rank 0 holds it
            if refused[0]:
                # Every rank knows now, so all leave the group together (barrier, then destroy): a process
                # that exits with the group alive, or before the others have read its last message, can
                # abort in gloo's teardown ("terminate called without an active exception") or leave
                # them waiting.
                distributed.shutdown()
                if not dist.is_main:
                    distributed.leave_job_now(2)  # rank 0 reports the refusal
        if refusal is not None:
            raise refusal
        yield
