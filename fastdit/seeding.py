"""One seeding scheme for every random stream in fastdit.

A stream is named (`"image-noise"`, `"train-step"`, ...) and indexed by non-negative integers (the
run's seed, an image index, a step, an epoch). numpy's `SeedSequence` hashes the stream's name and the
integers into 64 bits, so distinct (stream, keys) give unrelated streams: (seed 0, image 1000003) and
(seed 1, image 0) do not collide, and the noise of image i is unrelated to its label. The hash is a
fixed algorithm (O'Neill's seed_seq mixing), so the seeds are the same on every machine.

What a generator then draws is PyTorch's business: `torch.randn` on a CPU generator gives the same
values for the same seed and shape on one machine, but float32 normals may differ in the last bits
between CPUs whose kernels differ in vector width.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch

from .errors import UserError

IMAGE_NOISE = "image-noise"  # sampling: all noise of image i (x_T and every step)
IMAGE_LABEL = "image-label"  # sampling: the uniform class label of image i
EQUAL_LABELS = "equal-labels"  # sampling: the sort key of image i when every class gets N / K images
TRAIN_STEP = "train-step"  # training: timestep, noise and label dropout of global sample g in step s
EPOCH_ORDER = "epoch-order"  # training: the permutation of the dataset in epoch e
DATA_ITEM = "data-item"  # data: the flip and posterior noise of item i in epoch e
DIGITS_SPLIT = "digits-split"  # the digits demo: which digits are held out
DEMO_JUDGE = "demo-judge"  # the digits demo: the judge classifier's batches
DEMO_ENCODER = "demo-encoder"  # the digits demo: the frozen encoder REPA aligns with (its batches)
DECODER_NOISE = "decoder-noise"  # decoder training: the token noise of global sample g in step s
DECODER_AUGMENT = "decoder-augment"  # decoder training: sample g's DiffAug parameters in step s
DECODER_AUGMENT_SWITCHES = "decoder-augment-switches"  # decoder training: which DiffAug operations step s uses

# The largest seed a user may give: torch.manual_seed takes an unsigned 64-bit integer, so a larger one
# would fail deep inside a run (the streams above hash any size, but one scheme bounds every seed flag).
MAX_SEED = 2**64 - 1


def parse_seed(text: str | int) -> int:
    """A seed from its decimal text (or an int): an integer in [0, MAX_SEED]. A ValueError says what is
    wrong with the value; the edge that took it (a flag, a field of the app) names itself."""
    if isinstance(text, bool) or not isinstance(text, (str, int)):
        raise ValueError(f"{text!r} is not an integer")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an integer") from None
    if value < 0:
        raise ValueError(f"{value} is negative; seeds are integers >= 0, e.g. 0")
    if value > MAX_SEED:
        raise ValueError(f"{value} is too large; seeds are integers from 0 to 2^64 - 1 ({MAX_SEED})")
    return value


def derive_seed(stream: str, *keys: int) -> int:
    """A 64-bit seed that is a pure function of the stream name and the non-negative integer keys."""
    words = [int(key) for key in keys]
    if any(word < 0 for word in words):
        raise UserError(f"seeds must be >= 0, got {tuple(keys)} for the {stream!r} stream; pass --seed 0 or a positive value")
    if any(word > MAX_SEED for word in words):
        raise UserError(f"seeds must be at most 2^64 - 1, got {tuple(keys)} for the {stream!r} stream; pass a smaller --seed")
    entropy = [zlib.crc32(stream.encode("utf-8")), *words]
    return int(np.random.SeedSequence(entropy).generate_state(1, dtype=np.uint64)[0])


def seeded_generator(stream: str, *keys: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A `torch.Generator` on `device` (CPU by default) seeded by `derive_seed(stream, *keys)`. A
    generator only draws tensors on its own device type, and CPU and CUDA generators turn one seed into
    different numbers."""
    return torch.Generator(device=device).manual_seed(derive_seed(stream, *keys))
