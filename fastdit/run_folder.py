"""Folders that hold one job (a training run, a sample-ddp work folder, a latent store, a demo).

Two rules keep a user's work safe there:

* a folder continues only the job it was started with: `refuse_other_settings` compares the recorded
  settings with the requested ones and names what differs;
* one process tree at a time: `exclusive_lock` takes an advisory `flock` on a lock file in the folder,
  so a second `train` or `sample-ddp` on the same folder stops with a message instead of interleaving
  its writes with the first. The kernel drops the lock when its holder dies (SIGKILL included), so a
  killed run never leaves a stale lock behind on a local disk. Under torchrun, `exclusive_lock_for_all_ranks`
  lets rank 0 hold it for the whole job.

On a cluster the folder is usually on a network filesystem, and two things differ:

* A lock taken by a node that died outlives it: NFSv4 frees it when the node's lease runs out (about
  90 s), NFSv3 when the node comes back, Lustre/GPFS when the node is evicted. torchrun restarts the
  job within seconds, so its restart would be refused by the lock of its own earlier attempt. The lock
  file records the holder's host, pid and job (torchrun's TORCHELASTIC_RUN_ID, else SLURM_JOB_ID): a
  restart of the same job (TORCHELASTIC_RESTART_COUNT or SLURM_RESTART_COUNT above 0) whose earlier
  attempt holds the lock from another host, or from a pid that is gone, replaces the lock file by a new
  one and takes that (torchrun stopped every process of the earlier attempt before restarting). Anyone
  else is refused with the holder named and, for a holder on another host, what to do if it is gone.
* Some filesystems have no `flock` (NFS mounted without lockd: ENOLCK; Lustre without `-o flock`:
  ENOSYS; some FUSE and SMB mounts: EOPNOTSUPP). There the lock is a file created exclusively
  (`HELD_NAME`, removed when the job ends) holding the same record: a holder whose pid is gone on this
  host is stale and replaced, so is a restart's earlier attempt as above; a file left by a job killed on
  another host stays until it is deleted, and the refusal says so. Any other error of the lock is one
  line, never a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
from pathlib import Path
from typing import Iterator, Mapping

from . import distributed
from .distributed import DistInfo
from .errors import UserError
from .io import ensure_writable_dir, full_disk_as_user_error

LOCK_NAME = ".fastdit.lock"  # flocked; it stays in the folder between jobs, naming the last holder
HELD_NAME = ".fastdit.lock.held"  # on a filesystem without flock: exists while a job holds the folder
# flock(2) on a filesystem that does not support it: ENOLCK (NFS without lockd), ENOSYS (Lustre without
# -o flock), EOPNOTSUPP/ENOTSUP (FUSE, SMB), EINVAL (a file type that cannot be locked).
NO_FLOCK_ERRNOS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL})
_HOLDER = re.compile(r"(?P<job>.*) \(pid (?P<pid>[0-9]+) on (?P<host>[^)]*)\)(?: \[(?P<run>[^\]]*)\])?")
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


def is_lock_file(path: str | os.PathLike) -> bool:
    """True for the files `exclusive_lock` keeps in a folder (they are not a job's output)."""
    return Path(path).name in (LOCK_NAME, HELD_NAME)


def _this_run() -> tuple[str | None, bool]:
    """(the job this process belongs to, whether this is a restart of it): torchrun's run id and restart
    count, else SLURM's job id and restart count (a requeued job); (None, False) outside both."""
    for run_id, restarts, name in (("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT", "torchrun run"),
                                   ("SLURM_JOB_ID", "SLURM_RESTART_COUNT", "slurm job")):
        if os.environ.get(run_id):
            count = os.environ.get(restarts, "0")
            return f"{name} {os.environ[run_id]}", count.isdigit() and int(count) > 0
    return None, False


def _record(job: str) -> str:
    """This process as the lock file names it: `fastdit train (pid 12 on node3) [torchrun run 8f2c]`."""
    run, _ = _this_run()
    return f"{job} (pid {os.getpid()} on {socket.gethostname()})" + (f" [{run}]" if run else "")


def _holder(text: str) -> dict:
    """The record read back: job, pid, host, run (None where the text is not a record, e.g. empty)."""
    match = _HOLDER.fullmatch(text.strip())
    if not match:
        return {"text": text.strip() or "another process", "pid": None, "host": None, "run": None}
    return {"text": text.strip().split(" [")[0], "pid": int(match["pid"]), "host": match["host"], "run": match["run"]}


def _is_gone(holder: dict) -> bool:
    """Whether the holder is a process of this host that no longer runs (None: cannot tell)."""
    if holder["pid"] is None or holder["host"] != socket.gethostname():
        return False
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return True
    except OSError:  # EPERM: it runs, as another user
        return False
    return False


def _left_by_an_earlier_attempt(holder: dict) -> bool:
    """The holder is this job's own earlier attempt and this process is its restart: torchrun (or
    SLURM's requeue) stopped it, so a lock still held for it is a dead node's, or a killed process's."""
    run, restarted = _this_run()
    return (restarted and run is not None and holder["run"] == run
            and (holder["host"] != socket.gethostname() or _is_gone(holder)))


def _refusal(folder, holder: dict, lock_file: Path, *, flock: bool) -> UserError:
    words = f"{str(folder)!r} is in use by {holder['text']}; wait for it to finish (or stop it), or choose another folder"
    if holder["host"] not in (None, socket.gethostname()) or not flock:
        gone = ("the file server frees its lock after the node's lease (NFSv4: about 90 s), or delete"
                if flock else "delete")
        words += f". If that job is gone (its node died, or it was killed), {gone} {str(lock_file)!r} and rerun"
    return UserError(words)


@contextlib.contextmanager
def exclusive_lock(folder: str | os.PathLike, job: str) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if missing) for the duration of the block.

    `job` names the command in the message a second process gets (e.g. "fastdit train"). A flock where
    the filesystem has one, else a file created exclusively (see the module doc for both, and for what
    a restart of the same job does). On systems without `fcntl` (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock_path = ensure_writable_dir(folder) / LOCK_NAME
    handle = _flocked(folder, lock_path, job, fcntl)
    if handle is None:  # no flock on this filesystem
        with _held_by_creation(folder, ensure_writable_dir(folder) / HELD_NAME, job):
            yield
        return
    try:
        yield
    finally:
        handle.close()  # closing the descriptor releases the lock


def _flocked(folder, lock_path: Path, job: str, fcntl):
    """An open handle of `lock_path` holding its flock, with this process recorded in it; None where the
    filesystem has no flock; a UserError if another job holds it (or any other error of the lock)."""
    for attempt in range(2):
        try:
            with full_disk_as_user_error(lock_path):
                handle = open(lock_path, "a+")
        except OSError as err:  # a full disk is a NoSpaceError (not an OSError) by now
            raise UserError(f"cannot open the lock file {str(lock_path)!r}: {err.strerror or err}") from None
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = _holder(handle.read())
            handle.close()
            if attempt == 0 and _left_by_an_earlier_attempt(holder):
                # The lock is on the file, not its name: a new file under the name is free to take.
                print(f"warning: {str(folder)!r} is still locked for {holder['text']}, this job's earlier attempt; "
                      f"taking it over with a new lock file", file=sys.stderr)
                lock_path.unlink(missing_ok=True)
                continue
            raise _refusal(folder, holder, lock_path, flock=True) from None
        except OSError as err:
            handle.close()
            if err.errno in NO_FLOCK_ERRNOS:
                print(f"warning: the filesystem of {str(folder)!r} has no flock ({err.strerror}); locking it with "
                      f"{HELD_NAME}, which a job killed on another host leaves behind", file=sys.stderr)
                return None
            raise UserError(f"cannot lock {str(lock_path)!r}: {err.strerror or err}") from None
        # Who holds it, for the message above (the host too: the folder may be on a shared filesystem).
        with full_disk_as_user_error(lock_path):
            handle.seek(0)
            handle.truncate()
            handle.write(_record(job))
            handle.flush()
        return handle
    raise AssertionError("unreachable")  # pragma: no cover


@contextlib.contextmanager
def _held_by_creation(folder, held: Path, job: str) -> Iterator[None]:
    """The lock of a filesystem without flock: `held` created exclusively for the block, removed after."""
    for attempt in range(2):
        try:
            with full_disk_as_user_error(held):
                descriptor = os.open(held, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = _holder(held.read_text(errors="replace"))
            except FileNotFoundError:  # its holder just let go
                continue
            if attempt == 0 and (_is_gone(holder) or _left_by_an_earlier_attempt(holder)):
                print(f"warning: {str(held)!r} was left by {holder['text']}, which is gone; taking it over", file=sys.stderr)
                held.unlink(missing_ok=True)
                continue
            raise _refusal(folder, holder, held, flock=False) from None
        except OSError as err:
            raise UserError(f"cannot create the lock file {str(held)!r}: {err.strerror or err}") from None
        break
    else:
        raise UserError(f"cannot take the lock file {str(held)!r}: another job takes and leaves it; try again")
    try:
        with full_disk_as_user_error(held), os.fdopen(descriptor, "w") as handle:
            handle.write(_record(job))
        yield
    finally:
        held.unlink(missing_ok=True)


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
