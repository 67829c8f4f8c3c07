"""The losses of language-model objectives, as :class:`~kdistill.distiller.Distiller` terms.

- :func:`token_cross_entropy` / :class:`TokenCrossEntropy` — the hard-label term over the
  batch's aligned labels (``-100`` ignored).
- :class:`TokenKDLoss` — :class:`~kdistill.lm.divergences.TokenDivergenceLoss` as a term:
  it receives the labels and the attention mask, so padding and prompt tokens never count.
- :class:`~kdistill.lm.topk.TopKTokenKDLoss` — the same against a cached top-k teacher.

Conventions (:mod:`kdistill.lm.divergences`): ``p`` = teacher, ``q`` = student; no ``T²``;
summed over the vocabulary and averaged over the tokens that count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdistill.distiller import IGNORE_INDEX
from kdistill.lm.divergences import TokenDivergenceLoss

__all__ = ["TokenCrossEntropy", "TokenKDLoss", "token_cross_entropy"]


def token_cross_entropy(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = IGNORE_INDEX,
    reduction: str = "mean",
) -> Tensor:
    """Cross-entropy of ``(B, T, V)`` logits against aligned ``(B, T)`` labels.

    ``CE = −(1/N) Σ_{t: y_t ≠ ignore} log softmax(z_t)[y_t]`` over the ``N`` counted tokens
    (``reduction="mean"``; ``"sum"`` drops the ``1/N``). Computed in float32 at least.
    No counted token gives exactly 0 (not ``NaN``), with zero gradients.
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not align: "
            "expected (..., V) and (...) — causal-LM labels must already be shifted "
            "(see kdistill.lm.batches.causal_lm_labels)"
        )
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    total = F.cross_entropy(flat, labels.reshape(-1), ignore_index=ignore_index, reduction="sum")
    if reduction == "sum":
        return total
    return total / (labels != ignore_index).sum().clamp_min(1)


class TokenCrossEntropy(nn.Module):
    """Module form of :func:`token_cross_entropy`: the hard-label term of an LM objective.

    ``LossTerm("ce", TokenCrossEntropy(), teacher=None)`` compares the student's logits
    with the batch's aligned labels.
    """

    def __init__(self, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.ignore_index = ignore_index

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        return token_cross_entropy(logits, labels, self.ignore_index)


class TokenKDLoss(TokenDivergenceLoss):
    """:class:`~kdistill.lm.divergences.TokenDivergenceLoss` as a Distiller term.

    Gets the batch's labels (``requires_target``) and attention mask (``requires_mask``),
    so padding and prompt tokens (``labels == -100``) never count; the mean is over the
    remaining tokens. Same hyper-parameters (``kind``, ``beta``, ``temperature``,
    ``chunk_size``, ...) and conventions (no ``T²``).
    """

    requires_target = True
    requires_mask = True
