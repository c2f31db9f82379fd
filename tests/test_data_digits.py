"""The scikit-learn digits: scaling, the deterministic stratified split, the dataset."""

import pytest
import torch

from fastdit.data import DigitsDataset, load_digits_tensors, split_digits
from fastdit.errors import UserError


def test_digits_are_the_scikit_learn_pixels_scaled_to_minus_one_one():
    from sklearn.datasets import load_digits

    raw = load_digits()
    images, labels = load_digits_tensors()
    # 0..16 -> k / 8 - 1: every step is exact in float32 (powers of two), so equality is exact.
    expected = torch.from_numpy(raw.images).float().unsqueeze(1) / 8.0 - 1.0
    assert torch.equal(images, expected) and images.dtype == torch.float32
    assert torch.equal(labels, torch.from_numpy(raw.target).long())


def test_split_is_deterministic_disjoint_and_stratified():
    _, labels = load_digits_tensors()
    train, heldout = split_digits(labels, 0.2, seed=0)
    again_train, again_heldout = split_digits(labels, 0.2, seed=0)
    assert torch.equal(train, again_train) and torch.equal(heldout, again_heldout)
    assert not torch.equal(heldout, split_digits(labels, 0.2, seed=1)[1])
    assert len(set(train.tolist()) & set(heldout.tolist())) == 0
    assert len(train) + len(heldout) == 1797
    for digit in range(10):
        in_class = int((labels == digit).sum())
        assert int((labels[heldout] == digit).sum()) == round(0.2 * in_class)


def test_digits_dataset_splits():
    images, labels = load_digits_tensors()
    train_indices, heldout_indices = split_digits(labels)
    train, heldout, everything = DigitsDataset("train"), DigitsDataset("heldout"), DigitsDataset("all")
    assert len(train) + len(heldout) == len(everything) == 1797
    for dataset, indices in ((train, train_indices), (heldout, heldout_indices)):
        for item in (0, len(indices) // 2, len(indices) - 1):
            image, label = dataset[item]
            assert torch.equal(image, images[indices[item]]) and label == int(labels[indices[item]])
    with pytest.raises(UserError, match="unknown digits split 'test'"):
        DigitsDataset("test")
    with pytest.raises(UserError, match="between 0 and 1"):
        DigitsDataset("train", heldout_fraction=1.5)
