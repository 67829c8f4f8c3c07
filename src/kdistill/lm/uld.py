"""Cross-tokenizer distillation losses: ULD and the GOLD-style hybrid.

Both compare, for every aligned group of :mod:`kdistill.lm.alignment`, the student's
next-token distribution ``q = softmax(z_s / T)`` at ``student_positions`` with the teacher's
``p = softmax(z_t / T)`` at ``teacher_positions`` — the two places where both models have
read exactly the same text. The vocabularies differ, so the ordinary divergences of
:mod:`kdistill.lm.divergences` do not apply directly.

* **ULD** — Universal Logit Distillation (Boizard et al. 2024, "Towards Cross-Tokenizer
  Distillation: the Universal Logit Distillation Loss for LLMs", eq. 4): the closed form of
  the Wasserstein-1 distance when every pair of tokens is equally far apart, i.e. the L1
  distance between the *sorted* probability vectors, the shorter one padded with zeros::

      ULD(p, q) = Σ_{k=1}^{max(V_s, V_t)} | q_(k) − p_(k) |      (q_(1) ≥ q_(2) ≥ …)

* **Hybrid** — after TRL's GOLD trainer (``ULDLoss._compute_hybrid_uld_loss``): tokens
  whose meaning is the same in both vocabularies (the same bytes, see
  :func:`~kdistill.lm.cross_tokenizer.vocab_map`) form the matched set ``M``; the rest, ``U_s`` and ``U_t``, do not. With
  ``p_M`` / ``q_M`` the two distributions restricted to ``M`` and renormalised over it
  (GOLD compares the unnormalised restrictions; renormalising keeps each ``kind`` a true
  divergence and lets :func:`~kdistill.lm.divergences.token_divergence` do the work)::

      hybrid = w_M · D_kind(p_M ‖ q_M) + w_U · Σ_k | q_U,(k) − p_U,(k) |

  where the second term is ULD over the unmatched probabilities (not renormalised) and
  ``D_kind`` any divergence ``kind`` of :data:`~kdistill.lm.divergences.KINDS`. The default
  weights are GOLD's adaptive ones, ``w_M = |M| / V_t`` and ``w_U = 1 − w_M``. With one
  tokenizer on both sides ``M`` is the whole vocabulary, ``w_M = 1``, ``U = ∅``, and the
  hybrid *is* ``token_divergence(kind)`` over the compared tokens, bit for bit. A group
  where the teacher gives no mass to ``M`` (a top-k teacher whose k tokens are all
  unmatched) has no ``p_M``; its matched term counts 0.

Reduction: the mean over compared groups (``mask``; ``reduction="mean"``) or their sum. No
compared group gives exactly 0 with zero gradients. Temperature as in
:mod:`kdistill.lm.divergences`: both softened by ``T``, no ``T²``.

Memory: the compared rows are gathered once (``(N, V)`` copies in the logits' dtype, ``N``
= compared groups). The ULD term is then computed in chunks of rows whose float32 working
set (softmax, sort values and indices of both sides) is bounded by ``chunk_size`` rows,
with its gradient taken in closed form in the forward pass — ``∂ULD/∂q_v = sign(q_(r) −
p_(r))`` at ``v``'s rank ``r``, then the softmax Jacobian — as ``token_divergence`` does;
the matched term is ``token_divergence`` itself.

Teachers: dense logits ``(B, T_t, V_t)`` from a live teacher, or :class:`~kdistill.lm.cross_tokenizer.TopKTeacher` — ids
and log-probabilities of ``k`` tokens per position (an on-disk top-k cache in the teacher's
vocabulary, or a served teacher's ``top_logprobs`` mapped by
:func:`~kdistill.lm.cross_tokenizer.served_teacher_topk`).
A top-k teacher is the top-k distribution renormalised (exact when ``k = V_t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdistill.lm.cross_tokenizer import Teacher, TopKTeacher, VocabMap
from kdistill.lm.divergences import token_divergence

__all__ = [
    "HybridULDLoss",
    "ULDLoss",
    "hybrid_divergence",
    "uld_divergence",
]

_CHUNK_BYTES = 32 << 20
"""Float32 working memory of one ULD chunk: rows = budget // (16 · V · 4 bytes)."""


