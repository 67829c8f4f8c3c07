"""Hinton knowledge distillation (soft-target KL) and the combined Hinton objective.

Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network".
With student logits ``z_s``, teacher logits ``z_t`` and temperature ``T``::

    p_s = softmax(z_s / T),  p_t = softmax(z_t / T)
    kd  = T² · KL(p_t ‖ p_s) = T² · Σ_c p_t,c · (log p_t,c − log p_s,c)

summed over classes and averaged over rows. The ``T²`` factor keeps the
gradient magnitude independent of ``T``: ``∂kd/∂z_s = T · (p_s − p_t) / N``.

The combined objective (``hinton_loss``) is::

    loss = alpha · T² · KL(p_t ‖ p_s) + (1 − alpha) · CE(y, softmax(z_s))

alpha is the weight of the soft (teacher) term; 1 − alpha weighs the hard-label cross-entropy. alpha = 0 is plain supervised training, alpha = 1 is pure distillation.

Shapes follow the package convention (see ``_reduce``): logits ``(..., C)``
with all leading dims flattened into rows, optional boolean ``mask`` ``(...)``
selecting the rows that count; losses average over True rows and are exactly
0 when no row is True.

Teacher logits may be ``-inf`` at some classes (e.g. classes masked out of the
teacher's vocabulary): those classes get teacher probability 0 and contribute
exactly 0, with no ``NaN`` in the value or in either gradient.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.losses._reduce import _check_mask, _compute_dtype, _flatten_rows, _masked_mean
from kdistill.losses.label_smoothing import cross_entropy

__all__ = ["HintonLoss", "KDLoss", "hinton_loss", "kd_loss"]


def _check_temperature(temperature: float) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")


def _check_alpha(alpha: float) -> None:
    if not (0.0 <= alpha <= 1.0):  # also rejects NaN
        raise ValueError(
            f"alpha must be in [0, 1] (the weight of the soft teacher term), got {alpha!r}"
        )


def _check_pair(student_logits: Tensor, teacher_logits: Tensor) -> None:
    s, t = tuple(student_logits.shape), tuple(teacher_logits.shape)
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError(
            f"logits must have a class dimension, shape (..., C); got student {s}, teacher {t}"
        )
    if s == t:
        return
    if s[:-1] == t[:-1]:
        raise ValueError(
            f"student has {s[-1]} classes, teacher has {t[-1]} "
            f"(student_logits {s}, teacher_logits {t}); "
            "map the teacher's classes onto the student's before distilling"
        )
    raise ValueError(
        f"student_logits has shape {s} but teacher_logits has shape {t}; they must be equal "
        "(..., C) — run the teacher on the same batch (and sequence length) as the student"
    )


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 4.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft-target distillation loss ``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))``.

    Hinton et al. 2015, "Distilling the Knowledge in a Neural Network". Summed
    over classes, averaged over the counted rows. Computed in log space; the
    gradient wrt the student logits is ``T · (p_s − p_t) / N``.

    Args:
        student_logits: ``(..., C)``.
        teacher_logits: ``(..., C)``, same shape. May be ``-inf`` at some
            classes (probability 0, contributes 0, no ``NaN``). Detach it
            yourself if the teacher should not receive gradients.
        temperature: ``T > 0``; both distributions are softened by it.
        mask: optional ``(...)`` bool (the leading shape); only True rows count
            and the mean is over True rows. No True row gives exactly ``0``
            (still in the graph: ``backward()`` gives zero gradients).

    Returns:
        0-dim tensor, at least float32 (float16/bfloat16 inputs are upcast).

    Raises:
        ValueError: mismatched shapes, ``temperature <= 0`` or a mask whose
            shape is not the leading shape.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    flat_mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = _flatten_rows(student_logits, flat_mask).to(dtype)  # (M, C)
    t = _flatten_rows(teacher_logits, flat_mask).to(dtype)  # (M, C)

    log_p_s = torch.log_softmax(s / temperature, dim=-1)  # (M, C)
    log_p_t = torch.log_softmax(t / temperature, dim=-1)  # (M, C)
    p_t = log_p_t.exp()  # (M, C)
    # Where p_t == 0 the term p_t·(log p_t − log p_s) is 0 by convention (0·log 0 = 0).
    # Zero *both* logs there so no −inf·0 appears in the forward pass nor in
    # either backward path (through p_t and through the logs).
    support = p_t > 0
    zero = torch.zeros((), dtype=dtype, device=s.device)
    log_p_t = torch.where(support, log_p_t, zero)
    log_p_s = torch.where(support, log_p_s, zero)
    per_row = (p_t * (log_p_t - log_p_s)).sum(dim=-1)  # (M,)
    return _masked_mean(per_row) * (temperature * temperature)


def hinton_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    alpha: float = 0.9,
    mask: Tensor | None = None,
) -> Tensor:
    """Hinton et al. 2015 objective ``alpha · T² · KL(p_t ‖ p_s) + (1 − alpha) · CE(y, z_s)``.

    See the module docstring for the meaning of ``alpha``. The cross-entropy
    uses the un-softened student logits (``T = 1``).

    Args:
        student_logits: ``(..., C)``.
        teacher_logits: ``(..., C)``, same shape.
        target: ``(...)`` integer class indices (the hard labels).
        temperature: ``T > 0`` for the soft term.
        alpha: in ``[0, 1]``, weight of the soft (teacher) term.
        mask: optional ``(...)`` bool; both terms average over True rows only.

    Returns:
        0-dim tensor, at least float32.
    """
    _check_alpha(alpha)
    soft = kd_loss(student_logits, teacher_logits, temperature=temperature, mask=mask)
    hard = cross_entropy(student_logits, target, mask=mask)
    return alpha * soft + (1.0 - alpha) * hard


class KDLoss(nn.Module):
    """Module form of :func:`kd_loss`; holds only ``temperature``."""

    def __init__(self, temperature: float = 4.0) -> None:
        super().__init__()
        _check_temperature(temperature)
        self.temperature = temperature

    def forward(
        self, student_logits: Tensor, teacher_logits: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        return kd_loss(student_logits, teacher_logits, self.temperature, mask)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class HintonLoss(nn.Module):
    """Module form of :func:`hinton_loss`; holds only ``temperature`` and ``alpha``."""

    def __init__(self, temperature: float = 4.0, alpha: float = 0.9) -> None:
        super().__init__()
        _check_temperature(temperature)
        _check_alpha(alpha)
        self.temperature = temperature
        self.alpha = alpha

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        return hinton_loss(
            student_logits, teacher_logits, target, self.temperature, self.alpha, mask
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, alpha={self.alpha}"
