"""The network as a training step hands it to an objective's `losses`.

An objective computes its loss from model calls. Most make one, the trained forward, through whatever
the step runs (activation checkpointing, regional compilation, DDP or FSDP2) and with the inputs the
training extensions add to it (token routing's kept tokens): calling the `TrainingNetwork` is that
forward, on the rows of the batch the step handed over. Some objectives also need passes whose output
is a regression target under stop-gradient (MeanFlow's JVP and its guided field): `target` runs the same
weights as the plain module, on every token and without the training-only inputs, since a target is a
property of the network that sampling will run, and on any rows. `whole_batch` says that every process
must run the same forwards (FSDP2 gathers the sharded weights in each one), so such passes may not pick
a data-dependent subset of rows.
"""

from __future__ import annotations

from typing import Callable

import torch


class TrainingNetwork:
    """`network(x, t, **conditions)` is the trained forward; `network.target(x, t, **conditions)` the
    same weights for no-grad passes; `network.whole_batch` as in the module docstring."""

    def __init__(self, forward: Callable[..., torch.Tensor], target: Callable[..., torch.Tensor] | None = None, *,
                 training_inputs: dict | None = None, whole_batch: bool = False):
        self.forward = forward
        self.target = target if target is not None else forward
        self.training_inputs = dict(training_inputs or {})
        self.whole_batch = whole_batch

    def __call__(self, x: torch.Tensor, t: torch.Tensor, **conditions) -> torch.Tensor:
        return self.forward(x, t, **conditions, **self.training_inputs)

    @classmethod
    def of(cls, model: Callable[..., torch.Tensor]) -> "TrainingNetwork":
        """A plain module or function as both forwards, with no training-only inputs (direct use, tests)."""
        return cls(model)
