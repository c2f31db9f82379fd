"""One press of "Generate": the values from the page, the `fastdit sample` command that makes the same
picture, and the picture itself, sampled in batches of a fixed size with previews along the way.

The messages here reach the page: they name its fields ("the Steps field"), not command-line flags.
"""

from __future__ import annotations

import math
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import UserError
from ..program import program_words
from ..sampling import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, SamplingOptions
from ..sampling.generate import GENERATE_BATCH_SIZE
from ..sampling.guidance import OFFICIAL_GUIDED_CHANNELS
from .models import ModelSource

# Bounds on one request, so that one page cannot hold the server for long or run it out of memory
# (issue #18: a million images per class were sampled as one batch and the server was killed).
# 64 images fill an 8 x 8 grid; 64 images x 250 steps is the official DiT sampler's full grid.
MAX_IMAGES = 64
MAX_IMAGE_STEPS = 64 * 250
# Images sampled at once (the guided batch is twice this): memory stays the same whatever the grid.
# `fastdit sample`'s default batch, so its command makes the page's batches and the same bytes.
BATCH_SIZE = GENERATE_BATCH_SIZE
# Previews of the grid per batch while it is sampled (one every num_steps / this model calls).
PREVIEWS_PER_BATCH = 8
PENDING_GRAY = 128
MAX_SEED = 2**63 - 1  # what a torch generator and the 64-bit seed hash take  # the images of a later batch, before it starts


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


@dataclass(frozen=True)
class SampleRequest:
    source: ModelSource
    labels: tuple[int, ...]  # each class once; every class gets images_per_class images, one grid row each
    images_per_class: int = 1
    sampler: str | None = None  # None: the objective's own
    num_steps: int = OFFICIAL_NUM_STEPS
    cfg_scale: float = OFFICIAL_CFG_SCALE
    guidance_interval: tuple[float, float] | None = None
    # The official DiT/SiT rule: guide the first 3 channels of the model's output (the DiT and SiT presets).
    official_guidance: bool = False
    time_shift: float = 1.0  # flow models only; 1 is no shift
    seed: int = 0
    device: str = "auto"

    def check(self, limits: Limits = Limits()) -> None:
        """The cheap checks, before any model is loaded; `limits` bound the work of one request."""
        if not self.labels:
            raise UserError("pick at least one class in the Classes field")
        if self.images_per_class < 1:
            raise UserError(f"the Images per class field should be a whole number >= 1, got {self.images_per_class}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"the Seed field should be a whole number from 0 to {MAX_SEED}, got {self.seed}")
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
        return SamplingOptions(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                               guided_channels=OFFICIAL_GUIDED_CHANNELS if self.official_guidance else None,
                               guidance_interval=self.guidance_interval, time_shift=self.time_shift)

    def command(self, sampler: str, out: str = "sample.png") -> str:
        """The `fastdit sample` command that writes the same PNG (`sampler`: the resolved one)."""
        if self.source.path is not None:
            words = ["--ckpt", self.source.path]
        else:
            words = ["--model", self.source.model_name, "--image-size", str(self.source.image_size)]
        words += ["--class-labels", *map(str, self.all_labels), "--sampler", sampler,
                  "--num-sampling-steps", str(self.num_steps), "--cfg-scale", repr(float(self.cfg_scale))]
        if self.guidance_interval is not None:
            words += ["--guidance-interval", *(repr(float(t)) for t in self.guidance_interval)]
        if self.official_guidance:
            words += ["--official-guidance"]
        if self.time_shift != 1.0:
            words += ["--time-shift", repr(float(self.time_shift))]
        # --no-upscale: the page writes images at their size (its CSS enlarges them), and so does the command.
        words += ["--seed", str(self.seed), "--nrow", str(self.nrow), "--no-upscale", "--out", out]
        if self.device != "auto":
            words += ["--device", self.device]
        return shlex.join([*program_words(), "sample", *words])


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
    """Keeps the last model loaded, so the next picture from it starts at once; loads one at a time."""

    def __init__(self):
        self._lock = threading.Lock()
        self._key = None
        self._loaded = None

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
    from ..sampling import check_labels, generate, to_uint8

    request.check(limits)
    if stop is not None and stop.is_set():
        raise Stopped
    options = request.options()
    model, info, latent_space, device = cache.get(request.source, request.device)
    options.validate(info.objective)
    labels = check_labels(request.all_labels, info.config.num_classes)
    done: list[np.ndarray] = []
    num_batches = -(-len(labels) // batch_size)
    every = max(1, request.num_steps // PREVIEWS_PER_BATCH)

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
                note = f"batch {number} of {num_batches}, {calls} model calls" if num_batches > 1 else f"{calls} model calls"
                show(to_uint8(latent_space.decode(estimate)), note)

        done.append(generate(model, latent_space, batch, options=options, objective=info.objective, seed=request.seed,
                             indices=range(first, first + len(batch)), device=device, progress=progress,
                             on_estimate=watch))
    atomic_save_png(make_grid(np.concatenate(done), nrow=request.nrow), out)
    return request.command(options.resolved_sampler(info.objective))
