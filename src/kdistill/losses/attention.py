"""Attention Transfer (AT): match the spatial attention maps of feature maps.

Zagoruyko & Komodakis 2017, "Paying More Attention to Attention: Improving the
Performance of Convolutional Neural Networks via Attention Transfer". The
activation-based attention map of a feature map ``F`` ``(B, C, H, W)`` is the
channel statistic ``Σ_c |F_c|^p`` flattened over the ``H·W`` positions and
L2-normalised per sample::

    a(F) = vec(mean_c |F_c|^p) / ‖vec(mean_c |F_c|^p)‖₂        (B, H·W)

(mean and sum over channels give the same normalised map). The loss follows
the authors' reference implementation (also RepDistiller's ``Attention``)::

    loss = mean over (b, position) of (a(F_s) − a(F_t))²

i.e. ``mean_b ‖a_s − a_t‖²₂ / (H·W)``. (The paper writes the un-squared
distance ``β/2 · ‖a_s − a_t‖₂`` with ``β = 1000``; as in the reference code the
weight ``β`` is the term's weight, not part of this function.)

Student and teacher may have different channel counts (the map averages them
away) but are compared position by position. When the spatial sizes differ,
the *larger* map is reduced with ``adaptive_avg_pool`` (on the features,
before ``a(·)``, as in RepDistiller) to the smaller size, per spatial
dimension: ``(8, 8)`` vs ``(4, 4)`` pools the first to ``(4, 4)``. Feature maps
``(B, C, L)`` and ``(B, C, D, H, W)`` are handled the same way.

The default ``p = 2`` gives ``F²`` exactly as the reference ``f.pow(2)``; ``p``
must be ``>= 1`` so that exact zeros (dead ReLU units) have finite gradients.
A sample whose map is all zero gets a zero attention map with zero gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.losses._reduce import _compute_dtype
from kdistill.losses.cosine import _safe_normalize

__all__ = ["AttentionTransferLoss", "attention_map", "attention_transfer_loss"]

_POOL: dict[int, Callable[..., Tensor]] = {
    1: F.adaptive_avg_pool1d,
    2: F.adaptive_avg_pool2d,
    3: F.adaptive_avg_pool3d,
}


def _check_p(p: float) -> None:
    if not (p >= 1 and math.isfinite(p)):  # also rejects NaN
        raise ValueError(
            f"p must be a finite number >= 1 (the exponent in |F|^p; the paper uses 2), got {p!r}"
        )


def _check_features(features: Tensor, what: str) -> None:
    if features.dim() < 3:
        raise ValueError(
            f"{what} must be feature maps (B, C, H, W) (or (B, C, L), (B, C, D, H, W)), got "
            f"shape {tuple(features.shape)}; attention transfer needs spatial positions — "
            "for vectors (B, D) use a hint / relational loss instead"
        )


def attention_map(features: Tensor, p: float = 2.0) -> Tensor:
    """Per-sample L2-normalised attention map ``normalize(mean_c |F_c|^p)``.

    Args:
        features: ``(B, C, H, W)`` (any number ``>= 1`` of spatial dims).
        p: exponent ``>= 1``; 2 in the paper.

    Returns:
        ``(B, H·W)``, each row of unit L2 norm (or all zero for an all-zero
        sample), at least float32.
    """
    _check_p(p)
    _check_features(features, "features")
    x = features.to(_compute_dtype(features))  # (B, C, H, W)
    stat = x.pow(2) if p == 2 else x.abs().pow(p)  # (B, C, H, W)
    a = stat.mean(dim=1).flatten(1)  # (B, H·W)
    return _safe_normalize(a, dim=1)


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    _check_features(student, "student features")
    _check_features(teacher, "teacher features")
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() != teacher.dim():
        raise ValueError(
            f"student features {s} vs teacher {t}: different numbers of spatial dims; "
            "pick layers of the same kind (both (B, C, H, W))"
        )
    if s[0] != t[0]:
        raise ValueError(
            f"student features {s} vs teacher {t}: batch sizes differ ({s[0]} vs {t[0]}); "
            "run the teacher on the same batch as the student"
        )


def attention_transfer_loss(student: Tensor, teacher: Tensor, p: float = 2.0) -> Tensor:
    """Attention transfer loss ``mean((a(F_s) − a(F_t))²)`` (Zagoruyko & Komodakis 2017).

    Args:
        student: ``(B, C_s, H_s, W_s)`` student feature map.
        teacher: ``(B, C_t, H_t, W_t)`` teacher feature map; channel counts may
            differ. If the spatial sizes differ, the larger one is
            adaptive-average-pooled to the smaller (per dimension) first.
            Detach it yourself if the teacher should not receive gradients.
        p: exponent ``>= 1`` of the attention map; 2 in the paper.

    Returns:
        0-dim tensor, at least float32; exactly 0 for an empty batch.

    Raises:
        ValueError: inputs that are not feature maps, different batch sizes or
            numbers of spatial dims, or ``p < 1``.
    """
    _check_p(p)
    _check_pair(student, teacher)
    dtype = _compute_dtype(student, teacher)
    s, t = student.to(dtype), teacher.to(dtype)
    s_size, t_size = tuple(s.shape[2:]), tuple(t.shape[2:])
    if s_size != t_size:
        pool = _POOL.get(len(s_size))
        if pool is None:
            raise ValueError(
                f"student features {tuple(s.shape)} vs teacher {tuple(t.shape)}: cannot pool "
                f"{len(s_size)} spatial dims; give both the same spatial size"
            )
        size = tuple(min(a, b) for a, b in zip(s_size, t_size, strict=True))
        if s_size != size:
            s = pool(s, size)  # (B, C_s, *size)
        if t_size != size:
            t = pool(t, size)  # (B, C_t, *size)
    diff = attention_map(s, p) - attention_map(t, p)  # (B, H·W)
    return diff.pow(2).sum() / max(diff.numel(), 1)


class AttentionTransferLoss(nn.Module):
    """Module form of :func:`attention_transfer_loss`; holds only ``p``."""

    def __init__(self, p: float = 2.0) -> None:
        super().__init__()
        _check_p(p)
        self.p = p

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return attention_transfer_loss(student, teacher, self.p)

    def extra_repr(self) -> str:
        return f"p={self.p}"
