"""Language-model distillation: token-level divergences over the vocabulary.

- :func:`token_divergence` / :class:`TokenDivergenceLoss` — forward KL (Hinton), reverse
  KL (MiniLLM), generalised JSD (GKD), skew KL / skew reverse KL (DistiLLM) and total
  variation between student and teacher logits ``(B, T, V)``, computed in chunks of
  tokens with the gradient taken in the forward pass, so no full ``(tokens × V)`` float32
  tensor is kept for both models. :func:`token_divergence_reference` is the plain
  unchunked computation.
- :func:`fused_linear_divergence` / :class:`FusedLinearDivergenceLoss` — the same from the
  student's hidden states and ``lm_head`` weight, never materialising its full logits
  (after Liger-Kernel's fused linear JSD).
- :func:`align_vocab` / :func:`shared_vocab_size` — equal vocabularies, padded
  vocabularies (151,936 vs 152,064) and the error for different tokenizers.

Conventions (see :mod:`kdistill.lm.divergences`): ``p`` = teacher, ``q`` = student;
softened by the temperature without a ``T²`` factor; summed over the vocabulary and
averaged over the tokens that count (``labels != -100`` and ``mask``).
"""

from __future__ import annotations

from kdistill.lm.divergences import (
    DEFAULT_CHUNK_ELEMENTS,
    IGNORE_INDEX,
    KINDS,
    TokenDivergenceLoss,
    token_divergence,
    token_divergence_reference,
)
from kdistill.lm.fused import FusedLinearDivergenceLoss, fused_linear_divergence
from kdistill.lm.vocab import MAX_PAD_FRACTION, PAD_MULTIPLE, align_vocab, shared_vocab_size

__all__ = [
    "DEFAULT_CHUNK_ELEMENTS",
    "IGNORE_INDEX",
    "KINDS",
    "MAX_PAD_FRACTION",
    "PAD_MULTIPLE",
    "FusedLinearDivergenceLoss",
    "TokenDivergenceLoss",
    "align_vocab",
    "fused_linear_divergence",
    "shared_vocab_size",
    "token_divergence",
    "token_divergence_reference",
]
