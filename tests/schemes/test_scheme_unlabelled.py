from __future__ import annotations

import pytest
import torch
from scheme_helpers import CLASSES, blobs, mlp

from kdistill.data import stratified_indices
from kdistill.data.fashion_mnist import DatasetNotFoundError
from kdistill.distiller import Distiller
from kdistill.losses import cross_entropy, kd_loss
from kdistill.schemes import (
    MaskedCrossEntropy,
    fashion_mnist_partly_labelled,
    fill_pseudo_labels,
    hide_labels,
    labelled_split,
    oversample_labelled,
    pseudo_label,
    semi_supervised_terms,
)


def test_masked_cross_entropy_counts_only_labelled_rows() -> None:
    logits = torch.randn(6, CLASSES, requires_grad=True)
    target = torch.tensor([0, -1, 2, -1, 3, 1])
    loss = MaskedCrossEntropy()(logits, target)
    labelled = target != -1
    torch.testing.assert_close(loss, cross_entropy(logits[labelled], target[labelled]))
    loss.backward()
    assert logits.grad is not None
    assert torch.all(logits.grad[~labelled] == 0)
    assert torch.all(logits.grad[labelled].abs().sum(-1) > 0)


def test_a_batch_without_labels_gives_zero_hard_loss_with_zero_gradient() -> None:
    logits = torch.randn(3, CLASSES, requires_grad=True)
    loss = MaskedCrossEntropy()(logits, torch.full((3,), -1))
    assert loss.item() == 0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_soft_term_reaches_every_row_and_hard_term_only_labelled_rows() -> None:
    torch.manual_seed(0)
    teacher, student = mlp(32), mlp(8)
    x, y = blobs(8)
    y[::2] = -1  # rows 0, 2, 4, 6 unlabelled
    distiller = Distiller(student, semi_supervised_terms(temperature=2.0, alpha=0.25), teacher)
    out = distiller(x, y)
    z = student(x)
    with torch.no_grad():
        zt = teacher(x)
    labelled = y != -1
    torch.testing.assert_close(out["ce_loss"], cross_entropy(z[labelled], y[labelled]).detach())
    torch.testing.assert_close(out["kd_loss"], kd_loss(z, zt, 2.0).detach())
    torch.testing.assert_close(
        out["loss"], 0.25 * kd_loss(z, zt, 2.0) + 0.75 * cross_entropy(z[labelled], y[labelled])
    )
    # per-row gradients: CE only on labelled rows, KD on all rows
    logits = z.detach().requires_grad_(True)
    hard = torch.autograd.grad(MaskedCrossEntropy()(logits, y), logits)[0]
    soft = torch.autograd.grad(kd_loss(logits, zt, 2.0), logits)[0]
    assert torch.all(hard[~labelled] == 0) and torch.all(hard[labelled].abs().sum(-1) > 0)
    assert torch.all(soft.abs().sum(-1) > 0)


def test_alpha_one_or_zero_leaves_out_the_unused_term() -> None:
    assert [t.name for t in semi_supervised_terms(alpha=1.0)] == ["kd"]
    assert [t.name for t in semi_supervised_terms(alpha=0.0)] == ["ce"]
    with pytest.raises(ValueError):
        semi_supervised_terms(alpha=2.0)


def test_labelled_split_is_stratified_disjoint_and_the_train_subset_draw() -> None:
    labels = torch.arange(10).repeat_interleave(100)  # 1000 samples, 100 per class
    labelled, unlabelled = labelled_split(labels, 0.05, seed=3)
    assert len(labelled) == 50 and len(unlabelled) == 950
    assert torch.equal(torch.bincount(labels[labelled]), torch.full((10,), 5))
    assert not set(labelled.tolist()) & set(unlabelled.tolist())
    assert torch.equal(labelled, stratified_indices(labels, 50, seed=3))
    hidden = hide_labels(labels, labelled)
    assert torch.equal(hidden[labelled], labels[labelled])
    assert torch.all(hidden[unlabelled] == -1)


def test_oversampling_repeats_labelled_rows_to_the_asked_share() -> None:
    labels = torch.full((1000,), -1)
    labels[torch.tensor([3, 50, 700, 999, 10])] = torch.tensor([1, 2, 3, 4, 0])
    index = oversample_labelled(labels, 0.25)
    # 995 unlabelled rows; r = round(0.25 * 995 / (0.75 * 5)) = round(66.33) = 66 copies each
    assert index.shape == (1000 + 65 * 5,)
    assert torch.equal(index[:1000], torch.arange(1000))  # every row once, in order
    counts = torch.bincount(index, minlength=1000)
    labelled = labels != -1
    assert torch.all(counts[labelled] == 66) and torch.all(counts[~labelled] == 1)
    share = (labels[index] != -1).float().mean().item()
    assert share == pytest.approx(330 / 1325) and abs(share - 0.25) < 0.01


def test_oversampling_never_drops_rows_and_refuses_bad_input() -> None:
    labels = torch.arange(10).repeat_interleave(10)  # all labelled: nothing to add
    assert torch.equal(oversample_labelled(labels, 0.5), torch.arange(100))
    labels[:90] = -1  # natural share 0.1 > 0.05 asked: every row once
    assert torch.equal(oversample_labelled(labels, 0.05), torch.arange(100))
    with pytest.raises(ValueError, match="share"):
        oversample_labelled(labels, 1.0)
    with pytest.raises(ValueError, match="no labelled rows"):
        oversample_labelled(torch.full((5,), -1), 0.5)


def test_pseudo_labels_keep_only_confident_predictions() -> None:
    teacher = torch.nn.Linear(2, 3, bias=False)
    with torch.no_grad():
        teacher.weight.copy_(torch.eye(3, 2) * 10)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])  # confident 0, confident 1, uniform
    labels, conf = pseudo_label(teacher, x, threshold=0.9, batch_size=2)
    assert labels.tolist() == [0, 1, -1]
    assert conf[2].item() == pytest.approx(1 / 3)
    all_labels, _ = pseudo_label(teacher, x, threshold=0.0)
    assert all_labels[:2].tolist() == [0, 1] and all_labels[2] != -1
    mixed = fill_pseudo_labels(torch.tensor([2, -1, -1]), labels)
    assert mixed.tolist() == [2, 1, -1]
    assert teacher.training  # mode restored


def test_fashion_mnist_with_five_percent_of_its_labels() -> None:
    try:
        images, labels, true = fashion_mnist_partly_labelled(0.05, seed=0)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST not installed")
    assert images.shape == (60000, 1, 28, 28)
    kept = labels != -1
    assert kept.sum() == 3000
    assert torch.equal(labels[kept], true[kept])
    assert torch.equal(torch.bincount(labels[kept]), torch.full((10,), 300))
    assert torch.equal(torch.nonzero(kept).flatten(), stratified_indices(true, 3000, seed=0))
