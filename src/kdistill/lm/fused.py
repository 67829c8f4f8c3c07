"""Fused ``lm_head`` + token divergence: the student's full logits are never materialised.

For a language model the ``(tokens × vocab)`` logits are usually the largest activation
in the whole step (4,096 tokens × 151,936 ids is 2.5 GB in float32), and a distillation
loss needs them for *both* models. Following Liger-Kernel's fused linear JSD
(``LigerFusedLinearJSD``; Hsu et al. 2024, "Liger Kernel: Efficient Triton Kernels for
LLM Training"), :func:`fused_linear_divergence` takes the student's last hidden states
``h`` ``(N, H)`` and its ``lm_head`` weight ``W`` ``(V, H)`` (and bias) instead of its
logits and, chunk by chunk of tokens::

    z_c   = h_c Wᵀ (+ b)                       (chunk, V)   student logits of the chunk
    ℓ_c   = Σ_i D(p_i ‖ q_i)                   any kind of kdistill.lm.divergences
    g_c   = ∂ℓ_c / ∂z_c                        (chunk, V)
    ∂h_c  = g_c W,   ∂W += g_cᵀ h_c,   ∂b += Σ_i g_c,i

all inside the forward pass of one ``torch.autograd.Function``; backward only scales the
stored ``∂h`` ``(N, H)``, ``∂W`` ``(V, H)`` and ``∂b`` by the incoming gradient. Live
memory beyond inputs and those gradients is ``O(chunk × V)``. ``∂W`` is accumulated in
float32 (the per-chunk matmuls run in the weight's dtype) and stored in the weight's dtype.

The teacher is given either as logits ``(N, V)`` (e.g. precomputed or cached) or, to
avoid its logits too, as hidden states ``(N, H_t)`` and its own ``lm_head`` weight
``(V, H_t)`` (and bias), projected chunk by chunk. **The teacher gets no gradient** on
this path — its tensors are treated as constants.

A cached top-k teacher (:mod:`kdistill.cache`, top-k layout) is taken by
:func:`fused_topk_divergence`: per chunk the student's ``k + 1`` buckets (the teacher's top-k
ids and one ``logsumexp`` over the other ids), the divergence over ``k + 1`` entries, and the
gradient chained back through the bucketing, so the cached step never builds ``(N, V)``
logits either. Both functions can add the hard-label cross-entropy of the same chunk of
student logits (``kd_weight · D + ce_weight · CE``, :data:`TERMS_DOC`), the whole
``alpha · D + (1 − alpha) · CE`` objective in one pass. :func:`causal_lm_head_inputs` gets a
Hugging Face causal LM's final hidden states and ``lm_head`` parameter for them.

All conventions (kinds, ``beta`` / ``skew_alpha``, temperature without ``T²``,
``labels`` / ``ignore_index`` / ``mask``, mean over counted tokens, ``-inf`` handling,
vocabulary-size rule) are those of :func:`kdistill.lm.divergences.token_divergence`, and
the result equals ``token_divergence(F.linear(h, W, b), teacher_logits, ...)``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdistill.lm.divergences import (
    _WORKING_SET,
    IGNORE_INDEX,
    DivergenceSettings,
    _check_chunking,
    _check_reduction,
    _chunk_rows,
    _counted,
    _log_probs,
    _resolve,
    _rows,
    _scale_grad,
    _scratch,
    _Spec,
    _take_rows,
    _value_and_grads,
    _working_set,
)
from kdistill.lm.topk import teacher_buckets
from kdistill.lm.vocab import shared_vocab_size
from kdistill.losses._reduce import _compute_dtype

__all__ = [
    "FusedLinearDivergenceLoss",
    "FusedTopKDivergenceLoss",
    "causal_lm_head_inputs",
    "fused_linear_divergence",
    "fused_topk_divergence",
]

_TOPK_WORKING_SET = 2
"""``(rows, V)`` compute-dtype tensors alive at once on the top-k path besides the bucket
divergence's own ``(rows, k + 1)`` ones: the chunk's student logits, overwritten in place into
their gradient, and a half-precision copy of them for a half weight (checked by the tests)."""


def _linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x Wᵀ + b`` ``(n, V)``, into a pooled chunk buffer unless autocast picks the dtype."""
    if x.dtype != weight.dtype:
        x = x.to(weight.dtype)
    if torch.is_autocast_enabled(x.device.type):
        return F.linear(x, weight, bias)  # autocast's dtype, as the unfused lm_head would
    out = _scratch(x.shape[0], weight.shape[0], weight.dtype, x.device)
    if bias is None:
        return torch.mm(x, weight.T, out=out)
    return torch.addmm(bias, x, weight.T, out=out)


