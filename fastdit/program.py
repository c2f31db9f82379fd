"""How to run fastdit again from where the user is: the words of the command that fastdit prints.

After `make demo` the `fastdit` script lives in `.venv/bin`, which is not on PATH unless the
environment is activated: a printed `fastdit sample ...` would fail at once. The printed program is
therefore `fastdit` only when that name on PATH is this installation's script; else the script's own
path (relative to the current folder when it lies inside it, e.g. `.venv/bin/fastdit`); else this
interpreter with `-m fastdit`.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def program_words() -> list[str]:
    """The words that start a fastdit command runnable as printed, from the current folder."""
    script = Path(sys.executable).parent / "fastdit"
    on_path = shutil.which("fastdit")
    if on_path is not None and script.exists() and os.path.samefile(on_path, script):
        return ["fastdit"]
    if script.exists():
        try:
            return [str(script.relative_to(Path.cwd()))]
        except ValueError:  # not below the current folder: the absolute path
            return [str(script)]
    return [sys.executable, "-m", "fastdit"]
