"""Shared row / mask conventions for the losses in :mod:`kdistill.losses`.

Every loss takes per-position inputs of shape ``(..., C)`` (logits) or ``(...)``
(targets). All leading dimensions are flattened into *rows* (one row = one
sample, token or pixel). An optional boolean ``mask`` of the leading shape
``(...)`` selects the rows that count; the loss is the mean over the selected
rows. When no row is selected the loss is exactly ``0`` and still part of the
autograd graph, so ``backward()`` yields finite zero gradients.

Masked-out rows are removed *before* any maths is done on them, so their
values (padding, ``NaN``, ``-inf``) can never leak into the result or the
gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """Floating dtype to compute in: the promoted input dtype, at least float32.

    float16 / bfloat16 inputs are upcast so that softmax / log / sums are
    accurate; float64 inputs stay float64 (needed for gradcheck).
    """
    dtype = torch.float32
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise TypeError(f"expected floating-point logits, got dtype {t.dtype}")
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _check_mask(mask: Tensor | None, leading_shape: torch.Size, what: str) -> Tensor | None:
    """Validate ``mask`` against the leading shape ``(...)`` and flatten it to ``(N,)`` bool."""
    if mask is None:
        return None
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(
            f"mask must be a boolean tensor (True = row counts), got dtype {mask.dtype}; "
            "use mask.bool() or a comparison such as weights > 0"
        )
    if mask.shape != leading_shape:
        raise ValueError(
            f"mask has shape {tuple(mask.shape)} but {what} has leading shape "
            f"{tuple(leading_shape)}; the mask must have the shape of the logits "
            "without the class dimension, i.e. (...) for logits (..., C)"
        )
    if mask.dtype != torch.bool:
        mask = mask != 0
    return mask.reshape(-1)


def _flatten_rows(x: Tensor, mask: Tensor | None, event_ndim: int = 1) -> Tensor:
    """Flatten the leading dims of ``x`` into rows and keep only the masked-in rows.

    Args:
        x: ``(..., C)`` when ``event_ndim == 1`` (logits), ``(...)`` when
            ``event_ndim == 0`` (class-index targets).
        mask: already validated and flattened ``(N,)`` bool mask (see
            :func:`_check_mask`), or ``None`` to keep every row.
        event_ndim: number of trailing per-row dimensions (0 or 1).

    Returns:
        ``(M, C)`` or ``(M,)`` where ``M`` is the number of selected rows
        (``M == N`` without a mask).
    """
    rows = x.reshape(-1, x.shape[-1]) if event_ndim == 1 else x.reshape(-1)
    if mask is not None:
        rows = rows[mask.to(rows.device)]
    return rows


def _masked_mean(per_row: Tensor) -> Tensor:
    """Mean of the per-row losses ``(M,)`` of the selected rows; exactly 0 when ``M == 0``.

    ``sum() / max(M, 1)`` keeps an empty selection connected to the graph, so
    ``backward()`` gives finite zero gradients instead of ``NaN`` (``mean()``
    of an empty tensor is ``NaN``).
    """
    return per_row.sum() / max(per_row.numel(), 1)
