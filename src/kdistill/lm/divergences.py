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

Memory: :func:`token_divergence` walks the tokens in chunks of rows sized by a byte budget
``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`, 32 MiB) over the vocabulary size, the
compute dtype and the number of ``(rows, V)`` tensors the kind holds at once (3–4, computed in
place wherever the algebra allows), or of ``chunk_size`` rows when given. For
each chunk it upcasts to float32, computes the divergence and — in the forward pass,
the trick of Liger-Kernel's chunked losses — its gradient wrt the student logits (and
the teacher's, if those require grad) in closed form, stored in the input dtype.
Backward only scales the stored gradient. So beyond the inputs the loss holds one
gradient the size of the logits it differentiates (bf16 for bf16 logits) plus
``chunk_bytes`` of float32 working memory, never a full ``(N, V)`` float32 tensor or
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
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from kdistill.distiller import IGNORE_INDEX  # the one definition; re-exported here
from kdistill.lm.vocab import align_vocab
from kdistill.losses._reduce import _check_mask, _compute_dtype

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_ELEMENTS",
    "IGNORE_INDEX",
    "KINDS",
    "TokenDivergenceLoss",
    "release_workspace",
    "token_divergence",
    "token_divergence_reference",
]

KINDS = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv")
"""The divergence names accepted as ``kind``."""

DEFAULT_CHUNK_BYTES = 32 << 20
"""Default working-memory budget of one chunk (32 MiB): ``chunk_size=None`` takes
``max(1, chunk_bytes // (w · V · itemsize))`` token rows per chunk, ``w`` being the number of
``(rows, V)`` compute-dtype tensors the kind holds at once (:data:`_WORKING_SET`, 3–4; 1.5
more for half-precision inputs), e.g. 42 rows of JSD for a 49,152-token vocabulary in float32,
13 rows for 151,936 ids."""

DEFAULT_CHUNK_ELEMENTS = 1 << 24
"""The fixed default of earlier versions (``chunk_size = DEFAULT_CHUNK_ELEMENTS // V`` rows,
341 for 49,152 ids), kept for reference: pass ``chunk_size`` to reproduce it."""

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


def _check_chunking(chunk_size: int | None, chunk_bytes: int | None) -> None:
    for name, value in (("chunk_size", chunk_size), ("chunk_bytes", chunk_bytes)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            what = "tokens per chunk" if name == "chunk_size" else "bytes of working memory"
            raise ValueError(
                f"{name} must be a positive int ({what}) or None for automatic, got {value!r}"
            )
    if chunk_size is not None and chunk_bytes is not None:
        raise ValueError(
            f"give chunk_size (tokens per chunk, here {chunk_size}) or chunk_bytes (a memory "
            f"budget, here {chunk_bytes}), not both: chunk_size fixes the rows, chunk_bytes "
            "derives them from the vocabulary size"
        )


def _chunk_rows(
    chunk_size: int | None,
    vocab: int,
    *,
    chunk_bytes: int | None = None,
    working_set: float = 4.0,
    itemsize: int = 4,
) -> int:
    """Token rows per chunk: ``chunk_size`` if given, else from the byte budget.

    ``chunk_bytes`` (default :data:`DEFAULT_CHUNK_BYTES`) is divided by the bytes of the
    ``working_set`` compute-dtype ``(rows, V)`` tensors alive at once: ``rows =
    max(1, chunk_bytes // (working_set · V · itemsize))``.
    """
    _check_chunking(chunk_size, chunk_bytes)
    if chunk_size is not None:
        return chunk_size
    budget = DEFAULT_CHUNK_BYTES if chunk_bytes is None else chunk_bytes
    return max(1, int(budget // (working_set * max(vocab, 1) * itemsize)))


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


# --------------------------------------------------------------------------- chunk buffers


class _Workspace(threading.local):
    """Per-thread pool of ``(rows, V)`` chunk buffers, reused across chunks and calls."""

    def __init__(self) -> None:
        self.pools: dict[tuple[torch.device, torch.dtype, int], list[Tensor]] = {}


_WORKSPACE = _Workspace()
_CAN_POOL = hasattr(torch._C, "_storage_Use_Count")  # how a buffer is known to be free
_MAX_POOLED = 8  # buffers kept per (device, dtype, V); the kinds need at most 5 at once


def _is_free(buffer: Tensor) -> bool:
    # the pool's own reference + the temporary storage object of this call: nobody else
    return torch._C._storage_Use_Count(buffer.untyped_storage()._cdata) <= 2


def _scratch(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """An uninitialised ``(rows, vocab)`` tensor from the pool of chunk buffers.

    On the CPU, a chunk's working tensors are the same few sizes every chunk and every step;
    allocated fresh, they cost page faults every time (glibc serves blocks above 32 MiB by
    ``mmap`` and trims the freed heap). A pooled buffer is handed out again once no
    tensor refers to its storage any more (so a buffer still in use is never reused), and is
    kept between calls: at most :data:`DEFAULT_CHUNK_BYTES`-ish per thread, device and dtype,
    freed by :func:`release_workspace`.
    """
    if device.type != "cpu" or not _CAN_POOL:  # a GPU's caching allocator already reuses
        return torch.empty(rows, vocab, dtype=dtype, device=device)
    pool = _WORKSPACE.pools.setdefault((device, dtype, vocab), [])
    for buffer in pool:
        if buffer.shape[0] >= rows and _is_free(buffer):
            return buffer[:rows]
    pool[:] = [b for b in pool if not (_is_free(b) and b.shape[0] < rows)][: _MAX_POOLED - 1]
    with torch.inference_mode(False):  # usable outside an inference_mode block later
        buffer = torch.empty(rows, vocab, dtype=dtype, device=device)
    pool.append(buffer)
    return buffer[:rows]


def release_workspace() -> None:
    """Free the chunk buffers the LM divergences keep between calls (this thread's)."""
    _WORKSPACE.pools.clear()


def _like(x: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A pooled buffer shaped like the ``(n, V)`` tensor ``x``."""
    return _scratch(x.shape[0], x.shape[1], dtype or x.dtype, x.device)


def _log_probs(x: Tensor, dtype: torch.dtype, temperature: float, owned: bool) -> Tensor:
    """``log softmax(x / T)`` ``(n, V)`` in ``dtype``; divides ``x`` in place when ``owned``."""
    if x.dtype != dtype:
        x, owned = _like(x, dtype).copy_(x), True
    if temperature != 1.0:
        x = x.div_(temperature) if owned else torch.div(x, temperature, out=_like(x))
    return torch.log_softmax(x, dim=-1, out=_like(x))


def _exp(x: Tensor) -> Tensor:
    return torch.exp(x, out=_like(x))


def _take_rows(x: Tensor, start: int, stop: int, idx: Tensor | None) -> Tensor:
    """Rows ``start:stop`` of ``(N, V)`` ``x`` (a view), or rows ``idx`` (into a buffer)."""
    if idx is None:
        return x[start:stop]
    return torch.index_select(x, 0, idx, out=_scratch(idx.numel(), x.shape[1], x.dtype, x.device))


def _zero_where_absent(d: Tensor) -> Tensor:
    """In place: entries of ``d = log a − log b`` with ``a = 0`` (``−inf`` or ``NaN``) → 0.

    With ``log a`` finite, ``d ≥ log a > −∞``, so ``−inf`` / ``NaN`` only arise where
    ``a = 0`` exactly, whose terms count 0 (``0 · log 0 = 0``). ``+inf`` (``a > 0 = b``)
    is kept: the divergence is infinite there.
    """
    return d.nan_to_num_(nan=0.0, neginf=0.0, posinf=math.inf)


def _log_mix(log_a: Tensor, log_b: Tensor, w: float) -> Tensor:
    """``log(w · a + (1 − w) · b)`` for ``0 < w < 1``: one new ``(n, V)`` tensor, log space."""
    c = math.log1p(-w) - math.log(w)
    shifted = torch.add(log_b, c, out=_like(log_b)) if c != 0.0 else log_b
    out = torch.logaddexp(log_a, shifted, out=_like(log_a))
    del shifted
    return out.add_(math.log(w))


def _centre_(e: Tensor, prob: Tensor) -> Tensor:
    """In place: ``e − ⟨1, e⟩ · prob`` per row; with ``e = prob ⊙ x`` this is
    ``prob ⊙ (x − ⟨prob, x⟩)``, the softmax Jacobian applied to ``x``."""
    return e.addcmul_(prob, e.sum(dim=-1, keepdim=True), value=-1.0)


# Each _grads_<kind> takes ``pair = [lq, lp]``, the tempered log-probabilities of the
# student and the teacher, (n, V) tensors it takes over (empties the list) and overwrites, and returns the per-row divergence (n, 1) and
# ``factor ·`` its gradients wrt the tempered logits ``a`` / ``b`` (None when not needed).
# Every (n, V) operation is in place where the algebra allows; the peak number of (n, V)
# tensors alive at once is _WORKING_SET[kind] (checked by the tests).

_Grads = tuple[Tensor, Tensor | None, Tensor | None]


def _grads_forward_kl(pair: list[Tensor], w: float, ns: bool, nt: bool, f: float) -> _Grads:
    lq, lp = pair
    pair.clear()
    p = _exp(lp)
    e = _zero_where_absent(lp.sub_(lq)).mul_(p)  # p ⊙ (log p − log q)
    row = e.sum(dim=-1, keepdim=True)
    gb = _centre_(e, p).mul_(f) if nt else None  # p ⊙ (D − KL)
    del e
    ga = lq.exp_().sub_(p).mul_(f) if ns else None  # q − p
    return row, ga, gb


def _grads_reverse_kl(pair: list[Tensor], w: float, ns: bool, nt: bool, f: float) -> _Grads:
    lq, lp = pair
    pair.clear()
    q = _exp(lq)
    e = _zero_where_absent(lq.sub_(lp)).mul_(q)  # q ⊙ (log q − log p)
    row = e.sum(dim=-1, keepdim=True)
    gb = lp.exp_().sub_(q).mul_(f) if nt else None  # p − q
    ga = _centre_(e, q).mul_(f) if ns else None  # q ⊙ (D − KL)
    return row, ga, gb


def _grads_jsd(pair: list[Tensor], beta: float, ns: bool, nt: bool, f: float) -> _Grads:
    lq, lp = pair
    pair.clear()
    log_m = _log_mix(lp, lq, beta)  # m = β p + (1 − β) q
    p = _exp(lp)
    e = _zero_where_absent(lp.sub_(log_m)).mul_(p)  # p ⊙ (log p − log m)
    kl_p = e.sum(dim=-1, keepdim=True)
    gb = _centre_(e, p).mul_(beta * f) if nt else None
    del e, p, lp
    q = _exp(lq)
    e = _zero_where_absent(lq.sub_(log_m)).mul_(q)  # q ⊙ (log q − log m)
    del log_m
    kl_q = e.sum(dim=-1, keepdim=True)
    ga = _centre_(e, q).mul_((1.0 - beta) * f) if ns else None
    return beta * kl_p + (1.0 - beta) * kl_q, ga, gb


def _grads_skew_kl(pair: list[Tensor], alpha: float, ns: bool, nt: bool, f: float) -> _Grads:
    lq, lp = pair
    pair.clear()
    log_m = _log_mix(lp, lq, alpha)  # m = α p + (1 − α) q
    q = lq.exp_()
    p = _exp(lp)
    d = lp.sub_(log_m)  # log p − log m
    r = torch.exp(d, out=log_m).nan_to_num_(nan=0.0)  # p / m ≤ 1 / α, 0 where p = m = 0
    e = _zero_where_absent(d).mul_(p)
    row = e.sum(dim=-1, keepdim=True)
    gb = None
    if nt:  # p ⊙ (D − α r − ⟨p, D − α r⟩)
        gb = _centre_(e.addcmul_(p, r, value=-alpha), p).mul_(f)
    del e, p
    ga = None
    if ns:  # (1 − α) q ⊙ (⟨q, r⟩ − r)
        ga = _centre_(r.mul_(q), q).mul_(-(1.0 - alpha) * f)
    return row, ga, gb


def _grads_skew_reverse_kl(
    pair: list[Tensor], alpha: float, ns: bool, nt: bool, f: float
) -> _Grads:
    lq, lp = pair
    pair.clear()
    log_m = _log_mix(lq, lp, alpha)  # m = α q + (1 − α) p
    p = lp.exp_() if nt else None
    del lp
    q = _exp(lq)
    d = lq.sub_(log_m)  # log q − log m
    u = torch.exp(d, out=log_m).nan_to_num_(nan=0.0)  # q / m ≤ 1 / α
    e = _zero_where_absent(d).mul_(q)
    row = e.sum(dim=-1, keepdim=True)
    ga = None
    if ns:  # q ⊙ (D − α u − ⟨q, D − α u⟩)
        ga = _centre_(e.addcmul_(q, u, value=-alpha), q).mul_(f)
    del e
    gb = None
    if p is not None:  # (1 − α) p ⊙ (⟨p, u⟩ − u)
        gb = _centre_(u.mul_(p), p).mul_(-(1.0 - alpha) * f)
    return row, ga, gb


def _grads_tv(pair: list[Tensor], w: float, ns: bool, nt: bool, f: float) -> _Grads:
    lq, lp = pair
    pair.clear()
    q, p = lq.exp_(), lp.exp_()
    diff = torch.sub(p, q, out=_like(p)) if nt else p.sub_(q)
    row = 0.5 * torch.linalg.vector_norm(diff, ord=1, dim=-1, keepdim=True)
    sign = diff.sign_()  # σ = ½ sign(p − q); the ½ goes into the factors
    gb = (
        _centre_(torch.mul(p, sign, out=_like(p)), p).mul_(0.5 * f) if nt else None
    )  # p ⊙ (σ − ⟨p, σ⟩)
    ga = _centre_(sign.mul_(q), q).mul_(-0.5 * f) if ns else None  # −q ⊙ (σ − ⟨q, σ⟩)
    return row, ga, gb


_GRADS = {
    "forward_kl": _grads_forward_kl,
    "reverse_kl": _grads_reverse_kl,
    "jsd": _grads_jsd,
    "skew_kl": _grads_skew_kl,
    "skew_reverse_kl": _grads_skew_reverse_kl,
    "tv": _grads_tv,
}

_WORKING_SET: dict[str, float] = {
    "forward_kl": 3.0,
    "reverse_kl": 3.0,
    "jsd": 4.0,
    "skew_kl": 4.0,
    "skew_reverse_kl": 4.0,
    "tv": 4.0,
}
"""Peak number of compute-dtype ``(rows, V)`` chunk buffers in use at once in
:func:`_value_and_grads` (forward with gradients, incl. the upcast / tempered copies of the
inputs and the chunks themselves when gathered), the unit ``chunk_bytes`` is divided by;
tests/lm/test_lm_divergences.py measures it for every kind."""

_HALF_EXTRA = 1.5
"""Added to :data:`_WORKING_SET` for half-precision inputs: the gathered half chunks of
both models and the half copy of a gradient chunk."""


def _working_set(kind: str, input_dtype: torch.dtype, compute_dtype: torch.dtype) -> float:
    extra = _HALF_EXTRA if input_dtype.itemsize < compute_dtype.itemsize else 0.0
    return _WORKING_SET[kind] + extra


def _value_and_grads(
    student: Tensor,
    teacher: Tensor,
    spec: _Spec,
    need_student: bool,
    need_teacher: bool,
    scale: float,
    owned_student: bool = False,
    owned_teacher: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """Summed divergence of one chunk ``(n, V)`` and ``scale ·`` its gradients, analytically.

    The chunk is upcast to the compute dtype (at least float32) here, so only
    ``O(chunk × V)`` float32 memory is live at a time — at most :data:`_WORKING_SET` ``[kind]``
    ``(n, V)`` tensors — and no autograd graph is built. ``owned=True`` says ``student`` and
    ``teacher`` are fresh tensors of the caller's (an ``index_select`` or a matmul) that may
    be overwritten. With ``a = z_s / T``, ``b = z_t / T``, ``q = softmax(a)``,
    ``p = softmax(b)``, every gradient has the softmax form ``∂ℓ/∂a = q ⊙ (x − ⟨q, x⟩)`` for
    ``x = ∂ℓ/∂q``, which simplifies per kind (``m`` is the kind's mixture,
    ``D_p = log p − log m``):

    * forward KL: ``∂a = q − p``;  ``∂b = p ⊙ (log p − log q − KL)``
    * reverse KL: ``∂a = q ⊙ (log q − log p − KL)``;  ``∂b = p − q``
    * JSD(β): ``∂a = (1−β) q ⊙ (D_q − KL(q‖m))``;  ``∂b = β p ⊙ (D_p − KL(p‖m))``
    * skew KL, ``r = p / m``: ``∂a = (1−α) q ⊙ (⟨q, r⟩ − r)``;
      ``∂b = p ⊙ (D_p − α r − ⟨p, D_p − α r⟩)``
    * skew reverse KL, ``u = q / m``: ``∂a = q ⊙ (D_q − α u − ⟨q, D_q − α u⟩)``;
      ``∂b = (1−α) p ⊙ (⟨p, u⟩ − u)``
    * TV, ``σ = ½ sign(p − q)``: ``∂a = −q ⊙ (σ − ⟨q, σ⟩)``;  ``∂b = p ⊙ (σ − ⟨p, σ⟩)``

    and ``∂z = ∂a / T``. Terms with zero probability count zero (``0 · log 0 = 0``), so
    ``-inf`` logits give no ``NaN``. Cross-checked against autograd of :func:`_per_token`
    by the tests.
    """
    dtype = _compute_dtype(student, teacher)
    temperature = spec.temperature
    if spec.kind == "reverse_kl":  # renormalise q over the teacher's support
        off = teacher == -math.inf
        if not owned_student or student.dtype != dtype:
            student = _like(student, dtype).copy_(student)
            owned_student = True
        student = student.masked_fill_(off, -math.inf)
        del off
    log_q = _log_probs(student, dtype, temperature, owned_student)  # (n, V)
    del student
    log_p = _log_probs(teacher, dtype, temperature, owned_teacher)  # (n, V)
    del teacher
    pair = [log_q, log_p]  # handed over: the kind's function holds the only references
    del log_q, log_p
    row, ga, gb = _GRADS[spec.kind](
        pair, spec.weight, need_student, need_teacher, scale / temperature
    )
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
        idx = None if rows is None else rows[start:stop]
        value, g_s, g_t = _value_and_grads(  # chunks passed inline: freed inside once used
            _take_rows(student, start, stop, idx),
            _take_rows(teacher, start, stop, idx),
            spec,
            need_student,
            need_teacher,
            scale,
            owned_student=idx is not None,
            owned_teacher=idx is not None,
        )
        total += value
        _store_rows(grad_s, g_s, start, stop, idx)
        _store_rows(grad_t, g_t, start, stop, idx)
        del g_s, g_t  # before the next chunk allocates
    return total / normaliser, grad_s, grad_t


def _store_rows(
    full: Tensor | None, part: Tensor | None, start: int, stop: int, idx: Tensor | None
) -> None:
    """Write a chunk's rows ``part`` into ``full`` (rows ``start:stop``, or ``idx``)."""
    if full is None or part is None:
        return
    if idx is None:
        full[start:stop] = part
    else:
        full.index_copy_(0, idx, part.to(full.dtype))


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
    chunk_bytes: int | None = None,
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
        chunk_size: tokens per chunk (an explicit override); ``None`` derives it from
            ``chunk_bytes``.
        allow_padded: vocabulary-size rule, see :func:`~kdistill.lm.vocab.shared_vocab_size`.
        chunk_bytes: working-memory budget of one chunk in bytes (default
            :data:`DEFAULT_CHUNK_BYTES`, 32 MiB): the rows per chunk are
            ``chunk_bytes // (w · V · itemsize)`` with ``w`` the kind's number of
            ``(rows, V)`` compute-dtype tensors alive at once (3–4; +1.5 for half inputs). Not with ``chunk_size``.

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
    _check_chunking(chunk_size, chunk_bytes)
    s, t, keep = _prepare(student_logits, teacher_logits, labels, ignore_index, mask, allow_padded)
    dtype = _compute_dtype(s, t)
    low = s.dtype if s.dtype.itemsize <= t.dtype.itemsize else t.dtype
    chunk = _chunk_rows(
        chunk_size,
        s.shape[-1],
        chunk_bytes=chunk_bytes,
        working_set=_working_set(spec.kind, low, dtype),
        itemsize=dtype.itemsize,
    )
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
        chunk_bytes: int | None = None,
    ) -> None:
        super().__init__()
        _resolve(kind, beta, skew_alpha, temperature)
        _check_reduction(reduction)
        _check_chunking(chunk_size, chunk_bytes)
        self.kind = kind
        self.beta = beta
        self.skew_alpha = skew_alpha
        self.temperature = temperature
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.chunk_size = chunk_size
        self.allow_padded = allow_padded
        self.chunk_bytes = chunk_bytes

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
        if self.chunk_bytes is not None:
            parts.append(f"chunk_bytes={self.chunk_bytes}")
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
            chunk_bytes=self.chunk_bytes,
        )
