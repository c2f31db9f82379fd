"""The demo's judge: a small CNN that tells 8x8 digits apart, and whose penultimate layer is the feature
space of the demo's Frechet distance (the role Inception-v3 plays for FID on ImageNet).

It is trained on real digits the DiT never saw (see `fastdit.demo.run` for the split), with random
one-pixel shifts as augmentation: the held-out part is small (~360 digits), and shifts are the cheapest
way to make a few dozen digits per class generalise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..seeding import DEMO_JUDGE, seeded_generator


class DigitClassifier(nn.Module):
    """(N, 1, 8, 8) images in [-1, 1] -> logits (N, num_classes); `features` gives (N, feature_dim)."""

    def __init__(self, num_classes: int = 10, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(),   # (N, 32, 8, 8)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),  # (N, 64, 8, 8)
            nn.MaxPool2d(2),                             # (N, 64, 4, 4)
        )
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(64 * 4 * 4, feature_dim), nn.ReLU())  # (N, D)
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed(self.conv(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


@dataclass
class ClassifierOptions:
    epochs: int = 50
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    max_shift: int = 1  # random translation in pixels, each axis
    seed: int = 0


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image by up to `max_shift` pixels per axis, filling with background (-1)."""
    if max_shift == 0:
        return images
    n, _, h, w = images.shape
    padded = nn.functional.pad(images, (max_shift,) * 4, value=-1.0)
    span = 2 * max_shift + 1
    crops = torch.stack([padded[:, :, dy : dy + h, dx : dx + w] for dy in range(span) for dx in range(span)])  # (S*S, N, C, h, w)
    choice = torch.randint(0, span * span, (n,), generator=generator)
    return crops[choice, torch.arange(n)]


def train_classifier(
    images: torch.Tensor, labels: torch.Tensor, options: ClassifierOptions = ClassifierOptions(), num_classes: int = 10
) -> DigitClassifier:
    """Fit a `DigitClassifier` on (N, 1, 8, 8) images in [-1, 1]; deterministic for a given seed."""
    generator = seeded_generator(DEMO_JUDGE, options.seed)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG stays as it was
        torch.manual_seed(options.seed)
        model = DigitClassifier(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    steps_per_epoch = -(-len(labels) // options.batch_size)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, options.lr, total_steps=options.epochs * steps_per_epoch)
    model.train()
    for _ in range(options.epochs):
        order = torch.randperm(len(labels), generator=generator)
        for start in range(0, len(labels), options.batch_size):
            batch = order[start : start + options.batch_size]
            x = random_shift(images[batch], options.max_shift, generator)
            loss = nn.functional.cross_entropy(model(x), labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,) int64, penultimate features (N, D) float64) for images in [-1, 1]."""
    predictions, features = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(images[start : start + batch_size])
        predictions.append(model.head(f).argmax(dim=1))
        features.append(f.double())
    return torch.cat(predictions).numpy(), torch.cat(features).numpy()


def uint8_to_model_input(images: np.ndarray) -> torch.Tensor:
    """(N, H, W, 1) uint8 -> (N, 1, H, W) float32 in [-1, 1], the inverse of `sampling.to_uint8`."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
