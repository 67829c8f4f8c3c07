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
  :func:`vocab_map`) form the matched set ``M``; the rest, ``U_s`` and ``U_t``, do not. With
  ``p_M`` / ``q_M`` the two distributions restricted to ``M`` and renormalised over it
  (GOLD compares the unnormalised restrictions; renormalising keeps each ``kind`` a true
  divergence and lets :func:`~kdistill.lm.divergences.token_divergence` do the work)::

      hybrid = w_M · D_kind(p_M ‖ q_M) + w_U · Σ_k | q_U,(k) − p_U,(k) |

  where the second term is ULD over the unmatched probabilities (not renormalised) and
  ``D_kind`` any divergence ``kind`` of :data:`~kdistill.lm.divergences.KINDS`. The default
  weights are GOLD's adaptive ones, ``w_M = |M| / V_t`` and ``w_U = 1 − w_M``. With one
  tokenizer on both sides ``M`` is the whole vocabulary, ``w_M = 1``, ``U = ∅``, and the
  hybrid *is* ``token_divergence(kind)`` over the compared tokens, bit for bit.

Reduction: the mean over compared groups (``mask``; ``reduction="mean"``) or their sum. No
compared group gives exactly 0 with zero gradients. Temperature as in
:mod:`kdistill.lm.divergences`: both softened by ``T``, no ``T²``.

Memory: the compared rows are gathered once (``(N, V)`` copies in the logits' dtype, ``N``
= compared groups). The ULD term is then computed in chunks of rows whose float32 working
set (softmax, sort values and indices of both sides) is bounded by ``chunk_size`` rows,
with its gradient taken in closed form in the forward pass — ``∂ULD/∂q_v = sign(q_(r) −
p_(r))`` at ``v``'s rank ``r``, then the softmax Jacobian — as ``token_divergence`` does;
the matched term is ``token_divergence`` itself.

