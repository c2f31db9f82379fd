"""How to run fastdit again from where the user is: the words of the command that fastdit prints.

After `make demo` the `fastdit` script lives in `.venv/bin`, which is not on PATH unless the
environment is activated: a printed `fastdit sample ...` would fail at once. The printed program is
therefore `fastdit` only when that name on PATH is this installation's script; else the script's own
path (relative to the current folder when it lies inside it, e.g. `.venv/bin/fastdit`); else this
interpreter with `-m fastdit`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from pathlib import Path


def script_words(name: str) -> list[str] | None:
    """The words that run this installation's console script `name` as printed, from the current folder:
    `name` when that name on PATH is this installation's script, else the script's path (relative when it
    lies inside the current folder); None when this installation has no such script."""
    script = Path(sys.executable).parent / name
    if not script.exists():
        return None
    on_path = shutil.which(name)
    if on_path is not None and os.path.samefile(on_path, script):
        return [name]
    try:
        return [str(script.relative_to(Path.cwd()))]
    except ValueError:  # not below the current folder: the absolute path
        return [str(script)]


def program_words() -> list[str]:
    """The words that start a fastdit command runnable as printed, from the current folder."""
    return script_words("fastdit") or [sys.executable, "-m", "fastdit"]


def _from_here(path: Path) -> str:
    """`path` relative to the current folder when it lies inside it, else absolute."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def install_command(extra: str) -> str:
    """The command that adds fastdit's optional `extra` to this installation, runnable as printed.

    It is this interpreter's own pip, so the extra lands beside the torch already installed and pip keeps
    that torch (a fresh resolve could pull a multi-GB CUDA build: the Makefile installs torch first for
    that reason). From a source folder (`make demo`'s editable install) the extra comes from that folder,
    else from the package index.
    """
    source = Path(__file__).resolve().parent.parent
    python = _from_here(Path(sys.executable).absolute())
    if (source / "pyproject.toml").is_file():
        return shlex.join([python, "-m", "pip", "install", "-e", f"{_from_here(source)}[{extra}]"])
    return shlex.join([python, "-m", "pip", "install", f"fastdit[{extra}]"])
