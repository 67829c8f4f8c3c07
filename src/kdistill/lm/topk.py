"""Token-level KD against a cached top-k teacher: the maths that read the top-k cache.

The on-disk cache (:mod:`kdistill.cache`, ``"topk"`` layout) stores, per token, the teacher's
``k`` largest log-probabilities, their ids and the log of the mass on the other ids. This
module turns those back into a loss:

- :func:`topk_buckets` coarsens the student's and the teacher's distributions to ``k + 1``
  buckets (the teacher's top-k ids, and every other id lumped together);
  :func:`topk_divergence` computes any divergence of :mod:`kdistill.lm.divergences` between
  them — with ``k = V`` exactly the dense divergence, with ``k < V`` a lower bound of it at
  ``T = 1`` (data-processing inequality; see :mod:`kdistill.cache` for the derivation).
- :func:`densify_topk` rebuilds a full ``(..., V)`` teacher with the residual spread evenly,
  for losses that need one.
- :func:`pack_topk` / :func:`unpack_topk` carry a cached top-k teacher through a batch as
  one tensor, and :class:`TopKTokenKDLoss` is the :class:`~kdistill.distiller.Distiller` term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.distiller import IGNORE_INDEX
from kdistill.lm.divergences import token_divergence

__all__ = [
    "TOPK",
    "TopKTokenKDLoss",
    "densify_topk",
    "pack_topk",
    "teacher_buckets",
    "topk_buckets",
    "topk_divergence",
    "unpack_topk",
]


def _check_topk(student_logits: Tensor, values: Tensor, indices: Tensor, rest: Tensor) -> None:
    vocab, k = student_logits.shape[-1], values.shape[-1]
    if values.shape != indices.shape or values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must both "
            f"be (..., k) with the student logits' leading shape {tuple(student_logits.shape[:-1])}"
        )
    if rest.shape != values.shape[:-1]:
        raise ValueError(
            f"rest_log_mass has shape {tuple(rest.shape)}, expected {tuple(values.shape[:-1])}"
        )
    if k > vocab:
        raise ValueError(f"k = {k} top-k entries but the student has only V = {vocab} logits")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(
            f"top-k token ids span [{int(indices.min())}, {int(indices.max())}], outside the "
            f"student's vocabulary [0, {vocab}); slice or pad the student logits to the "
            "teacher's vocabulary"
        )


def topk_buckets(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    rest_log_mass: Tensor,
    temperature: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Student and teacher logits over ``k + 1`` buckets: the teacher's top-k ids + the rest.

    Args:
        student_logits: ``(..., V)`` raw student logits (with gradients).
        values: ``(..., k)`` teacher log-probabilities at ``T = 1`` (any float dtype).
        indices: ``(..., k)`` their token ids (any integer dtype).
        rest_log_mass: ``(...)`` log of the teacher's mass on the other ``V − k`` ids.
        temperature: ``T > 0``.

    Returns:
        ``(student, teacher)`` float32 (float64 for float64 logits) ``(..., k + 1)`` (``(..., k)`` when ``k = V``) whose
        softmaxes are the coarsened tempered distributions: bucket ``j < k`` is id
        ``indices[j]``, bucket ``k`` all other ids. Student: ``z_s / T`` gathered, and
        ``logsumexp`` of ``z_s / T`` over the other ids (exact). Teacher: ``values / T``
        and ``(R − log n) / T + log n`` with ``n = V − k`` — exact at ``T = 1`` (it is
        ``R``), and for ``T ≠ 1`` the tempered mass of a residual spread evenly over the
        ``n`` ids. Memory: one float32 ``(..., V)`` copy of the student logits.
    """
    _check_topk(student_logits, values, indices, rest_log_mass)
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    vocab, k = student_logits.shape[-1], values.shape[-1]
    idx = indices.long()
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # float64 stays float64
    s = student_logits.to(dtype) / temperature  # (..., V)
    s_top = s.gather(-1, idx)  # (..., k)
    teacher = teacher_buckets(values, rest_log_mass, vocab, temperature, dtype)
    if k == vocab:  # nothing outside the top-k: no rest bucket
        return s_top, teacher
    s_rest = s.scatter(-1, idx, -math.inf).logsumexp(dim=-1, keepdim=True)  # (..., 1)
    return torch.cat([s_top, s_rest], dim=-1), teacher


def teacher_buckets(
    values: Tensor, rest_log_mass: Tensor, vocab: int, temperature: float, dtype: torch.dtype
) -> Tensor:
    """The teacher's ``k + 1`` bucket logits ``(..., k + 1)`` (``(..., k)`` when ``k = V``).

    ``values / T`` and, for the rest, ``R`` at ``T = 1`` or ``(R − log n) / T + log n`` with
    ``n = V − k`` (a residual spread evenly). The one rule every top-k loss uses (the plain
    :func:`topk_buckets` and the fused ``kdistill.lm.fused.fused_topk_divergence``).
    """
    k = values.shape[-1]
    top = values.to(dtype) / temperature  # (..., k)
    if k == vocab:
        return top
    r = rest_log_mass.to(dtype).unsqueeze(-1)  # (..., 1)
    log_n = math.log(vocab - k)
    r = r if temperature == 1.0 else (r - log_n) / temperature + log_n
    return torch.cat([top, r], dim=-1)


