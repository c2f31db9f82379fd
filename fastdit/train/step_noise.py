"""The random draws of one training step: each process draws only its own samples.

Global sample g of step s (g = rank · B_local + i) gets its objective's draws (`Objective.draw`: a
timestep and the diffusion noise for DDPM, ...), its label-dropout decision, when images are
encoded on the fly its posterior noise and then the training extensions' draws (`TrainExtension.draw`:
token routing's kept tokens), in that order, from a generator of its own,
seeded by (seed, s, g) (`fastdit.seeding`, stream TRAIN_STEP). What sample g receives thus depends on
nothing but (seed, s, g): not on the process count, the rank, the global or local batch size, or the
micro-batch split. A 1-process and an N-process run train on identical (x_t, t, y) and differ only by
floating-point summation order, and a resumed run draws exactly what the uninterrupted one drew.

Why per sample rather than one generator per step: a generator seeded per step has to draw the whole
global batch (256-1024 latents) for any process to find its slice, on every process, every step.
Per-sample generators let each process draw its B_local samples only.

Where: on the CPU, whatever device trains, then moved to it with one copy per tensor. A CUDA generator
per sample would cost a handful of tiny kernel launches per sample (thousands a step at a large batch),
and the CPU draws are microseconds per sample. So a CPU run and a CUDA run with the same seed train on
the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..seeding import TRAIN_STEP, seeded_generator

CPU = torch.device("cpu")

# An extension's per-sample draw: (generator, device) -> {name: tensor with a batch dimension of 1}.
ExtraDraw = Callable[[torch.Generator, torch.device], "dict[str, torch.Tensor]"]


@dataclass
class StepDraws:
    objective: dict[str, torch.Tensor]  # the objective's draws, each (B_local, ...)
    drop_labels: torch.Tensor  # (B_local,) bool
    latent_noise: torch.Tensor | None  # (B_local, C, H, W) posterior sample for on-the-fly VAE encoding
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # the extensions' draws, e.g. "route_kept" (B_local, K)

    def micro(self, start: int, stop: int) -> "StepDraws":
        return StepDraws(
            {name: value[start:stop] for name, value in self.objective.items()}, self.drop_labels[start:stop],
            None if self.latent_noise is None else self.latent_noise[start:stop],
            {name: value[start:stop] for name, value in self.extra.items()},
        )


def _draw_sample(seed, step, index, shape, objective, dropout_prob, with_latent_noise, extra_draws,
                 device=CPU) -> StepDraws:
    """The draws of global sample `index`, each of batch size 1, in a fixed order from its own generator."""
    generator = seeded_generator(TRAIN_STEP, seed, step, index, device=device)
    drawn = objective.draw(shape, generator, device)
    drop = torch.rand(1, generator=generator, device=device) < dropout_prob
    latent_noise = torch.randn((1, *shape), generator=generator, device=device) if with_latent_noise else None
    extra = {}
    for draw in extra_draws:  # last: a run without an extension draws what it drew before
        extra.update(draw(generator, device))
    return StepDraws(drawn, drop, latent_noise, extra)


def draw_step(
    seed: int,
    step: int,
    *,
    global_batch: int,
    rank: int,
    local_batch: int,
    shape: tuple[int, ...],
    objective,
    dropout_prob: float,
    with_latent_noise: bool,
    device: torch.device,
    extra_draws: Sequence[ExtraDraw] = (),
) -> StepDraws:
    """This process's draws of step `step`: global samples rank · local_batch ... + local_batch − 1, drawn
    on the CPU and returned on `device`."""
    device, first = torch.device(device), rank * local_batch
    if first < 0 or first + local_batch > global_batch:  # a caller's bug, not a user's input
        raise ValueError(f"rank {rank} with {local_batch} samples each lies outside the global batch of {global_batch}")
    samples = [
        _draw_sample(seed, step, index, shape, objective, dropout_prob, with_latent_noise, extra_draws)
        for index in range(first, first + local_batch)
    ]

    def gathered(tensors: list[torch.Tensor]) -> torch.Tensor:
        batch = torch.cat(tensors)
        if device.type == "cuda":  # one copy per tensor, from page-locked memory so that it does not wait
            return batch.pin_memory().to(device, non_blocking=True)
        return batch.to(device)

    return StepDraws(
        {name: gathered([s.objective[name] for s in samples]) for name in samples[0].objective},
        gathered([s.drop_labels for s in samples]),
        gathered([s.latent_noise for s in samples]) if with_latent_noise else None,
        {name: gathered([s.extra[name] for s in samples]) for name in samples[0].extra},
    )
