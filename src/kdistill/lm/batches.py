"""Language-model batches for the :class:`~kdistill.trainer.Trainer`, and running HF models.

A tokenised example is a mapping with ``input_ids`` (a list of token ids) and, for
instruction / prompt-completion data, ``prompt_length`` (how many leading ids are the
prompt). :class:`CausalLMCollator` pads a list of them **on the right** into the dict batch
the Trainer and :class:`~kdistill.distiller.Distiller` take::

    {"inputs": {"input_ids": (B, T), "attention_mask": (B, T)}, "target": labels (B, T)}

**Labels are aligned with the logits.** The causal-LM shift happens exactly once, in
:func:`causal_lm_labels`: ``labels[b, t]`` is the token the model should predict *at*
position ``t``, i.e. ``input_ids[b, t + 1]``, and :data:`IGNORE_INDEX` (``-100``) where
position ``t + 1`` is padding, a prompt token, or past the end. So the student's logits
``(B, T, V)``, the teacher's logits and the labels line up position by position, and every
loss (cross-entropy, :func:`~kdistill.lm.divergences.token_divergence`, accuracy,
perplexity) uses them unshifted. Do not pass these labels to a Hugging Face model's own
``labels=`` argument, which would shift them a second time. Masked-LM labels
(:mod:`kdistill.lm.distilbert`) need no shift and are aligned by construction.

Models are called with :func:`kdistill.distiller.call_model` (``model(**inputs)``) and their
logits read with :func:`kdistill.distiller.output_logits` (``ModelOutput.logits``); inner
layers (``"model.layers.1"``, ``"bert.encoder.layer.2"``) come from forward hooks
(:class:`kdistill.taps.FeatureTaps`, which unwraps the tuples HF layers return), so HF
teachers and students are used unmodified. :func:`model_outputs` does all three at once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.data.loader import epoch_generator
from kdistill.distiller import IGNORE_INDEX, LOGITS, Inputs, call_model, output_logits
from kdistill.lm.losses import token_cross_entropy
from kdistill.taps import FeatureTaps

__all__ = [
    "IGNORE_INDEX",
    "ByteTokenizer",
    "CausalLMCollator",
    "ExampleLoader",
    "causal_lm_labels",
    "evaluate_lm",
    "model_outputs",
    "pad_right",
]

Example = Mapping[str, Any]
"""``{"input_ids": list[int], "prompt_length": int (optional, default 0), "loss_mask":
list[int] (optional)}``.

``loss_mask`` (0/1, one per id, aligned with ``input_ids``) marks the tokens the model is
trained to *produce*: 1 = token ``t`` is a target (its label sits at position ``t − 1``),
0 = context only. Chat data sets it to 1 on assistant tokens only
(:mod:`kdistill.lm.data`); it combines with ``prompt_length`` (both must allow a target).
"""


# --------------------------------------------------------------------------- tokenizer


class ByteTokenizer:
    """UTF-8 bytes as tokens, for tiny offline runs and tests (no vocabulary file).

    Ids ``0 … 255`` are the bytes; then ``pad``, ``bos``, ``eos`` (and ``mask`` for
    masked-LM objectives): :attr:`vocab_size` is 260. ``encode`` prepends ``bos``.
    """

    pad_token_id = 256
    bos_token_id = 257
    eos_token_id = 258
    mask_token_id = 259
    vocab_size = 260

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = list(text.encode("utf-8"))
        return [self.bos_token_id, *ids] if add_special_tokens else ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        data = bytes(i for i in ids if 0 <= i < 256)
        if not skip_special_tokens:
            names = {256: "<pad>", 257: "<s>", 258: "</s>", 259: "<mask>"}
            return "".join(names.get(i, chr(i)) if i >= 256 else chr(i) for i in ids)
        return data.decode("utf-8", errors="replace")

    @property
    def all_special_ids(self) -> list[int]:
        return [self.pad_token_id, self.bos_token_id, self.eos_token_id, self.mask_token_id]


# --------------------------------------------------------------------------- collation


def pad_right(
    sequences: Sequence[Sequence[int]], pad_value: int, length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-pad token lists into ``(input_ids, attention_mask)``, both ``(B, T)`` int64.

    ``T`` is the longest sequence, or ``length`` when given (sequences longer than it are
    an error: truncate first).
    """
    if not sequences:
        raise ValueError("cannot collate an empty list of examples")
    longest = max(len(s) for s in sequences)
    width = longest if length is None else length
    if longest > width:
        raise ValueError(f"a sequence has {longest} tokens, more than length={width}")
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


