"""DistilBERT's triple loss and its masked-LM collator (Sanh et al. 2019).

Sanh, Debut, Chaumond & Wolf 2019, "DistilBERT, a distilled version of BERT: smaller,
faster, cheaper and lighter", train the student on masked-LM data with a linear
combination of three losses::

    L = α_kd · T² · KL(softmax(z_t / T) ‖ softmax(z_s / T))     soft-target KD  ("ce")
      + α_mlm · CE(y_masked, softmax(z_s))                       masked-LM       ("mlm")
      + α_cos · (1 − cos(h_s, h_t))                              hidden states   ("cos")

The paper gives no numbers for the weights; the reference implementation's README
(``huggingface/transformers``, ``examples/research_projects/distillation``) trains
DistilBERT with ``--alpha_ce 5.0 --alpha_mlm 2.0 --alpha_cos 1.0 --alpha_clm 0.0 --mlm``
and ``train.py``'s default ``--temperature 2.0``: :data:`DISTILBERT_WEIGHTS`,
:data:`DISTILBERT_TEMPERATURE`. Choices made as in that code:

* The KD term is the mean over **all non-padding tokens** (``attention_mask == 1``) —
  its default; ``restrict_ce_to_mask`` limits it to the masked positions
  (``restrict_to_masked=True`` here). ``nn.KLDivLoss(reduction="batchmean")`` on the
  selected ``(N, V)`` rows is a mean over tokens, times ``T²`` (Hinton's scaling).
* The MLM term is cross-entropy over the masked positions only (labels ``-100``
  elsewhere).
* The cosine term compares the **last layer's** hidden states ``(B, T, H)`` of student
  and teacher (same width), averaged over non-padding tokens — ``nn.CosineEmbeddingLoss``
  with target 1.
* Masking (:func:`mask_tokens`): 15 % of the non-special, non-padding tokens are
  selected; of those 80 % become ``[MASK]``, 10 % a random token, 10 % stay (BERT's
  80/10/10). Each token is selected independently (Bernoulli, as Hugging Face's
  ``DataCollatorForLanguageModeling``); the reference code instead draws exactly
  ``ceil(15 % · tokens)`` positions with frequency-smoothed probabilities
  (``mlm_smoothing = 0.7``), which we do not reproduce.

:func:`distilbert_loss` is the whole objective on tensors; :func:`distilbert_terms` gives
the same three terms as :class:`~kdistill.distiller.LossTerm` s for a
:class:`~kdistill.distiller.Distiller` over Hugging Face models, with the hidden states read
by hook from the last layer (:func:`last_layer_name`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.distiller import IGNORE_INDEX, LossTerm
from kdistill.lm.batches import Example, pad_right
from kdistill.lm.divergences import token_divergence
from kdistill.lm.losses import TokenCrossEntropy, token_cross_entropy
from kdistill.losses.cosine import cosine_loss

__all__ = [
    "DISTILBERT_TEMPERATURE",
    "DISTILBERT_WEIGHTS",
    "HiddenCosineLoss",
    "MLMCollator",
    "SoftTargetKDLoss",
    "distilbert_loss",
    "distilbert_terms",
    "hidden_cosine_loss",
    "last_layer_name",
    "mask_tokens",
    "soft_target_kd_loss",
]

DISTILBERT_WEIGHTS: dict[str, float] = {"kd": 5.0, "mlm": 2.0, "cos": 1.0}
"""``alpha_ce``, ``alpha_mlm``, ``alpha_cos`` of the reference DistilBERT training command."""

DISTILBERT_TEMPERATURE = 2.0
"""The reference ``train.py``'s default softmax temperature."""


# --------------------------------------------------------------------------- masking


