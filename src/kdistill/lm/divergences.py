"""Token-level divergences between a student and a teacher language model.

Every token position ``i`` (a row of the logits) gives two distributions over the
vocabulary, the teacher's ``p = softmax(z_t / T)`` and the student's
``q = softmax(z_s / T)``. The per-token divergences (``kind``) are:

* ``"forward_kl"`` — ``KL(p ‖ q) = Σ_v p_v (log p_v − log q_v)``, word-level KD
  (Hinton et al. 2015; Kim & Rush 2016). Mass-covering.
* ``"reverse_kl"`` — ``KL(q ‖ p) = Σ_v q_v (log q_v − log p_v)``, the objective of
  MiniLLM (Gu et al. 2024, "MiniLLM: Knowledge Distillation of Large Language Models").
  Mode-seeking.
* ``"jsd"`` — the generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024,
  "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes",
  eq. 1) with ``m = β p + (1 − β) q``::

      JSD(β) = β · KL(p ‖ m) + (1 − β) · KL(q ‖ m)

  ``β = 0.5`` is the symmetric Jensen–Shannon divergence. The end points follow TRL's
  ``GKDTrainer.generalized_jsd_loss``: ``β = 0`` *is* forward ``KL(p ‖ q)`` and ``β = 1``
  *is* reverse ``KL(q ‖ p)`` (the formula itself would give 0 there; for ``β → 0`` it
  behaves like ``β · KL(p ‖ q)``, so the scale jumps at the end points exactly as in TRL).
* ``"skew_kl"`` — α-skew KL of DistiLLM (Ko et al. 2024, "DistiLLM: Towards Streamlined
  Distillation for Large Language Models"): ``KL(p ‖ α p + (1 − α) q)``.
* ``"skew_reverse_kl"`` — α-skew reverse KL of DistiLLM: ``KL(q ‖ (1 − α) p + α q)``.
  ``α = 0`` gives back plain forward / reverse KL; DistiLLM uses ``α = 0.1``.
* ``"tv"`` — total variation ``½ Σ_v |p_v − q_v|``, one of the f-divergences of
  f-DISTILL (Wen et al. 2023, "f-Divergence Minimization for Sequence-Level Knowledge
  Distillation").

Reduction: summed over the vocabulary, then the **mean over counted tokens**
(``reduction="mean"``, TRL's ``"batchmean"`` with labels) or their sum
(``reduction="sum"``, e.g. to divide by a token count taken over a whole
gradient-accumulation step). Tokens are counted unless ``labels == ignore_index``
(``-100``, Hugging Face's padding / prompt label) or ``mask`` is False there. No counted
token gives exactly ``0`` with zero gradients.

Temperature: both distributions are softened by ``T``; there is **no ``T²`` factor**
(the language-model convention of TRL, DistiLLM and MiniLLM, where ``T = 1`` is usual).
So ``token_divergence(kind="forward_kl", temperature=T) ==
kdistill.losses.kd_loss(temperature=T) / T²`` (Hinton's classification KD keeps the
``T²`` that makes the gradient size independent of ``T``). Multiply by ``T²`` yourself
for Hinton's convention.

Memory: :func:`token_divergence` walks the tokens in chunks of ``chunk_size`` rows. For
each chunk it upcasts to float32, computes the divergence and — in the forward pass,
the trick of Liger-Kernel's chunked losses — its gradient wrt the student logits (and
the teacher's, if those require grad) in closed form, stored in the input dtype.
Backward only scales the stored gradient. So beyond the inputs the loss holds one
gradient the size of the logits it differentiates (bf16 for bf16 logits) plus
``O(chunk_size × V)`` float32 working memory, never a full ``(N, V)`` float32 tensor or
the full softmax graph of both models. Double backward is not supported (use
:func:`token_divergence_reference`). :mod:`kdistill.lm.fused` goes further and never
materialises the student's logits at all.

Numerics and ``-inf`` logits: log-space throughout; ``0 · log 0 = 0``. A teacher logit
of ``-inf`` (a token masked out of the teacher's vocabulary) gives ``p_v = 0`` and no
``NaN`` in value or gradients. Forward KL, JSD (``0 < β < 1``), the skew divergences
(``α > 0``) and TV stay finite with the student's full distribution. Reverse KL
(``"reverse_kl"``, ``"jsd"`` with ``β = 1``, ``"skew_reverse_kl"`` with ``α = 0``) would
be ``+∞`` whenever the student gives any mass to a token the teacher rules out, so for it
the teacher's ``-inf`` tokens are removed from the student too: ``q`` is renormalised
over the teacher's support and those student logits get zero gradient. A row whose
teacher logits are all ``-inf`` has no distribution — mask it out. (A student logit of
``-inf`` where the teacher has mass makes forward KL ``+∞``, as it mathematically is.)

Shapes: logits ``(B, T, V)`` or ``(N, V)`` (any ``(..., V)``); ``labels`` / ``mask`` have
the leading shape (``(B, T)`` or ``(N,)``) and must already be aligned with the logits
(for causal LMs: shifted by one, as in ``logits[:, :-1]`` vs ``labels[:, 1:]``). Different
vocabulary sizes are handled by :func:`kdistill.lm.vocab.shared_vocab_size`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdistill.lm.vocab import align_vocab
from kdistill.losses._reduce import _check_mask, _compute_dtype

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "IGNORE_INDEX",
    "KINDS",
    "TokenDivergenceLoss",
    "token_divergence",
    "token_divergence_reference",
]

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
"""The divergence names accepted as ``kind``."""

IGNORE_INDEX = -100
"""Hugging Face's label for tokens that do not count (padding, prompt)."""

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""``chunk_size=None`` takes ``max(1, DEFAULT_CHUNK_ELEMENTS // V)`` rows per chunk: 64 MiB
per float32 ``(chunk, V)`` working tensor (110 rows for a 151,936-token vocabulary)."""

_REDUCTIONS = ("mean", "sum")


# --------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Spec:
    """A validated divergence: the resolved ``kind``, its mixing weight and ``T``."""

    kind: str
    weight: float  # β for "jsd", α for the skew kinds, unused otherwise
    temperature: float


def _resolve(kind: str, beta: float, skew_alpha: float, temperature: float) -> _Spec:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {', '.join(KINDS)}")
    if not (temperature > 0 and math.isfinite(temperature)):  # also rejects NaN
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (0.0 <= beta <= 1.0):
        raise ValueError(
            f"beta must be in [0, 1] (JSD mixture m = beta·p_teacher + (1 − beta)·q_student; "
            f"0 = forward KL, 1 = reverse KL), got {beta!r}"
        )
    if not (0.0 <= skew_alpha < 1.0):
        raise ValueError(
            f"skew_alpha must be in [0, 1) (0 = plain KL; DistiLLM uses 0.1; 1 would make the "
            f"skew divergence identically 0), got {skew_alpha!r}"
        )
    temperature = float(temperature)
    if kind == "jsd":
        if beta == 0.0:
            return _Spec("forward_kl", 0.0, temperature)
        if beta == 1.0:
            return _Spec("reverse_kl", 0.0, temperature)
        return _Spec("jsd", float(beta), temperature)
    if kind in ("skew_kl", "skew_reverse_kl"):
        if skew_alpha == 0.0:
            return _Spec("forward_kl" if kind == "skew_kl" else "reverse_kl", 0.0, temperature)
        return _Spec(kind, float(skew_alpha), temperature)
    return _Spec(kind, 0.0, temperature)


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(
            f"reduction must be 'mean' (over counted tokens) or 'sum', got {reduction!r}"
        )


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive int (tokens per chunk) or None for automatic, "
            f"got {chunk_size!r}"
        )
    return chunk_size


def _check_leading(student: Tensor, teacher: Tensor, what: str = "logits") -> None:
    if student.dim() < 1 or teacher.dim() < 1:
        raise ValueError(
            f"{what} must have a vocabulary dimension, shape (..., V); got student "
            f"{tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    if student.shape[:-1] != teacher.shape[:-1]:
        raise ValueError(
            f"student {what} have shape {tuple(student.shape)} but teacher {what} "
            f"{tuple(teacher.shape)}; the leading (token) shapes must be equal — run the "
            "teacher on the same batch and sequence length as the student"
        )


def _counted(
    leading_shape: torch.Size,
    labels: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
    device: torch.device,
) -> Tensor | None:
    """Flat ``(N,)`` bool of the tokens that count, or ``None`` when all count."""
    keep = _check_mask(mask, leading_shape, "student_logits")
    if labels is not None:
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(
                f"labels must be integer token ids (ignore_index={ignore_index} = does not "
                f"count), got dtype {labels.dtype}; pass a boolean tensor as mask= instead"
            )
        if labels.shape != leading_shape:
            raise ValueError(
                f"labels has shape {tuple(labels.shape)} but the logits have leading shape "
                f"{tuple(leading_shape)}; labels must be aligned with the logits (already "
                "shifted for a causal LM), i.e. (B, T) for logits (B, T, V)"
            )
        from_labels = labels.reshape(-1) != ignore_index
        keep = from_labels if keep is None else keep & from_labels.to(keep.device)
    return None if keep is None else keep.to(device)


def _rows(keep: Tensor | None, n: int) -> tuple[Tensor | None, int]:
    """Indices of counted rows (``None`` = all ``n``) and how many there are."""
    if keep is None:
        return None, n
    rows = keep.nonzero().squeeze(1)
    if rows.numel() == n:
        return None, n
    return rows, rows.numel()


# --------------------------------------------------------------------------- per-token maths


def _kl_terms(log_a: Tensor, log_b: Tensor) -> Tensor:
    """``Σ_v a_v (log a_v − log b_v)`` per row, with ``0 · log 0 = 0`` and no ``NaN`` grads.

    Where ``a_v = 0`` both logs are replaced by 0 *before* subtracting, so neither the
    value nor any backward path meets ``−inf − (−inf)`` or ``0 · ∞``.
    """
    support = log_a > -math.inf
    zero = log_a.new_zeros(())
    diff = torch.where(support, log_a, zero) - torch.where(support, log_b, zero)
    return (log_a.exp() * diff).sum(dim=-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, w: float) -> Tensor:
    """``log(w · p + (1 − w) · q)`` for ``0 < w < 1``, in log space.

    Where both are ``−inf`` the (unused) result is made finite so that ``logaddexp``'s
    backward does not produce ``NaN``; those entries are dropped by :func:`_kl_terms`.
    """
    both_zero = (log_p == -math.inf) & (log_q == -math.inf)
    zero = log_p.new_zeros(())
    lp = torch.where(both_zero, zero, log_p)
    lq = torch.where(both_zero, zero, log_q)
    return torch.logaddexp(lp + math.log(w), lq + math.log1p(-w))


def _per_token(student: Tensor, teacher: Tensor, spec: _Spec) -> Tensor:
    """Divergence per row ``(n,)`` of student / teacher logits ``(n, V)`` (compute dtype)."""
    s = student / spec.temperature
    t = teacher / spec.temperature
    if spec.kind == "reverse_kl":
        # KL(q ‖ p) is +inf when q > 0 where p = 0: renormalise q over the teacher's support.
        s = torch.where(t == -math.inf, t, s)
    log_q = torch.log_softmax(s, dim=-1)
    log_p = torch.log_softmax(t, dim=-1)
    kind = spec.kind
    if kind == "forward_kl":
        return _kl_terms(log_p, log_q)
    if kind == "reverse_kl":
        return _kl_terms(log_q, log_p)
    if kind == "jsd":
        beta = spec.weight
        log_m = _log_mixture(log_p, log_q, beta)
        return beta * _kl_terms(log_p, log_m) + (1.0 - beta) * _kl_terms(log_q, log_m)
    if kind == "skew_kl":
        return _kl_terms(log_p, _log_mixture(log_p, log_q, spec.weight))
    if kind == "skew_reverse_kl":
        return _kl_terms(log_q, _log_mixture(log_p, log_q, 1.0 - spec.weight))
    if kind == "tv":
        return 0.5 * (log_p.exp() - log_q.exp()).abs().sum(dim=-1)
    raise AssertionError(kind)  # pragma: no cover - _resolve rejects other kinds


def _value_and_grads(
    student: Tensor,
    teacher: Tensor,
    spec: _Spec,
    need_student: bool,
    need_teacher: bool,
    scale: float,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed divergence of one chunk ``(n, V)`` and ``scale ·`` its gradients, analytically.

    The chunk is upcast to the compute dtype (at least float32) here, so only
    ``O(chunk × V)`` float32 memory is live at a time, and no autograd graph is built.
    With ``a = z_s / T``, ``b = z_t / T``, ``q = softmax(a)``, ``p = softmax(b)``, every
    gradient has the softmax form ``∂ℓ/∂a = q ⊙ (x − ⟨q, x⟩)`` for ``x = ∂ℓ/∂q``, which
    simplifies per kind (``m`` is the kind's mixture, ``D_p = log p − log m``):

    * forward KL: ``∂a = q − p``;  ``∂b = p ⊙ (log p − log q − KL)``
    * reverse KL: ``∂a = q ⊙ (log q − log p − KL)``;  ``∂b = p − q``
    * JSD(β): ``∂a = (1−β) q ⊙ (D_q − KL(q‖m))``;  ``∂b = β p ⊙ (D_p − KL(p‖m))``
    * skew KL, ``r = p / m``: ``∂a = (1−α) q ⊙ (⟨q, r⟩ − r)``;
      ``∂b = p ⊙ (D_p − α r − ⟨p, D_p − α r⟩)``
    * skew reverse KL, ``u = q / m``: ``∂a = q ⊙ (D_q − α u − ⟨q, D_q − α u⟩)``;
      ``∂b = (1−α) p ⊙ (⟨p, u⟩ − u)``
    * TV, ``σ = ½ sign(p − q)``: ``∂a = −q ⊙ (σ − ⟨q, σ⟩)``;  ``∂b = p ⊙ (σ − ⟨p, σ⟩)``

    and ``∂z = ∂a / T``. Entries with zero probability are zeroed before any product, so
    ``-inf`` logits give no ``NaN``. Cross-checked against autograd of
    :func:`_per_token` by the tests.
    """
    dtype = _compute_dtype(student, teacher)
    temperature = spec.temperature
    a = student.to(dtype) / temperature
    b = teacher.to(dtype) / temperature
    kind = spec.kind
    if kind == "reverse_kl":
        a = torch.where(b == -math.inf, b, a)  # renormalise q over the teacher's support
    log_q = torch.log_softmax(a, dim=-1)
    log_p = torch.log_softmax(b, dim=-1)
    del a, b
    q, p = log_q.exp(), log_p.exp()
    zero = q.new_zeros(())

    def dot(x: Tensor, y: Tensor) -> Tensor:  # row-wise ⟨x, y⟩, kept as (n, 1)
        return (x * y).sum(dim=-1, keepdim=True)

    def centred(prob: Tensor, x: Tensor) -> Tensor:  # prob ⊙ (x − ⟨prob, x⟩)
        return prob * (x - dot(prob, x))

    ga: Tensor | None
    gb: Tensor | None
    if kind == "forward_kl":
        d_p = torch.where(p > 0, log_p - log_q, zero)
        row = dot(p, d_p)
        ga = q - p if need_student else None
        gb = p * (d_p - row) if need_teacher else None
    elif kind == "reverse_kl":
        d_q = torch.where(q > 0, log_q - log_p, zero)
        row = dot(q, d_q)
        ga = q * (d_q - row) if need_student else None
        gb = p - q if need_teacher else None
    elif kind == "jsd":
        beta = spec.weight
        log_m = _log_mixture(log_p, log_q, beta)
        d_p = torch.where(p > 0, log_p - log_m, zero)
        d_q = torch.where(q > 0, log_q - log_m, zero)
        kl_p, kl_q = dot(p, d_p), dot(q, d_q)
        row = beta * kl_p + (1.0 - beta) * kl_q
        ga = (1.0 - beta) * (q * (d_q - kl_q)) if need_student else None
        gb = beta * (p * (d_p - kl_p)) if need_teacher else None
    elif kind == "skew_kl":
        alpha = spec.weight
        log_m = _log_mixture(log_p, log_q, alpha)
        d_p = torch.where(p > 0, log_p - log_m, zero)
        row = dot(p, d_p)
        r = torch.where(p > 0, d_p.exp(), zero)  # p / m ≤ 1 / α
        ga = (1.0 - alpha) * (q * (dot(q, r) - r)) if need_student else None
        gb = centred(p, d_p - alpha * r) if need_teacher else None
    elif kind == "skew_reverse_kl":
        alpha = spec.weight
        log_m = _log_mixture(log_p, log_q, 1.0 - alpha)
        d_q = torch.where(q > 0, log_q - log_m, zero)
        row = dot(q, d_q)
        u = torch.where(q > 0, d_q.exp(), zero)  # q / m ≤ 1 / α
        ga = centred(q, d_q - alpha * u) if need_student else None
        gb = (1.0 - alpha) * (p * (dot(p, u) - u)) if need_teacher else None
    elif kind == "tv":
        diff = p - q
        row = 0.5 * diff.abs().sum(dim=-1, keepdim=True)
        sigma = 0.5 * torch.sign(diff)
        ga = -centred(q, sigma) if need_student else None
        gb = centred(p, sigma) if need_teacher else None
    else:  # pragma: no cover - _resolve rejects other kinds
        raise AssertionError(kind)
    factor = scale / temperature
    if ga is not None:
        ga = ga.mul_(factor)  # every ga / gb above is a fresh tensor
    if gb is not None:
        gb = gb.mul_(factor)
    return row.sum(), ga, gb


def _scale_grad(grad: Tensor | None, grad_output: Tensor) -> Tensor | None:
    """``grad · grad_output``, skipping the (N, V)-sized multiply when it is 1."""
    if grad is None:
        return None
    if bool(grad_output == 1):
        return grad
    return grad * grad_output.to(grad.dtype)


# --------------------------------------------------------------------------- chunked loop


def _chunked(
    student: Tensor,
    teacher: Tensor,
    rows: Tensor | None,
    count: int,
    spec: _Spec,
    chunk: int,
    normaliser: float,
    need_student: bool,
    need_teacher: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Loss over the counted rows of ``(N, V)`` logits, chunk by chunk, with its gradients.

    Returns the loss (0-dim, compute dtype) and the gradients of the loss wrt ``student``
    / ``teacher`` (input dtype, uncounted rows zero) when asked for.
    """
    dtype = _compute_dtype(student, teacher)
    total = torch.zeros((), dtype=dtype, device=student.device)
    grad_s = grad_t = None
    if need_student:
        grad_s = torch.zeros_like(student) if rows is not None else torch.empty_like(student)
    if need_teacher:
        grad_t = torch.zeros_like(teacher) if rows is not None else torch.empty_like(teacher)
    scale = 1.0 / normaliser
    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        if rows is None:
            idx = None
            s_c, t_c = student[start:stop], teacher[start:stop]
        else:
            idx = rows[start:stop]
            s_c, t_c = student.index_select(0, idx), teacher.index_select(0, idx)
        value, g_s, g_t = _value_and_grads(s_c, t_c, spec, need_student, need_teacher, scale)
        total += value
        for full, part in ((grad_s, g_s), (grad_t, g_t)):
            if full is None or part is None:
                continue
            if idx is None:
                full[start:stop] = part
            else:
                full.index_copy_(0, idx, part.to(full.dtype))
    return total / normaliser, grad_s, grad_t


class _ChunkedTokenDivergence(torch.autograd.Function):
    """Chunked divergence whose gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        rows: Tensor | None,
        count: int,
        spec: _Spec,
        chunk: int,
        normaliser: float,
    ) -> Tensor:
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        loss, grad_s, grad_t = _chunked(
            student, teacher, rows, count, spec, chunk, normaliser, need_s, need_t
        )
        ctx.save_for_backward(grad_s, grad_t)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grad_s, grad_t = ctx.saved_tensors
        return (
            _scale_grad(grad_s, grad_output),
            _scale_grad(grad_t, grad_output),
            None,
            None,
            None,
            None,
            None,
        )


# --------------------------------------------------------------------------- public API


def _prepare(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor | None,
    ignore_index: int,
    mask: Tensor | None,
    allow_padded: bool | None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Validate, align vocabularies and flatten to ``(N, V)``; return the counted-row bool."""
    _check_leading(student_logits, teacher_logits)
    _compute_dtype(student_logits, teacher_logits)  # rejects integer logits
    student_logits, teacher_logits = align_vocab(
        student_logits, teacher_logits, allow_padded=allow_padded
    )
    leading = student_logits.shape[:-1]
    keep = _counted(leading, labels, ignore_index, mask, student_logits.device)
    vocab = student_logits.shape[-1]
    return student_logits.reshape(-1, vocab), teacher_logits.reshape(-1, vocab), keep


def token_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mask: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    allow_padded: bool | None = None,
) -> Tensor:
    """Token-level divergence between student and teacher, computed in chunks of tokens.

    See the module docstring for the formulas of each ``kind``, the temperature
    convention (no ``T²``), the ``-inf`` rules and the memory behaviour.

    Args:
        student_logits: ``(B, T, V)`` or ``(N, V)``.
        teacher_logits: same leading shape, ``(..., V_t)``; ``V_t ≠ V`` is resolved by
            :func:`kdistill.lm.vocab.shared_vocab_size`. Gets gradients only if it
            requires grad (usually it is computed under ``torch.no_grad()``).
        kind: one of :data:`KINDS`.
        beta: JSD mixture weight of the teacher, ``m = β p + (1 − β) q``; ``0`` = forward
            KL, ``1`` = reverse KL (TRL's convention).
        skew_alpha: DistiLLM's skew ``α`` in ``[0, 1)`` for the skew kinds.
        temperature: ``T > 0`` softening both distributions; no ``T²`` factor.
        labels: optional ``(B, T)`` integer ids; tokens with ``ignore_index`` do not count.
        ignore_index: the label value of tokens that do not count (default ``-100``).
        mask: optional ``(B, T)`` bool (or 0/1 integer, e.g. an attention mask); only True
            tokens count. Combined with ``labels`` by AND.
        reduction: ``"mean"`` over counted tokens (default) or ``"sum"``.
        chunk_size: tokens per chunk; ``None`` picks ``DEFAULT_CHUNK_ELEMENTS // V``.
        allow_padded: vocabulary-size rule, see :func:`~kdistill.lm.vocab.shared_vocab_size`.

    Returns:
        0-dim tensor in the compute dtype (float32 for half inputs, float64 for float64).
        Exactly ``0`` (with zero gradients) when no token counts.

    Raises:
        ValueError: unknown ``kind``, out-of-range ``beta`` / ``skew_alpha`` /
            ``temperature``, bad ``chunk_size`` / ``reduction``, mismatched shapes or
            incompatible vocabularies.
        TypeError: non-floating logits, float labels or a float mask.
    """
    spec = _resolve(kind, beta, skew_alpha, temperature)
    _check_reduction(reduction)
    s, t, keep = _prepare(student_logits, teacher_logits, labels, ignore_index, mask, allow_padded)
    chunk = _chunk_rows(chunk_size, s.shape[-1])
    rows, count = _rows(keep, s.shape[0])
    normaliser = float(max(count, 1)) if reduction == "mean" else 1.0
    if torch.is_grad_enabled() and (s.requires_grad or t.requires_grad):
        return _ChunkedTokenDivergence.apply(s, t, rows, count, spec, chunk, normaliser)
    loss, _, _ = _chunked(s, t, rows, count, spec, chunk, normaliser, False, False)
    return loss


def token_divergence_reference(
    student_logits: Tensor,
    teacher_logits: Tensor,
    kind: str = "forward_kl",
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mask: Tensor | None = None,
    reduction: str = "mean",
    allow_padded: bool | None = None,
) -> Tensor:
    """Plain, unchunked :func:`token_divergence`: ordinary autograd over all tokens at once.

    Same arguments, conventions and result (up to rounding). It keeps the whole float32
    softmax graph of both models — ``O(N × V)`` float32 memory several times over — so it
    is for tests, small inputs and double backward.
    """
    spec = _resolve(kind, beta, skew_alpha, temperature)
    _check_reduction(reduction)
    s, t, keep = _prepare(student_logits, teacher_logits, labels, ignore_index, mask, allow_padded)
    if keep is not None:
        s, t = s[keep], t[keep]
    dtype = _compute_dtype(s, t)
    per_token = _per_token(s.to(dtype), t.to(dtype), spec)
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / max(per_token.numel(), 1)


class DivergenceSettings(nn.Module):
    """The hyper-parameters shared by the token-divergence loss modules, validated once."""

    def __init__(
        self,
        kind: str = "forward_kl",
        *,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        temperature: float = 1.0,
        ignore_index: int = IGNORE_INDEX,
        reduction: str = "mean",
        chunk_size: int | None = None,
        allow_padded: bool | None = None,
    ) -> None:
        super().__init__()
        _resolve(kind, beta, skew_alpha, temperature)
        _check_reduction(reduction)
        if chunk_size is not None:
            _chunk_rows(chunk_size, 1)
        self.kind = kind
        self.beta = beta
        self.skew_alpha = skew_alpha
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.allow_padded = allow_padded

    def extra_repr(self) -> str:
        parts = [f"kind={self.kind!r}"]
        if self.kind == "jsd":
            parts.append(f"beta={self.beta}")
        if self.kind in ("skew_kl", "skew_reverse_kl"):
            parts.append(f"skew_alpha={self.skew_alpha}")
        parts.append(f"temperature={self.temperature}")
        if self.reduction != "mean":
            parts.append(f"reduction={self.reduction!r}")
        if self.chunk_size is not None:
            parts.append(f"chunk_size={self.chunk_size}")
        return ", ".join(parts)


class TokenDivergenceLoss(DivergenceSettings):
    """Module form of :func:`token_divergence`; holds only the hyper-parameters.

    ``forward(student_logits, teacher_logits, labels=None, mask=None)``.
    """

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return token_divergence(
            student_logits,
            teacher_logits,
            self.kind,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            allow_padded=self.allow_padded,
        )
