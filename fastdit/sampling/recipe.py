"""A sampling recipe: every setting that decides how a model is sampled, resolved in layers.

The layers, lowest first:

1. the command's defaults (what `fastdit sample` and `sample-ddp` did before recipes existed);
2. one source: a named preset (`fastdit.sampling.presets`) or a recipe file (`--recipe FILE`, below:
   what `fastdit sweep` writes), or else the recipe the checkpoint records (training writes one into
   every checkpoint and export, `training_recipe`);
3. the flags the user gave, one field each.

A layer sets only the fields it names (a dict of field -> value), so "unset" is "absent", and None
keeps its meaning as a value (all channels guided, no guidance interval). The resolved recipe
remembers which layer set each field, for the job's first line ("settings: preset dit-xl2-256;
--cfg-scale 4 overrode cfg_scale 1.5") and for the record written beside the images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UserError
from .options import OFFICIAL_CFG_SCALE, OPTIONS, RECIPE_OPTIONS, SamplingOptions

# The fields that say how one image is sampled: what a checkpoint may record (`fastdit.sampling.options`).
SAMPLING_FIELDS = RECIPE_OPTIONS
# How each field of a recipe is called on the command line (the flag that overrides it): the sampling
# options' flags, and the job's own fields around them.
FLAGS = {
    "model": "--model",
    "image_size": "--image-size",
    **{name: OPTIONS[name].flag for name in SAMPLING_FIELDS},
    "label_sampling": "--label-sampling",
    "num_samples": "--num-fid-samples",
}
RECIPE_FIELDS = tuple(FLAGS)
# random: each image's label drawn from (seed, index), as DiT's sample_ddp.py draws them; equal: every
# class N / num_classes times (`fastdit.sampling.indexed`).
LABEL_SAMPLINGS = ("random", "equal")

# What the commands did before recipes: the options' defaults (the objective's sampler, DiT's 250
# steps, every channel guided, no interval, no shift) and random labels; cfg 4 for a picture (DiT's
# sample.py), 1.5 for FID (DiT's sample_ddp.py).
DEFAULTS = {"model": None, "image_size": None, **{name: OPTIONS[name].default for name in SAMPLING_FIELDS},
            "label_sampling": "random", "num_samples": 50_000}
FID_CFG_SCALE = 1.5


@dataclass(frozen=True)
class RecipeSource:
    """A layer between the defaults and the flags: `what` names it in messages ("preset dit-xl2-256",
    "the checkpoint's recipe"); `values` are the fields it sets."""

    what: str
    values: dict
    preset: str | None = None


@dataclass
class ResolvedRecipe:
    values: dict  # every field of RECIPE_FIELDS
    origin: dict  # field -> "default", the source's `what`, or the flag that set it
    source: RecipeSource | None = None
    overridden: dict = field(default_factory=dict)  # field -> (flag, the source's value, the flag's value)

    def __getitem__(self, name: str):
        return self.values[name]

    @property
    def preset(self) -> str | None:
        return self.source.preset if self.source else None

    def note_override(self, name: str, flag: str, value) -> None:
        """Record that `flag` (set to `value`) overrides the source's field `name` without being that
        field's own flag: `--class-labels` replaces a preset's label sampling ("random") with given labels.
        The value stays (the job reads it where no flag replaces it); the record, the first line and
        `fastdit evaluate`'s comparison with the published figure name the change."""
        if name not in RECIPE_FIELDS:
            raise ValueError(f"unknown recipe field {name!r}; known: {', '.join(RECIPE_FIELDS)}")
        if self.source is not None and name in self.source.values:
            self.overridden[name] = (flag, self.source.values[name], value)

    def options(self, **others) -> SamplingOptions:
        """The `SamplingOptions` of this recipe; `others` are the options a recipe does not hold (eta, precision)."""
        values = {name: self.values[name] for name in SAMPLING_FIELDS}
        if values["guidance_interval"] is not None:
            values["guidance_interval"] = tuple(values["guidance_interval"])
        return SamplingOptions(**values, **others)

    def describe(self, fields=RECIPE_FIELDS, own_sampler: str | None = None) -> str:
        """One line: where the settings came from, which flag overrode which of the source's values, and
        every value (`own_sampler`: the model's own, shown where the recipe leaves the sampler to it)."""
        words = [f"settings from {self.source.what}" if self.source else "settings: the defaults"]
        given = [name for name in fields if self.origin[name] == FLAGS[name] and name not in self.overridden]
        if self.overridden:
            words.append("; ".join(f"{flag} overrode {name} ({show_value(old, name)} -> {show_value(new, name)})"
                                   for name, (flag, old, new) in self.overridden.items() if name in fields))
        if given:
            words.append("flags: " + ", ".join(f"{FLAGS[name]} {show_value(self.values[name], name)}" for name in given))
        values = dict(self.values)
        if values["sampler"] is None and own_sampler:
            values["sampler"] = own_sampler
        shown = ", ".join(f"{name} {show_value(values[name], name)}" for name in fields
                          if not (name in ("model", "image_size") and values[name] is None))
        return "; ".join(w for w in words if w) + f" ({shown})"

    def to_dict(self, fields=RECIPE_FIELDS) -> dict:
        """The record written beside the images: the preset, the source, every value of `fields` and
        where it came from."""
        return {
            "preset": self.preset,
            "source": self.source.what if self.source else "defaults",
            "values": {name: _plain(self.values[name]) for name in fields},
            "origin": {name: self.origin[name] for name in fields},
            "overridden": {name: {"flag": flag, "was": _plain(old), "now": _plain(new)}
                           for name, (flag, old, new) in self.overridden.items() if name in fields},
        }


