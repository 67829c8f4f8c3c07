"""Decoupled Knowledge Distillation (DKD): target-class and non-target-class KD.

Zhao, Cui, Song, Qiu & Liang 2022, "Decoupled Knowledge Distillation" (CVPR).
With student / teacher logits ``z``, temperature ``T`` and the true class ``y``
of a row, write ``p = softmax(z / T)`` and split it into

* the *binary* target / non-target distribution ``b = [p_y, 1 − p_y]``;
* the distribution *among the non-target classes*
  ``p̂_c = p_c / (1 − p_y) = softmax(z_{c≠y} / T)_c`` for ``c ≠ y``.

Then (superscript ``T`` = teacher, ``S`` = student)::

    TCKD = T² · KL(b^T ‖ b^S)
    NCKD = T² · KL(p̂^T ‖ p̂^S)
    dkd  = alpha · TCKD + beta · NCKD          averaged over rows

Classical KD decomposes exactly as ``KD = TCKD + (1 − p^T_y) · NCKD`` (paper
eq. 6, per row); DKD drops the ``(1 − p^T_y)`` coupling, which suppresses NCKD
for well-predicted samples, and weighs both parts freely. Defaults are the
paper's / mdistiller's CIFAR-100 setting ``alpha = 1, beta = 8, T = 4``.

mdistiller additionally ramps the whole DKD term linearly from 0 to its weight
over the first 20 epochs (``min(epoch / warmup, 1)``). That is a *weight
schedule* of the loss term — configure it with kdistill's term-weight
schedules; it is deliberately not part of this function.

Numerics: everything is done in log space. ``log(1 − p_y)`` is the
``logsumexp`` of the non-target log-probabilities rather than ``log(1 − p)``,
so a (near-)certain teacher (``p_y ≈ 1``, e.g. logits ``[50, 0, 0]``) gives a
finite loss and finite gradients where the reference ``torch.log(softmax)``
would produce ``log 0``. The target class is removed from the non-target
softmax with ``−inf`` (exact) instead of mdistiller's ``− 1000 · gt_mask``
(the same value whenever the logits span less than ~1000·T). Teacher logits
may be ``−inf`` at non-target classes (probability 0, contributes 0); a row
whose teacher puts all its mass on the target has ``NCKD = 0``.

Shapes follow the package convention (see ``_reduce``): logits ``(..., C)``
with ``C >= 2``, integer targets ``(...)``, optional boolean ``mask`` ``(...)``;
the mean is over True rows and exactly 0 when no row counts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._reduce import _check_mask, _compute_dtype, _flatten_rows, _masked_mean
from kdistill.losses.kd import _check_pair, _check_temperature
from kdistill.losses.label_smoothing import _check_logits_target

__all__ = ["DKDLoss", "dkd_loss", "dkd_parts"]

_NEG_INF = float("-inf")


def _check_weight(name: str, value: float) -> None:
    if not (value >= 0 and math.isfinite(value)):  # also rejects NaN
        raise ValueError(
            f"{name} must be a finite number >= 0 (the weight of its DKD part), got {value!r}"
        )


def _kl_from_logs(log_p: Tensor, log_q: Tensor) -> Tensor:
    """``Σ_c p_c (log p_c − log q_c)`` over the last dim, ``0 · log 0 = 0``.

    Where ``p_c == 0`` both logs are replaced by 0 before the product so that
    no ``−inf · 0`` reaches the value or either backward path (as in ``kd_loss``).
    """
    p = log_p.exp()
    support = p > 0
    zero = torch.zeros((), dtype=log_p.dtype, device=log_p.device)
    log_p = torch.where(support, log_p, zero)
    log_q = torch.where(support, log_q, zero)
    return (p * (log_p - log_q)).sum(dim=-1)


def _logsumexp_or_neg_inf(x: Tensor, has_finite: Tensor) -> Tensor:
    """Row-wise ``logsumexp`` of ``x`` ``(M, C)``; ``−inf`` for rows with no finite entry.

    Plain ``logsumexp`` of an all-``−inf`` row is ``−inf`` too, but its backward
    is ``exp(−inf − (−inf)) = NaN``; such rows are replaced by zeros first.
    """
    safe = torch.where(has_finite[:, None], x, torch.zeros_like(x))
    return torch.where(has_finite, torch.logsumexp(safe, dim=-1), _NEG_INF)


def dkd_parts(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 4.0,
    mask: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The two DKD parts ``(TCKD, NCKD)``, each ``T² · KL`` averaged over the rows.

    Zhao et al. 2022, "Decoupled Knowledge Distillation"; see the module
    docstring. ``dkd_loss = alpha · TCKD + beta · NCKD``.

    Args:
        student_logits: ``(..., C)``, ``C >= 2``.
        teacher_logits: ``(..., C)``, same shape. Detach it yourself if the
            teacher should not receive gradients.
        target: ``(...)`` integer class indices in ``[0, C)`` (rows with mask
            False may hold anything, e.g. ``-100``).
        temperature: ``T > 0``; both distributions are softened by it.
        mask: optional ``(...)`` bool; only True rows count.

    Returns:
        ``(tckd, nckd)``: two 0-dim tensors, at least float32.

    Raises:
        ValueError: mismatched shapes, fewer than 2 classes, a target outside
            ``[0, C)``, ``temperature <= 0`` or a badly shaped mask.
        TypeError: non-integer target or non-floating logits.
    """
    _check_temperature(temperature)
    _check_pair(student_logits, teacher_logits)
    _check_logits_target(student_logits, target)
    num_classes = student_logits.shape[-1]
    if num_classes < 2:
        raise ValueError(
            f"DKD needs at least 2 classes (a target and a non-target part), got logits of "
            f"shape {tuple(student_logits.shape)}; use kd_loss for a single output"
        )
    flat_mask = _check_mask(mask, student_logits.shape[:-1], "student_logits")
    dtype = _compute_dtype(student_logits, teacher_logits)
    s = _flatten_rows(student_logits, flat_mask).to(dtype)  # (M, C)
    t = _flatten_rows(teacher_logits, flat_mask).to(dtype)  # (M, C)
    y = _flatten_rows(target, flat_mask, event_ndim=0).to(device=s.device, dtype=torch.long)
    if y.numel() > 0:
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"target holds class indices in [{lo}, {hi}] but the logits have "
                f"{num_classes} classes; every counted target must be in [0, {num_classes}) "
                "(mask out ignored rows such as -100 with mask=...)"
            )
    gt = F.one_hot(y, num_classes).bool()  # (M, C), True at the target class

    s_scaled = s / temperature  # (M, C)
    t_scaled = t / temperature  # (M, C)
    log_p_s = torch.log_softmax(s_scaled, dim=-1)  # (M, C)
    log_p_t = torch.log_softmax(t_scaled, dim=-1)  # (M, C)

    # Rows whose teacher has at least one finite non-target logit (else p^T_y = 1).
    t_has_rest = (t.masked_fill(gt, _NEG_INF) > _NEG_INF).any(dim=-1)  # (M,)
    s_has_rest = torch.ones_like(t_has_rest)  # finite student logits

    def binary(log_p: Tensor, has_rest: Tensor) -> Tensor:
        """``log b = [log p_y, log(1 − p_y)]`` ``(M, 2)``, both terms in log space."""
        log_p_y = log_p.gather(-1, y[:, None]).squeeze(-1)  # (M,)
        log_rest = _logsumexp_or_neg_inf(log_p.masked_fill(gt, _NEG_INF), has_rest)  # (M,)
        return torch.stack([log_p_y, log_rest], dim=-1)

    tckd_rows = _kl_from_logs(binary(log_p_t, t_has_rest), binary(log_p_s, s_has_rest))  # (M,)

    # Non-target distributions p̂: the target class removed before the softmax.
    # A teacher row with no finite non-target logit gets a dummy (uniform) p̂^T
    # and NCKD 0, so no NaN appears in the value or the gradients.
    uniform_rest = torch.zeros_like(t_scaled).masked_fill(gt, _NEG_INF)
    t_rest = torch.where(t_has_rest[:, None], t_scaled.masked_fill(gt, _NEG_INF), uniform_rest)
    log_q_t = torch.log_softmax(t_rest, dim=-1)  # (M, C), −inf at the target
    log_q_s = torch.log_softmax(s_scaled.masked_fill(gt, _NEG_INF), dim=-1)  # (M, C)
    nckd_rows = _kl_from_logs(log_q_t, log_q_s)  # (M,)
    nckd_rows = torch.where(t_has_rest, nckd_rows, torch.zeros_like(nckd_rows))

    scale = temperature * temperature
    return _masked_mean(tckd_rows) * scale, _masked_mean(nckd_rows) * scale


