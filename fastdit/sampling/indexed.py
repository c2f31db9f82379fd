"""Images sampled by global index, for FID: image i's class label and noise depend only on (seed, i),
so they do not depend on how the work is split into batches, processes or resumed runs (EDM2 practice).
`fastdit sample-ddp` and the FID of a training run both sample through `sample_by_index`.

Class labels. DiT's `sample_ddp.py` draws `torch.randint` per batch and per rank, so its labels change
with the number of GPUs. Here image i of a run with seed s gets

    uniform:  label = floor(h * K / 2**64),  h = derive_seed("image-label", s, i)   (Lemire's multiply-shift)
    given:    label = class_labels[i % len(class_labels)]

h is the 64-bit hash of `fastdit.seeding` (a fixed algorithm, no library RNG method whose stream could
change between versions), in a stream of its own, apart from the image's noise. The bias of
multiply-shift is below K / 2**64, far below any sampling noise.

Noise. `generate` draws image i's noise from a generator of its own, seeded by (seed, i)
(`fastdit.sampling.noise`).
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch

from ..objectives import Objective
from ..seeding import IMAGE_LABEL, derive_seed
from .generate import SamplingOptions, generate


def uniform_label(seed: int, index: int, num_classes: int) -> int:
    """The label of image `index`: uniform over [0, num_classes), a pure function of (seed, index)."""
    return (derive_seed(IMAGE_LABEL, seed, index) * num_classes) >> 64


def labels_for(indices: Sequence[int], *, seed: int, num_classes: int, class_labels: Sequence[int] | None = None) -> np.ndarray:
    """int64 labels of the images with these global indices: uniform, or `class_labels` cycled."""
    if class_labels:
        return np.asarray([class_labels[i % len(class_labels)] for i in indices], dtype=np.int64)
    return np.asarray([uniform_label(seed, i, num_classes) for i in indices], dtype=np.int64)


def as_rgb(images: np.ndarray) -> np.ndarray:
    """(N, H, W, 1 or 3) -> (N, H, W, 3): ADM's evaluator and Inception take RGB; gray is repeated."""
    return np.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images


def sample_by_index(
    model,
    latent_space,
    indices: Sequence[int],
    *,
    seed: int,
    batch_size: int,
    options: SamplingOptions,
    objective: Objective,
    class_labels: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    compile: bool = False,
) -> Iterator[tuple[Sequence[int], np.ndarray, np.ndarray]]:
    """Yield (indices, int64 labels, (N, H, W, 3) uint8 RGB images) for `indices` in batches of `batch_size`.

    Batches are consecutive slices of `indices`. Which images share a batch can change their last bits
    (a matrix product over 2 rows and over 4 may round differently), so a caller that promises the same
    bytes whatever the number of processes must hand in the same slices (sample-ddp: one chunk at a time).
    """
    num_classes = model.config.num_classes
    for first in range(0, len(indices), batch_size):
        batch = indices[first : first + batch_size]
        labels = labels_for(batch, seed=seed, num_classes=num_classes, class_labels=class_labels)
        images = generate(model, latent_space, labels, options=options, objective=objective, seed=seed, indices=batch,
                          device=device, compile=compile, batch_size=batch_size)
        yield batch, labels, as_rgb(images)
