"""Which model the page samples from: the digits demo, a local checkpoint, or an official release."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ..demo.run import TRAIN_RUN, DemoConfig
from ..errors import UserError
from ..hub import OFFICIAL_CHECKPOINTS, official_objective
from ..train.state import checkpoint_dir

DIGITS = "digits demo (offline)"
LOCAL = "local checkpoint"
# Where `make demo` (the Makefile's DEMO_OUT) and a bare `fastdit demo` (DemoConfig.out) write their run.
DEMO_FOLDERS = ("demo-out", DemoConfig.out)


def official_choice(model_name: str, image_size: int) -> str:
    return f"{model_name} {image_size}px (ImageNet, downloaded on first use)"


OFFICIAL = {official_choice(m, s): (m, s) for m, s in OFFICIAL_CHECKPOINTS.values()}
MODEL_CHOICES = [DIGITS, LOCAL, *OFFICIAL]
# What the Checkpoint field takes (the files `checkpoint.load_model` reads).
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")


def preset_choice(preset) -> str | None:
    """The Model choice of a sampling preset (`fastdit.sampling.presets`): the official weights of the
    model and size it names, as `fastdit sample --preset` picks them; None for a recipe that names no
    model (repa-sde-250, for a model you trained), which leaves the choice to the user."""
    model_name, image_size = preset.recipe.get("model"), preset.recipe.get("image_size")
    if model_name is None:
        return None
    choice = official_choice(model_name, image_size)
    return choice if choice in OFFICIAL else None


def find_demo_checkpoint(folders) -> Path | None:
    """The newest EMA weights a digits demo wrote (DIR/train/checkpoints/NNNNNNN-ema.safetensors) in the
    first of `folders` that has one; None if none has."""
    for folder in folders:
        found = sorted(checkpoint_dir(Path(folder) / TRAIN_RUN).glob("*-ema.safetensors"))
        if found:
            return found[-1]
    return None


@dataclass(frozen=True)
class ModelSource:
    """What to load: a checkpoint path, or (path None) the official weights of model_name at image_size."""
    path: str | None = None
    model_name: str | None = None
    image_size: int | None = None

    @property
    def official_objective(self) -> str | None:
        return official_objective(self.model_name) if self.path is None else None


def model_source(choice: str, path: str | None, demo_folders) -> ModelSource:
    """The model behind a choice in the page; `path` is the text of the checkpoint box (the digits
    demo uses it too when no demo run is found, so a run elsewhere can be given)."""
    path = (path or "").strip()
    if choice in OFFICIAL:
        return ModelSource(None, *OFFICIAL[choice])
    if choice == DIGITS and not path:
        found = find_demo_checkpoint(demo_folders)
        if found is None:
            raise UserError(f"no digits demo found in {', '.join(map(str, demo_folders))}; run `make demo` "
                            "(or `fastdit demo`), or give the path of its -ema.safetensors checkpoint")
        return ModelSource(str(found))
    if choice not in (DIGITS, LOCAL):
        raise UserError(f"unknown model {choice!r}; pick one from the Model list")
    if not path:
        raise UserError("the Checkpoint field is empty; give the path of a .pt or .safetensors checkpoint")
    return ModelSource(readable_checkpoint(path))


def readable_checkpoint(path: str) -> str:
    """The Checkpoint field's file, expanded. Anyone who can load the page can type any path, so the
    field must not tell which files the server has: a name without a checkpoint suffix is
    refused before the disk is touched, and a missing file, a folder and a file the server may not read
    get one and the same message."""
    shown = path if len(path) <= 200 else path[:100] + "..." + path[-40:]
    try:
        candidate = Path(path).expanduser()  # "~nobody/x": no such home folder
    except RuntimeError:
        candidate = Path(path)
    if candidate.suffix.lower() not in CHECKPOINT_SUFFIXES:
        raise UserError(f"the Checkpoint field takes a .pt, .pth or .safetensors file, not {shown!r}")
    try:
        readable = candidate.is_file() and os.access(candidate, os.R_OK)
    except (OSError, ValueError):  # a name longer than the file system allows, a NUL byte
        readable = False
    if not readable:
        raise UserError(f"no readable checkpoint at {shown!r}; check the Checkpoint field")
    return str(candidate)
