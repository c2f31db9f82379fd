"""The 1,797 handwritten 8x8 digits shipped inside scikit-learn (no download), for the pixel-space demo.

Pixels (0..16 in scikit-learn) are scaled to [-1, 1]; images are (1, 8, 8), labels 0..9.
`split_digits` gives a deterministic, class-balanced train / held-out split: the demo trains the DiT on
the train part and a digit classifier on the held-out part, so the classifier that judges generated
digits has never seen the images the generator learned from.
"""

from __future__ import annotations

import torch

from ..errors import UserError
from ..program import install_command
from ..seeding import DIGITS_SPLIT, seeded_generator

DIGIT_CLASS_NAMES = [str(digit) for digit in range(10)]
SPLITS = ("train", "heldout", "all")
# The share of each digit held out of DiT training (the demo trains its judge on it).
DIGITS_HELDOUT_FRACTION = 0.2


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """All digits: images (1797, 1, 8, 8) float32 in [-1, 1] and labels (1797,) int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(f"the digits need scikit-learn: {install_command('demo')}") from None
    digits = load_digits()
    images = torch.from_numpy(digits.images).float().div(16.0).mul(2.0).sub(1.0).unsqueeze(1)  # (N, 1, 8, 8)
    return images, torch.from_numpy(digits.target).long()


def split_digits(
    labels: torch.Tensor, heldout_fraction: float = DIGITS_HELDOUT_FRACTION, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (train, heldout), sorted; each class contributes round(fraction * its size) held-out items."""
    if not 0.0 < heldout_fraction < 1.0:
        raise UserError(f"held-out fraction must be between 0 and 1 (exclusive), got {heldout_fraction}")
    generator = seeded_generator(DIGITS_SPLIT, seed)
    train, heldout = [], []
    for digit in range(int(labels.max()) + 1):
        members = torch.nonzero(labels == digit).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        num_heldout = round(heldout_fraction * len(members))
        heldout.append(members[:num_heldout])
        train.append(members[num_heldout:])
    return torch.cat(train).sort().values, torch.cat(heldout).sort().values


class DigitsDataset(torch.utils.data.Dataset):
    """Item i is (image (1, 8, 8) float32 in [-1, 1], label). Whole set in memory (~0.5 MB).

    No flip augmentation: a mirrored digit is not the same digit. `images` and `labels` hold the
    chosen split as tensors, for code (such as the demo's classifier) that wants them all at once.
    """

    class_names = DIGIT_CLASS_NAMES
    num_classes = 10
    sample_shape = (1, 8, 8)

    def __init__(self, split: str = "train", *, heldout_fraction: float = DIGITS_HELDOUT_FRACTION, seed: int = 0):
        if split not in SPLITS:
            raise UserError(f"unknown digits split {split!r}; choose one of {', '.join(SPLITS)}")
        images, labels = load_digits_tensors()
        if split != "all":
            train, heldout = split_digits(labels, heldout_fraction, seed)
            chosen = train if split == "train" else heldout
            images, labels = images[chosen], labels[chosen]
        self.split = split
        self.images = images
        self.labels = labels

    def set_epoch(self, epoch: int) -> None:
        """Nothing is random per item; present so every fastdit dataset has the same interface."""

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])
