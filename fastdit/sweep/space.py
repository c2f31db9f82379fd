"""What a sweep tries: a list of values per setting, and the points of their product.

The settings are the EMA the weights come from (`Weights`: the run's own last export, an EMA length σ_rel
made from the run's post-hoc snapshots, or an export named by its path) and the recipe options that
decide how one image is sampled (`fastdit.sampling.options`: guidance scale, guidance interval, steps,
sampler, time shift). A point names only the values the command gave, fixed or swept; everything else
comes from the preset or the checkpoint's recipe when the point is sampled (`fastdit.sweep.runner`).
So a point is the same point in a later sweep that adds values to an axis, and its scores are reused.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..power_ema import SIGMA_REL_MAX
from ..sampling.options import OPTIONS

# The recipe options a sweep can vary, in the order of a point's name and of the table's columns, with
# the short word that names each in a point's name ("cfg1.5").
RECIPE_AXES = {"cfg_scale": "cfg", "guidance_interval": "int", "sampler": "", "num_steps": "steps", "time_shift": "shift"}
EVERY_STEP_WORDS = ("none", "every-step")  # a guidance-interval value: guide at every step


@dataclass(frozen=True)
class Weights:
    """Where a point's weights come from: kind "last" (the run's last EMA export, or the --ckpt file),
    "sigma" (the EMA of length `value` made from the run's post-hoc snapshots) or "file" (an export)."""

    kind: str
    value: float | str | None = None

    @property
    def key(self) -> str:
        if self.kind == "last":
            return "last"
        if self.kind == "sigma":
            return f"sigma{self.value:g}"
        return Path(str(self.value)).stem

    @property
    def label(self) -> str:
        """As the table shows it."""
        if self.kind == "sigma":
            return f"σ_rel {self.value:g}"
        return "last export" if self.kind == "last" else Path(str(self.value)).name

    def to_json(self):
        return self.kind if self.kind == "last" else {"sigma": self.value} if self.kind == "sigma" else {"file": self.value}


def parse_ema(word: str) -> Weights:
    """One --ema value: "last", an EMA length σ_rel (a number), or the path of an export."""
    if word == "last":
        return Weights("last")
    try:
        sigma_rel = float(word)
    except ValueError:
        return Weights("file", str(Path(word).expanduser()))
    if not (math.isfinite(sigma_rel) and 0 < sigma_rel <= SIGMA_REL_MAX):
        raise UserError(f"--ema {word}: an EMA length σ_rel must be in (0, {SIGMA_REL_MAX:.3f}]; EDM2's best lie between "
                        "0.05 and 0.15")
    return Weights("sigma", sigma_rel)


def parse_interval(word: str) -> tuple[float, float] | None:
    """One --guidance-interval value: LOW:HIGH, or none (every step)."""
    if word.lower() in EVERY_STEP_WORDS:
        return None
    low, sep, high = word.partition(":")
    try:
        if not sep:
            raise ValueError
        interval = (float(low), float(high))
    except ValueError:
        raise UserError(f"--guidance-interval {word!r}: write LOW:HIGH (e.g. 0.3:1) or none") from None
    if not all(math.isfinite(v) for v in interval):
        raise UserError(f"--guidance-interval {word!r}: LOW and HIGH must be finite numbers")
    return interval


def show(name: str, value) -> str:
    """A value as the table and a point's name write it."""
    if name == "guidance_interval":
        return "none" if value is None else f"{value[0]:g}:{value[1]:g}"
    if isinstance(value, float):
        return f"{value:g}"
    return "own" if value is None else str(value)


@dataclass(frozen=True)
class Point:
    weights: Weights
    values: tuple[tuple[str, object], ...]  # (recipe field, value) for the recipe axes the command gave

    @property
    def recipe_values(self) -> dict:
        return dict(self.values)

    @property
    def name(self) -> str:
        """Its name in file names, the table and the recipe it becomes: ema-sigma0.1_cfg1.5_steps9."""
        words = [f"ema-{self.weights.key}"]
        for field, value in self.values:
            shown = show(field, value).replace(":", "-")
            words.append(f"{RECIPE_AXES[field]}{shown}" if RECIPE_AXES[field] else shown)
        return "_".join(words).replace("/", "-").replace(" ", "")

    def to_json(self) -> dict:
        return {"ema": self.weights.to_json(),
                "values": {field: list(value) if isinstance(value, tuple) else value for field, value in self.values}}


@dataclass(frozen=True)
class SweepSpace:
    ema: tuple[Weights, ...]
    axes: dict  # recipe field -> tuple of values (one value: a fixed setting)

    def points(self) -> list[Point]:
        """The product of every axis, EMA outermost (points of the same weights follow each other, so the
        weights are loaded once for them)."""
        fields = [field for field in RECIPE_AXES if field in self.axes]
        points = [Point(weights, tuple(zip(fields, combination)))
                  for weights in self.ema for combination in itertools.product(*(self.axes[f] for f in fields))]
        names = [point.name for point in points]
        twice = sorted({name for name in names if names.count(name) > 1})
        if twice:
            raise UserError(f"two points share the name {twice[0]!r} (the same value twice, or two --ema files of one "
                            "name): give each value once, and rename one of the files")
        return points

    @property
    def swept(self) -> list[str]:
        """The settings with more than one value: "ema" and recipe fields."""
        return (["ema"] if len(self.ema) > 1 else []) + [field for field in RECIPE_AXES if len(self.axes.get(field, ())) > 1]

    def describe_fixed(self) -> str:
        fixed = [f"ema {self.ema[0].label}"] if len(self.ema) == 1 else []
        fixed += [f"{OPTIONS[field].flag} {show(field, values[0])}" for field, values in self.axes.items() if len(values) == 1]
        return ", ".join(fixed)