def _teacher_chunk(
    logits: Tensor | None,  # (N, V)
    hidden: Tensor | None,  # (N, Ht)
    weight: Tensor | None,  # (V, Ht)
    bias: Tensor | None,  # (V,)
    start: int,
    stop: int,
    idx: Tensor | None,
) -> Tensor:
    """The teacher's logits ``(n, V)`` of one chunk: sliced, or projected from its head."""
    if logits is not None:
        return _take_rows(logits, start, stop, idx)
    assert hidden is not None and weight is not None
    h_c = hidden[start:stop] if idx is None else hidden.index_select(0, idx)
    return _linear(h_c, weight, bias)


def _head_grads(
    g: Tensor,  # (n, V) ∂ℓ/∂z of the chunk, compute dtype
    h_c: Tensor,  # (n, H)
    weight: Tensor,  # (V, H)
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],  # ∂h (N, H), ∂W, ∂b (f32)
    start: int,
    stop: int,
    idx: Tensor | None,
) -> None:
    """Chain ``g`` through ``z = h Wᵀ + b``: ``∂h_c = g W``, ``∂W += gᵀ h_c``, ``∂b += Σ g``.

    ``∂W`` accumulates in the compute dtype with ``addmm_`` (no ``(V, H)`` temporary) when
    the weight has that dtype, or on a CPU; a half weight on an accelerator multiplies in its
    own dtype (tensor cores) and adds the ``(V, H)`` product.
    """
    grad_h, grad_w, grad_b = grads
    g_mm = g if g.dtype == weight.dtype else g.to(weight.dtype)  # (n, V)
    if grad_h is not None:
        part = g_mm @ weight  # (n, H)
        if idx is None:
            grad_h[start:stop] = part
        else:
            grad_h.index_copy_(0, idx, part.to(grad_h.dtype))
    if grad_w is not None:
        if grad_w.dtype == weight.dtype or weight.device.type == "cpu":
            grad_w.addmm_(g.T.to(grad_w.dtype), h_c.to(grad_w.dtype))  # (V, H) in place
        else:
            grad_w += g_mm.T @ h_c.to(weight.dtype)
    if grad_b is not None:
        grad_b += g.sum(dim=0)


