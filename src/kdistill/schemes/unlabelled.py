"""Distillation on partly labelled data: masked hard labels, label splits, pseudo-labels.

Convention: a label of ``-1`` (:data:`UNLABELLED`) marks an unlabelled sample. Batches mix
both kinds; the hard-label term counts only the labelled rows (:class:`MaskedCrossEntropy`)
while the soft, teacher term counts every row — the teacher's predictions are the only
signal the unlabelled images carry::

    from kdistill.distiller import Distiller
    distiller = Distiller(student, semi_supervised_terms(temperature=4, alpha=0.9), teacher)

Note that the Trainer's ``train_accuracy`` compares the student with the labels as given,
so unlabelled rows (label ``-1``) count as misses there; test accuracy is unaffected.

:func:`labelled_split` draws the labelled share class-stratified with
:func:`kdistill.data.stratified_indices` — the same draw as ``data.train_subset`` with the
same seed, so a teacher trained by ``kdistill run`` with ``train_subset: 3000, seed: 0`` saw
exactly the labelled 5 % of :func:`fashion_mnist_partly_labelled` (``fraction=0.05, seed=0``).
:func:`pseudo_label` labels a large unlabelled set with a teacher, keeping only confident
predictions.
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor, nn

from kdistill.data.fashion_mnist import fashion_mnist_dataset, stratified_indices
from kdistill.distiller import LossTerm
from kdistill.losses import KDLoss, cross_entropy
from kdistill.losses.registry import LOSSES

UNLABELLED = -1
"""The label of a sample without one."""


def masked_cross_entropy(logits: Tensor, target: Tensor, ignore_index: int = UNLABELLED) -> Tensor:
    """Cross-entropy over the rows whose label is not ``ignore_index``; 0 when there is none.

    The mean is over the labelled rows only (not the batch), so a batch with few labels
    weighs them as much as a fully labelled one; unlabelled rows get exactly zero gradient.
    """
    return cross_entropy(logits, target, mask=target != ignore_index)


class MaskedCrossEntropy(nn.Module):
    """Hard-label term that skips unlabelled rows (``target == ignore_index``).

    Use with ``LossTerm(..., teacher=None)``: the term's reference is then the labels.
    """

    def __init__(self, ignore_index: int = UNLABELLED) -> None:
        super().__init__()
        self.ignore_index = int(ignore_index)

    def forward(self, logits: Tensor, target: Tensor) -> Tensor:
        return masked_cross_entropy(logits, target, self.ignore_index)

    def extra_repr(self) -> str:
        return f"ignore_index={self.ignore_index}"


if "masked_cross_entropy" not in LOSSES:  # usable in YAML terms once kdistill.schemes is imported
    LOSSES.add("masked_cross_entropy", MaskedCrossEntropy)


def semi_supervised_terms(
    temperature: float = 4.0, alpha: float = 0.9, ignore_index: int = UNLABELLED
) -> list[LossTerm]:
    """``alpha · KD`` on every row + ``(1 − alpha) · CE`` on the labelled rows.

    Terms of weight 0 are left out (alpha = 1: the teacher alone; alpha = 0: labels alone).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1] (weight of the soft term), got {alpha}")
    terms = [
        LossTerm("kd", KDLoss(temperature), alpha),
        LossTerm("ce", MaskedCrossEntropy(ignore_index), 1.0 - alpha, teacher=None),
    ]
    return [t for t in terms if t.weight > 0]


