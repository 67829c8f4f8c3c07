"""Several frozen teachers seen by a :class:`~kdistill.distiller.Distiller` as one.

:class:`MultiTeacher` is an ``nn.Module`` whose output is the ensemble's aggregated logits,
so it drops into ``Distiller(student, terms, teacher=MultiTeacher(...))``, the teacher-output
cache and YAML runs unchanged. With teacher logits ``z_i``, weights ``w_i`` (normalised to
sum to 1; per sample with confidence weighting) and temperature ``T``:

- ``mode="probs"`` (the usual ensemble of soft targets, e.g. Hinton et al. 2015's
  ensembles, Fukuda et al. 2017): ``p = Σ_i w_i · softmax(z_i / T)`` and the output is
  ``T · log p``. Because ``softmax((T · log p) / T) = p`` exactly, a KD term *at the same
  temperature T* sees exactly the averaged distribution. Use the same ``T`` in the KD loss:
  at another temperature ``T'`` the term sees ``p^(T/T')`` renormalised, not an average.
  Classes to which every teacher gives probability 0 come out as ``-inf`` (handled by
  :func:`~kdistill.losses.kd_loss`).
- ``mode="logits"``: ``Σ_i w_i · z_i`` (temperature-free; kd sees softmax of the mean logit).

Weights: ``weights=None`` is uniform; a list is normalised to sum to 1. With
``confidence_weighting="max_prob"`` (or ``True``) or ``"entropy"`` each sample's weights are additionally scaled by
each teacher's confidence on that sample — its top softmax probability, or ``1 − H(p)/log C``
(1 for a one-hot prediction, 0 for a uniform one) — and renormalised per sample, so the
teacher that is surer about a sample counts more there (cf. the confidence-aware
multi-teacher weighting of Zhang et al. 2022, CA-MKD). Confidences use ``softmax(z_i)`` at
``T = 1``.

The teachers are frozen (no gradients, always eval mode) and live under ``teachers.<name>``,
so feature terms address one teacher's layer as ``"teachers.0.stage2"`` (or
``"teachers.<name>.<layer>"`` when they are given as a dict): per-teacher feature terms need
nothing else. Teachers may have any architectures; they must agree on the classes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from kdistill.distiller import freeze

Confidence = Literal["none", "max_prob", "entropy"]


def normalise_weights(weights: Sequence[float] | None, n: int) -> list[float]:
    """Non-negative weights rescaled to sum to 1 (``None``: uniform)."""
    if weights is None:
        return [1.0 / n] * n
    values = [float(w) for w in weights]
    if len(values) != n:
        raise ValueError(f"got {len(values)} weights for {n} teachers")
    if any(not (w >= 0 and math.isfinite(w)) for w in values):
        raise ValueError(f"teacher weights must be finite and >= 0, got {values}")
    total = sum(values)
    if total <= 0:
        raise ValueError(f"teacher weights must not all be 0, got {values}")
    return [w / total for w in values]


def confidence_scores(logits: Tensor, kind: Confidence) -> Tensor:
    """Per-row confidence in ``[0, 1]`` of logits ``(..., C)``: ``(...)``.

    ``max_prob``: the top softmax probability; ``entropy``: ``1 − H(softmax)/log C``.
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)
    p = log_p.exp()
    if kind == "max_prob":
        return p.max(dim=-1).values
    if kind == "entropy":
        classes = logits.shape[-1]
        if classes < 2:
            return torch.ones(logits.shape[:-1], device=logits.device)
        entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
        return (1.0 - entropy / math.log(classes)).clamp(min=0.0)
    raise ValueError(f"unknown confidence {kind!r}; choose max_prob or entropy")