def _grad_buffers(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    rows: Tensor | None,
    dtype: torch.dtype,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    grad_h = grad_w = grad_b = None
    if need_h:
        grad_h = torch.zeros_like(hidden) if rows is not None else torch.empty_like(hidden)
    if need_w:
        grad_w = torch.zeros(weight.shape, dtype=dtype, device=weight.device)
    if need_b and bias is not None:
        grad_b = torch.zeros(bias.shape, dtype=dtype, device=bias.device)
    return grad_h, grad_w, grad_b


def _finish_grads(
    grads: tuple[Tensor | None, Tensor | None, Tensor | None], weight: Tensor, bias: Tensor | None
) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    grad_h, grad_w, grad_b = grads
    if grad_w is not None:
        grad_w = grad_w.to(weight.dtype)
    if grad_b is not None and bias is not None:
        grad_b = grad_b.to(bias.dtype)
    return grad_h, grad_w, grad_b


@dataclass(frozen=True)
class _Terms:
    """The weights of the two terms a fused loss sums: ``kd · D + ce · CE``.

    ``targets`` ``(N,)`` int64 are the next-token ids (only counted rows are read), given when
    ``ce > 0``; the cross-entropy ``−log softmax(z)[y]`` is on the raw logits (``T = 1``).
    """

    kd: float = 1.0
    ce: float = 0.0
    targets: Tensor | None = None


def _ce_chunk(
    z: Tensor, y: Tensor, need_grad: bool, factor: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Summed cross-entropy of one chunk ``(n, V)`` vs ids ``y`` ``(n,)``, and ``factor ·``
    its gradient ``softmax(z) − onehot(y)`` (a pooled ``(n, V)`` buffer)."""
    log_q = _log_probs(z, dtype, 1.0, owned=False)  # (n, V), z itself is left intact
    value = -log_q.gather(1, y[:, None]).sum()
    if not need_grad:
        return value, None
    g = log_q.exp_()
    g.scatter_add_(1, y[:, None], torch.full((y.numel(), 1), -1.0, dtype=g.dtype, device=g.device))
    return value, g.mul_(factor)


def _student_chunk(
    h_c: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    terms: _Terms,
    start: int,
    stop: int,
    idx: Tensor | None,
    need_grad: bool,
    scale: float,
    dtype: torch.dtype,
) -> tuple[list[Tensor], Tensor | None, Tensor | None]:
    """The chunk's student logits (in a one-item list, for the caller to hand over) and, when
    ``terms.ce > 0``, the chunk's summed cross-entropy and its scaled gradient."""
    z = _linear(h_c, weight, bias)  # (n, V): the student logits of this chunk only
    if terms.targets is None or terms.ce == 0.0:
        return [z], None, None
    y = terms.targets[start:stop] if idx is None else terms.targets.index_select(0, idx)
    value, g = _ce_chunk(z, y, need_grad, terms.ce * scale, dtype)
    return [z], value, g


def _fused(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    teacher_logits: Tensor | None,  # (N, V)
    teacher_hidden: Tensor | None,  # (N, Ht)
    teacher_weight: Tensor | None,  # (V, Ht)
    teacher_bias: Tensor | None,  # (V,)
    rows: Tensor | None,
    count: int,
    spec: _Spec,
    chunk: int,
    normaliser: float,
    terms: _Terms,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss, its two parts (D, CE) and the gradients wrt ``hidden`` / ``weight`` / ``bias``."""
    teacher_ref = teacher_logits if teacher_logits is not None else teacher_weight
    assert teacher_ref is not None
    dtype = _compute_dtype(hidden, weight, teacher_ref)
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    total_ce = torch.zeros((), dtype=dtype, device=hidden.device)
    grads = _grad_buffers(hidden, weight, bias, rows, dtype, need_h, need_w, need_b)
    need_logits = any(x is not None for x in grads)
    scale = 1.0 / normaliser
    teacher_fresh = teacher_logits is None or rows is not None

    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        idx = None if rows is None else rows[start:stop]
        h_c = hidden[start:stop] if idx is None else hidden.index_select(0, idx)
        box, ce_value, g_ce = _student_chunk(
            h_c, weight, bias, terms, start, stop, idx, need_logits, scale, dtype
        )
        value, g, _ = _value_and_grads(  # logits handed over: freed inside once used
            box.pop(),
            _teacher_chunk(
                teacher_logits, teacher_hidden, teacher_weight, teacher_bias, start, stop, idx
            ),
            spec,
            need_logits,
            False,
            terms.kd * scale,
            owned_student=True,
            owned_teacher=teacher_fresh,
        )
        total += value
        if ce_value is not None:
            total_ce += ce_value
        if g is not None:
            if g_ce is not None:
                g = g.add_(g_ce)
            _head_grads(g, h_c, weight, grads, start, stop, idx)
        del g, g_ce, h_c
    return _results(total, total_ce, normaliser, terms, grads, weight, bias)


TERMS_DOC = """Two terms in one pass: ``kd_weight · D + ce_weight · CE``.

``D`` is the divergence (mean over counted tokens, or sum), ``CE = −log softmax(z)[y]`` the
cross-entropy of the student's raw logits (``T = 1``) against ``labels`` on the same counted
tokens and with the same reduction, the hard-label term of an LM objective
(``alpha · D + (1 − alpha) · CE``: ``kd_weight=alpha, ce_weight=1 - alpha``). Computed from
the same chunk of logits, so the student's logits are never materialised for the CE either
(one more ``(rows, V)`` buffer in the chunk's working set). ``return_parts=True`` returns
``(loss, D, CE)``, the parts detached for logging.
"""


def _terms(
    kd_weight: float, ce_weight: float, labels: Tensor | None, keep: Tensor | None, vocab: int
) -> _Terms:
    for name, value in (("kd_weight", kd_weight), ("ce_weight", ce_weight)):
        if isinstance(value, bool) or not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not ce_weight:
        return _Terms(float(kd_weight))
    if labels is None:
        raise ValueError(
            "ce_weight > 0 adds the cross-entropy on the next-token ids: pass labels (aligned "
            "with the hidden states, ignore_index where no token counts)"
        )
    targets = labels.reshape(-1).long()
    counted = targets if keep is None else targets[keep.to(targets.device)]
    if counted.numel() and (int(counted.min()) < 0 or int(counted.max()) >= vocab):
        raise ValueError(
            f"labels of counted tokens span [{int(counted.min())}, {int(counted.max())}], "
            f"outside the student's vocabulary [0, {vocab}); mark tokens that do not count "
            "with ignore_index"
        )
    return _Terms(float(kd_weight), float(ce_weight), targets)


def _results(
    total: Tensor,
    total_ce: Tensor,
    normaliser: float,
    terms: _Terms,
    grads: tuple[Tensor | None, Tensor | None, Tensor | None],
    weight: Tensor,
    bias: Tensor | None,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    kd, ce = total / normaliser, total_ce / normaliser
    loss = terms.kd * kd + terms.ce * ce if terms.ce else terms.kd * kd
    return (loss, kd, ce, *_finish_grads(grads, weight, bias))


class _FusedLinearDivergence(torch.autograd.Function):
    """:func:`_fused` with its gradients computed in forward and scaled in backward.

    Outputs the loss and, not differentiable, its two parts (for logging)."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        flags = tuple(ctx.needs_input_grad[:3])  # hidden, weight, bias
        loss, kd, ce, grad_h, grad_w, grad_b = _fused(*(*args, *flags))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_output: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (
            _scale_grad(grad_h, grad_output),
            _scale_grad(grad_w, grad_output),
            _scale_grad(grad_b, grad_output),
        ) + (None,) * (ctx.n_args - 3)


def _check_head(hidden: Tensor, weight: Tensor, bias: Tensor | None, who: str) -> None:
    if weight.dim() != 2:
        raise ValueError(
            f"{who}_weight must be the lm_head weight of shape (V, H), got {tuple(weight.shape)}"
        )
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"{who}_hidden has shape {tuple(hidden.shape)} but {who}_weight has shape "
            f"{tuple(weight.shape)}; the hidden size (last dim) must equal the weight's "
            "second dim — pass the last hidden states and lm_head.weight of the same model"
        )
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(
            f"{who}_bias has shape {tuple(bias.shape)} but {who}_weight has "
            f"{weight.shape[0]} rows; the bias must be (V,) = ({weight.shape[0]},)"
        )
    if not (hidden.dtype.is_floating_point and weight.dtype.is_floating_point):
        raise TypeError(
            f"{who}_hidden and {who}_weight must be floating point, got {hidden.dtype} and "
            f"{weight.dtype}"
        )


def fused_linear_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_logits: Tensor | None = None,
    kind: str = "forward_kl",
    *,
    teacher_hidden: Tensor | None = None,
    teacher_weight: Tensor | None = None,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    mask: Tensor | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    allow_padded: bool | None = None,
    chunk_bytes: int | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    return_parts: bool = False,
) -> Any:
    """Token divergence of ``student_hidden @ student_weight.T`` vs the teacher, fused.

    Equals :func:`~kdistill.lm.divergences.token_divergence` on the student's logits
    ``F.linear(student_hidden, student_weight, student_bias)`` without ever holding them
    whole; see the module docstring.

    Args:
        student_hidden: ``(B, T, H)`` or ``(N, H)``: the student's last hidden states
            (for a causal LM the positions that predict, e.g. ``hidden[:, :-1]``).
        student_weight: ``(V, H)``, the student's ``lm_head.weight``.
        teacher_logits: ``(B, T, V_t)`` / ``(N, V_t)`` teacher logits; or leave ``None``
            and give ``teacher_hidden`` and ``teacher_weight``.
        kind: one of :data:`~kdistill.lm.divergences.KINDS`.
        teacher_hidden: ``(B, T, H_t)`` / ``(N, H_t)`` teacher hidden states.
        teacher_weight: ``(V_t, H_t)`` teacher ``lm_head.weight``.
        student_bias: optional ``(V,)`` ``lm_head`` bias of the student (gets a gradient).
        teacher_bias: optional ``(V_t,)`` bias of the teacher's head.
        beta, skew_alpha, temperature, labels, ignore_index, mask, reduction, chunk_size,
        allow_padded, chunk_bytes: as in :func:`~kdistill.lm.divergences.token_divergence`
            (the chunk's student and teacher logits are part of the same working set, so
            ``chunk_bytes`` bounds everything ``(rows, V)``-sized). ``V ≠ V_t`` slices the
            larger head / logits to the shared ids under the vocabulary rule.
        kd_weight, ce_weight, return_parts: see :data:`TERMS_DOC`.

    Returns:
        0-dim loss ``kd_weight · D + ce_weight · CE`` in the compute dtype (at least
        float32), or ``(loss, D, CE)`` with ``return_parts`` (the parts detached, for
        logging). Gradients flow to ``student_hidden``, ``student_weight`` and
        ``student_bias`` only.

    Raises:
        ValueError: both or neither teacher form given, mismatched shapes, or the errors
            of :func:`~kdistill.lm.divergences.token_divergence`.
    """
    spec = _resolve(kind, beta, skew_alpha, temperature)
    _check_reduction(reduction)
    _check_chunking(chunk_size, chunk_bytes)
    _check_head(student_hidden, student_weight, student_bias, "student")
    leading = student_hidden.shape[:-1]
    has_logits = teacher_logits is not None
    has_head = teacher_hidden is not None or teacher_weight is not None
    if has_logits == has_head:
        raise ValueError(
            "give the teacher either as teacher_logits (N, V) or as teacher_hidden (N, H_t) "
            "plus teacher_weight (V, H_t) — exactly one of the two"
        )
    vocab_s = student_weight.shape[0]
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_hidden/teacher_weight, not logits")
        if teacher_logits.dim() < 1 or teacher_logits.shape[:-1] != leading:
            raise ValueError(
                f"teacher_logits has shape {tuple(teacher_logits.shape)} but student_hidden "
                f"{tuple(student_hidden.shape)}; the leading (token) shapes must be equal"
            )
        if not teacher_logits.dtype.is_floating_point:
            raise TypeError(f"teacher_logits must be floating point, got {teacher_logits.dtype}")
        vocab_t = teacher_logits.shape[-1]
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError(
                "teacher_hidden and teacher_weight go together: pass both (the teacher's "
                "last hidden states and its lm_head.weight)"
            )
        _check_head(teacher_hidden, teacher_weight, teacher_bias, "teacher")
        if teacher_hidden.shape[:-1] != leading:
            raise ValueError(
                f"teacher_hidden has shape {tuple(teacher_hidden.shape)} but student_hidden "
                f"{tuple(student_hidden.shape)}; the leading (token) shapes must be equal"
            )
        vocab_t = teacher_weight.shape[0]

    vocab = shared_vocab_size(vocab_s, vocab_t, allow_padded=allow_padded)
    if vocab != vocab_s:
        student_weight = student_weight[:vocab]
        student_bias = None if student_bias is None else student_bias[:vocab]
    if teacher_logits is not None:
        teacher_logits = teacher_logits.detach()[..., :vocab].reshape(-1, vocab)
    else:
        assert teacher_hidden is not None and teacher_weight is not None
        teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()[:vocab]
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()[:vocab]

    keep = _counted(leading, labels, ignore_index, mask, student_hidden.device)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows, count = _rows(keep, hidden.shape[0])
    teacher_ref = teacher_logits if teacher_logits is not None else teacher_weight
    assert teacher_ref is not None
    dtype = _compute_dtype(hidden, student_weight, teacher_ref)
    low = min((student_weight.dtype, teacher_ref.dtype), key=lambda d: d.itemsize)
    if torch.is_autocast_enabled(hidden.device.type):  # the heads project in half precision
        low = torch.get_autocast_dtype(hidden.device.type)
    chunk = _chunk_rows(
        chunk_size,
        vocab,
        chunk_bytes=chunk_bytes,
        working_set=_working_set(spec.kind, low, dtype) + (1.0 if ce_weight else 0.0),
        itemsize=dtype.itemsize,
    )
    normaliser = float(max(count, 1)) if reduction == "mean" else 1.0
    args = (
        hidden,
        student_weight,
        student_bias,
        teacher_logits,
        teacher_hidden,
        teacher_weight,
        teacher_bias,
        rows,
        count,
        spec,
        chunk,
        normaliser,
        _terms(kd_weight, ce_weight, labels, keep, vocab),
    )
    if torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, student_weight, student_bias)
    ):
        loss, kd, ce = _FusedLinearDivergence.apply(*args)
    else:
        loss, kd, ce, _, _, _ = _fused(*args, False, False, False)
    return (loss, kd.detach(), ce.detach()) if return_parts else loss


