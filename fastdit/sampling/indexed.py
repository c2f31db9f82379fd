"""Images sampled by global index, for FID: image i's class label and noise depend only on (seed, i),
so they do not depend on how the work is split into batches, processes or resumed runs (EDM2 practice).
`fastdit sample-ddp` and the FID of a training run both sample through `sample_by_index`.

Class labels. DiT's `sample_ddp.py` draws `torch.randint` per batch and per rank, so its labels change
with the number of GPUs. Here image i of a run with seed s gets

    uniform:  label = floor(h * K / 2**64),  h = derive_seed("image-label", s, i)   (Lemire's multiply-shift)
    equal:    label = rank(i) mod K, rank(i) = the place of image i when the N images of the run are
              sorted by g(i) = derive_seed("equal-labels", s, i) (ties, with odds 2**-64, by index)
    given:    label = class_labels[i % len(class_labels)]

"equal" gives every class exactly N / K images (N a multiple of K) in an order fixed by the seed: the
ranks are a random permutation of 0..N-1 and exactly N / K of them have each remainder mod K. Image
i's label depends on (seed, N, i): the run's size, never on how the run is split.

h and g are the 64-bit hash of `fastdit.seeding` (a fixed algorithm, no library RNG method whose stream could
change between versions), in a stream of its own, apart from the image's noise. The bias of
multiply-shift is below K / 2**64, far below any sampling noise.

Noise. `generate` draws image i's noise from a generator of its own, seeded by (seed, i)
(`fastdit.sampling.noise`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Iterator, Sequence

import numpy as np
import torch

from ..objectives import Objective
from ..errors import UserError
from ..image_grid import as_rgb
from ..seeding import EQUAL_LABELS, IMAGE_LABEL, derive_seed
from .generate import SamplingOptions, generate
from .recipe import LABEL_SAMPLINGS


def uniform_label(seed: int, index: int, num_classes: int) -> int:
    """The label of image `index`: uniform over [0, num_classes), a pure function of (seed, index)."""
    return (derive_seed(IMAGE_LABEL, seed, index) * num_classes) >> 64


def check_equal_labels(num_samples: int, num_classes: int) -> None:
    if num_samples % num_classes:
        below, above = num_samples - num_samples % num_classes, num_samples + num_classes - num_samples % num_classes
        raise UserError(f"equal label sampling gives every class the same number of images: {num_samples} images "
                        f"are not a multiple of {num_classes} classes; use {below or above} or {above} images, "
                        "or --label-sampling random")


@lru_cache(maxsize=4)
def _equal_ranks(seed: int, num_samples: int) -> np.ndarray:
    """rank(i) of every image of a run of `num_samples` (see the module doc); computed once per run."""
    keys = np.fromiter((derive_seed(EQUAL_LABELS, seed, i) for i in range(num_samples)), dtype=np.uint64,
                       count=num_samples)
    order = np.argsort(keys, kind="stable")  # stable: a tie goes to the lower index
    ranks = np.empty(num_samples, dtype=np.int64)
    ranks[order] = np.arange(num_samples)
    ranks.flags.writeable = False  # shared by every call of the run
    return ranks


def labels_for(indices: Sequence[int], *, seed: int, num_classes: int, class_labels: Sequence[int] | None = None,
               label_sampling: str = "random", num_samples: int | None = None) -> np.ndarray:
    """int64 labels of the images with these global indices: `class_labels` cycled when given, else
    drawn by `label_sampling`: "random" (uniform), or "equal" over the run's `num_samples` images."""
    if class_labels:
        return np.asarray([class_labels[i % len(class_labels)] for i in indices], dtype=np.int64)
    if label_sampling not in LABEL_SAMPLINGS:
        raise UserError(f"unknown label sampling {label_sampling!r}; choose one of {', '.join(LABEL_SAMPLINGS)}")
    if label_sampling == "equal":
        if num_samples is None:
            raise ValueError("equal label sampling needs the run's number of images (num_samples)")
        check_equal_labels(num_samples, num_classes)
        ranks = _equal_ranks(seed, num_samples)
        return np.asarray([ranks[i] % num_classes for i in indices], dtype=np.int64)
    return np.asarray([uniform_label(seed, i, num_classes) for i in indices], dtype=np.int64)


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
    label_sampling: str = "random",
    num_samples: int | None = None,
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
        labels = labels_for(batch, seed=seed, num_classes=num_classes, class_labels=class_labels,
                            label_sampling=label_sampling, num_samples=num_samples)
        images = generate(model, latent_space, labels, options=options, objective=objective, seed=seed, indices=batch,
                          device=device, compile=compile, batch_size=batch_size)
        yield batch, labels, as_rgb(images)