def topk_divergence(
    student_logits: Tensor,
    values: Tensor,
    indices: Tensor,
    rest_log_mass: Tensor,
    kind: str = "forward_kl",
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """A token divergence of :mod:`kdistill.lm` against a cached top-k teacher.

    Computes ``kdistill.lm.token_divergence(kind)`` between the student's and the teacher's
    distributions coarsened to the ``k + 1`` buckets of :func:`topk_buckets` (the teacher's
    top-k ids, and every other id lumped together), with the same conventions (no ``T²``;
    mean over counted tokens; ``labels == ignore_index`` and ``mask`` select tokens).
    ``k = V`` gives the dense divergence; ``k < V`` a lower bound of it for every
    f-divergence kind at ``T = 1`` (data-processing inequality) — see the module docstring.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        values, indices, rest_log_mass: a cache's ``topk_values``, ``topk_indices`` and
            ``rest_log_mass`` for the same tokens, ``(B, T, k)``, ``(B, T, k)``, ``(B, T)``.
        kind, beta, skew_alpha, temperature, labels, ignore_index, mask, reduction: as for
            :func:`kdistill.lm.token_divergence`.
    """
    student, teacher = topk_buckets(student_logits, values, indices, rest_log_mass, temperature)
    return token_divergence(
        student,
        teacher,
        kind,
        beta=beta,
        skew_alpha=skew_alpha,
        temperature=1.0,  # already applied bucket-wise
        labels=labels,
        ignore_index=ignore_index,
        mask=mask,
        reduction=reduction,
    )


def densify_topk(values: Tensor, indices: Tensor, rest_log_mass: Tensor, vocab_size: int) -> Tensor:
    """Full teacher log-probabilities ``(..., V)`` with the residual spread evenly.

    Entries ``indices`` get ``values``; each of the other ``V − k`` ids gets
    ``rest_log_mass − log(V − k)``. For losses that need a full ``(..., V)`` teacher
    (e.g. :func:`kdistill.losses.kd_loss`, whose softmax of log-probabilities is the
    distribution itself). Costs a float32 ``(..., V)`` tensor; :func:`topk_divergence`
    avoids imposing this uniform tail on the student.
    """
    k = values.shape[-1]
    if not k <= vocab_size:
        raise ValueError(f"k = {k} exceeds vocab_size = {vocab_size}")
    fill = (
        rest_log_mass.float() - math.log(vocab_size - k)
        if k < vocab_size
        else torch.full(rest_log_mass.shape, -math.inf)
    )
    out = fill.unsqueeze(-1).expand(*values.shape[:-1], vocab_size).contiguous()
    return out.scatter(-1, indices.long(), values.float())


TOPK = "topk"
"""Batch key (``teacher.topk``) and term reference of a packed cached top-k teacher."""

_EXACT_FLOAT32_IDS = 1 << 24  # every integer up to 2^24 is exact in float32


def pack_topk(values: Tensor, indices: Tensor, rest_log_mass: Tensor) -> Tensor:
    """One float32 tensor ``(..., 2k + 1)``: ``[values | indices | rest_log_mass]``.

    A :class:`~kdistill.distiller.Distiller` term compares the student with *one* teacher
    tensor, so a cached top-k teacher (:mod:`kdistill.cache`) travels as one. Lossless:
    16-bit values widen exactly, token ids below ``2^24`` are exact in float32.

    Args:
        values: ``(..., k)`` teacher log-probabilities (float16 / bfloat16 / float32).
        indices: ``(..., k)`` their token ids (any integer dtype).
        rest_log_mass: ``(...)`` log of the teacher's mass on the other ids.
    """
    narrow = indices.dtype in (torch.uint8, torch.int8, torch.int16, torch.uint16)  # all exact
    if not narrow and indices.numel() and int(indices.max()) >= _EXACT_FLOAT32_IDS:
        raise ValueError("token ids >= 2^24 cannot be packed exactly in float32")
    return torch.cat([values.float(), indices.float(), rest_log_mass.float().unsqueeze(-1)], dim=-1)


def unpack_topk(packed: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`pack_topk`: ``values (..., k)``, ``indices (..., k)`` int64, ``rest (...)``."""
    k, odd = divmod(packed.shape[-1] - 1, 2)
    if odd or k < 1:
        raise ValueError(f"a packed top-k teacher has 2k + 1 columns, got {packed.shape[-1]}")
    return packed[..., :k], packed[..., k : 2 * k].long(), packed[..., 2 * k]


class TopKTokenKDLoss(nn.Module):
    """Token-level KD against a cached top-k teacher (:func:`topk_divergence`).

    ``forward(student_logits (B, T, V), packed (B, T', 2k + 1), labels (B, T), mask)``, the
    packed teacher from :func:`pack_topk` with ``T' ≥ T`` (cached rows are padded to the
    longest training text; positions past ``T`` are padding of this batch and dropped).
    Same conventions as :class:`~kdistill.lm.losses.TokenKDLoss` — mean over the tokens
    whose label is not ignored, no ``T²`` — and with ``k = V`` the same value.
    """

    requires_target = True
    requires_mask = True

    def __init__(
        self,
        kind: str = "forward_kl",
        *,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        self.kind, self.beta, self.skew_alpha = kind, beta, skew_alpha
        self.temperature = temperature

    def forward(
        self, student_logits: Tensor, packed: Tensor, labels: Tensor, mask: Tensor | None = None
    ) -> Tensor:
        values, indices, rest = unpack_topk(packed[:, : student_logits.shape[1]])
        return topk_divergence(
            student_logits,
            values,
            indices,
            rest,
            self.kind,
            temperature=self.temperature,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            labels=labels,
            mask=None if mask is None else mask.bool(),
        )

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, temperature={self.temperature}"