def causal_lm_labels(
    input_ids: Tensor,
    attention_mask: Tensor,
    prompt_lengths: Tensor | None = None,
    loss_mask: Tensor | None = None,
) -> Tensor:
    """Labels aligned with causal-LM logits: the one place where the shift happens.

    ``labels[b, t] = input_ids[b, t + 1]`` when position ``t + 1`` is a real token
    (``attention_mask == 1``) that is not part of the prompt (``t + 1 >=
    prompt_lengths[b]``) and is marked as a target (``loss_mask[b, t + 1] == 1``), else
    :data:`IGNORE_INDEX`; the last position is always ignored.
    So logits ``(B, T, V)`` at position ``t`` are scored against ``labels[:, t]`` with no
    further shifting (cf. ``logits[:, :-1]`` vs ``input_ids[:, 1:]`` in HF's loss).

    Args:
        input_ids: ``(B, T)`` right-padded token ids.
        attention_mask: ``(B, T)``, 1 on real tokens; each row ``1 … 1 0 … 0``.
        prompt_lengths: ``(B,)`` number of leading prompt tokens of each row (never
            targets); ``None`` = no prompt, every next token counts.
        loss_mask: ``(B, T)`` 0/1, aligned with ``input_ids``: 1 where the token is a
            target (e.g. an assistant token of a chat); ``None`` = every token may be.

    Returns:
        ``(B, T)`` int64 labels.

    Raises:
        ValueError: shapes differ or a row is not right-padded.
    """
    if input_ids.shape != attention_mask.shape or input_ids.dim() != 2:
        raise ValueError(
            f"input_ids {tuple(input_ids.shape)} and attention_mask "
            f"{tuple(attention_mask.shape)} must both be (B, T)"
        )
    real = attention_mask.bool()
    if not torch.equal(real, real.long().cummin(dim=1).values.bool()):
        raise ValueError(
            "causal_lm_labels expects right padding (each attention_mask row 1…1 0…0); "
            "left padding is only for generation prompts"
        )
    valid = real[:, 1:] & real[:, :-1]  # (B, T-1): target position t+1 is a real token
    if prompt_lengths is not None:
        target_pos = torch.arange(1, input_ids.shape[1], device=input_ids.device)  # (T-1,)
        valid &= target_pos[None, :] >= prompt_lengths.to(input_ids.device)[:, None]
    if loss_mask is not None:
        if loss_mask.shape != input_ids.shape:
            raise ValueError(
                f"loss_mask {tuple(loss_mask.shape)} must have the shape of input_ids "
                f"{tuple(input_ids.shape)}"
            )
        valid &= loss_mask[:, 1:].to(input_ids.device).bool()  # (B, T-1): target is counted
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    labels[:, :-1] = torch.where(valid, input_ids[:, 1:], IGNORE_INDEX)
    return labels


@dataclass
class CausalLMCollator:
    """Collate causal-LM examples into a Trainer batch (right padding, aligned labels).

    Args:
        pad_token_id: id written into padding positions (never a target).
        max_length: truncate each example to its first ``max_length`` tokens (the
            prompt is kept first, so a long prompt leaves few or no targets); ``None``
            keeps everything.

    ``collator(examples)`` → ``{"inputs": {"input_ids", "attention_mask"}, "target":
    labels, "prompt_lengths": (B,)}`` with labels from :func:`causal_lm_labels`. An
    example's optional ``loss_mask`` (see :data:`Example`) is truncated with its ids and
    masks the labels of its 0 tokens; examples without one count every token.
    """

    pad_token_id: int
    max_length: int | None = None

    def __post_init__(self) -> None:
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(
                f"max_length must be >= 2 (a token and its successor), got {self.max_length}"
            )

    def __call__(self, examples: Sequence[Example]) -> dict[str, Any]:
        seqs, prompts, masks = [], [], []
        for i, example in enumerate(examples):
            ids = list(example["input_ids"])
            prompt = int(example.get("prompt_length", 0))
            if not 0 <= prompt <= len(ids):
                raise ValueError(
                    f"example {i}: prompt_length {prompt} is outside [0, {len(ids)}] (its length)"
                )
            given = example.get("loss_mask")
            mask = [1] * len(ids) if given is None else [int(m) for m in given]
            if len(mask) != len(ids) or not set(mask) <= {0, 1}:
                raise ValueError(
                    f"example {i}: loss_mask must be {len(ids)} values 0/1 (one per input id), "
                    f"got {len(mask)} values {sorted(set(mask))[:4]}"
                )
            if self.max_length is not None:
                ids, mask = ids[: self.max_length], mask[: self.max_length]
            seqs.append(ids)
            prompts.append(min(prompt, len(ids)))
            masks.append(mask)
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id)
        prompt_lengths = torch.tensor(prompts, dtype=torch.long)
        loss_mask = None
        if any(example.get("loss_mask") is not None for example in examples):
            loss_mask, _ = pad_right(masks, 0)  # (B, T): padding is never a target
        return {
            "inputs": {"input_ids": input_ids, "attention_mask": attention_mask},
            "target": causal_lm_labels(input_ids, attention_mask, prompt_lengths, loss_mask),
            "prompt_lengths": prompt_lengths,
        }