class FusedLinearDivergenceLoss(DivergenceSettings):
    """Module form of :func:`fused_linear_divergence`; holds only the hyper-parameters.

    ``forward(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
    teacher_weight=None, student_bias=None, teacher_bias=None, labels=None, mask=None)``.
    """

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        teacher_logits: Tensor | None = None,
        *,
        teacher_hidden: Tensor | None = None,
        teacher_weight: Tensor | None = None,
        student_bias: Tensor | None = None,
        teacher_bias: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return fused_linear_divergence(
            student_hidden,
            student_weight,
            teacher_logits,
            self.kind,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            student_bias=student_bias,
            teacher_bias=teacher_bias,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            temperature=self.temperature,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            allow_padded=self.allow_padded,
            chunk_bytes=self.chunk_bytes,
        )


# --------------------------------------------------------------------------- cached top-k teacher


def _topk_chunk(
    z: Tensor,  # (n, V) fresh student logits of the chunk, overwritten
    idx: Tensor,  # (n, k) int64 teacher top-k ids
    teacher: Tensor,  # (n, k + 1) or (n, k) teacher bucket logits
    spec: _Spec,  # the divergence at T = 1 (buckets are already tempered)
    temperature: float,
    need_grad: bool,
    scale: float,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor | None]:
    """Summed bucket divergence of one chunk and ``scale ·`` its gradient wrt ``z`` ``(n, V)``.

    With ``s = z / T``, the student's buckets are ``s`` at the top-k ids and
    ``s_rest = log Σ_{v ∉ top-k} exp(s_v)``; by the chain rule
    ``∂ℓ/∂s_v = g_j`` at the ``j``-th top-k id and ``g_rest · exp(s_v − s_rest)`` elsewhere,
    and ``∂ℓ/∂z = ∂ℓ/∂s / T``. ``s`` is turned into ``exp(s − max)`` and then into the
    gradient in place, so the chunk holds one ``(n, V)`` tensor.
    """
    s = z if z.dtype == dtype else z.to(dtype)  # (n, V)
    del z
    if temperature != 1.0:
        s.div_(temperature)
    k = idx.shape[-1]
    s_top = s.gather(-1, idx)  # (n, k)
    if k == s.shape[-1]:  # no rest bucket
        value, g_b, _ = _value_and_grads(
            s_top, teacher, spec, need_grad, False, scale, owned_student=True, owned_teacher=True
        )
        if g_b is None:
            return value, None
        return value, s.zero_().scatter_(-1, idx, g_b.div_(temperature))
    s.scatter_(-1, idx, -math.inf)
    peak = s.amax(dim=-1, keepdim=True)  # (n, 1)
    peak = peak.masked_fill(peak == -math.inf, 0.0)
    mass = s.sub_(peak).exp_()  # (n, V) exp(s_v − max), 0 on the top-k
    total = mass.sum(dim=-1, keepdim=True)  # (n, 1)
    value, g_b, _ = _value_and_grads(
        torch.cat([s_top, total.log() + peak], dim=-1),  # (n, k + 1) student buckets
        teacher,
        spec,
        need_grad,
        False,
        scale,
        owned_student=True,
        owned_teacher=True,
    )
    if g_b is None:
        return value, None
    g = mass.mul_(g_b[:, k:] / (total * temperature))  # rest: g_rest · exp(s_v − s_rest) / T
    return value, g.scatter_(-1, idx, g_b[:, :k].div_(temperature))


