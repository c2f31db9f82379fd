"""One press of "Generate": the values from the page, the `fastdit sample` command that makes the same
picture, and the picture itself, sampled in batches of a fixed size with previews along the way.

The request's sampling fields are the options of `fastdit.sampling.options`, one each, and so is the
command that reproduces it. The messages here reach the page: they name its fields ("the Steps
field"), not command-line flags.
"""

from __future__ import annotations

import dataclasses
import math
import shlex
import threading
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..program import program_words
from ..sampling import OPTIONS, Option, SamplingOptions
from ..sampling.generate import GENERATE_BATCH_SIZE
from ..sampling.options import command_words
from ..sampling.recipe import recorded_options
from ..seeding import MAX_SEED, parse_seed
from .models import ModelSource

# Bounds on one request, so that one page cannot hold the server for long or run it out of memory
# (a request of a million images per class sampled as one batch would have the server killed).
# 64 images fill an 8 x 8 grid; 64 images x 250 steps is the official DiT sampler's full grid.
MAX_IMAGES = 64
MAX_IMAGE_STEPS = 64 * 250
# Images sampled at once (the guided batch is twice this): memory stays the same whatever the grid.
# `fastdit sample`'s default batch, so its command makes the page's batches and the same bytes.
BATCH_SIZE = GENERATE_BATCH_SIZE
# Previews of the grid per batch while it is sampled (one every num_steps / this model calls).
PREVIEWS_PER_BATCH = 8
PENDING_GRAY = 128  # the images of a later batch, before it starts


class Stopped(Exception):
    """The page asked the generation to stop (its Stop button, or its browser went away)."""


@dataclass(frozen=True)
class Limits:
    max_images: int = MAX_IMAGES
    max_image_steps: int = MAX_IMAGE_STEPS


def whole_number(value, field: str, minimum: int) -> int:
    """A number field's value as an int; an emptied field (None) or a fraction is a message naming it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"the {field} field is empty; enter a whole number >= {minimum}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the {field} field should be a whole number >= {minimum}, got {value!r}") from None
    if not math.isfinite(number) or number != int(number) or number < minimum:
        raise UserError(f"the {field} field should be a whole number >= {minimum}, got {value:g}"
                        if isinstance(value, (int, float)) else f"the {field} field should be a whole number >= {minimum}")
    return int(number)


def real_number(value, field: str) -> float:
    """A number field's value as a float; an emptied field is a message naming it."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError(f"the {field} field is empty; enter a number")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"the {field} field should be a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UserError(f"the {field} field should be a finite number, got {number}")
    return number


def seed_number(value) -> int:
    """The Seed field's value: exactly what `--seed` takes (`fastdit.seeding.parse_seed`), so the page
    takes every seed the command line takes, up to 2^64 - 1. The field is text: a number field would
    pass through JavaScript's floats, which hold integers exactly only up to 2^53."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UserError("the Seed field is empty; enter a whole number from 0 to 2^64 - 1")
    try:
        return parse_seed(value)
    except ValueError:
        raise UserError(f"the Seed field should be a whole number from 0 to 2^64 - 1, got {value!r}") from None


def request_name(option: Option) -> str:
    """An option's field in the request: its own name, or for a switch the name of its flag
    (official_guidance: the page's checkbox, True for the flag's value)."""
    return option.dest if option.kind == "switch" else option.name


def request_value(option: Option, value):
    """An option's value as the request holds it (a switch: whether it is on)."""
    return value == option.switch if option.kind == "switch" else value


def option_value(option: Option, value):
    """The request's value of a field as the option's value (a switch: its value, or None when off)."""
    if option.kind == "switch":
        return option.switch if value else None
    return tuple(value) if option.kind == "pair" and value is not None else value


