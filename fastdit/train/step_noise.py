"""The random draws of one training step, the same for any number of processes.

For step s, one generator seeded by (seed, s) draws the timesteps, the diffusion noise and the
label-dropout decisions of the whole global batch; each process keeps its own slice. A 1-process and
an N-process run thus train on identical (x_t, t, y) and differ only by floating-point summation
order, and a resumed run draws exactly what the uninterrupted one drew.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..seeding import TRAIN_STEP, seeded_generator


@dataclass
class StepDraws:
    t: torch.Tensor  # (B_local,) int64
    noise: torch.Tensor  # (B_local, C, H, W)
    drop_labels: torch.Tensor  # (B_local,) bool
    latent_noise: torch.Tensor | None  # (B_local, C, H, W) posterior sample for on-the-fly VAE encoding

    def micro(self, start: int, stop: int) -> "StepDraws":
        return StepDraws(
            self.t[start:stop], self.noise[start:stop], self.drop_labels[start:stop],
            None if self.latent_noise is None else self.latent_noise[start:stop],
        )


def draw_step(
    seed: int,
    step: int,
    *,
    global_batch: int,
    rank: int,
    local_batch: int,
    shape: tuple[int, ...],
    process,
    dropout_prob: float,
    with_latent_noise: bool,
    device: torch.device,
) -> StepDraws:
    # Drawn on the CPU: the same numbers on every device type (and cheap next to a DiT step).
    generator = seeded_generator(TRAIN_STEP, seed, step)
    t = process.sample_times(global_batch, generator=generator)  # int64 steps (DDPM) or real t (flow)
    noise = torch.randn((global_batch, *shape), generator=generator)
    drop = torch.rand(global_batch, generator=generator) < dropout_prob
    latent_noise = torch.randn((global_batch, *shape), generator=generator) if with_latent_noise else None
    mine = slice(rank * local_batch, (rank + 1) * local_batch)
    return StepDraws(
        t[mine].to(device),
        noise[mine].to(device),
        drop[mine].to(device),
        None if latent_noise is None else latent_noise[mine].to(device),
    )
