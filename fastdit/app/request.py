"""One press of "Generate": the values from the page, the `fastdit sample` command that makes the same
picture, and the picture itself."""

from __future__ import annotations

import shlex
import threading
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from ..program import program_words
from ..sampling import OFFICIAL_CFG_SCALE, OFFICIAL_NUM_STEPS, SamplingOptions
from .models import ModelSource


@dataclass(frozen=True)
class SampleRequest:
    source: ModelSource
    labels: tuple[int, ...]  # each class once; every class gets images_per_class images, one grid row each
    images_per_class: int = 1
    sampler: str | None = None  # None: the objective's own
    num_steps: int = OFFICIAL_NUM_STEPS
    cfg_scale: float = OFFICIAL_CFG_SCALE
    guidance_interval: tuple[float, float] | None = None
    seed: int = 0
    device: str = "auto"

    def check(self) -> None:
        """The cheap checks, before any model is loaded."""
        if not self.labels:
            raise UserError("pick at least one class")
        if self.images_per_class < 1:
            raise UserError(f"images per class must be >= 1, got {self.images_per_class}")
        if self.seed < 0:
            raise UserError(f"the seed must be an integer >= 0, got {self.seed}")

    @property
    def all_labels(self) -> list[int]:
        return [label for label in self.labels for _ in range(self.images_per_class)]

    @property
    def nrow(self) -> int:
        # one class per row when a class has several images; otherwise the classes side by side
        return self.images_per_class if self.images_per_class > 1 else min(len(self.labels), 8)

    def options(self) -> SamplingOptions:
        return SamplingOptions(sampler=self.sampler, num_steps=self.num_steps, cfg_scale=self.cfg_scale,
                               guidance_interval=self.guidance_interval)

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


def generate_grid(request: SampleRequest, cache: ModelCache, out: Path, progress: bool = True) -> str:
    """Sample the request's grid into the PNG `out`; returns the command that reproduces it."""
    from ..image_grid import make_grid
    from ..io import atomic_save_png
    from ..sampling import check_labels, generate

    request.check()
    options = request.options()
    model, info, latent_space, device = cache.get(request.source, request.device)
    options.validate(info.objective)
    labels = check_labels(request.all_labels, info.config.num_classes)
    images = generate(model, latent_space, labels, options=options, objective=info.objective, seed=request.seed,
                      device=device, progress=progress)
    atomic_save_png(make_grid(images, nrow=request.nrow), out)
    return request.command(options.resolved_sampler(info.objective))