# --------------------------------------------------------------------------- ULD maths


def _sorted_l1(
    q: Tensor, p: Tensor, need_q: bool, need_p: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``Σ_k |q_(k) − p_(k)|`` summed over rows of ``q`` ``(n, L_s)``, ``p`` ``(n, L_t)``
    (zero-padded to one length), and ``∂/∂q``, ``∂/∂p`` (``sign`` at each entry's rank)."""
    n, ls, lt = q.shape[0], q.shape[1], p.shape[1]
    width = max(ls, lt)
    if width == 0:
        return q.new_zeros(()), torch.zeros_like(q), torch.zeros_like(p)
    q_sorted, q_order = q.sort(dim=-1, descending=True)  # (n, L_s)
    p_sorted, p_order = p.sort(dim=-1, descending=True)  # (n, L_t)
    diff = q.new_zeros((n, width))
    diff[:, :ls] = q_sorted
    diff[:, :lt] -= p_sorted
    del q_sorted, p_sorted
    value = diff.abs().sum()
    sign = diff.sign_()  # (n, width): ∂|q_(k) − p_(k)| / ∂q_(k)
    gq = torch.zeros_like(q).scatter_(1, q_order, sign[:, :ls]) if need_q else None
    gp = torch.zeros_like(p).scatter_(1, p_order, sign[:, :lt]).neg_() if need_p else None
    return value, gq, gp


def _softmax_backward(prob: Tensor, x: Tensor, factor: float) -> Tensor:
    """``factor · prob ⊙ (x − ⟨prob, x⟩)``: the gradient wrt logits of a function of
    ``softmax`` whose gradient wrt the probabilities is ``x``."""
    return prob * (x - (prob * x).sum(dim=-1, keepdim=True)) * factor


def _chunk_rows(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, _CHUNK_BYTES // (16 * max(vocab, 1) * 4))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    return chunk_size


def _uld_chunks(
    student: Tensor,
    teacher: Tensor,
    student_cols: Tensor | None,
    teacher_cols: Tensor | None,
    temperature: float,
    chunk: int,
    need_s: bool,
    need_t: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed ULD over rows ``(N, V_s)`` / ``(N, V_t)``, restricted to the given columns
    (``None`` = all) of the full softmax, chunk by chunk, and its gradients (input dtype)."""
    dtype = torch.promote_types(torch.promote_types(student.dtype, teacher.dtype), torch.float32)
    total = torch.zeros((), dtype=dtype, device=student.device)
    grad_s = torch.empty_like(student) if need_s else None
    grad_t = torch.empty_like(teacher) if need_t else None
    for start in range(0, student.shape[0], chunk):
        stop = min(start + chunk, student.shape[0])
        q = torch.softmax(student[start:stop].to(dtype) / temperature, dim=-1)  # (n, V_s)
        p = torch.softmax(teacher[start:stop].to(dtype) / temperature, dim=-1)  # (n, V_t)
        q_sub = q if student_cols is None else q[:, student_cols]
        p_sub = p if teacher_cols is None else p[:, teacher_cols]
        value, gq, gp = _sorted_l1(q_sub, p_sub, need_s, need_t)
        total += value
        for full, prob, part, cols in (
            (grad_s, q, gq, student_cols),
            (grad_t, p, gp, teacher_cols),
        ):
            if full is None or part is None:
                continue
            if cols is not None:
                part = torch.zeros_like(prob).index_copy_(1, cols, part)
            full[start:stop] = _softmax_backward(prob, part, 1.0 / temperature).to(full.dtype)
    return total, grad_s, grad_t


class _ULD(torch.autograd.Function):
    """:func:`_uld_chunks` with its gradients computed in forward and scaled in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        student: Tensor,
        teacher: Tensor,
        student_cols: Tensor | None,
        teacher_cols: Tensor | None,
        temperature: float,
        chunk: int,
    ) -> Tensor:
        need_s, need_t = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        total, grad_s, grad_t = _uld_chunks(
            student, teacher, student_cols, teacher_cols, temperature, chunk, need_s, need_t
        )
        ctx.save_for_backward(grad_s, grad_t)
        return total

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        grads = [None if g is None else g * grad_output.to(g.dtype) for g in ctx.saved_tensors]
        return grads[0], grads[1], None, None, None, None


def _uld_sum(
    student: Tensor,
    teacher: Tensor,
    student_cols: Tensor | None,
    teacher_cols: Tensor | None,
    temperature: float,
    chunk_size: int | None,
) -> Tensor:
    chunk = _chunk_rows(chunk_size, max(student.shape[-1], teacher.shape[-1]))
    if torch.is_grad_enabled() and (student.requires_grad or teacher.requires_grad):
        return _ULD.apply(student, teacher, student_cols, teacher_cols, temperature, chunk)
    total, _, _ = _uld_chunks(
        student, teacher, student_cols, teacher_cols, temperature, chunk, False, False
    )
    return total


# --------------------------------------------------------------------------- gathering


def _gather(
    student_logits: Tensor,
    teacher: Teacher,
    student_positions: Tensor,
    teacher_positions: Tensor,
    mask: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """The compared rows: student ``(N, V_s)`` and teacher ``(N, V_t)`` logits."""
    if student_logits.dim() != 3:
        raise ValueError(f"student_logits must be (B, T, V), got {tuple(student_logits.shape)}")
    t_shape = teacher.shape
    if len(t_shape) != 3 or t_shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher logits must be (B, T_t, V_t) with the student's batch size "
            f"{student_logits.shape[0]}, got {tuple(t_shape)}"
        )
    if student_positions.shape != teacher_positions.shape or student_positions.dim() != 2:
        raise ValueError(
            f"student_positions {tuple(student_positions.shape)} and teacher_positions "
            f"{tuple(teacher_positions.shape)} must both be (B, G) (see alignment_tensors)"
        )
    if student_positions.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"positions have batch size {student_positions.shape[0]} but the logits "
            f"{student_logits.shape[0]}"
        )
    if mask is None:
        keep = torch.ones_like(student_positions, dtype=torch.bool)
    else:
        if mask.shape != student_positions.shape or mask.dtype.is_floating_point:
            raise ValueError(
                f"mask must be a bool (B, G) like the positions {tuple(student_positions.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        keep = mask.bool()
    device = student_logits.device
    keep = keep.to(device)
    s_pos = student_positions.to(device)[keep]
    t_pos = teacher_positions.to(device)[keep]
    batch = torch.arange(keep.shape[0], device=device)[:, None].expand_as(keep)[keep]
    ts, tt = student_logits.shape[1], t_shape[1]
    for name, pos, width in (("student", s_pos, ts), ("teacher", t_pos, tt)):
        if pos.numel() and (int(pos.min()) < 0 or int(pos.max()) >= width):
            raise ValueError(
                f"{name}_positions hold {int(pos.min())}..{int(pos.max())}, outside the "
                f"{name}'s {width} positions: the alignment does not belong to these logits"
            )
    s_rows = student_logits.reshape(-1, student_logits.shape[-1]).index_select(
        0, batch * ts + s_pos
    )
    t_flat = batch * tt + t_pos
    if isinstance(teacher, TopKTeacher):
        t_rows = teacher.rows(t_flat.to(teacher.ids.device)).to(device)
    else:
        t_rows = teacher.reshape(-1, teacher.shape[-1]).index_select(0, t_flat)
    return s_rows, t_rows


def _check(temperature: float, reduction: str) -> None:
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' (over compared groups) or 'sum', got {reduction!r}"
        )


# --------------------------------------------------------------------------- public losses


def uld_divergence(
    student_logits: Tensor,
    teacher: Teacher,
    student_positions: Tensor,
    teacher_positions: Tensor,
    mask: Tensor | None = None,
    *,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """ULD (Boizard et al. 2024) between aligned student and teacher positions.

    ``Σ_k |q_(k) − p_(k)|`` per compared group (sorted probabilities, the shorter
    vocabulary padded with zeros), averaged over the groups (module docstring).

    Args:
        student_logits: ``(B, T_s, V_s)``.
        teacher: ``(B, T_t, V_t)`` logits (gets gradients only if it requires grad) or a
            :class:`TopKTeacher`.
        student_positions, teacher_positions: ``(B, G)`` from
            :func:`~kdistill.lm.alignment.alignment_tensors`.
        mask: ``(B, G)`` bool, the groups compared (``None`` = all).
        temperature: ``T > 0`` for both; no ``T²``.
        reduction: ``"mean"`` over compared groups or ``"sum"``.
        chunk_size: rows per chunk (``None``: a 32 MiB float32 budget).

    Returns:
        0-dim tensor (float32 at least); exactly 0 when nothing is compared.
    """
    _check(temperature, reduction)
    s_rows, t_rows = _gather(student_logits, teacher, student_positions, teacher_positions, mask)
    total = _uld_sum(s_rows, t_rows, None, None, float(temperature), chunk_size)
    return total / max(s_rows.shape[0], 1) if reduction == "mean" else total


def hybrid_divergence(
    student_logits: Tensor,
    teacher: Teacher,
    student_positions: Tensor,
    teacher_positions: Tensor,
    vocab: VocabMap,
    mask: Tensor | None = None,
    *,
    kind: str = "forward_kl",
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """``w_M · D_kind(p_M ‖ q_M) + w_U · ULD(p_U, q_U)`` per compared group (module docstring).

    Args:
        vocab: the matched tokens (:func:`~kdistill.lm.cross_tokenizer.vocab_map`); its sizes must be the logits'.
        kind, beta, skew_alpha: the divergence on matched tokens, as in
            :func:`~kdistill.lm.divergences.token_divergence`.
        matched_weight, unmatched_weight: ``w_M``, ``w_U`` (both or neither); ``None`` =
            GOLD's ``|M| / V_t`` and ``1 − |M| / V_t``.
        Others: as :func:`uld_divergence`.
    """
    _check(temperature, reduction)
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError(
            "give both matched_weight and unmatched_weight, or neither (GOLD's |M|/V_t)"
        )
    v_s, v_t = student_logits.shape[-1], teacher.shape[-1]
    if (vocab.student_vocab, vocab.teacher_vocab) != (v_s, v_t):
        raise ValueError(
            f"the vocab map is for {vocab.student_vocab} student / {vocab.teacher_vocab} teacher "
            f"ids, the logits have {v_s} / {v_t}: build it from these tokenizers (len(tokenizer) "
            "ids; pad the map if a model pads its embedding)"
        )
    if matched_weight is None:
        w_m = vocab.size / v_t
        w_u = 1.0 - w_m
    else:
        w_m, w_u = float(matched_weight), float(unmatched_weight)  # type: ignore[arg-type]
        if w_m < 0 or w_u < 0:
            raise ValueError(f"hybrid weights must be >= 0, got {w_m}, {w_u}")
    s_rows, t_rows = _gather(student_logits, teacher, student_positions, teacher_positions, mask)
    n = s_rows.shape[0]
    loss = s_rows.new_zeros((), dtype=torch.promote_types(s_rows.dtype, torch.float32))
    if vocab.size and w_m > 0:
        identity = vocab.is_identity
        s_m = s_rows if identity else s_rows.index_select(1, vocab.student_ids.to(s_rows.device))
        t_m = t_rows if identity else t_rows.index_select(1, vocab.teacher_ids.to(t_rows.device))
        # a teacher row with no mass on M (a top-k teacher, -inf logits) has no p_M: its
        # matched term is 0; the mean stays over all n compared groups
        support = (t_m > -math.inf).any(dim=-1)  # (n,)
        count = int(support.sum())
        matched = token_divergence(
            s_m,
            t_m,
            kind,
            beta=beta,
            skew_alpha=skew_alpha,
            temperature=temperature,
            mask=None if count == n else support,
            chunk_size=chunk_size,
        )
        if count != n:
            matched = matched * (count / max(n, 1))
        loss = w_m * matched if w_m != 1.0 else matched
    u_s, u_t = vocab.unmatched("student"), vocab.unmatched("teacher")
    if (u_s.numel() or u_t.numel()) and w_u > 0:
        unmatched = _uld_sum(
            s_rows,
            t_rows,
            u_s.to(s_rows.device),
            u_t.to(t_rows.device),
            float(temperature),
            chunk_size,
        )
        loss = loss + w_u * unmatched / max(n, 1)
    return loss * n if reduction == "sum" else loss


class _AlignedLoss(nn.Module):
    """Shared ``forward(student_logits, teacher, alignment)`` of the cross-tokenizer losses;
    ``alignment`` is the collator's ``{"student_positions", "teacher_positions", "mask"}``
    (a :class:`~kdistill.distiller.LossTerm` hands the batch's ``alignment`` entry over)."""

    batch_keys = ("alignment",)

    def __init__(self, temperature: float = 1.0, chunk_size: int | None = None) -> None:
        super().__init__()
        _check(temperature, "mean")
        self.temperature = float(temperature)
        self.chunk_size = chunk_size

    @staticmethod
    def _unpack(alignment: Mapping[str, Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        try:
            return (
                alignment["student_positions"],
                alignment["teacher_positions"],
                alignment.get("mask"),
            )
        except KeyError as err:
            raise ValueError(
                f"alignment needs 'student_positions' and 'teacher_positions' (and 'mask'), "
                f"got keys {sorted(alignment)}; see CrossTokenizerCollator"
            ) from err


class ULDLoss(_AlignedLoss):
    """Module form of :func:`uld_divergence`."""

    def forward(
        self, student_logits: Tensor, teacher: Teacher, alignment: Mapping[str, Tensor]
    ) -> Tensor:
        s_pos, t_pos, mask = self._unpack(alignment)
        return uld_divergence(
            student_logits,
            teacher,
            s_pos,
            t_pos,
            mask,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class HybridULDLoss(_AlignedLoss):
    """Module form of :func:`hybrid_divergence`; ``vocab=None`` takes the teacher's first
        ``V_s`` ids as the student's (a served teacher mapped by
    :func:`~kdistill.lm.cross_tokenizer.served_teacher_topk`)."""

    def __init__(
        self,
        vocab: VocabMap | None,
        kind: str = "forward_kl",
        *,
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        temperature: float = 1.0,
        matched_weight: float | None = None,
        unmatched_weight: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(temperature, chunk_size)
        self.vocab = vocab
        self.kind, self.beta, self.skew_alpha = kind, beta, skew_alpha
        self.matched_weight, self.unmatched_weight = matched_weight, unmatched_weight

    def forward(
        self, student_logits: Tensor, teacher: Teacher, alignment: Mapping[str, Tensor]
    ) -> Tensor:
        s_pos, t_pos, mask = self._unpack(alignment)
        vocab = self.vocab or VocabMap.shared_prefix(student_logits.shape[-1], teacher.shape[-1])
        return hybrid_divergence(
            student_logits,
            teacher,
            s_pos,
            t_pos,
            vocab,
            mask,
            kind=self.kind,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            temperature=self.temperature,
            matched_weight=self.matched_weight,
            unmatched_weight=self.unmatched_weight,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        matched = "n/a" if self.vocab is None else self.vocab.size
        return f"kind={self.kind!r}, temperature={self.temperature}, matched={matched}"