class ExampleLoader:
    """Batches of collated examples, reproducible per epoch (as :class:`TensorBatchLoader`).

    The order of epoch ``k`` and any randomness of ``collate`` (e.g. MLM masking) depend
    only on ``(seed, k)``: ``collate(examples, generator)`` is called with the epoch's
    generator when it accepts one (``takes_generator=True``). ``set_start_step`` skips
    batches when resuming mid-epoch while still drawing their randomness, so later batches
    are identical to an uninterrupted epoch's. Single-process only.

    Args:
        examples: tokenised examples (see :data:`Example`).
        collate: ``fn(list_of_examples) -> batch dict`` (or ``fn(examples, generator)``).
        batch_size: examples per batch.
        shuffle: new permutation each epoch.
        drop_last: drop a final short batch.
        seed: base seed of the per-epoch generator.
        takes_generator: pass the epoch generator to ``collate``.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        collate: Callable[..., dict[str, Any]],
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int = 0,
        takes_generator: bool = False,
    ) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not examples:
            raise ValueError("ExampleLoader needs at least one example")
        self.examples = list(examples)
        self.collate = collate
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.takes_generator = takes_generator
        self.epoch = 0
        self.start_step = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_step = 0

    def set_start_step(self, step: int) -> None:
        if not 0 <= step <= len(self):
            raise ValueError(f"start step must be in [0, {len(self)}], got {step}")
        self.start_step = step

    def __len__(self) -> int:
        n, b = len(self.examples), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def batches(self, generator: torch.Generator) -> Iterator[list[Example]]:
        """The epoch's lists of examples, drawing the order from ``generator``."""
        n = len(self.examples)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for i in range(len(self)):
            index = order[i * self.batch_size : (i + 1) * self.batch_size].tolist()
            yield [self.examples[j] for j in index]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        generator = epoch_generator(self.seed, self.epoch)
        for i, chunk in enumerate(self.batches(generator)):
            batch = self.collate(chunk, generator) if self.takes_generator else self.collate(chunk)
            if i >= self.start_step:
                yield batch


# --------------------------------------------------------------------------- running models


def model_outputs(
    model: nn.Module, inputs: Inputs, layers: Sequence[str] = ()
) -> dict[str, Tensor]:
    """Run ``model`` once and return its logits and named layers, as the Distiller sees them.

    Returns ``{"logits": (B, T, V), <layer name>: tensor, ...}`` — ``logits`` from
    :func:`~kdistill.distiller.output_logits` (``ModelOutput.logits``, or
    ``last_hidden_state`` for a headless encoder), layers through forward hooks with tuple
    outputs unwrapped (an HF decoder layer gives its hidden states ``(B, T, H)``), plus
    ``last_hidden_state`` when the output has one. Gradients flow as usual; wrap in
    ``torch.no_grad()`` for a teacher.
    """
    with FeatureTaps(model, list(layers)) as taps:
        output = call_model(model, inputs)
        values = taps.pop()
    values[LOGITS] = output_logits(output)
    if isinstance(output, Mapping) and isinstance(output.get("last_hidden_state"), Tensor):
        values.setdefault("last_hidden_state", output["last_hidden_state"])
    return values


@torch.inference_mode()
def evaluate_lm(
    model: nn.Module, loader: Any, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Per-token accuracy, mean cross-entropy (nats) and perplexity over counted labels.

    ``loader`` yields Trainer batches (``{"inputs": {...}, "target": labels}``); tokens with
    ``labels == -100`` do not count. ``perplexity = exp(loss)``. Runs in eval mode and
    restores the mode. Pass as ``Trainer(evaluate_fn=evaluate_lm)``.
    """
    was_training = model.training
    model.eval()
    nll, correct, count = 0.0, 0, 0
    for batch in loader:
        inputs = {k: v.to(device) for k, v in batch["inputs"].items()}
        labels = batch["target"].to(device)
        logits = output_logits(call_model(model, inputs))  # (B, T, V)
        nll += token_cross_entropy(logits, labels, reduction="sum").item()
        counted = labels != IGNORE_INDEX
        correct += ((logits.argmax(-1) == labels) & counted).sum().item()
        count += int(counted.sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("evaluation batches hold no counted token (every label is -100)")
    loss = nll / count
    return {"accuracy": correct / count, "loss": loss, "perplexity": math.exp(min(loss, 700.0))}