def mask_tokens(
    input_ids: Tensor,
    attention_mask: Tensor,
    *,
    mask_token_id: int,
    vocab_size: int,
    special_token_ids: Sequence[int] = (),
    probability: float = 0.15,
    mask_fraction: float = 0.8,
    random_fraction: float = 0.1,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """BERT-style masking: ``(masked_input_ids, labels)``, both ``(B, T)``.

    Each real (``attention_mask == 1``), non-special token is selected with probability
    ``probability``; ``labels`` hold its original id there and ``-100`` elsewhere. A
    selected token becomes ``mask_token_id`` with probability ``mask_fraction``, a
    uniformly random id in ``[0, vocab_size)`` with probability ``random_fraction``, and
    stays itself otherwise (one uniform draw per position decides).
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"probability must be in [0, 1], got {probability}")
    if mask_fraction < 0 or random_fraction < 0 or mask_fraction + random_fraction > 1:
        raise ValueError(
            f"need mask_fraction, random_fraction >= 0 with sum <= 1, got "
            f"{mask_fraction} + {random_fraction}"
        )
    special = torch.as_tensor(list(special_token_ids), dtype=input_ids.dtype)
    candidates = attention_mask.bool() & ~torch.isin(input_ids, special)
    select_draw = torch.rand(input_ids.shape, generator=generator)
    kind_draw = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(
        0, vocab_size, input_ids.shape, dtype=input_ids.dtype, generator=generator
    )
    selected = candidates & (select_draw < probability)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)
    to_mask = selected & (kind_draw < mask_fraction)
    to_random = (
        selected & (kind_draw >= mask_fraction) & (kind_draw < mask_fraction + random_fraction)
    )
    masked = torch.where(to_mask, mask_token_id, input_ids)
    masked = torch.where(to_random, random_ids, masked)
    return masked, labels


@dataclass
class MLMCollator:
    """Collate tokenised examples into masked-LM batches for the Trainer.

    Right-pads ``input_ids`` (truncated to ``max_length``), masks them with
    :func:`mask_tokens` and returns ``{"inputs": {"input_ids", "attention_mask"},
    "target": labels}``; teacher and student both see the masked ids (as in DistilBERT).
    Called as ``collator(examples, generator)`` by
    :class:`~kdistill.lm.batches.ExampleLoader` (``takes_generator=True``), so the masks
    of an epoch depend only on ``(seed, epoch)``.
    """

    pad_token_id: int
    mask_token_id: int
    vocab_size: int
    special_token_ids: list[int] = field(default_factory=list)
    max_length: int | None = None
    probability: float = 0.15
    mask_fraction: float = 0.8
    random_fraction: float = 0.1

    def __call__(
        self, examples: Sequence[Example], generator: torch.Generator | None = None
    ) -> dict[str, Any]:
        seqs = [list(ex["input_ids"])[: self.max_length] for ex in examples]
        input_ids, attention_mask = pad_right(seqs, self.pad_token_id)
        masked, labels = mask_tokens(
            input_ids,
            attention_mask,
            mask_token_id=self.mask_token_id,
            vocab_size=self.vocab_size,
            special_token_ids=sorted({*self.special_token_ids, self.pad_token_id}),
            probability=self.probability,
            mask_fraction=self.mask_fraction,
            random_fraction=self.random_fraction,
            generator=generator,
        )
        return {
            "inputs": {"input_ids": masked, "attention_mask": attention_mask},
            "target": labels,
        }


# --------------------------------------------------------------------------- the three losses


def _kd_mask(labels: Tensor | None, attention_mask: Tensor | None, restrict: bool) -> Tensor | None:
    if restrict:
        if labels is None:
            raise ValueError("restrict_to_masked=True needs the MLM labels")
        return labels != IGNORE_INDEX
    return None if attention_mask is None else attention_mask.bool()


def soft_target_kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = DISTILBERT_TEMPERATURE,
    attention_mask: Tensor | None = None,
    labels: Tensor | None = None,
    restrict_to_masked: bool = False,
    chunk_size: int | None = None,
) -> Tensor:
    """DistilBERT's ``L_ce``: ``T² · mean_t KL(softmax(z_t,t/T) ‖ softmax(z_s,t/T))``.

    Args:
        student_logits / teacher_logits: ``(B, T, V)``.
        temperature: ``T``; the ``T²`` factor is included (Hinton's scaling, as in the
            reference code).
        attention_mask: ``(B, T)``; the mean is over its non-zero tokens (the default
            of the reference code). ``None`` = every token.
        labels: ``(B, T)`` MLM labels; with ``restrict_to_masked=True`` only the masked
            positions (``labels != -100``) count.
        chunk_size: tokens per chunk of :func:`~kdistill.lm.divergences.token_divergence`.
    """
    mask = _kd_mask(labels, attention_mask, restrict_to_masked)
    kl = token_divergence(
        student_logits,
        teacher_logits,
        "forward_kl",
        temperature=temperature,
        mask=mask,
        chunk_size=chunk_size,
    )
    return kl * temperature**2


def hidden_cosine_loss(
    student_hidden: Tensor, teacher_hidden: Tensor, attention_mask: Tensor | None = None
) -> Tensor:
    """DistilBERT's ``L_cos``: mean over non-padding tokens of ``1 − cos(h_s, h_t)``.

    ``student_hidden`` / ``teacher_hidden`` ``(B, T, H)``; ``attention_mask`` ``(B, T)``.
    """
    mask = None if attention_mask is None else attention_mask.bool()
    return cosine_loss(student_hidden, teacher_hidden, mask)


def distilbert_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    labels: Tensor,
    attention_mask: Tensor,
    *,
    temperature: float = DISTILBERT_TEMPERATURE,
    weights: Mapping[str, float] = DISTILBERT_WEIGHTS,
    restrict_to_masked: bool = False,
) -> dict[str, Tensor]:
    """The triple loss ``α_kd · L_kd + α_mlm · L_mlm + α_cos · L_cos`` on tensors.

    Args:
        student_logits / teacher_logits: MLM logits ``(B, T, V)`` on the masked inputs.
        student_hidden / teacher_hidden: last-layer hidden states ``(B, T, H)``.
        labels: ``(B, T)`` MLM labels (``-100`` where not masked).
        attention_mask: ``(B, T)``, 1 on real tokens.
        temperature: ``T`` of the KD term (``T²`` included).
        weights: ``{"kd", "mlm", "cos"}`` (default 5 / 2 / 1).
        restrict_to_masked: KD on masked positions only instead of all real tokens.

    Returns:
        ``{"loss", "kd", "mlm", "cos"}`` — the weighted total and the unweighted parts.
    """
    missing = {"kd", "mlm", "cos"} - set(weights)
    if missing:
        raise ValueError(f"weights needs keys kd, mlm, cos; missing {sorted(missing)}")
    parts = {
        "kd": soft_target_kd_loss(
            student_logits,
            teacher_logits,
            temperature=temperature,
            attention_mask=attention_mask,
            labels=labels,
            restrict_to_masked=restrict_to_masked,
        ),
        "mlm": token_cross_entropy(student_logits, labels),
        "cos": hidden_cosine_loss(student_hidden, teacher_hidden, attention_mask),
    }
    total = sum(weights[k] * v for k, v in parts.items())
    return {"loss": total, **parts}  # type: ignore[dict-item]


class SoftTargetKDLoss(nn.Module):
    """Module form of :func:`soft_target_kd_loss` for a Distiller term (gets labels and mask)."""

    requires_target = True
    requires_mask = True

    def __init__(
        self,
        temperature: float = DISTILBERT_TEMPERATURE,
        restrict_to_masked: bool = False,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.restrict_to_masked = restrict_to_masked
        self.chunk_size = chunk_size

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor,
        labels: Tensor | None = None,
        mask: Tensor | None = None,
    ) -> Tensor:
        return soft_target_kd_loss(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            attention_mask=mask,
            labels=labels,
            restrict_to_masked=self.restrict_to_masked,
            chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, restrict_to_masked={self.restrict_to_masked}"


class HiddenCosineLoss(nn.Module):
    """Module form of :func:`hidden_cosine_loss`; gets the attention mask as ``mask=``."""

    requires_mask = True
    same_shape = True

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
        return hidden_cosine_loss(student, teacher, mask)


# --------------------------------------------------------------------------- Distiller terms

_LAYER_LIST = re.compile(r"^(.*\.)?(layer|layers|h|block|blocks)\.(\d+)$")


def last_layer_name(model: nn.Module) -> str:
    """Name of the last transformer block of an HF-style model, for a hidden-state tap.

    Looks for numbered children of a layer list — ``bert.encoder.layer.5``,
    ``model.layers.29``, ``transformer.h.11`` — and returns the highest-numbered one. Its
    output (first element of the tuple) is the last layer's hidden states ``(B, T, H)``.

    Raises:
        ValueError: no such layer list is found (name the layer yourself).
    """
    best: tuple[int, str] | None = None
    for name, _ in model.named_modules():
        match = _LAYER_LIST.match(name)
        if match:
            index = int(match.group(3))
            if best is None or index > best[0]:
                best = (index, name)
    if best is None:
        raise ValueError(
            f"cannot find a numbered layer list (…layer.N, …layers.N, …h.N) in "
            f"{type(model).__name__}; pass the hidden-state layer name explicitly"
        )
    return best[1]


def distilbert_terms(
    student_layer: str,
    teacher_layer: str,
    *,
    temperature: float = DISTILBERT_TEMPERATURE,
    weights: Mapping[str, float] = DISTILBERT_WEIGHTS,
    restrict_to_masked: bool = False,
    chunk_size: int | None = None,
) -> list[LossTerm]:
    """The triple loss as three Distiller terms: ``kd``, ``mlm`` and ``cos``.

    ``student_layer`` / ``teacher_layer`` name the modules whose outputs are the
    last hidden states (e.g. :func:`last_layer_name` of each model). With a
    :class:`~kdistill.distiller.Distiller` over HF masked-LM models and
    :class:`MLMCollator` batches, the distiller's loss equals :func:`distilbert_loss`.
    """
    return [
        LossTerm(
            "kd",
            SoftTargetKDLoss(temperature, restrict_to_masked, chunk_size),
            weight=weights["kd"],
        ),
        LossTerm("mlm", TokenCrossEntropy(), weight=weights["mlm"], teacher=None),
        LossTerm(
            "cos",
            HiddenCosineLoss(),
            weight=weights["cos"],
            student=student_layer,
            teacher=teacher_layer,
        ),
    ]