class _Request:
    """What `SampleRequest` does; its fields are made below: the model, the classes and the seed, and
    one field per sampling option (`fastdit.sampling.options.OPTIONS`)."""

    def check(self, limits: Limits = Limits()) -> None:
        """The cheap checks, before any model is loaded; `limits` bound the work of one request."""
        if not self.labels:
            raise UserError("pick at least one class in the Classes field")
        if self.images_per_class < 1:
            raise UserError(f"the Images per class field should be a whole number >= 1, got {self.images_per_class}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"the Seed field should be a whole number from 0 to 2^64 - 1, got {self.seed}")
        count = len(self.labels) * self.images_per_class
        if count > limits.max_images:
            raise UserError(f"{len(self.labels)} classes x {self.images_per_class} images per class = {count} images; "
                            f"this server makes at most {limits.max_images} at a time: pick fewer classes or images per class")
        if count * self.num_steps > limits.max_image_steps:
            raise UserError(f"{count} images x {self.num_steps} steps = {count * self.num_steps:,} image-steps; this server "
                            f"allows {limits.max_image_steps:,} per request: lower the Steps field or make fewer images")

    @property
    def all_labels(self) -> list[int]:
        return [label for label in self.labels for _ in range(self.images_per_class)]

    @property
    def nrow(self) -> int:
        # one class per row when a class has several images; otherwise the classes side by side
        return self.images_per_class if self.images_per_class > 1 else min(len(self.labels), 8)

    def options(self) -> SamplingOptions:
        return SamplingOptions(**{name: option_value(option, getattr(self, request_name(option)))
                                  for name, option in OPTIONS.items()})

    def command(self, sampler: str, out: str = "sample.png", baseline: SamplingOptions | None = None) -> str:
        """The `fastdit sample` command that writes the same PNG (`sampler`: the resolved one). It writes
        every option that differs from `baseline`, what the command takes without the flag (the
        checkpoint's recipe over its defaults; by default the defaults), and sampler, steps and scale."""
        if self.source.path is not None:
            words = ["--ckpt", self.source.path]
        else:
            words = ["--model", self.source.model_name, "--image-size", str(self.source.image_size)]
        words += ["--class-labels", *map(str, self.all_labels)]
        words += command_words(dataclasses.replace(self.options(), sampler=sampler), baseline)
        # --no-upscale: the page writes images at their size (its CSS enlarges them), and so does the command.
        words += ["--seed", str(self.seed), "--nrow", str(self.nrow), "--no-upscale", "--out", out]
        if self.device != "auto":
            words += ["--device", self.device]
        return shlex.join([*program_words(), "sample", *words])


_OPTION_TYPES = typing.get_type_hints(SamplingOptions)
SampleRequest = dataclasses.make_dataclass(
    "SampleRequest",
    [("source", ModelSource),
     ("labels", tuple[int, ...]),  # each class once; every class gets images_per_class images, one grid row each
     ("images_per_class", int, 1),
     *[(request_name(option), bool if option.kind == "switch" else _OPTION_TYPES[name], request_value(option, option.default))
       for name, option in OPTIONS.items()],
     ("seed", int, 0),
     ("device", str, "auto")],
    bases=(_Request,), frozen=True, namespace={"__module__": __name__},
)
SampleRequest.__doc__ = "The page's values for one picture: the model, the classes, each sampling option (`request_name`), the seed."


def parse_interval(text: str | None) -> tuple[float, float] | None:
    """"LOW HIGH" from the page's text box; empty means guide at every step."""
    words = (text or "").replace(",", " ").split()
    if not words:
        return None
    try:
        low, high = map(float, words)
    except ValueError:
        raise UserError(f"guidance interval {text!r} should be two numbers, LOW HIGH, or empty for every step") from None
    return low, high


class ModelCache:
    """Keeps the last model loaded, so the next picture from it starts at once; loads one at a time.
    Likewise the last AutoGuidance model (`guide`), checked against the model it guides."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._loaded = None
        self._guide_key = None
        self._guide = None

    def guide(self, path: str, source: ModelSource, device: str):
        """The guidance model `path` for the model of `source` (loaded by `get`), loaded once and checked."""
        from ..checkpoint import load_guidance_model

        loaded = self.get(source, device)
        key = (path, source, device)
        with self._lock:
            if self._guide_key != key:
                self._guide_key, self._guide = None, None
                self._guide = load_guidance_model(path, loaded.info, device=loaded.device)
                self._guide_key = key
            return self._guide

    def get(self, source: ModelSource, device: str):
        from ..loading import load_for_sampling

        key = (source, device)
        with self._lock:
            if self._key != key:
                self._key, self._loaded = None, None  # free the old model before loading the next one
                self._loaded = load_for_sampling(source.path, model_name=source.model_name,
                                                 image_size=source.image_size, device=device)
                self._key = key
            return self._loaded


def generate_grid(request: SampleRequest, cache: ModelCache, out: Path, progress: bool = True, *,
                  limits: Limits = Limits(), batch_size: int = BATCH_SIZE,
                  on_preview: Callable[[np.ndarray, str], None] | None = None,
                  stop: threading.Event | None = None) -> str:
    """Sample the request's grid into the PNG `out`; returns the command that reproduces it.

    Images are sampled `batch_size` at a time, image k seeded by (seed, k) as `fastdit sample` seeds it,
    so memory does not grow with the grid. `on_preview(grid, note)` receives the whole grid as it is made
    (finished images, the current batch's estimate x̂, gray for the rest) a few times per batch; once
    `stop` is set, the run ends at the next model call by raising `Stopped`."""
    from ..image_grid import make_grid
    from ..io import atomic_save_png
    from ..sampling import check_labels, generate, get_sampler, to_uint8

    request.check(limits)
    if stop is not None and stop.is_set():
        raise Stopped
    options = request.options()
    model, info, latent_space, device = cache.get(request.source, request.device)
    options.validate(info.objective)  # the page's one check: generate() does not repeat it
    if options.guidance_model is not None and options.cfg_scale > 1:  # AutoGuidance: its weaker model, checked
        options.attach_guidance_network(cache.guide(options.guidance_model, request.source, request.device))
    labels = check_labels(request.all_labels, info.config.num_classes)
    done: list[np.ndarray] = []
    num_batches = -(-len(labels) // batch_size)
    every = max(1, request.num_steps // PREVIEWS_PER_BATCH)
    sampler = get_sampler(options.resolved_sampler(info.objective), info.objective)
    total = sampler.model_calls(options.num_steps, options.sampler_options())  # None: adaptive (dopri5)

    def show(current: np.ndarray, note: str) -> None:
        images = np.concatenate([*done, current])  # (n, H, W, C) uint8, the first n images of the grid
        pending = np.full((len(labels) - len(images), *images.shape[1:]), PENDING_GRAY, np.uint8)
        on_preview(np.asarray(make_grid(np.concatenate([images, pending]), nrow=request.nrow)), note)

    for number, first in enumerate(range(0, len(labels), batch_size), start=1):
        batch = labels[first : first + batch_size]
        calls = 0

        def watch(estimate) -> None:
            nonlocal calls
            if stop is not None and stop.is_set():
                raise Stopped
            calls += 1
            if on_preview is not None and calls % every == 0:
                of_calls = f"{calls} of {total} model calls" if total else f"{calls} model calls (adaptive steps)"
                note = f"batch {number} of {num_batches}, {of_calls}" if num_batches > 1 else of_calls
                show(to_uint8(latent_space.decode(estimate)), note)

        done.append(generate(model, latent_space, batch, options=options, objective=info.objective, seed=request.seed,
                             indices=range(first, first + len(batch)), device=device, progress=progress,
                             on_estimate=watch))
    atomic_save_png(make_grid(np.concatenate(done), nrow=request.nrow), out)
    # The command without a flag takes the checkpoint's recipe: it writes each option that differs from it.
    return request.command(options.resolved_sampler(info.objective), baseline=recorded_options(info))
