"""Which items each process reads at each step: a pure function of (seed, epoch, step in epoch).

Each epoch is one permutation of the dataset drawn from a generator seeded by (seed, epoch); step k
of the epoch uses global positions [k·B, (k+1)·B) of it, and process r of W reads the r-th slice of
B/W of those. The global batch at a step is therefore the same set of items for any number of
processes, and resuming needs nothing but (epoch, step in epoch): the position is the state.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..seeding import EPOCH_ORDER, seeded_generator


def epoch_permutation(num_items: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(num_items, generator=seeded_generator(EPOCH_ORDER, seed, epoch))


class StepBatchSampler(torch.utils.data.Sampler):
    """Yields this process's list of indices for each step of one epoch, from `start_step` on."""

    def __init__(self, num_items: int, global_batch: int, rank: int, world_size: int, seed: int, epoch: int, start_step: int = 0):
        self.steps = steps_per_epoch(num_items, global_batch)  # the last partial batch is dropped
        self.local_batch = global_batch // world_size
        self.global_batch = global_batch
        self.rank = rank
        self.permutation = epoch_permutation(num_items, seed, epoch)
        self.start_step = start_step

    def __len__(self) -> int:
        return max(self.steps - self.start_step, 0)

    def __iter__(self):
        for step in range(self.start_step, self.steps):
            start = step * self.global_batch + self.rank * self.local_batch
            yield self.permutation[start : start + self.local_batch].tolist()


def steps_per_epoch(num_items: int, global_batch: int) -> int:
    """Full global batches in one epoch; at least one, or the data cannot train at this batch size."""
    if num_items < global_batch:
        raise UserError(
            f"the dataset has {num_items} items, fewer than the global batch size {global_batch}; "
            f"lower --global-batch-size"
        )
    return num_items // global_batch


def batch_split(optim, world_size: int) -> tuple[int, int]:
    """(images per process, images per forward) of a step for the config's optimisation section `optim`;
    a UserError if they do not divide."""
    if optim.global_batch_size % world_size:
        raise UserError(
            f"global batch size {optim.global_batch_size} is not divisible by the {world_size} processes; "
            f"use a multiple of {world_size}"
        )
    local_batch = optim.global_batch_size // world_size
    micro_batch = optim.micro_batch_size or local_batch
    if local_batch % micro_batch:
        raise UserError(f"--micro-batch-size {micro_batch} does not divide the per-process batch {local_batch}")
    return local_batch, micro_batch