def labelled_split(labels: Tensor, fraction: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Class-stratified ``(labelled, unlabelled)`` index tensors (each sorted).

    The labelled part has ``round(fraction · N)`` samples drawn by
    :func:`~kdistill.data.stratified_indices` (so it equals ``data.train_subset`` of that
    size with the same seed); the unlabelled part is every other index.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction of labelled samples must be in (0, 1], got {fraction}")
    n = max(1, round(fraction * labels.shape[0]))
    labelled = stratified_indices(labels, n, seed)
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    keep[labelled] = False
    return labelled, torch.nonzero(keep).flatten()


def oversample_labelled(labels: Tensor, share: float, ignore_index: int = UNLABELLED) -> Tensor:
    """Row indices of an epoch in which labelled rows make up about ``share`` of the samples.

    Mean Teacher (Tarvainen & Valpola, 2017) fills a fixed part of every mini-batch with
    labelled samples (the official code's ``labeled_batch_size`` / ``TwoStreamBatchSampler``).
    With plain shuffling and 5 % of the labels, a labelled image comes round once per epoch
    and a batch of 128 holds about 6 of them. Here every unlabelled row appears once and every
    labelled row ``r`` times,

        r = max(1, round(share · n_unlabelled / ((1 − share) · n_labelled))),

    so shuffled batches hold about ``share`` labelled rows. Rows are never dropped: a
    ``share`` below the labels' natural share gives ``r = 1`` (every row once).

    Args:
        labels: ``(N,)`` with ``ignore_index`` marking the unlabelled rows.
        share: wanted fraction of labelled rows per epoch, in ``(0, 1)``.

    Returns:
        ``(N + (r − 1) · n_labelled,)`` long indices into ``labels``: ``0..N-1`` followed by
        the labelled rows ``r − 1`` more times.
    """
    if not 0.0 < share < 1.0:
        raise ValueError(f"share of labelled rows must be in (0, 1), got {share}")
    labelled = torch.nonzero(labels != ignore_index).flatten()
    n_labelled = labelled.numel()
    if n_labelled == 0:
        raise ValueError("no labelled rows to oversample (every label is the ignore_index)")
    n_unlabelled = labels.shape[0] - n_labelled
    repeats = max(1, round(share * n_unlabelled / ((1.0 - share) * n_labelled)))
    every = torch.arange(labels.shape[0])
    return torch.cat([every, labelled.repeat(repeats - 1)])


def hide_labels(labels: Tensor, labelled: Tensor, ignore_index: int = UNLABELLED) -> Tensor:
    """A copy of ``labels`` with every row outside ``labelled`` set to ``ignore_index``."""
    hidden = torch.full_like(labels, ignore_index)
    hidden[labelled] = labels[labelled]
    return hidden


def fashion_mnist_partly_labelled(
    fraction: float = 0.05,
    seed: int = 0,
    root: str | os.PathLike[str] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Fashion-MNIST's training set with only ``fraction`` of its labels (5 %: 3000 images).

    Returns ``(images (N, 1, 28, 28) normalised, labels (N,) with -1 for the hidden ones,
    true labels (N,))``.
    """
    images, labels = fashion_mnist_dataset("train", root=root).tensors
    labelled, _ = labelled_split(labels, fraction, seed)
    return images, hide_labels(labels, labelled), labels


@torch.inference_mode()
def pseudo_label(
    teacher: nn.Module,
    inputs: Tensor,
    threshold: float = 0.0,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    temperature: float = 1.0,
    ignore_index: int = UNLABELLED,
) -> tuple[Tensor, Tensor]:
    """Label ``inputs`` with the teacher's top class where it is confident enough.

    Args:
        teacher: any classifier; run in eval mode (its mode is restored).
        inputs: ``(N, ...)``.
        threshold: keep a prediction when its softmax probability (at ``temperature``) is at
            least this; the others get ``ignore_index``. ``0`` keeps all.

    Returns:
        ``(labels (N,) long, confidence (N,) float)`` on CPU.
    """
    if not 0.0 <= threshold <= 1.0 or not math.isfinite(threshold):
        raise ValueError(f"threshold must be a probability in [0, 1], got {threshold}")
    was_training = teacher.training
    teacher.eval()
    labels, confidence = [], []
    for start in range(0, inputs.shape[0], batch_size):
        logits = teacher(inputs[start : start + batch_size].to(device)).float()
        probs = torch.softmax(logits / temperature, dim=-1)
        conf, cls = probs.max(dim=-1)
        labels.append(torch.where(conf >= threshold, cls, torch.full_like(cls, ignore_index)).cpu())
        confidence.append(conf.cpu())
    teacher.train(was_training)
    return torch.cat(labels), torch.cat(confidence)


def fill_pseudo_labels(labels: Tensor, pseudo: Tensor, ignore_index: int = UNLABELLED) -> Tensor:
    """Keep the true labels where there are some; use the pseudo-labels elsewhere."""
    return torch.where(labels != ignore_index, labels, pseudo)