def resolve(defaults: dict, source: RecipeSource | None, flags: dict) -> ResolvedRecipe:
    """The recipe: `defaults`, then `source`'s values, then `flags` ({field: value}, only the fields the
    user gave). Unknown field names are a programming error (ValueError)."""
    for layer in (defaults, source.values if source else {}, flags):
        unknown = set(layer) - set(RECIPE_FIELDS)
        if unknown:
            raise ValueError(f"unknown recipe field(s) {sorted(unknown)}; known: {', '.join(RECIPE_FIELDS)}")
    values = {**DEFAULTS, **defaults}
    origin = dict.fromkeys(values, "default")
    if source is not None:
        values.update(source.values)
        origin.update(dict.fromkeys(source.values, source.what))
    overridden = {}
    for name, value in flags.items():
        if source is not None and name in source.values and _plain(source.values[name]) != _plain(value):
            overridden[name] = (FLAGS[name], source.values[name], value)
        values[name] = value
        origin[name] = FLAGS[name]
    return ResolvedRecipe(values=values, origin=origin, source=source, overridden=overridden)


def training_recipe(objective, *, conditional: bool, sampler: str | None = None, num_steps: int | None = None,
                    cfg_scale: float | None = None, input_shape: tuple[int, ...] | None = None) -> dict:
    """The recipe a training run records in its checkpoints: the objective's sampler and step count,
    cfg 1 where guiding is impossible (no null class) or would guide twice (trained in: MeanFlow), the
    time shift that goes with the objective's training for a model of inputs `input_shape` (C, H, W)
    (RAE's sqrt(C·H·W / 4096)), and whatever the run set explicitly (the digits demo's Heun-9 at cfg 3)."""
    policy = objective.sampling
    recipe = {"sampler": sampler or policy.sampler, "num_steps": num_steps or policy.num_steps}
    shift = objective.sampling_time_shift(tuple(input_shape)) if input_shape is not None else None
    if shift is not None:
        recipe["time_shift"] = float(shift)
    if cfg_scale is not None:
        recipe["cfg_scale"] = float(cfg_scale)
    elif policy.cfg_scale(OFFICIAL_CFG_SCALE, conditional=conditional) == 1.0:
        recipe["cfg_scale"] = 1.0
    return recipe


def checkpoint_source(recorded: dict | None) -> RecipeSource | None:
    """The recipe a checkpoint records, as a source; None for files from before recipes (they keep the
    commands' defaults). Fields this version does not know are left out."""
    if not recorded:
        return None
    values = {name: recorded[name] for name in SAMPLING_FIELDS if name in recorded}
    for name, value in values.items():
        if not _fits_kind(OPTIONS[name], value):
            raise UserError(f"the checkpoint's sampling recipe has {name} = {json.dumps(value, default=str)[:40]}, "
                            f"which is no value of {OPTIONS[name].flag}: the file is damaged or its record was edited; "
                            f"export the model again")
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    return RecipeSource("the checkpoint's recipe", values) if values else None


def _fits_kind(option, value) -> bool:
    """Whether a recorded `value` has the type of `option`'s values (its range is the options' own check)."""
    def number(v):
        return isinstance(v, (int, float)) and not isinstance(v, bool)

    if option.kind == "choice":
        return value is None or isinstance(value, str)
    if option.kind == "int":
        return type(value) is int
    if option.kind == "float":
        return number(value)
    if option.kind == "switch":
        return value is None or value == option.switch and type(value) is type(option.switch)
    if option.kind == "path":
        return value is None or isinstance(value, str)
    return value is None or (isinstance(value, (list, tuple)) and len(value) == 2 and all(map(number, value)))


def recorded_options(info, defaults: dict | None = None) -> SamplingOptions:
    """The options a loaded model's checkpoint recommends (its recipe over `defaults`), for callers
    without flags: `generate(..., info=info)` and the app's initial values."""
    return resolve(defaults or {}, checkpoint_source(info.sampling), {}).options()


def _plain(value):
    return list(value) if isinstance(value, tuple) else value


