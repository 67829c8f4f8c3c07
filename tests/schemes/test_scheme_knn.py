from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdistill.schemes import KNNClassifier, extract_features, knn_accuracy, knn_evaluate, knn_scores
from kdistill.trainer import evaluate


def clusters(n_per_class: int, classes: int = 5, dim: int = 16, spread: float = 0.3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(123))
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = centres[y] + spread * torch.randn(len(y), dim, generator=g)
    return x, y


def test_knn_separates_clustered_features_and_is_at_chance_on_noise() -> None:
    train_x, train_y = clusters(40)
    test_x, test_y = clusters(20, seed=1)
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20) == 1.0
    assert knn_accuracy(train_x, train_y, test_x, test_y, k=20, weighted=False) == 1.0
    noise = torch.randn(200, 16, generator=torch.Generator().manual_seed(5))
    shuffled = train_y[torch.randperm(200, generator=torch.Generator().manual_seed(6))]
    acc = knn_accuracy(noise, shuffled, test_x, test_y, k=20)
    assert 0.05 < acc < 0.45  # chance is 0.2


def test_weighted_vote_matches_a_hand_computation() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 1])
    query = torch.tensor([[2.0, 0.0]])  # cosines: 1, 0, 1/sqrt(2)
    scores = knn_scores(bank, labels, query, k=2, temperature=0.5, num_classes=3)
    expected = torch.tensor([[math.exp(1 / 0.5), math.exp(math.sqrt(0.5) / 0.5), 0.0]])
    torch.testing.assert_close(scores, expected)
    plain = knn_scores(bank, labels, query, k=3, weighted=False, num_classes=2)
    torch.testing.assert_close(plain, torch.tensor([[1.0, 2.0]]))


def test_unlabelled_bank_rows_do_not_vote() -> None:
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    labels = torch.tensor([-1, 0, 1])
    scores = knn_scores(bank, labels, torch.tensor([[1.0, 0.0]]), k=1, num_classes=2)
    assert scores[0, 0] > 0 and scores[0, 1] == 0
    with pytest.raises(ValueError, match="no labelled"):
        knn_scores(bank, torch.full((3,), -1), bank)


def test_knn_of_a_model_and_the_knn_classifier_agree() -> None:
    train_x, train_y = clusters(30)
    test_x, test_y = clusters(10, seed=1)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8))
    features = extract_features(model, train_x, batch_size=7)
    assert features.shape == (150, 8)
    via_layer = extract_features(model, train_x, feature_layer="1")
    assert via_layer.shape == (150, 16)
    acc = knn_evaluate(model, (train_x, train_y), (test_x, test_y), k=10)
    classifier = KNNClassifier(model, (train_x, train_y), k=10)
    loader = [(test_x[i : i + 16], test_y[i : i + 16]) for i in range(0, 50, 16)]
    assert evaluate(classifier, loader)["accuracy"] == pytest.approx(acc)
    assert model.training  # mode restored
    assert set(classifier.state_dict()) == set(model.state_dict())
