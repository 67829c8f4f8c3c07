"""The fused token-KD objective of ``kdistill lm`` (``distill.fused``): one pass, no student logits.

:class:`FusedTokenKD` is a :class:`~kdistill.trainer.TrainableModel` (what the
:class:`~kdistill.trainer.Trainer` trains, in place of a :class:`~kdistill.distiller.Distiller`)
whose ``forward`` computes the whole token objective

    L = alpha · D(p_t ‖ q_s) + (1 − alpha) · CE(q_s, y)

(Hinton et al. 2015 per token; ``D`` any :data:`~kdistill.lm.divergences.KINDS` divergence,
GKD's generalised JSD included, Agarwal et al. 2024) from the student's final hidden states
``h`` ``(B, T, H)`` and its ``lm_head`` weight ``W`` ``(V, H)``
(:func:`~kdistill.lm.fused.causal_lm_head_inputs`), chunk by chunk of tokens, so the student's
``(B, T, V)`` logits never exist (Liger-Kernel's fused linear JSD, Hsu et al. 2024). The
teacher is either

* live (same tokenizer): its final hidden states and ``lm_head`` under ``no_grad``, projected
  per chunk too (:func:`~kdistill.lm.fused.fused_linear_divergence`), or
* a cached top-k (``teacher_outputs["topk"]``, :func:`~kdistill.lm.topk.pack_topk`):
  :func:`~kdistill.lm.fused.fused_topk_divergence`.

Same values and gradients as the plain Distiller terms (``TokenKDLoss`` / ``TopKTokenKDLoss``
with weight ``alpha`` plus ``TokenCrossEntropy`` with ``1 − alpha``). The frozen teacher is
held outside the module tree, so DDP (which wraps this module whole) never sees it and the
checkpoints hold the student only, under the same ``student.`` keys as the plain run's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.distiller import ATTENTION_MASK, IGNORE_INDEX, freeze, untie_shared_tensors
from kdistill.lm.fused import causal_lm_head_inputs, fused_linear_divergence, fused_topk_divergence
from kdistill.lm.topk import TOPK, unpack_topk

__all__ = ["FusedTokenKD"]


class FusedTokenKD(nn.Module):
    """``alpha · D + (1 − alpha) · CE`` of a causal LM from its hidden states, fused.

    Args:
        student: a Hugging Face causal LM (``get_decoder()`` / ``get_output_embeddings()``;
            a LoRA-wrapped one too); the only module of this one's tree.
        teacher: the live frozen teacher (same tokenizer), or ``None`` for a cached top-k
            teacher read from ``teacher_outputs["topk"]`` (``(B, T', 2k + 1)``, ``T' ≥ T``).
        kind, beta, skew_alpha, temperature: the divergence (:func:`fused_linear_divergence`).
        alpha: weight of the KD term; ``1 − alpha`` on the cross-entropy (``alpha = 1``: KD
            alone, as GKD). Must be ``> 0`` (``alpha = 0`` has no teacher term to fuse).
        chunk_size, chunk_bytes: the chunking (rows, or a byte budget; default the budget).

    ``forward(inputs, target, teacher_outputs=None, index=None, extras=None)`` — ``inputs``
    the batch's model inputs (``input_ids``, ``attention_mask``), ``target`` ``(B, T)`` the
    aligned next-token labels (``-100`` ignored) — returns ``{"loss", "kd_loss"[, "ce_loss"],
    "logits": None}`` (no logits: the Trainer then logs no train accuracy). Under torchrun
    each rank's loss is scaled by ``N · n_r / Σ_r n_r`` (``n_r`` its counted tokens), so
    DDP's gradient average is the global token mean (as the plain terms' ``_GlobalTokenMean``).
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        *,
        kind: str = "forward_kl",
        beta: float = 0.5,
        skew_alpha: float = 0.1,
        temperature: float = 1.0,
        alpha: float = 0.5,
        chunk_size: int | None = None,
        chunk_bytes: int | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < alpha <= 1.0:
            raise ValueError(
                f"alpha must be in (0, 1] (weight of the KD term), got {alpha}; alpha = 0 "
                "trains on cross-entropy alone: use the plain path"
            )
        self.student = student
        self.terms = nn.ModuleList()  # no loss-term adapters (what the Checkpointer reads)
        # held outside the module tree: not wrapped by DDP, not in state dicts or parameters()
        object.__setattr__(self, "teacher", None if teacher is None else freeze(teacher))
        self.kind, self.beta, self.skew_alpha = kind, beta, skew_alpha
        self.temperature, self.alpha = temperature, alpha
        self.chunk_size, self.chunk_bytes = chunk_size, chunk_bytes
        self.progress = 0.0

    # -- the TrainableModel protocol ----------------------------------------------------

    def train(self, mode: bool = True) -> FusedTokenKD:
        """Student in ``mode``; the teacher always in eval."""
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def _apply(self, fn: Callable[..., Any], recurse: bool = True) -> FusedTokenKD:
        """``.to(device)`` / ``.half()`` move the held-outside teacher too, like a Distiller's."""
        super()._apply(fn, recurse)
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return self

    def set_progress(self, epoch: float) -> None:
        self.progress = float(epoch)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's parameters that take gradients (the teacher is not in the tree)."""
        return (p for p in self.student.parameters() if p.requires_grad)

    def trainable_state_dict(self) -> dict[str, Tensor]:
        """``student.<name>`` tensors only — the keys of the plain run's checkpoints."""
        state = {f"student.{k}": v for k, v in self.student.state_dict().items()}
        return untie_shared_tensors(state)

    def load_trainable_state_dict(self, state: Mapping[str, Tensor]) -> None:
        unknown = sorted(k for k in state if not k.startswith("student."))
        if unknown:
            raise KeyError(f"not student weights: {unknown[:5]} (the fused run has no adapters)")
        self.student.load_state_dict({k[len("student.") :]: v for k, v in state.items()})

    # -- forward ------------------------------------------------------------------------

    @property
    def parts(self) -> list[str]:
        """The logged parts: ``kd`` always, ``ce`` when ``alpha < 1`` (the plain terms')."""
        return ["kd", "ce"] if self.alpha < 1 else ["kd"]

    def _teacher_head(self, inputs: Mapping[str, Any]) -> dict[str, Tensor | None]:
        assert self.teacher is not None
        with torch.no_grad():
            hidden, weight, bias = causal_lm_head_inputs(self.teacher, inputs)  # (B, T, H_t)
        return {"teacher_hidden": hidden, "teacher_weight": weight, "teacher_bias": bias}

    def forward(
        self,
        inputs: Mapping[str, Any],
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
        extras: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        if target is None:
            raise ValueError("FusedTokenKD needs the batch's aligned next-token labels (target)")
        hidden, weight, bias = causal_lm_head_inputs(self.student, inputs)  # (B, T, H), (V, H)
        mask = inputs.get(ATTENTION_MASK)
        common: dict[str, Any] = {
            "temperature": self.temperature,
            "beta": self.beta,
            "skew_alpha": self.skew_alpha,
            "labels": target,
            "mask": None if mask is None else mask.bool(),
            "chunk_size": self.chunk_size,
            "chunk_bytes": self.chunk_bytes,
            "kd_weight": self.alpha,
            "ce_weight": 1.0 - self.alpha,
            "return_parts": True,
        }
        if self.teacher is None:  # the cached top-k teacher, (B, T', 2k + 1) with T' >= T
            if teacher_outputs is None or TOPK not in teacher_outputs:
                raise ValueError(
                    "FusedTokenKD without a live teacher reads the cached top-k teacher: the "
                    f"batch needs teacher_outputs[{TOPK!r}] (kdistill.lm.topk.pack_topk)"
                )
            values, ids, rest = unpack_topk(teacher_outputs[TOPK][:, : hidden.shape[1]])
            loss, kd, ce = fused_topk_divergence(
                hidden, weight, bias, values, ids, rest, self.kind, **common
            )
        else:
            loss, kd, ce = fused_linear_divergence(
                hidden, weight, None, self.kind, student_bias=bias,
                **self._teacher_head(inputs), **common,
            )  # fmt: skip
        out: dict[str, Any] = {"loss": loss * _global_token_scale(target, loss), "kd_loss": kd}
        if self.alpha < 1:
            out["ce_loss"] = ce
        out["logits"] = None  # never formed
        return out

    def extra_repr(self) -> str:
        source = "top-k cache" if self.teacher is None else "live teacher"
        return f"kind={self.kind!r}, alpha={self.alpha}, teacher={source}"


def _global_token_scale(labels: Tensor, like: Tensor) -> Tensor | float:
    """``N · n_r / Σ_r n_r`` under torchrun (1 in one process): see :class:`FusedTokenKD`."""
    if distributed.world_size() == 1:
        return 1.0
    counted = (labels != IGNORE_INDEX).sum().to(torch.float64)
    total = distributed.all_sum(counted)
    scale = counted * distributed.world_size() / total.clamp_min(1.0)
    return scale.to(like.dtype)
