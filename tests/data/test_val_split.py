"""The validation split: held out of the training set, stratified, the same for every seed."""

from __future__ import annotations

import pytest
import torch

from kdistill.data import stratified_indices, train_val_indices


def _labels() -> torch.Tensor:
    # 3 classes with 50 / 30 / 20 members, interleaved
    return torch.tensor([0] * 50 + [1] * 30 + [2] * 20)[torch.randperm(100)]


def test_validation_is_disjoint_from_training_and_covers_the_split() -> None:
    labels = _labels()
    train, val = train_val_indices(labels, 10)
    assert len(val) == 10 and len(train) == 90
    assert sorted(torch.cat([train, val]).tolist()) == list(range(100))
    assert train.tolist() == sorted(train.tolist()) and val.tolist() == sorted(val.tolist())


def test_validation_keeps_each_class_share() -> None:
    labels = _labels()
    _, val = train_val_indices(labels, 10)
    counts = torch.bincount(labels[val], minlength=3).tolist()
    assert counts == [5, 3, 2]  # 10 × (0.5, 0.3, 0.2)


def test_validation_split_is_fixed_and_is_the_stratified_draw_of_its_seed() -> None:
    labels = _labels()
    _, first = train_val_indices(labels, 10)
    torch.manual_seed(123)  # the global RNG plays no part
    _, again = train_val_indices(labels, 10)
    assert first.tolist() == again.tolist()
    assert first.tolist() == stratified_indices(labels, 10, 0).tolist()
    _, other = train_val_indices(labels, 10, seed=1)
    assert other.tolist() != first.tolist()


@pytest.mark.parametrize("size", [0, 100, 101])
def test_validation_size_must_leave_training_images(size: int) -> None:
    with pytest.raises(ValueError, match="between 1 and 99"):
        train_val_indices(_labels(), size)