class MultiTeacher(nn.Module):
    """A frozen ensemble of teachers whose ``forward`` returns aggregated logits ``(B, C)``.

    Args:
        teachers: a list (named ``"0"``, ``"1"``, ...) or a dict name → model.
        weights: one non-negative weight per teacher, normalised to sum to 1; ``None``
            weighs them equally.
        mode: ``"probs"`` averages softened probabilities and returns ``T · log p``;
            ``"logits"`` averages the logits.
        confidence_weighting: ``False`` / ``"none"``, or per-sample weighting by
            ``"max_prob"`` (also ``True``) / ``"entropy"``; read back as ``.confidence``.
        temperature: ``T`` for ``mode="probs"``; use the same ``T`` in the KD term.
    """

    def __init__(
        self,
        teachers: Sequence[nn.Module] | Mapping[str, nn.Module],
        weights: Sequence[float] | None = None,
        mode: Literal["probs", "logits"] = "probs",
        confidence_weighting: Confidence | bool = False,
        temperature: float = 4.0,
    ) -> None:
        super().__init__()
        named = (
            dict(teachers)
            if isinstance(teachers, Mapping)
            else {str(i): t for i, t in enumerate(teachers)}
        )
        if not named:
            raise ValueError("MultiTeacher needs at least one teacher")
        if mode not in ("probs", "logits"):
            raise ValueError(f"mode must be 'probs' or 'logits', got {mode!r}")
        confidence: Confidence
        if confidence_weighting is True:
            confidence = "max_prob"
        elif confidence_weighting is False:
            confidence = "none"
        elif confidence_weighting in ("none", "max_prob", "entropy"):
            confidence = confidence_weighting
        else:
            raise ValueError(
                "confidence_weighting must be False, True, 'none', 'max_prob' or 'entropy', got "
                f"{confidence_weighting!r}"
            )
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.teachers = nn.ModuleDict({k: freeze(t) for k, t in named.items()})
        self.weights = normalise_weights(weights, len(named))
        self.mode = mode
        self.confidence = confidence
        self.temperature = float(temperature)

    def train(self, mode: bool = True) -> MultiTeacher:
        """The teachers stay in eval mode whatever the mode asked for."""
        super().train(mode)
        for teacher in self.teachers.values():
            teacher.eval()
        return self

    def teacher_logits(self, inputs: Tensor) -> list[Tensor]:
        """Each teacher's logits ``(B, C)``, in order."""
        out = [teacher(inputs) for teacher in self.teachers.values()]
        shapes = {tuple(z.shape) for z in out}
        if len(shapes) != 1:
            raise ValueError(f"teachers disagree on the logits' shape: {sorted(shapes)}")
        return out

    def sample_weights(self, logits: Sequence[Tensor]) -> Tensor:
        """Weights ``(K, ...)`` of the ``K`` teachers per row, summing to 1 over ``K``."""
        stacked = torch.stack([z.float() for z in logits])  # (K, ..., C)
        fixed = torch.tensor(self.weights, device=stacked.device).view(
            -1, *[1] * (stacked.dim() - 2)
        )
        if self.confidence == "none":
            return fixed.expand(stacked.shape[:-1])
        scores = confidence_scores(stacked, self.confidence) * fixed  # (K, ...)
        total = scores.sum(0, keepdim=True)
        # A row where every weighted confidence is 0 falls back to the fixed weights.
        return torch.where(total > 0, scores / total.clamp(min=1e-12), fixed.expand_as(scores))

    def aggregate(self, logits: Sequence[Tensor]) -> Tensor:
        """Aggregate teacher logits ``K × (..., C)`` into ``(..., C)``; see the module doc."""
        weights = self.sample_weights(logits).unsqueeze(-1)  # (K, ..., 1)
        stacked = torch.stack([z.float() for z in logits])  # (K, ..., C)
        if self.mode == "logits":
            return (weights * stacked).sum(0)
        log_p = torch.log_softmax(stacked / self.temperature, dim=-1)
        # log Σ_k w_k p_k, stable; a weight of 0 contributes nothing (log 0 = -inf).
        log_w = torch.log(weights)
        return torch.logsumexp(log_w + log_p, dim=0) * self.temperature

    def forward(self, inputs: Tensor) -> Tensor:
        return self.aggregate(self.teacher_logits(inputs))

    def extra_repr(self) -> str:
        return (
            f"weights={[round(w, 4) for w in self.weights]}, mode={self.mode!r}, "
            f"confidence={self.confidence!r}, temperature={self.temperature}"
        )
