"""Bits per byte: a language model's compression of text, comparable across tokenizers.

Perplexity is per *token*, so two models with different tokenizers cannot be compared by it
(a byte-level model predicts ~4× as many, easier, tokens as a BPE model on English). The
total negative log-likelihood of a text does not depend on how it was cut, so dividing it by
the text's UTF-8 bytes gives a fair figure (Gao et al. 2020, "The Pile", §5; lm-evaluation-
harness's ``bits_per_byte``)::

    bpb = Σ_t −ln q(x_t | x_<t) / (n_bytes · ln 2)

summed over every token of the text, each predicted once from everything before it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdistill.distiller import call_model, output_logits
from kdistill.lm.alignment import SpanTokenizer
from kdistill.lm.batches import pad_right

__all__ = ["bits_per_byte", "evaluate_bits_per_byte", "scoring_windows"]


def bits_per_byte(total_nll_nats: float, num_bytes: int) -> float:
    """``total_nll_nats / (num_bytes · ln 2)``: nats of the whole text over its UTF-8 bytes."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be > 0 (UTF-8 bytes of the scored text), got {num_bytes}")
    return float(total_nll_nats) / (num_bytes * math.log(2.0))


def scoring_windows(ids: Sequence[int], max_length: int) -> list[list[int]]:
    """Cut ``ids`` (prefix token first) into windows of at most ``max_length`` tokens that
    overlap by one, so every token after the first is a target of exactly one window (its
    context is the window's earlier tokens)."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    windows, start = [], 0
    while start < len(ids) - 1:
        windows.append(list(ids[start : start + max_length]))
        start += max_length - 1
    return windows


def _scored_ids(wrapped: SpanTokenizer, text: str, prefix_token_id: int | None) -> list[int]:
    ids = wrapped.encode(text, add_special_tokens=True)
    while ids and wrapped.token_bytes(ids[-1]) is None:  # a trailing EOS / [SEP] is not text
        ids.pop()
    if ids and wrapped.token_bytes(ids[0]) is not None:  # no BOS: score the first token too
        tok = wrapped.tokenizer
        prefix = prefix_token_id
        if prefix is None:
            prefix = getattr(tok, "bos_token_id", None)
        if prefix is None:
            prefix = getattr(tok, "eos_token_id", None)
        if prefix is None:
            raise ValueError(
                f"{wrapped.name} adds no BOS and has no bos/eos token: pass prefix_token_id, "
                "the token the first text token is predicted from"
            )
        ids = [int(prefix), *ids]
    return ids


@torch.inference_mode()
def evaluate_bits_per_byte(
    model: nn.Module,
    tokenizer: Any,
    texts: Sequence[str],
    *,
    max_length: int = 1024,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    prefix_token_id: int | None = None,
) -> dict[str, float]:
    """Bits per byte of a causal LM on ``texts`` (module docstring).

    Each text is tokenised as the model sees it (its BOS kept; a tokenizer that adds none
    gets ``prefix_token_id``, default its BOS, else its EOS, in front, so the first text
    token is scored too), cut by :func:`scoring_windows`, and every text token's NLL summed.

    Returns:
        ``{"bits_per_byte", "nll_nats", "bytes", "tokens", "perplexity"}`` — ``tokens``
        scored and their perplexity, for reference.
    """
    wrapped = SpanTokenizer(tokenizer, "tokenizer")
    pad = getattr(tokenizer, "pad_token_id", None)
    pad = 0 if pad is None else int(pad)
    windows: list[list[int]] = []
    num_bytes = 0
    for text in texts:
        data = len(text.encode("utf-8"))
        if data == 0:
            continue
        num_bytes += data
        windows.extend(scoring_windows(_scored_ids(wrapped, text, prefix_token_id), max_length))
    if not windows:
        raise ValueError("no text to score: every text is empty")
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    try:
        for i in range(0, len(windows), batch_size):
            ids, mask = pad_right(windows[i : i + batch_size], pad)
            ids, mask = ids.to(device), mask.to(device)
            logits = output_logits(call_model(model, {"input_ids": ids, "attention_mask": mask}))
            targets = ids[:, 1:]  # (B, T-1)
            counted = mask[:, 1:].bool()
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
            token_nll = -logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T-1)
            nll += float(token_nll[counted].double().sum())
            tokens += int(counted.sum())
    finally:
        model.train(was_training)
    return {
        "bits_per_byte": bits_per_byte(nll, num_bytes),
        "nll_nats": nll,
        "bytes": float(num_bytes),
        "tokens": float(tokens),
        "perplexity": math.exp(min(nll / max(tokens, 1), 700.0)),
    }
