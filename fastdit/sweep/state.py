"""The sweep's state file, `<out>/sweep.json`: what the sweep is (the settings its scores depend on) and
every score so far, per point and sample count. Written atomically after each score, so a sweep killed
at any moment resumes by running the same command again: a scored point is never sampled or scored
again, a point killed while sampling continues from its finished chunks (`fastdit.sample_ddp`).

A later run with more values on an axis reuses the points it shares with the earlier one; a run whose
scores would not be comparable (another model, metric, reference, seed, batch or label sampling) is
refused, as `fastdit sample-ddp` refuses an output made with other settings.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from ..io import atomic_write_json
from .space import Point

STATE_FILE = "sweep.json"
FORMAT = "fastdit.sweep"
VERSION = 1


class SweepState:
    def __init__(self, out: Path, identity: dict):
        self.path = Path(out) / STATE_FILE
        self.identity = json.loads(json.dumps(identity))  # as it reads back (tuples -> lists)
        self.points: dict[str, dict] = {}
        if self.path.exists():
            self._read()

    def _read(self) -> None:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read the sweep's state {str(self.path)!r} ({err}); move it away to start over") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise UserError(f"{str(self.path)!r} is not a fastdit sweep's state; choose another --out")
        if data.get("identity") != self.identity:
            theirs, ours = data.get("identity") or {}, self.identity
            differ = sorted(key for key in set(theirs) | set(ours) if theirs.get(key) != ours.get(key))
            words = "; ".join(f"{key}: {theirs.get(key)!r} there, {ours.get(key)!r} now" for key in differ)
            raise UserError(f"{str(self.path.parent)!r} holds a sweep with other settings ({words}); its scores would "
                            "not compare with these: choose another --out, or run with the same settings to continue it")
        self.points = data.get("points") or {}

    def score(self, point: Point, count: int) -> dict | None:
        return self.points.get(point.name, {}).get("scores", {}).get(str(count))

    def record(self, point: Point, count: int, scores: dict, recipe: dict) -> None:
        """Keep `scores` of `point` at `count` samples, with the recipe it was sampled with, and write."""
        entry = self.points.setdefault(point.name, {**point.to_json(), "scores": {}})
        entry["recipe"] = recipe
        entry["scores"][str(count)] = scores
        self.write()

    def write(self) -> None:
        atomic_write_json({"format": FORMAT, "version": VERSION, "identity": self.identity, "points": self.points},
                          self.path)
