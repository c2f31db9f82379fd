"""One seeding scheme for every random stream: distinct keys give distinct streams, on every machine."""

import pytest
import torch

from fastdit.errors import UserError
from fastdit.seeding import IMAGE_LABEL, IMAGE_NOISE, TRAIN_STEP, derive_seed, seeded_generator


def test_neighbouring_seeds_and_indices_do_not_collide():
    # The earlier scheme, seed * 1_000_003 + index, gave (0, 1000003) and (1, 0) the same stream.
    assert derive_seed(IMAGE_NOISE, 0, 1_000_003) != derive_seed(IMAGE_NOISE, 1, 0)
    seeds = {derive_seed(IMAGE_NOISE, seed, index) for seed in range(20) for index in range(500)}
    assert len(seeds) == 20 * 500


def test_streams_are_apart():
    # An image's noise and its label, or a training step, never share a seed.
    assert len({derive_seed(stream, 3, 7) for stream in (IMAGE_NOISE, IMAGE_LABEL, TRAIN_STEP)}) == 3


def test_seeds_are_a_fixed_function_of_their_keys():
    # numpy's SeedSequence hashing is platform independent: this value holds on every machine.
    assert derive_seed(IMAGE_NOISE, 0, 0) == 8913966052606553432
    first = torch.randint(0, 2**31, (4,), generator=seeded_generator(TRAIN_STEP, 5, 9))
    again = torch.randint(0, 2**31, (4,), generator=seeded_generator(TRAIN_STEP, 5, 9))
    assert torch.equal(first, again)


def test_negative_seeds_are_user_errors():
    with pytest.raises(UserError, match="seeds must be >= 0"):
        derive_seed(IMAGE_NOISE, -1, 0)
