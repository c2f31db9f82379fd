"""A frozen encoder for 8x8 digits, for representation alignment (REPA) on the digits demo.

REPA aligns the DiT's hidden tokens with the patch tokens of a pretrained encoder (DINOv2 on
ImageNet). No such encoder exists for 8x8 digits, so the demo trains one, once, in seconds: a small
patch network, supervised on the DiT's own training split (1,438 digits), whose 4x4 grid of tokens
(64 values each) then serves as REPA's targets. It is deliberately not the judge: another
architecture (2x2 patch embedding and 3x3 convolutions on the token grid, no pooling, GELU; the judge
is a pooled ReLU CNN), another seed stream, and the other split of the data, so alignment cannot
teach the DiT the judge's own features.

It is saved as TorchScript with its input side (`resolution = 8`), which `fastdit.encoders.load_encoder`
reads: `fastdit train --repa PATH.ts` uses it like any other encoder, through the same
preprocessing (`encoder_input`: gray to RGB, ImageNet normalisation) that it was trained with.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..encoders import IMAGENET_MEAN, IMAGENET_STD, encoder_input
from ..io import atomic_path
from ..seeding import DEMO_ENCODER, seeded_generator
from .classifier import random_shift

RESOLUTION = 8
TOKEN_DIM = 64


class DigitTokens(nn.Module):
    """(N, 3, 8, 8) normalised images -> (N, 16, 64) tokens on a 4x4 grid."""

    def __init__(self, dim: int = TOKEN_DIM):
        super().__init__()
        self.resolution = RESOLUTION  # an int attribute: TorchScript keeps it, load_encoder reads it
        self.patches = nn.Conv2d(3, dim, kernel_size=2, stride=2)  # (N, D, 4, 4): one token per 2x2 patch
        self.mix = nn.Sequential(
            nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1),
            nn.GELU(), nn.Conv2d(dim, dim, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grid = self.patches(x)
        grid = grid + self.mix(grid)
        return grid.flatten(2).transpose(1, 2)  # (N, 16, D)


def train_digit_encoder(images: torch.Tensor, labels: torch.Tensor, *, epochs: int = 30, seed: int = 0,
                        batch_size: int = 64, lr: float = 2e-3) -> DigitTokens:
    """Fit `DigitTokens` with a linear head on its mean token to classify (N, 1, 8, 8) digits in
    [-1, 1] (one-pixel shifts as augmentation); deterministic for a given seed."""
    generator = seeded_generator(DEMO_ENCODER, seed)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(seed)
        encoder = DigitTokens()
        head = nn.Linear(TOKEN_DIM, int(labels.max()) + 1)
    parameters = [*encoder.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=1e-4)
    steps = epochs * -(-len(labels) // batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    for _ in range(epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), batch_size):
            batch = order[start:start + batch_size]
            x = encoder_input(random_shift(images[batch], 1, generator), RESOLUTION, mean, std)
            loss = nn.functional.cross_entropy(head(encoder(x).mean(dim=1)), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return encoder.eval()


def save_digit_encoder(encoder: DigitTokens, path: str | Path) -> Path:
    """Write the encoder as TorchScript (with its `resolution`), atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.jit.script(encoder).save(str(tmp))
    return path


def digit_encoder_path(folder: str | Path, seed: int = 0) -> Path:
    """Where the demo keeps its digit encoder in `folder`."""
    return Path(folder) / f"digit-encoder-seed{seed}.ts"


def digit_encoder_file(folder: str | Path, seed: int = 0) -> Path:
    """The demo's digit encoder in `folder`, trained on the DiT's training split the first time."""
    from ..data import load_digits_tensors, split_digits
    from ..data.digits import DIGITS_HELDOUT_FRACTION

    path = digit_encoder_path(folder, seed)
    if not path.exists():
        images, labels = load_digits_tensors()
        train_indices, _ = split_digits(labels, DIGITS_HELDOUT_FRACTION, seed)
        save_digit_encoder(train_digit_encoder(images[train_indices], labels[train_indices], seed=seed), path)
    return path
