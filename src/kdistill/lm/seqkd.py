"""Sequence-level KD and GKD-style on-policy distillation for causal language models.

**Sequence-level KD** (Kim & Rush 2016, "Sequence-Level Knowledge Distillation"): instead
of matching the teacher's per-token distributions, the student is trained with plain
cross-entropy on the teacher's *outputs* — ``ŷ = argmax_y p_teacher(y | x)``, approximated
by greedy or beam search (sampling is also offered, as in Alpaca/Vicuna-style
teacher-generated data). :func:`generate_completions` runs ``model.generate`` on
left-padded prompts; :func:`build_seqkd_examples` turns prompts and the teacher's
completions into ``{"input_ids": prompt + completion, "prompt_length": len(prompt)}``
examples, whose prompt tokens :class:`~kdistill.lm.batches.CausalLMCollator` masks
(``-100``), so the loss ``−Σ_t log q(ŷ_t | x, ŷ_<t)`` counts completion tokens only.

**On-policy mixing** (Agarwal et al. 2024, "On-Policy Distillation of Language Models:
Learning from Self-Generated Mistakes", GKD): with probability ``λ`` a batch's completions
are replaced by the *student's* own samples ``y ~ q(· | x)``, generated without gradients;
the teacher scores them and the loss is a token-level divergence — GKD's generalised JSD
(β) by default, :class:`~kdistill.lm.losses.TokenKDLoss` — on the completion tokens only.
``λ = 0`` is supervised KD on the fixed completions (ground truth or teacher-generated),
``λ = 1`` is fully on-policy. :class:`OnPolicyLoader` makes the choice per batch from a
generator seeded by ``(seed, epoch)`` and samples under a per-batch seed, so an epoch is
reproducible and a resumed run redraws exactly what an uninterrupted one drew. As in GKD
(and TRL's ``GKDTrainer``), no gradient flows through the sampling: the sampled tokens are
data.

Prompts are lists of token ids. For generation they are padded **on the left** (decoder-only
models continue from the last position; HF derives position ids from the attention mask);
training batches are right-padded by the collator.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from kdistill.data.loader import epoch_generator
from kdistill.lm.batches import CausalLMCollator, Example, ExampleLoader

__all__ = [
    "STRATEGIES",
    "GenerationSettings",
    "OnPolicyLoader",
    "build_seqkd_examples",
    "generate_completions",
    "left_pad",
]

STRATEGIES = ("greedy", "beam", "sample")


@dataclass(frozen=True)
class GenerationSettings:
    """How completions are decoded.

    Args:
        strategy: ``"greedy"`` (argmax each step), ``"beam"`` (``num_beams`` beams, Kim &
            Rush's approximation of the mode) or ``"sample"`` (``temperature``, ``top_k``,
            ``top_p``; GKD samples the student at temperature 1).
        max_new_tokens: tokens generated after each prompt (fewer when EOS comes first).
        num_beams: beams for ``"beam"``.
        temperature / top_k / top_p: sampling only; ``top_k = 0`` and ``top_p = 1`` disable
            those filters.
    """

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    max_new_tokens: int = 32
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.strategy == "beam" and self.num_beams < 2:
            raise ValueError(f"beam search needs num_beams >= 2, got {self.num_beams}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got {self.top_k}, {self.top_p}")

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``transformers`` ``generate`` for these settings."""
        kwargs: dict[str, Any] = {"max_new_tokens": self.max_new_tokens}
        if self.strategy == "greedy":
            kwargs.update(do_sample=False, num_beams=1)
        elif self.strategy == "beam":
            kwargs.update(do_sample=False, num_beams=self.num_beams, early_stopping=True)
        else:
            kwargs.update(
                do_sample=True,
                num_beams=1,
                temperature=self.temperature,
                top_k=self.top_k,
                top_p=self.top_p,
            )
        return kwargs


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int) -> tuple[Tensor, Tensor]:
    """Left-pad prompts into ``(input_ids, attention_mask)`` ``(B, P)`` for generation."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token (e.g. a BOS token)")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = torch.as_tensor(list(prompt), dtype=torch.long)
        mask[i, width - len(prompt) :] = 1
    return ids, mask


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@torch.no_grad()
def generate_completions(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[list[int]]:
    """Decode a completion for every prompt with ``model.generate`` (HF decoder-only LM).

    Prompts are left-padded (:func:`left_pad`) in batches of ``batch_size``; the model runs
    in eval mode without gradients (its mode is restored). Each completion is the new
    tokens only, cut after the first ``eos_token_id`` (kept: the student learns to stop);
    without an EOS every completion has exactly ``max_new_tokens`` tokens.

    Args:
        model: a ``transformers`` causal LM (anything with ``generate``).
        prompts: token-id lists, each non-empty.
        settings: decoding strategy and length (default greedy, 32 tokens).
        pad_token_id: id for padding (may equal ``eos_token_id``).
        eos_token_id: end-of-sequence id, or ``None`` to always generate the full length.
        batch_size: prompts per ``generate`` call.
        seed: for ``"sample"``: seeds torch's RNG inside a forked RNG state, so the result
            depends only on ``seed`` and the global RNG is left untouched.

    Returns:
        One list of token ids per prompt, in order.
    """
    settings = settings or GenerationSettings()
    if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
        raise ValueError(
            "generate_completions is for decoder-only models; an encoder-decoder's outputs "
            "do not continue its inputs"
        )
    if not hasattr(model, "generate"):
        raise TypeError(f"{type(model).__name__} has no generate(); use a transformers causal LM")
    generate: Any = model.generate
    device = _model_device(model)
    devices = [device] if device.type == "cuda" else []
    was_training = model.training
    model.eval()
    completions: list[list[int]] = []
    try:
        with torch.random.fork_rng(devices=devices, enabled=seed is not None):
            if seed is not None:
                torch.manual_seed(seed)
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                ids, mask = left_pad(chunk, pad_token_id)
                out = generate(  # (b, P + new)
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    pad_token_id=pad_token_id,
                    eos_token_id=eos_token_id,
                    **settings.generate_kwargs(),
                )
                for row in out[:, ids.shape[1] :].tolist():
                    if eos_token_id is not None and eos_token_id in row:
                        row = row[: row.index(eos_token_id) + 1]
                    completions.append(row)
    finally:
        model.train(was_training)
    return completions


def build_seqkd_examples(
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    settings: GenerationSettings | None = None,
    *,
    pad_token_id: int,
    eos_token_id: int | None = None,
    batch_size: int = 16,
    seed: int | None = None,
) -> list[dict[str, Any]]:
    """Sequence-level KD data: each prompt followed by the teacher's decoded completion.

    Returns ``[{"input_ids": prompt + completion, "prompt_length": len(prompt)}, ...]``;
    collated by :class:`~kdistill.lm.batches.CausalLMCollator`, only completion tokens are
    targets. Train the student on them with
    :class:`~kdistill.lm.losses.TokenCrossEntropy` (Kim & Rush's word-level loss on
    teacher outputs) and optionally a token-level KD term as well.
    """
    completions = generate_completions(
        teacher,
        prompts,
        settings,
        pad_token_id=pad_token_id,
        eos_token_id=eos_token_id,
        batch_size=batch_size,
        seed=seed,
    )
    return [
        {"input_ids": [*prompt, *completion], "prompt_length": len(prompt)}
        for prompt, completion in zip(prompts, completions, strict=True)
    ]


class OnPolicyLoader:
    """Prompt + completion batches; with probability ``lam`` the student writes the completions.

    For each batch of examples (``{"input_ids", "prompt_length"}``, e.g. from
    :func:`build_seqkd_examples` or ground-truth data) a coin with ``P(heads) = lam`` is
    drawn from the ``(seed, epoch)`` generator. Heads: the prompts are decoded by the
    *student* (``student_settings``, sampling at T = 1 by default, without gradients, in
    eval mode) and those completions replace the batch's; tails: the batch is kept. The
    batch is then collated (right padding, prompt masked). Each batch dict also holds
    ``"on_policy"`` (a 0-dim bool tensor), which the Trainer ignores.

    Pair it with a :class:`~kdistill.distiller.Distiller` whose term is
    ``TokenKDLoss(kind="jsd", beta=β)`` against the live teacher: GKD's objective.

    Args:
        examples: the fixed (off-policy) data.
        student: the model being trained (its ``generate`` is used on heads only).
        lam: on-policy fraction ``λ`` in ``[0, 1]``; ``0`` never calls the student's
            ``generate``, ``1`` always does.
        collate: usually :class:`~kdistill.lm.batches.CausalLMCollator`.
        batch_size / shuffle / drop_last / seed: as for :class:`ExampleLoader`.
        student_settings: decoding of the student's samples (default: sampling, T = 1,
            ``max_new_tokens`` 32).
        pad_token_id / eos_token_id: as for :func:`generate_completions`.
    """

    def __init__(
        self,
        examples: Sequence[Example],
        student: nn.Module,
        lam: float,
        collate: CausalLMCollator,
        batch_size: int,
        *,
        pad_token_id: int,
        eos_token_id: int | None = None,
        student_settings: GenerationSettings | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        seed: int = 0,
    ) -> None:
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam (the on-policy fraction λ) must be in [0, 1], got {lam}")
        for i, example in enumerate(examples):
            if int(example.get("prompt_length", 0)) < 1:
                raise ValueError(
                    f"example {i} has no prompt (prompt_length < 1); on-policy sampling "
                    "needs a prompt to continue"
                )
        self.examples = ExampleLoader(examples, collate, batch_size, shuffle, drop_last, seed)
        self.student = student
        self.lam = float(lam)
        self.collate = collate
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.student_settings = student_settings or GenerationSettings(strategy="sample")
        self.seed = seed
        self.epoch = 0
        self.start_step = 0
        self.on_policy_batches = 0  # how many batches the student has written (all epochs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.start_step = 0
        self.examples.set_epoch(epoch)

    def set_start_step(self, step: int) -> None:
        if not 0 <= step <= len(self):
            raise ValueError(f"start step must be in [0, {len(self)}], got {step}")
        self.start_step = step

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        order = epoch_generator(self.seed, self.epoch)
        coins = random.Random(f"on-policy/{self.seed}/{self.epoch}")
        for step, chunk in enumerate(self.examples.batches(order)):
            heads = coins.random() < self.lam  # drawn for skipped batches too
            if step < self.start_step:
                continue
            if heads:
                chunk = self._student_completions(chunk, step)
                self.on_policy_batches += 1
            batch = self.collate(chunk)
            batch["on_policy"] = torch.tensor(heads)
            yield batch

    def _student_completions(self, chunk: list[Example], step: int) -> list[Example]:
        prompts = [list(ex["input_ids"])[: int(ex["prompt_length"])] for ex in chunk]
        completions = generate_completions(
            self.student,
            prompts,
            self.student_settings,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            batch_size=len(prompts),
            seed=(self.seed * 1_000_003 + self.epoch) * 100_003 + step,
        )
        return [
            {"input_ids": [*prompt, *completion], "prompt_length": len(prompt)}
            for prompt, completion in zip(prompts, completions, strict=True)
        ]