def _fused_topk(
    hidden: Tensor,  # (N, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    values: Tensor,  # (N, k)
    indices: Tensor,  # (N, k)
    rest: Tensor,  # (N,)
    rows: Tensor | None,
    count: int,
    spec: _Spec,
    temperature: float,
    chunk: int,
    normaliser: float,
    terms: _Terms,
    need_h: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Loss, its two parts (D, CE) and the gradients wrt ``hidden`` / ``weight`` / ``bias``."""
    dtype = _compute_dtype(hidden, weight)
    vocab = weight.shape[0]
    total = torch.zeros((), dtype=dtype, device=hidden.device)
    total_ce = torch.zeros((), dtype=dtype, device=hidden.device)
    grads = _grad_buffers(hidden, weight, bias, rows, dtype, need_h, need_w, need_b)
    need_logits = any(x is not None for x in grads)
    scale = 1.0 / normaliser

    def take(x: Tensor, start: int, stop: int, idx: Tensor | None) -> Tensor:
        return x[start:stop] if idx is None else x.index_select(0, idx)

    for start in range(0, count, chunk):
        stop = min(start + chunk, count)
        idx = None if rows is None else rows[start:stop]
        h_c = take(hidden, start, stop, idx)
        box, ce_value, g_ce = _student_chunk(
            h_c, weight, bias, terms, start, stop, idx, need_logits, scale, dtype
        )
        value, g = _topk_chunk(
            box.pop(),  # (n, V), handed over: overwritten and freed inside
            take(indices, start, stop, idx).long(),
            teacher_buckets(
                take(values, start, stop, idx),
                take(rest, start, stop, idx),
                vocab,
                temperature,
                dtype,
            ),
            spec,
            temperature,
            need_logits,
            terms.kd * scale,
            dtype,
        )
        total += value
        if ce_value is not None:
            total_ce += ce_value
        if g is not None:
            if g_ce is not None:
                g = g.add_(g_ce)
            _head_grads(g, h_c, weight, grads, start, stop, idx)
        del g, g_ce, h_c
    return _results(total, total_ce, normaliser, terms, grads, weight, bias)


class _FusedTopKDivergence(_FusedLinearDivergence):
    """:func:`_fused_topk` with its gradients computed in forward and scaled in backward."""

    @staticmethod
    def forward(ctx: Any, *args: Any) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        flags = tuple(ctx.needs_input_grad[:3])  # hidden, weight, bias
        loss, kd, ce, grad_h, grad_w, grad_b = _fused_topk(*(*args, *flags))
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.n_args = len(args)
        ctx.mark_non_differentiable(kd, ce)
        return loss, kd, ce


def _check_topk_teacher(
    leading: torch.Size, vocab: int, values: Tensor, indices: Tensor, rest: Tensor
) -> None:
    if values.dim() < 1 or values.shape != indices.shape or values.shape[:-1] != leading:
        raise ValueError(
            f"top-k values {tuple(values.shape)} and indices {tuple(indices.shape)} must both "
            f"be (..., k) with the student hidden states' leading shape {tuple(leading)}; "
            "pass the cache rows of the same tokens (topk_values, topk_indices)"
        )
    if rest.shape != values.shape[:-1]:
        raise ValueError(
            f"rest_log_mass has shape {tuple(rest.shape)}, expected {tuple(values.shape[:-1])} "
            "(one log-mass per token)"
        )
    if not (values.dtype.is_floating_point and rest.dtype.is_floating_point):
        raise TypeError(
            f"top-k values and rest_log_mass must be floating point, got {values.dtype} and "
            f"{rest.dtype}"
        )
    if indices.dtype.is_floating_point or indices.dtype == torch.bool:
        raise TypeError(f"top-k indices must be integer token ids, got dtype {indices.dtype}")
    indices = indices.long()  # uint16 / int16 as cached; (..., k) int64 is small
    k = values.shape[-1]
    if k > vocab:
        raise ValueError(f"k = {k} top-k entries but the student head has only V = {vocab} rows")
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab):
        raise ValueError(
            f"top-k token ids span [{int(indices.min())}, {int(indices.max())}], outside the "
            f"student's vocabulary [0, {vocab}); the student's lm_head must cover the "
            "teacher's ids"
        )


def fused_topk_divergence(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
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
    chunk_size: int | None = None,
    chunk_bytes: int | None = None,
    kd_weight: float = 1.0,
    ce_weight: float = 0.0,
    return_parts: bool = False,
) -> Any:
    """Top-k-teacher divergence of ``student_hidden @ student_weight.T``, fused.

    Equals ``kdistill.lm.topk.topk_divergence(F.linear(student_hidden, student_weight,
    student_bias), values, indices, rest_log_mass, kind, ...)`` — the divergence between the
    student's and a cached teacher's distributions coarsened to ``k + 1`` buckets (the
    teacher's top-k ids and "every other id"; exact at ``k = V``, a lower bound otherwise)
    — without ever holding the student's ``(N, V)`` logits: per chunk of tokens
    ``z_c = h_c Wᵀ + b`` ``(chunk, V)``, its ``k + 1`` buckets (a gather and one
    ``logsumexp`` over the other ids), the divergence over ``k + 1`` entries and its
    gradient, chained back to ``∂h_c``, ``∂W``, ``∂b`` in the forward pass (as
    :func:`fused_linear_divergence`). Live memory beyond inputs and those gradients: one
    compute-dtype ``(chunk, V)`` tensor, ``chunk`` taken from ``chunk_bytes``.

    Args:
        student_hidden: ``(B, T, H)`` or ``(N, H)`` last hidden states of the student.
        student_weight: ``(V, H)`` its ``lm_head.weight`` (the parameter itself, so that
            the gradient reaches it; a tied embedding is fine).
        student_bias: ``(V,)`` its ``lm_head`` bias, or ``None``.
        values: ``(B, T, k)`` teacher log-probabilities at ``T = 1`` (cache
            ``topk_values``, any float dtype).
        indices: ``(B, T, k)`` their token ids (cache ``topk_indices``, any integer dtype).
        rest_log_mass: ``(B, T)`` log of the teacher's mass on the other ``V − k`` ids.
        kind, temperature, beta, skew_alpha, labels, ignore_index, mask, reduction,
        chunk_size, chunk_bytes: as in :func:`~kdistill.lm.divergences.token_divergence`;
            ``V`` is the student head's row count.
        kd_weight, ce_weight, return_parts: see :data:`TERMS_DOC`.

    Returns:
        0-dim loss ``kd_weight · D + ce_weight · CE`` in the compute dtype (at least
        float32), or ``(loss, D, CE)`` with ``return_parts``; gradients flow to
        ``student_hidden``, ``student_weight`` and ``student_bias``, never to the teacher.
    """
    spec = _resolve(kind, beta, skew_alpha, temperature)
    bucket_spec = _resolve(kind, beta, skew_alpha, 1.0)  # the buckets are tempered already
    _check_reduction(reduction)
    _check_chunking(chunk_size, chunk_bytes)
    _check_head(student_hidden, student_weight, student_bias, "student")
    leading = student_hidden.shape[:-1]
    vocab = student_weight.shape[0]
    _check_topk_teacher(leading, vocab, values, indices, rest_log_mass)
    k = values.shape[-1]
    indices = indices.long()  # uint16 / int16 as cached; (..., k) int64 is small
    keep = _counted(leading, labels, ignore_index, mask, student_hidden.device)
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    rows, count = _rows(keep, hidden.shape[0])
    chunk = _chunk_rows(
        chunk_size,
        vocab,
        chunk_bytes=chunk_bytes,
        working_set=_TOPK_WORKING_SET
        + (_WORKING_SET[spec.kind] + 2) * (k + 1) / vocab
        + (1.0 if ce_weight else 0.0),
        itemsize=_compute_dtype(hidden, student_weight).itemsize,
    )
    normaliser = float(max(count, 1)) if reduction == "mean" else 1.0
    args = (
        hidden,
        student_weight,
        student_bias,
        values.detach().reshape(-1, k),
        indices.detach().reshape(-1, k),
        rest_log_mass.detach().reshape(-1),
        rows,
        count,
        bucket_spec,
        spec.temperature,
        chunk,
        normaliser,
        _terms(kd_weight, ce_weight, labels, keep, vocab),
    )
    if torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (hidden, student_weight, student_bias)
    ):
        loss, kd, ce = _FusedTopKDivergence.apply(*args)
    else:
        loss, kd, ce, _, _, _ = _fused_topk(*args, False, False, False)
    return (loss, kd.detach(), ce.detach()) if return_parts else loss


class FusedTopKDivergenceLoss(DivergenceSettings):
    """Module form of :func:`fused_topk_divergence`; holds only the hyper-parameters.

    ``forward(student_hidden, student_weight, values, indices, rest_log_mass, *,
    student_bias=None, labels=None, mask=None)``.
    """

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        values: Tensor,
        indices: Tensor,
        rest_log_mass: Tensor,
        *,
        student_bias: Tensor | None = None,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return fused_topk_divergence(
            student_hidden,
            student_weight,
            student_bias,
            values,
            indices,
            rest_log_mass,
            self.kind,
            temperature=self.temperature,
            beta=self.beta,
            skew_alpha=self.skew_alpha,
            labels=labels,
            ignore_index=self.ignore_index,
            mask=mask,
            reduction=self.reduction,
            chunk_size=self.chunk_size,
            chunk_bytes=self.chunk_bytes,
        )


# --------------------------------------------------------------------------- models


def _unwrap(model: nn.Module) -> nn.Module:
    """The Hugging Face model inside DDP / ``torch.compile`` wrappers (FSDP2 wraps in place)."""
    while True:
        inner = getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def causal_lm_head_inputs(
    model: nn.Module, inputs: Mapping[str, Any]
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The inputs of a causal LM's ``lm_head``: its final hidden states, weight and bias.

    Runs ``model(**inputs)`` once — through ``model`` itself, so a DDP or FSDP wrapper's
    forward (gradient-sync set-up, parameter all-gather) runs as usual — asking the model to
    project only the last position (``logits_to_keep=1``, ``num_logits_to_keep`` before
    transformers 4.49; models without either compute their logits as usual), and reads the
    decoder's ``last_hidden_state`` (after the final norm: the ``lm_head``'s input) through a
    forward hook removed afterwards. ``output_hidden_states=True`` is not used: from
    transformers 5 its last entry is the last layer's output *before* the final norm.

    Returns:
        ``hidden`` ``(B, T, H)`` with the graph to the model's parameters; ``weight``
        ``(V, H)`` = ``get_output_embeddings().weight`` — the parameter itself (for tied
        embeddings the input embedding matrix), so that the fused loss's gradient reaches it;
        ``bias`` ``(V,)`` or ``None``. Feed them to :func:`fused_linear_divergence` /
        :func:`fused_topk_divergence` with labels aligned to all ``T`` positions.

    Raises:
        TypeError: the model has no ``get_decoder()`` / ``get_output_embeddings()`` (not a
            Hugging Face causal LM), naming its class.
    """
    inner = _unwrap(model)
    get_decoder = getattr(inner, "get_decoder", None)
    get_head = getattr(inner, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or not isinstance(head, nn.Module):
        raise TypeError(
            f"{type(inner).__name__} has no get_decoder() / get_output_embeddings(): the fused "
            "head needs a Hugging Face causal LM (e.g. LlamaForCausalLM); pass its logits to "
            "the plain loss instead (distill.fused: false)"
        )
    captured: list[Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        hidden = getattr(output, "last_hidden_state", None)
        captured.append(hidden if isinstance(hidden, Tensor) else output[0])

    params = inspect.signature(inner.forward).parameters
    extra = {}
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in params:
            extra[name] = 1
            break
    handle = decoder.register_forward_hook(keep)
    try:
        model(**inputs, **extra)
    finally:
        handle.remove()
    if len(captured) != 1:
        raise RuntimeError(
            f"the decoder of {type(inner).__name__} ran {len(captured)} times in one forward; "
            "expected once"
        )
    return captured[0], head.weight, getattr(head, "bias", None)
