"""Distillation schemes: *how and when* knowledge is transferred.

Offline distillation (a frozen, pre-trained teacher) is :class:`kdistill.distiller.Distiller`.
The schemes here plug into the same :class:`~kdistill.trainer.Trainer` by offering the
Distiller's interface (see :mod:`kdistill.schemes.base`):

- online: :class:`MutualLearning` (deep mutual learning of N peers) and
  :class:`OnlineDistillation` (a teacher trained alongside its student);
- self-distillation: :func:`born_again` (Born-Again generations) and
  :class:`AuxiliaryHeads` (deep-to-shallow, "Be Your Own Teacher");
- EMA teachers: :class:`EMATeacher`, :class:`MeanTeacher` (semi-supervised consistency) and
  :class:`DINO` (label-free), with :func:`knn_accuracy` to judge a representation;
- :class:`MultiTeacher`: an ensemble of frozen teachers usable as one Distiller teacher;
- partly labelled data: :class:`MaskedCrossEntropy`, :func:`semi_supervised_terms`,
  :func:`labelled_split`, :func:`pseudo_label`.

From YAML: a ``scheme:`` section next to the usual experiment sections
(:mod:`kdistill.schemes.config`), run with ``kdistill run FILE.yaml`` (``python -m kdistill.schemes run`` is the same).
"""

from __future__ import annotations

from kdistill.schemes.augment import random_resized_crop
from kdistill.schemes.base import Scheme, train_scheme
from kdistill.schemes.ema import (
    DINO,
    DINOHead,
    EMATeacher,
    MeanTeacher,
    ProjectedBackbone,
    dino_loss,
    momentum_at,
    sigmoid_rampup,
)
from kdistill.schemes.knn import (
    KNNClassifier,
    extract_features,
    knn_accuracy,
    knn_evaluate,
    knn_scores,
)
from kdistill.schemes.multi_teacher import MultiTeacher, confidence_scores, normalise_weights
from kdistill.schemes.mutual import MutualLearning, OnlineDistillation
from kdistill.schemes.self_distill import AuxiliaryHeads, auto_head, born_again
from kdistill.schemes.unlabelled import (
    UNLABELLED,
    MaskedCrossEntropy,
    fashion_mnist_partly_labelled,
    fill_pseudo_labels,
    hide_labels,
    labelled_split,
    masked_cross_entropy,
    oversample_labelled,
    pseudo_label,
    semi_supervised_terms,
)

__all__ = [
    "DINO",
    "UNLABELLED",
    "AuxiliaryHeads",
    "DINOHead",
    "EMATeacher",
    "KNNClassifier",
    "MaskedCrossEntropy",
    "MeanTeacher",
    "MultiTeacher",
    "MutualLearning",
    "OnlineDistillation",
    "ProjectedBackbone",
    "Scheme",
    "auto_head",
    "born_again",
    "confidence_scores",
    "dino_loss",
    "extract_features",
    "fashion_mnist_partly_labelled",
    "fill_pseudo_labels",
    "hide_labels",
    "knn_accuracy",
    "knn_evaluate",
    "knn_scores",
    "labelled_split",
    "masked_cross_entropy",
    "momentum_at",
    "normalise_weights",
    "oversample_labelled",
    "pseudo_label",
    "random_resized_crop",
    "semi_supervised_terms",
    "sigmoid_rampup",
    "train_scheme",
]
