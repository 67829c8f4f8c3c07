"""Cosine hidden-state matching (DistilBERT's cosine embedding loss).

Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled version of BERT:
smaller, faster, cheaper and lighter", align the directions of the student and
teacher hidden states with a cosine embedding loss (``nn.CosineEmbeddingLoss``
with target 1)::

    loss = mean over rows of (1 − cos(s, t)),   cos(s, t) = ⟨s, t⟩ / (‖s‖ · ‖t‖)

Shapes follow the package convention (see ``_reduce``): hidden states
``(..., D)`` with all leading dims flattened into rows (one row = one token),
optional boolean ``mask`` ``(...)`` (e.g. the attention mask) selecting the
rows that count; the mean is over True rows and exactly 0 when none is True.

The loss only depends on directions: it is unchanged by scaling any row of
either input by a positive factor. A row of zeros has no direction: it is
treated as orthogonal to everything (cosine 0, loss 1) and gets a zero
gradient instead of ``NaN`` or a ``1/eps`` blow-up.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from kdistill.losses._reduce import _check_mask, _compute_dtype, _flatten_rows, _masked_mean

__all__ = ["CosineLoss", "cosine_loss"]

_NORM_EPS = 1e-12


def _safe_normalize(x: Tensor, dim: int = -1, eps: float = _NORM_EPS) -> Tensor:
    """``x / ‖x‖`` along ``dim``; slices with ``‖x‖ <= eps`` become exactly 0.

    Same values as ``F.normalize`` for every slice whose norm exceeds ``eps``,
    but a (near-)zero slice gets a *zero* gradient rather than ``F.normalize``'s
    ``1/eps`` factor (or ``NaN`` from ``sqrt(0)``): both ``where`` branches are
    finite, so no ``inf · 0`` appears in the backward pass.
    """
    sq = (x * x).sum(dim=dim, keepdim=True)
    ok = sq > eps * eps
    norm = torch.sqrt(torch.where(ok, sq, torch.ones_like(sq)))
    return torch.where(ok, x / norm, torch.zeros_like(x))


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(
            f"cosine_loss expects hidden states (..., D); got student {s}, teacher {t}"
        )
    if s == t:
        return
    if s[:-1] == t[:-1]:
        raise ValueError(
            f"student hidden size {s[-1]} vs teacher {t[-1]} (student {s}, teacher {t}): "
            f"add an adapter (e.g. nn.Linear({s[-1]}, {t[-1]})) that maps the student "
            "hidden states onto the teacher's size"
        )
    raise ValueError(
        f"student hidden states {s} vs teacher {t}: the leading (batch, sequence) shapes "
        "must be equal — run the teacher on the same batch (and sequence length)"
    )


def cosine_loss(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over rows of ``1 − cos(s, t)`` along the last dim (DistilBERT, Sanh et al. 2019).

    Args:
        student: ``(..., D)`` student hidden states (after an adapter when the
            hidden sizes differ).
        teacher: ``(..., D)``, same shape. Detach it yourself if the teacher
            should not receive gradients.
        mask: optional ``(...)`` bool (the leading shape, e.g. an attention
            mask ``(B, L)``); only True rows count. No True row gives exactly 0.

    Returns:
        0-dim tensor in ``[0, 2]``, at least float32 (half inputs are upcast).

    Raises:
        ValueError: mismatched shapes (the message says to add an adapter when
            only ``D`` differs) or a mask whose shape is not the leading shape.
    """
    _check_pair(student, teacher)
    flat_mask = _check_mask(mask, student.shape[:-1], "student")
    dtype = _compute_dtype(student, teacher)
    s = _flatten_rows(student, flat_mask).to(dtype)  # (M, D)
    t = _flatten_rows(teacher, flat_mask).to(dtype)  # (M, D)
    cos = (_safe_normalize(s) * _safe_normalize(t)).sum(dim=-1)  # (M,)
    return _masked_mean(1.0 - cos)


class CosineLoss(nn.Module):
    """Module form of :func:`cosine_loss`; has no hyper-parameters."""

    same_shape = True  # compares tensors elementwise: adapters apply when shapes differ

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return cosine_loss(student, teacher, mask)
