"""Where the page's PNGs go: one folder per server, of which only the newest pictures are kept.

Each picture gets a numbered subfolder, so that its download keeps a plain name (fastdit-seed5.png),
and the old ones are removed: a temporary folder per picture that nothing removes would fill the temp
folder with every grid a long-running server ever made.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

KEEP_PICTURES = 32  # enough for every page open at once to still download its latest picture


class OutputFolder:
    def __init__(self, root: str | Path, keep: int = KEEP_PICTURES):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        numbers = [int(p.name) for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()]
        self._next = max(numbers, default=0) + 1

    def new_path(self, name: str) -> Path:
        """A fresh path for the picture `name`; the oldest pictures beyond `keep` are removed."""
        with self._lock:
            folder = self.root / f"{self._next:06d}"
            self._next += 1
            folder.mkdir()
            self._prune()
        return folder / name

    def _prune(self) -> None:
        numbered = sorted((p for p in self.root.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
        for old in numbered[: max(0, len(numbered) - self.keep)]:
            shutil.rmtree(old, ignore_errors=True)