Teachers: dense logits ``(B, T_t, V_t)`` from a live teacher, or :class:`TopKTeacher` — ids
and log-probabilities of ``k`` tokens per position (an on-disk top-k cache in the teacher's
vocabulary, or a served teacher's ``top_logprobs`` mapped by :func:`served_teacher_topk`).
A top-k teacher is the top-k distribution renormalised (exact when ``k = V_t``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdistill.lm.alignment import (
    AlignmentError,
    SpanTokenizer,
    TokenSpans,
    align_spans,
    alignment_tensors,
    spans_from_pieces,
)
from kdistill.lm.divergences import token_divergence

__all__ = [
    "HybridULDLoss",
    "TopKTeacher",
    "ULDLoss",
    "VocabMap",
    "hybrid_divergence",
    "served_teacher_topk",
    "uld_divergence",
    "vocab_map",
    "vocab_map_from_keys",
]

_CHUNK_BYTES = 32 << 20
"""Float32 working memory of one ULD chunk: rows = budget // (16 · V · 4 bytes)."""


# --------------------------------------------------------------------------- teachers


@dataclass(frozen=True)
class TopKTeacher:
    """A teacher known on ``k`` tokens per position.

    ``log_probs`` ``(B, T_t, k)`` float (``-inf`` = no entry), ``ids`` ``(B, T_t, k)`` int
    (``-1`` = no entry) into a vocabulary of ``vocab_size`` ids. A position with no entry has
    no distribution and must not be compared.
    """

    log_probs: Tensor
    ids: Tensor
    vocab_size: int

    def __post_init__(self) -> None:
        if self.log_probs.shape != self.ids.shape or self.ids.dim() != 3:
            raise ValueError(
                f"TopKTeacher needs log_probs and ids of one shape (B, T, k); got "
                f"{tuple(self.log_probs.shape)} and {tuple(self.ids.shape)}"
            )

    @property
    def shape(self) -> torch.Size:
        return torch.Size((*self.ids.shape[:2], self.vocab_size))

    def rows(self, flat_rows: Tensor) -> Tensor:
        """Dense logits ``(n, vocab_size)`` (``-inf`` off the top-k) of flat positions."""
        k = self.ids.shape[-1]
        ids = self.ids.reshape(-1, k).index_select(0, flat_rows)  # (n, k)
        values = self.log_probs.reshape(-1, k).index_select(0, flat_rows)
        present = ids >= 0
        if not bool(present.any(dim=-1).all()):
            raise ValueError(
                "a compared teacher position has no top-k entry (no distribution there); mask "
                "it out of the alignment"
            )
        dense = values.new_full((ids.shape[0], self.vocab_size + 1), -math.inf)
        slot = torch.where(present, ids.long(), self.vocab_size)  # absent entries → a spare column
        dense.scatter_(1, slot, torch.where(present, values, -math.inf))
        return dense[:, : self.vocab_size]


Teacher = Tensor | TopKTeacher


# --------------------------------------------------------------------------- vocabularies


@dataclass(frozen=True)
class VocabMap:
    """Matched tokens: ``student_ids[i]`` and ``teacher_ids[i]`` mean the same text."""

    student_ids: Tensor  # (M,) int64
    teacher_ids: Tensor  # (M,) int64
    student_vocab: int
    teacher_vocab: int

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    @property
    def is_identity(self) -> bool:
        n = self.student_vocab
        return (
            self.teacher_vocab == n
            and self.size == n
            and bool((self.student_ids == torch.arange(n)).all())
            and bool((self.teacher_ids == torch.arange(n)).all())
        )

    def unmatched(self, side: str) -> Tensor:
        vocab, ids = (
            (self.student_vocab, self.student_ids)
            if side == "student"
            else (self.teacher_vocab, self.teacher_ids)
        )
        keep = torch.ones(vocab, dtype=torch.bool)
        keep[ids] = False
        return keep.nonzero().squeeze(1)

    @classmethod
    def shared_prefix(cls, student_vocab: int, teacher_vocab: int) -> VocabMap:
        """The teacher's first ``student_vocab`` ids are the student's (served teachers)."""
        ids = torch.arange(student_vocab)
        return cls(ids, ids.clone(), student_vocab, teacher_vocab)


def vocab_map_from_keys(
    student_keys: Sequence[bytes | str], teacher_keys: Sequence[bytes | str]
) -> VocabMap:
    """Match ids whose keys are equal; the ``i``-th student id of a key with its ``i``-th
    teacher id (so two identical vocabularies map id ``v`` to id ``v``)."""
    pending: dict[bytes | str, list[int]] = {}
    for i, key in enumerate(student_keys):
        pending.setdefault(key, []).append(i)
    for ids in pending.values():
        ids.reverse()  # pop() takes the lowest id first
    pairs = []
    for j, key in enumerate(teacher_keys):
        waiting = pending.get(key)
        if waiting:
            pairs.append((waiting.pop(), j))
    s = torch.tensor([a for a, _ in pairs], dtype=torch.long)
    t = torch.tensor([b for _, b in pairs], dtype=torch.long)
    return VocabMap(s, t, len(student_keys), len(teacher_keys))


def vocab_map(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabMap:
    """Tokens of the two tokenizers that stand for the same bytes.

    Byte-level ``Ġthe``, SentencePiece ``▁the`` and ByteTokenizer-style tokens are compared
    by their bytes (so a Llama-3 and a Llama-2 token for ``" the"`` match, which GOLD's
    string comparison misses); special tokens and WordPiece tokens by their strings.
    """
    s = SpanTokenizer(student_tokenizer, "student tokenizer")
    t = SpanTokenizer(teacher_tokenizer, "teacher tokenizer")
    return vocab_map_from_keys(s.vocab_keys(), t.vocab_keys())


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
        vocab: the matched tokens (:func:`vocab_map`); its sizes must be the logits'.
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
        matched = token_divergence(
            s_m,
            t_m,
            kind,
            beta=beta,
            skew_alpha=skew_alpha,
            temperature=temperature,
            chunk_size=chunk_size,
        )
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
    ``alignment`` is the collator's ``{"student_positions", "teacher_positions", "mask"}``."""

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
    ``V_s`` ids as the student's (a served teacher mapped by :func:`served_teacher_topk`)."""

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


# --------------------------------------------------------------------------- served teachers


def _field(record: Any, name: str) -> Any:
    if isinstance(record, Mapping):
        return record.get(name)
    return getattr(record, name, None)


def _record_bytes(record: Any) -> bytes:
    raw = _field(record, "bytes")
    if raw is not None:
        return bytes(raw)
    token = _field(record, "token")
    if not isinstance(token, str):
        raise AlignmentError(f"a logprobs record has no 'token' string: {record!r}")
    return token.encode("utf-8")


def _logaddexp(a: float, b: float) -> float:
    high, low = max(a, b), min(a, b)
    return high if low == -math.inf else high + math.log1p(math.exp(low - high))


def _top_of(record: Any) -> Sequence[Any]:
    top = _field(record, "top_logprobs")
    if top is None:
        top = _field(record, "top")
    return top or ()


def served_teacher_topk(
    student: Sequence[TokenSpans],
    records: Sequence[Sequence[Any]],
    student_tokenizer: Any,
    texts: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Map a served teacher's ``top_logprobs`` onto the student's side of the alignment.

    ``records[b]`` is the per-token log-probability list the OpenAI-compatible server gave
    for text ``b`` scored as a whole (``logprobs.content`` of a chat response, or
    :class:`kdistill.serve.client.TokenLogprob` objects): token ``i`` with its ``token``
    string, optional ``bytes`` and ``top_logprobs`` ``[{"token", "logprob", "bytes"}]``,
    the teacher's distribution of token ``i`` given tokens ``< i``. So teacher *position*
    ``j`` is "after ``j`` tokens": position 0 (zero-width, before the first token) holds
    token 0's alternatives, position ``j`` token ``j``'s, the last position none (masked).

    Alternatives are mapped by their bytes onto student ids (alternatives with the same bytes
    are one text, their probabilities added); those no student token spells get ids
    ``V_s, V_s + 1, …`` (shared by the batch). The result feeds
    :func:`uld_divergence` (which needs only the sorted probabilities) and
    :func:`hybrid_divergence` with ``VocabMap.shared_prefix(V_s, vocab_size)``.

    Args:
        student: the student's :class:`~kdistill.lm.alignment.TokenSpans` of each text.
        records: per text, the teacher's token records.
        student_tokenizer: gives the student's token bytes (vocab keys).
        texts: when given, the teacher's tokens must spell each text byte for byte.

    Returns:
        ``{"teacher": TopKTeacher (B, n + 1, k), "alignment": {...}, "vocab": VocabMap}``.

    Raises:
        AlignmentError: the records do not spell the text.
    """
    if len(student) != len(records):
        raise ValueError(f"{len(student)} student texts but {len(records)} teacher record lists")
    wrapped = SpanTokenizer(student_tokenizer, "student tokenizer")
    key_to_id: dict[bytes | str, int] = {}
    for i, key in enumerate(wrapped.vocab_keys()):
        key_to_id.setdefault(key, i)
    v_s = wrapped.vocab_size
    extra: dict[bytes, int] = {}
    groups, rows = [], []
    for b, (spans, recs) in enumerate(zip(student, records, strict=True)):
        pieces = [_record_bytes(r) for r in recs]
        data = b"".join(pieces)
        text = None if texts is None else texts[b].encode("utf-8")
        if text is not None and data == b" " + text and pieces[0].startswith(b" "):
            pieces[0] = pieces[0][1:]  # SentencePiece's dummy-prefix "▁" is not text
            data = text
        if text is not None and data != text:
            raise AlignmentError(
                f"text {b}: the served teacher's tokens spell {data[:60]!r}… but the text is "
                f"{texts[b][:60]!r}…; score the text itself (echo / prompt_logprobs)"
            )
        teacher_spans = [(0, 0), *spans_from_pieces(pieces)]  # position j = after j tokens
        groups.append(align_spans(spans.spans, teacher_spans))
        row = []
        for j in range(len(teacher_spans)):
            alternatives: dict[int, float] = {}  # alternatives with the same bytes add up
            for alt in _top_of(recs[j]) if j < len(recs) else ():
                key = _record_bytes(alt)
                token_id = key_to_id.get(key)
                if token_id is None:
                    token_id = extra.setdefault(key, v_s + len(extra))
                lp = float(_field(alt, "logprob"))
                old = alternatives.get(token_id)
                alternatives[token_id] = lp if old is None else float(_logaddexp(old, lp))
            row.append(list(alternatives.items()))
        rows.append(row)
    width = max(len(r) for r in rows)
    k = max((len(a) for r in rows for a in r), default=1) or 1
    ids = torch.full((len(rows), width, k), -1, dtype=torch.long)
    log_probs = torch.full((len(rows), width, k), -math.inf)
    for b, row in enumerate(rows):
        for j, alternatives in enumerate(row):
            for slot, (token_id, lp) in enumerate(alternatives):
                ids[b, j, slot], log_probs[b, j, slot] = token_id, lp
    alignment = alignment_tensors(groups)
    has_entry = (ids >= 0).any(dim=-1)  # (B, width)
    alignment["mask"] &= has_entry.gather(1, alignment["teacher_positions"])
    teacher = TopKTeacher(log_probs, ids, v_s + len(extra))
    return {
        "teacher": teacher,
        "alignment": alignment,
        "vocab": VocabMap.shared_prefix(v_s, teacher.vocab_size),
    }
