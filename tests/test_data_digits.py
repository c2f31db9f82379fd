"""The scikit-learn digits: scaling, the deterministic stratified split, the dataset."""

import pytest
import torch

from fastdit.data import DigitsDataset, load_digits_tensors, split_digits
from fastdit.errors import UserError


def test_digits_are_scaled_to_minus_one_one():
    images, labels = load_digits_tensors()
    assert images.shape == (1797, 1, 8, 8) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() == 1.0
    assert labels.dtype == torch.int64 and sorted(labels.unique().tolist()) == list(range(10))


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
    train, heldout, everything = DigitsDataset("train"), DigitsDataset("heldout"), DigitsDataset("all")
    assert len(train) + len(heldout) == len(everything) == 1797
    image, label = heldout[0]
    assert image.shape == DigitsDataset.sample_shape == (1, 8, 8) and isinstance(label, int)
    assert train.class_names == [str(d) for d in range(10)] and train.num_classes == 10
    with pytest.raises(UserError, match="unknown digits split 'test'"):
        DigitsDataset("test")
    with pytest.raises(UserError, match="between 0 and 1"):
        DigitsDataset("train", heldout_fraction=1.5)
