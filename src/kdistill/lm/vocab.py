"""Matching the teacher's vocabulary to the student's.

Token-level distillation compares the two models' distributions over the *same* token
ids, so the main path is a teacher and a student that share one tokenizer. Two models
with one tokenizer still often report different vocabulary sizes, because one of them
pads its embedding matrix (and ``lm_head``) to a multiple of 64 or 128 for faster
matmuls: Qwen2.5-0.5B has 151,936 rows and Qwen2.5-7B 152,064 for the same 151,665
tokens; GPT-2's 50,257 tokens are often padded to 50,304. The extra ids are never
produced by the tokenizer, so slicing both logit tensors to the shared first
``min(V_s, V_t)`` ids (and renormalising the softmax over them) is the right fix.

The rule (:func:`shared_vocab_size`), with ``V_s``, ``V_t`` the student / teacher sizes:

* ``V_s == V_t``: nothing to do.
* ``allow_padded=None`` (the default, *auto*): slice to ``min(V_s, V_t)`` only if the
  sizes look like one vocabulary with padding — the larger size is a multiple of
  :data:`PAD_MULTIPLE` (64) **and** the two differ by less than
  :data:`MAX_PAD_FRACTION` (1 %) of the larger size. Otherwise raise ``ValueError``
  naming both sizes: the models most likely use different tokenizers.
* ``allow_padded=True``: always slice to ``min(V_s, V_t)`` — you vouch that ids
  ``0 … min − 1`` mean the same tokens in both models.
* ``allow_padded=False``: any difference is an error.

The sizes cannot prove the tokenizers are the same: GPT-2 (50,257 tokens) and Pythia
(GPT-NeoX tokenizer, embedding padded to 50,304) pass the auto rule but tokenise text
differently, and Llama-2 and Mistral both have exactly 32,000 ids. Check the tokenizers
themselves when in doubt, and pass ``allow_padded=False`` to make any size mismatch an
error.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["MAX_PAD_FRACTION", "PAD_MULTIPLE", "align_vocab", "shared_vocab_size"]

PAD_MULTIPLE = 64
"""The auto rule only treats the larger vocabulary as padded when it is a multiple of this."""

MAX_PAD_FRACTION = 0.01
"""The auto rule only slices when the sizes differ by less than this fraction of the larger."""


def _looks_padded(student_vocab: int, teacher_vocab: int) -> bool:
    larger = max(student_vocab, teacher_vocab)
    diff = abs(student_vocab - teacher_vocab)
    return larger % PAD_MULTIPLE == 0 and diff < MAX_PAD_FRACTION * larger


def shared_vocab_size(
    student_vocab: int, teacher_vocab: int, *, allow_padded: bool | None = None
) -> int:
    """Number of leading token ids to compare, following the rule in the module docstring.

    Args:
        student_vocab: the student's vocabulary size ``V_s`` (logits' last dim, or
            ``lm_head.weight.shape[0]``).
        teacher_vocab: the teacher's ``V_t``.
        allow_padded: ``None`` = auto (slice only a padding-like difference), ``True`` =
            always slice to ``min(V_s, V_t)``, ``False`` = sizes must be equal.

    Returns:
        ``V_s`` when the sizes are equal, else ``min(V_s, V_t)``.

    Raises:
        ValueError: the sizes differ and the rule does not allow slicing; the message
            names both sizes.
    """
    for name, size in (("student_vocab", student_vocab), ("teacher_vocab", teacher_vocab)):
        if int(size) != size or size < 1:
            raise ValueError(f"{name} must be a positive integer, got {size!r}")
    if student_vocab == teacher_vocab:
        return int(student_vocab)
    shared = int(min(student_vocab, teacher_vocab))
    if allow_padded is True:
        return shared
    sizes = (
        f"the student's vocabulary has {student_vocab} ids but the teacher's has {teacher_vocab}"
    )
    if allow_padded is False:
        raise ValueError(
            f"{sizes} and allow_padded=False; they likely use different tokenizers — "
            "distil between models that share a tokenizer, or pass allow_padded=True if "
            f"ids 0..{shared - 1} mean the same tokens in both"
        )
    if _looks_padded(student_vocab, teacher_vocab):
        return shared
    raise ValueError(
        f"{sizes}; that is not a padded copy of one vocabulary (the larger size would be "
        f"a multiple of {PAD_MULTIPLE} and differ by < {MAX_PAD_FRACTION:.0%}), so they "
        "likely use different tokenizers. Distil between models that share a tokenizer, "
        f"or pass allow_padded=True if ids 0..{shared - 1} mean the same tokens in both"
    )


def align_vocab(
    student_logits: Tensor, teacher_logits: Tensor, *, allow_padded: bool | None = None
) -> tuple[Tensor, Tensor]:
    """Slice student and teacher logits ``(..., V)`` to their shared vocabulary.

    Equal sizes are returned unchanged (the same tensor objects). Otherwise both are cut
    to the first ``min(V_s, V_t)`` ids when :func:`shared_vocab_size` allows it; the
    results are views (no copy) and gradients flow back into the kept ids only.

    Args:
        student_logits: ``(..., V_s)``.
        teacher_logits: ``(..., V_t)``.
        allow_padded: see :func:`shared_vocab_size`.

    Returns:
        ``(student_logits[..., :V], teacher_logits[..., :V])`` with the shared ``V``.

    Raises:
        ValueError: the sizes differ beyond what the rule allows (message names both), or
            a tensor has no vocabulary dimension.
    """
    if student_logits.dim() < 1 or teacher_logits.dim() < 1:
        raise ValueError(
            "logits must have a vocabulary dimension, shape (..., V); got student "
            f"{tuple(student_logits.shape)}, teacher {tuple(teacher_logits.shape)}"
        )
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if vs == vt:
        return student_logits, teacher_logits
    v = shared_vocab_size(vs, vt, allow_padded=allow_padded)
    return student_logits[..., :v], teacher_logits[..., :v]
