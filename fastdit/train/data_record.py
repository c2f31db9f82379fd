"""What a run trains on, recorded in its folder (`data.json`) and compared when it resumes.

A label is an index into the sorted class folder names, so a class folder added or removed between
two runs of the same command renumbers every label after it: the resumed model would go on learning
class 5 from what was class 6. The record holds the class list and a digest of the file list, and a
resumed run

* refuses a changed class list, naming the classes added and removed (the labels would change
  meaning: no setting can make the old checkpoint right for the new list);
* warns about a changed file list under the same classes, and records the new one. The labels keep
  their meaning, so the checkpoint is still a good start, and adding or removing images (cleaning a
  dataset, adding a crawl) is a normal thing to do; but the data order is a function of the dataset's
  length, so the run no longer trains on what an uninterrupted one would have, which the warning says.

The digest of an image folder covers each file's path and size, not its bytes: hashing ImageNet's
140 GB would take minutes at every start, while a stat per file costs seconds, and a file added,
removed, renamed or replaced by one of another size changes the digest. A latent store is fixed once
extracted; its record is the digest `fastdit extract` took of the images it encoded, and its count.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json, check_regular_file

DATA_RECORD = "data.json"
_MAX_NAMED = 10


def describe_data(dataset) -> dict:
    """{"class_names", "num_items", "files_digest"} of a training dataset (`fastdit.data`)."""
    from ..data import ImageFolderDataset, LatentStoreDataset

    if isinstance(dataset, ImageFolderDataset):
        digest = image_folder_digest(dataset.index.root, dataset.index.files)
    elif isinstance(dataset, LatentStoreDataset):
        digest = f"store:{dataset.store.meta.get('files_digest', '')}"
    else:  # the digits: part of the package, the same in every run
        digest = None
    return {"class_names": list(dataset.class_names), "num_items": len(dataset), "files_digest": digest}


def image_folder_digest(root: Path, files: list[str]) -> str:
    """sha256 of every file's relative path and size in bytes (why not the bytes: the module docstring)."""
    digest = hashlib.sha256()
    for name in files:
        try:
            size = os.stat(root / name).st_size
        except OSError:  # vanished since the listing: recorded as such, and the next run sees a change
            size = -1
        # surrogateescape: a name that is not UTF-8 keeps its own bytes (Python decodes it that way)
        digest.update(f"{name}\t{size}\n".encode("utf-8", "surrogateescape"))
    return digest.hexdigest()


def read_data_record(run_dir: Path) -> dict | None:
    """The recorded data of a run folder; None when it has none (a new run, or one from before the
    record existed); a UserError when the file is damaged."""
    path = run_dir / DATA_RECORD
    if not os.path.lexists(path):
        return None
    try:
        check_regular_file(path, "data record")  # a folder, pipe or dangling link there: refused, not replaced
    except UserError as err:
        raise UserError(f"{err}; remove it to resume without the data check, or pass another --run-name") from None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{str(path)!r} is not readable JSON ({err}); delete it to resume without the data "
                        f"check, or pass another --run-name") from None
    if not (isinstance(record, dict) and isinstance(record.get("class_names"), list)
            and all(isinstance(name, str) for name in record["class_names"])):
        raise UserError(f"{str(path)!r} does not hold a data record (a list of class names); delete it to resume "
                        f"without the data check, or pass another --run-name")
    return record


def compare_with_record(recorded: dict | None, current: dict, run_dir: Path) -> str | None:
    """Raise a UserError if the class list changed; return a warning if only the file list did."""
    if recorded is None:
        return None
    old, new = recorded["class_names"], current["class_names"]
    if old != new:
        added = [name for name in new if name not in old]
        removed = [name for name in old if name not in new]
        change = "; ".join(part for part in (
            f"added {_named(added)}" if added else "", f"removed {_named(removed)}" if removed else "") if part)
        raise UserError(
            f"the data's classes changed since the run in {str(run_dir)!r} started ({change or 'same names, another order'}): "
            f"every label after the first change would mean another class. Restore the data as it was to resume, "
            f"or pass another --run-name to start a new run on the new classes"
        )
    if recorded.get("files_digest") != current["files_digest"]:
        return (f"the data's file list changed since the last start of this run ({recorded.get('num_items')} -> "
                f"{current['num_items']} items, same classes): training continues, but on another data order "
                f"than an uninterrupted run would have seen")
    return None


def write_data_record(run_dir: Path, record: dict) -> None:
    path = run_dir / DATA_RECORD
    if os.path.lexists(path):  # a folder or a pipe there is refused, not replaced
        try:
            check_regular_file(path, "data record")
        except UserError as err:
            raise UserError(f"{err}; remove it, or pass another --run-name") from None
    atomic_write_json(record, path)


def _named(names: list[str]) -> str:
    shown = ", ".join(repr(name) for name in names[:_MAX_NAMED])
    return shown + (f" and {len(names) - _MAX_NAMED} more" if len(names) > _MAX_NAMED else "")
