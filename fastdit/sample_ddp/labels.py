"""Class labels for FID sampling, one per global image index, that do not depend on how the work is split.

DiT's `sample_ddp.py` draws `torch.randint` per batch and per rank, so its labels change with the
number of GPUs. Here image i of a run with seed s gets

    uniform:  label = floor(h * K / 2**64),  h = derive_seed("image-label", s, i)   (Lemire's multiply-shift)
    given:    label = class_labels[i % len(class_labels)]

h is the 64-bit hash of `fastdit.seeding` (a fixed algorithm, no library RNG method whose stream could
change between versions), in a stream of its own, apart from the image's noise. The bias of
multiply-shift is below K / 2**64, far below any sampling noise.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..seeding import IMAGE_LABEL, derive_seed


def uniform_label(seed: int, index: int, num_classes: int) -> int:
    """The label of image `index`: uniform over [0, num_classes), a pure function of (seed, index)."""
    return (derive_seed(IMAGE_LABEL, seed, index) * num_classes) >> 64


def labels_for(indices: Sequence[int], *, seed: int, num_classes: int, class_labels: Sequence[int] | None = None) -> np.ndarray:
    """int64 labels of the images with these global indices: uniform, or `class_labels` cycled."""
    if class_labels:
        return np.asarray([class_labels[i % len(class_labels)] for i in indices], dtype=np.int64)
    return np.asarray([uniform_label(seed, i, num_classes) for i in indices], dtype=np.int64)