def dkd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    mask: Tensor | None = None,
) -> Tensor:
    """DKD loss ``alpha · TCKD + beta · NCKD`` (Zhao et al. 2022).

    See :func:`dkd_parts` for the arguments and the module docstring for the
    formulas. ``alpha`` and ``beta`` must be finite and ``>= 0``; the default
    ``alpha = 1, beta = 8, T = 4`` is the paper's CIFAR-100 setting; other
    benchmarks use other values (see the paper's / mdistiller's configs). The
    warm-up of the term weight is a schedule, not part of this function.

    Returns:
        0-dim tensor, at least float32.
    """
    _check_weight("alpha", alpha)
    _check_weight("beta", beta)
    tckd, nckd = dkd_parts(student_logits, teacher_logits, target, temperature, mask)
    return alpha * tckd + beta * nckd


class DKDLoss(nn.Module):
    """Module form of :func:`dkd_loss`; holds only ``alpha``, ``beta`` and ``temperature``."""

    requires_target = True

    def __init__(self, alpha: float = 1.0, beta: float = 8.0, temperature: float = 4.0) -> None:
        super().__init__()
        _check_weight("alpha", alpha)
        _check_weight("beta", beta)
        _check_temperature(temperature)
        self.alpha = alpha
        self.beta = beta
        self.temperature = temperature

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        target: Tensor,
        mask: Tensor | None = None,
    ) -> Tensor:
        return dkd_loss(
            student_logits,
            teacher_logits,
            target,
            self.alpha,
            self.beta,
            self.temperature,
            mask,
        )

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, temperature={self.temperature}"