# ------------------------------------------------------------------------------------------------
# Recipe files: settings written down (the winner of `fastdit sweep`, or by hand), read by
# `fastdit sample-ddp --recipe FILE` and `fastdit sample --recipe FILE` as the source layer, in place
# of a preset or the checkpoint's recipe. Besides the recipe's values a file may name the weights
# ("ckpt", used when --ckpt is not given; a relative path is read from the file's folder) and the
# job's settings that decide the bytes of a sample set: image i's noise and label depend on (seed, i),
# and which images share a batch (batch and chunk size) may move their last bits (`fastdit.sample_ddp`).
# So `sample-ddp --recipe FILE` with no other flag writes the very `.npz` the recipe was measured on.
# ------------------------------------------------------------------------------------------------

RECIPE_FILE_FORMAT = "fastdit.recipe"
RECIPE_FILE_VERSION = 1
JOB_FIELDS = ("seed", "batch_size", "chunk_size")  # sample-ddp's --seed, --batch-size, --chunk-size


@dataclass(frozen=True)
class RecipeFile:
    path: Path
    name: str  # how messages and records call it ("recipe <name>"): written in the file, so a copy reads the same
    values: dict  # recipe fields (RECIPE_FIELDS) it sets
    ckpt: Path | None  # the weights it was measured with
    job: dict  # the JOB_FIELDS it sets
    record: dict  # the rest: where it came from (a sweep's metric and scores)

    def as_source(self) -> RecipeSource:
        return RecipeSource(f"recipe {self.name}", dict(self.values))


def write_recipe_file(path: str | os.PathLike, name: str, values: dict, *, ckpt: str | os.PathLike | None = None,
                      job: dict | None = None, record: dict | None = None) -> Path:
    """Write a recipe file (atomically). `values`: recipe fields; `ckpt` is stored relative to the
    file's folder when it lies inside it (the folder can move), else as given."""
    from ..io import atomic_write_json

    path = Path(path)
    unknown = sorted(set(values) - set(RECIPE_FIELDS)) + sorted(set(job or {}) - set(JOB_FIELDS))
    if unknown:
        raise ValueError(f"not recipe fields: {unknown}")
    data = {"format": RECIPE_FILE_FORMAT, "version": RECIPE_FILE_VERSION, "name": name,
            "values": {key: _plain(value) for key, value in values.items()}, **(job or {}),
            **({"record": record} if record else {})}
    if ckpt is not None:
        ckpt = Path(ckpt).resolve()
        folder = path.parent.resolve()
        data["ckpt"] = str(ckpt.relative_to(folder)) if ckpt.is_relative_to(folder) else str(ckpt)
    atomic_write_json(data, path)
    return path


def read_recipe_file(path: str | os.PathLike) -> RecipeFile:
    """A recipe file, checked for its form (the values are checked against the model once it is loaded)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"recipe file {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"cannot read recipe file {str(path)!r}: {err}") from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FILE_FORMAT or not isinstance(data.get("values"), dict):
        raise UserError(f"{str(path)!r} is not a fastdit recipe file (a JSON object with \"format\": "
                        f"\"{RECIPE_FILE_FORMAT}\" and \"values\"); `fastdit sweep` writes them")
    if data.get("version", RECIPE_FILE_VERSION) > RECIPE_FILE_VERSION:
        raise UserError(f"recipe file {str(path)!r} is of version {data['version']}, newer than this fastdit reads "
                        f"({RECIPE_FILE_VERSION}); update fastdit")
    values = dict(data["values"])
    unknown = sorted(set(values) - set(RECIPE_FIELDS))
    if unknown:
        raise UserError(f"recipe file {str(path)!r} sets unknown field(s) {', '.join(unknown)}; known: "
                        f"{', '.join(RECIPE_FIELDS)}")
    if values.get("guidance_interval") is not None:
        values["guidance_interval"] = tuple(values["guidance_interval"])
    if "label_sampling" in values and values["label_sampling"] not in LABEL_SAMPLINGS:
        raise UserError(f"recipe file {str(path)!r}: unknown label sampling {values['label_sampling']!r}; "
                        f"choose one of {', '.join(LABEL_SAMPLINGS)}")
    job = {}
    for key in JOB_FIELDS:
        if key in data:
            if isinstance(data[key], bool) or not isinstance(data[key], int) or data[key] < (0 if key == "seed" else 1):
                raise UserError(f"recipe file {str(path)!r}: {key} must be a {'non-negative' if key == 'seed' else 'positive'} "
                                f"integer, got {data[key]!r}")
            job[key] = data[key]
    ckpt = data.get("ckpt")
    if ckpt is not None:
        ckpt = Path(ckpt).expanduser()
        ckpt = ckpt if ckpt.is_absolute() else path.parent / ckpt
    return RecipeFile(path=path, name=str(data.get("name") or path.stem), values=values, ckpt=ckpt, job=job,
                      record=data.get("record") or {})


def show_value(value, name: str = "") -> str:
    if value is None:  # what None means for each field
        return {"guided_channels": "all", "guidance_interval": "every step", "sampler": "the model's own",
                "guidance_model": "none (classifier-free)"}.get(name, "none")
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(f"{v:g}" for v in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
