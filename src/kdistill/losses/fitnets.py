"""FitNets hint loss: regress (adapted) student features onto teacher features.

Romero, Ballas, Kahou, Chassang, Gatta & Bengio 2015, "FitNets: Hints for Thin
Deep Nets". A student "guided" layer ``v`` is mapped by a regressor ``r`` onto
the shape of a teacher "hint" layer ``u`` and trained with::

    L_hint = ½ · ‖u − r(v)‖²₂

Here the loss is the *mean* squared error over every element (as in the
reference implementation RepDistiller's ``HintLoss = nn.MSELoss()``), i.e. the
paper's loss divided by ``numel / 2``; the weight of the term absorbs the
constant.

The regressor (adapter, e.g. a 1×1 conv from the student's to the teacher's
channels) is *not* part of this loss: kdistill's ``LossTerm`` applies it to the
student tensor before calling the loss, so ``hint_loss`` only ever sees tensors
of equal shape ``(B, ...)``.
"""

from __future__ import annotations

from torch import Tensor, nn

from kdistill.losses._reduce import _compute_dtype

__all__ = ["HintLoss", "hint_loss"]


def _check_same_shape(student: Tensor, teacher: Tensor, what: str) -> None:
    s, t = tuple(student.shape), tuple(teacher.shape)
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(f"{what} expects batched features (B, ...); got student {s}, teacher {t}")
    if s == t:
        return
    if s[0] != t[0]:
        raise ValueError(
            f"student features {s} vs teacher {t}: batch sizes differ ({s[0]} vs {t[0]}); "
            "run the teacher on the same batch as the student"
        )
    raise ValueError(
        f"student features {s} vs teacher {t}: {what} needs equal shapes; add an adapter "
        "that maps the student features onto the teacher's shape (e.g. a 1×1 conv for "
        "feature maps (B, C, H, W), an nn.Linear for hidden states (B, L, D))"
    )


def hint_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """FitNets hint loss: mean squared error between student and teacher features.

    Romero et al. 2015, "FitNets: Hints for Thin Deep Nets" (mean instead of
    ``½ · sum``, see the module docstring).

    Args:
        student: ``(B, ...)`` student features, already adapted to the teacher's
            shape (e.g. ``(B, C, H, W)`` after a 1×1 conv).
        teacher: ``(B, ...)``, same shape. Detach it yourself if the teacher
            should not receive gradients.

    Returns:
        0-dim tensor, at least float32 (float16/bfloat16 inputs are upcast);
        exactly 0 for an empty batch.

    Raises:
        ValueError: the shapes differ (the message says to add an adapter).
    """
    _check_same_shape(student, teacher, "hint_loss")
    dtype = _compute_dtype(student, teacher)
    diff = student.to(dtype) - teacher.to(dtype)  # (B, ...)
    return diff.pow(2).sum() / max(diff.numel(), 1)


class HintLoss(nn.Module):
    """Module form of :func:`hint_loss`; has no hyper-parameters (the adapter lives in ``LossTerm``)."""

    same_shape = True  # compares tensors elementwise: adapters apply when shapes differ

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return hint_loss(student, teacher)
