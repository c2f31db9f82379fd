"""Class labels for FID sampling, one per global image index, that do not depend on how the work is split.

DiT's `sample_ddp.py` draws `torch.randint` per batch and per rank, so its labels change with the
number of GPUs. Here image i of a run with seed s gets

    uniform:  label = floor(splitmix64(s, i) * K / 2**64)        (Lemire's multiply-shift)
    given:    label = class_labels[i % len(class_labels)]

splitmix64 (Steele et al. 2014) is a fixed integer hash, written out below, so the labels are the same
on every machine and every numpy/torch version; a library RNG's method could change its stream. The
salt keeps the label stream apart from the noise stream of `fastdit.sampling.noise.image_seed`. The
bias of multiply-shift is below K / 2**64, far below any sampling noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

_MASK64 = (1 << 64) - 1
_LABEL_SALT = 0x6C6162656C73  # "labels" in ASCII: a stream of its own


def _splitmix64(value: int) -> int:
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def uniform_label(seed: int, index: int, num_classes: int) -> int:
    """The label of image `index`: uniform over [0, num_classes), a pure function of (seed, index)."""
    # Hash the seed first, then mix in the index, so (seed, index) and (seed + 1, index - 1) differ.
    mixed = _splitmix64(_splitmix64((seed ^ _LABEL_SALT) & _MASK64) ^ (index & _MASK64))
    return (mixed * num_classes) >> 64


def labels_for(indices: Sequence[int], *, seed: int, num_classes: int, class_labels: Sequence[int] | None = None) -> np.ndarray:
    """int64 labels of the images with these global indices: uniform, or `class_labels` cycled."""
    if class_labels:
        return np.asarray([class_labels[i % len(class_labels)] for i in indices], dtype=np.int64)
    return np.asarray([uniform_label(seed, i, num_classes) for i in indices], dtype=np.int64)
