"""Language-model distillation with Hugging Face teachers and students.

Token-level losses:

- :func:`token_divergence` / :class:`TokenDivergenceLoss` — forward KL (Hinton), reverse
  KL (MiniLLM), generalised JSD (GKD), skew KL / skew reverse KL (DistiLLM) and total
  variation between student and teacher logits ``(B, T, V)``, computed in chunks of
  tokens with the gradient taken in the forward pass, so no full ``(tokens × V)`` float32
  tensor is kept for both models. :func:`token_divergence_reference` is the plain
  unchunked computation.
- :func:`fused_linear_divergence` / :class:`FusedLinearDivergenceLoss` — the same from the
  student's hidden states and ``lm_head`` weight, never materialising its full logits
  (after Liger-Kernel's fused linear JSD); :func:`fused_topk_divergence` /
  :class:`FusedTopKDivergenceLoss` against a cached top-k teacher;
  :func:`causal_lm_head_inputs` reads a causal LM's hidden states and head;
  :class:`FusedTokenKD` is ``kdistill lm``'s fused objective (``distill.fused``).
  Chunks are sized by a byte budget (:data:`DEFAULT_CHUNK_BYTES`; the pooled chunk buffers
  are freed by :func:`release_workspace`).
- :func:`align_vocab` / :func:`shared_vocab_size` — equal vocabularies, padded
  vocabularies (151,936 vs 152,064) and the error for different tokenizers.

Batches, objectives and training:

- :mod:`kdistill.lm.batches` — :class:`CausalLMCollator` (right padding, ``attention_mask``,
  labels ``-100`` on padding and prompt, the causal shift done once in
  :func:`causal_lm_labels`), :class:`ExampleLoader`, :func:`evaluate_lm` (per-token
  accuracy, cross-entropy, perplexity).
- :mod:`kdistill.lm.losses` — :class:`TokenKDLoss` / :class:`TokenCrossEntropy` as
  :class:`~kdistill.distiller.Distiller` terms over HF models;
  :mod:`kdistill.lm.topk` — the same against a cached top-k teacher.
- :mod:`kdistill.lm.seqkd` — sequence-level KD (Kim & Rush 2016) from the teacher's
  ``generate`` and GKD-style on-policy mixing (:class:`OnPolicyLoader`).
- :mod:`kdistill.lm.distilbert` — DistilBERT's triple loss and its masked-LM collator.
- :mod:`kdistill.lm.student_init` — DistilBERT-style students copied from teacher layers.
- :mod:`kdistill.lm.config` / :mod:`kdistill.lm.train` — ``kdistill lm CONFIG.yaml``.

Conventions (see :mod:`kdistill.lm.divergences`): ``p`` = teacher, ``q`` = student;
softened by the temperature without a ``T²`` factor; summed over the vocabulary and
averaged over the tokens that count (``labels != -100`` and ``mask``).
"""

from __future__ import annotations

from kdistill.lm.batches import (
    ByteTokenizer,
    CausalLMCollator,
    ExampleLoader,
    causal_lm_labels,
    evaluate_lm,
    model_outputs,
)
from kdistill.lm.distilbert import (
    DISTILBERT_TEMPERATURE,
    DISTILBERT_WEIGHTS,
    HiddenCosineLoss,
    MLMCollator,
    SoftTargetKDLoss,
    distilbert_loss,
    distilbert_terms,
    mask_tokens,
)
from kdistill.lm.divergences import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_ELEMENTS,
    IGNORE_INDEX,
    KINDS,
    TokenDivergenceLoss,
    release_workspace,
    token_divergence,
    token_divergence_reference,
)
from kdistill.lm.fused import (
    FusedLinearDivergenceLoss,
    FusedTopKDivergenceLoss,
    causal_lm_head_inputs,
    fused_linear_divergence,
    fused_topk_divergence,
)
from kdistill.lm.fused_run import FusedTokenKD
from kdistill.lm.losses import TokenCrossEntropy, TokenKDLoss, token_cross_entropy
from kdistill.lm.seqkd import (
    GenerationSettings,
    OnPolicyLoader,
    build_seqkd_examples,
    generate_completions,
)
from kdistill.lm.student_init import init_student_from_teacher
from kdistill.lm.vocab import MAX_PAD_FRACTION, PAD_MULTIPLE, align_vocab, shared_vocab_size

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "DEFAULT_CHUNK_ELEMENTS",
    "DISTILBERT_TEMPERATURE",
    "DISTILBERT_WEIGHTS",
    "IGNORE_INDEX",
    "KINDS",
    "MAX_PAD_FRACTION",
    "PAD_MULTIPLE",
    "ByteTokenizer",
    "CausalLMCollator",
    "ExampleLoader",
    "FusedLinearDivergenceLoss",
    "FusedTokenKD",
    "FusedTopKDivergenceLoss",
    "GenerationSettings",
    "HiddenCosineLoss",
    "MLMCollator",
    "OnPolicyLoader",
    "SoftTargetKDLoss",
    "TokenCrossEntropy",
    "TokenDivergenceLoss",
    "TokenKDLoss",
    "align_vocab",
    "build_seqkd_examples",
    "causal_lm_head_inputs",
    "causal_lm_labels",
    "distilbert_loss",
    "distilbert_terms",
    "evaluate_lm",
    "fused_linear_divergence",
    "fused_topk_divergence",
    "generate_completions",
    "init_student_from_teacher",
    "mask_tokens",
    "model_outputs",
    "release_workspace",
    "shared_vocab_size",
    "token_cross_entropy",
    "token_divergence",
    "token_divergence_reference",
]
