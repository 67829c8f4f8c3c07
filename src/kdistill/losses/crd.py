"""Contrastive Representation Distillation (CRD) with NCE and momentum memory banks.

Tian, Krishnan & Isola 2020, "Contrastive Representation Distillation"
(ICLR), following the authors' RepDistiller ``crd/`` code. Student and
teacher embeddings ``f_s`` ``(B, D_s)`` and ``f_t`` ``(B, D_t)`` are mapped by
linear heads to ``feat_dim`` and L2-normalised::

    v_s = normalize(W_s f_s + b_s),   v_t = normalize(W_t f_t + b_t)       (B, F)

Two memory banks ``M_s``, ``M_t`` ``(num_samples, F)`` hold one (momentum
averaged) embedding per *dataset sample*. For a sample ``i`` (its dataset index)
and ``K`` negative sample indices ``j_1..j_K``, the critic scores are::

    h(v, m) = exp(⟨v, m⟩ / τ) / Z                         τ = nce_t = 0.07

and each direction is trained with the NCE objective (``m = K``, noise
probability ``P_n = 1 / N`` with ``N = num_samples``, ``eps = 1e-7``)::

    nce = −1/B · Σ_b [ log(h_pos / (h_pos + m·P_n + eps))
                       + Σ_k log(m·P_n / (h_neg,k + m·P_n + eps)) ]

    loss = nce(student anchor v_s vs teacher memory M_t[i, j_1..j_K])
         + nce(teacher anchor v_t vs student memory M_s[i, j_1..j_K])

``Z`` (one per direction) is estimated on the first forward as in RepDistiller,
``Z = mean(exp(⟨v, m⟩ / τ)) · N`` over that batch's scores, and then kept
fixed. After the loss is computed (and only in training mode) the banks'
rows of the batch are updated without gradient::

    M[i] ← normalize(momentum · M[i] + (1 − momentum) · v_i)

Differences from RepDistiller: negatives are drawn uniformly *excluding the
positive index* (RepDistiller's alias sampler may draw it) with a dedicated
seeded ``torch.Generator``, so runs are reproducible; RepDistiller's
``contrast_idx`` (negatives chosen by the data loader, e.g. its
``CIFAR100InstanceSample``) is accepted as ``contrast_index``. A zero
embedding is normalised to 0 (zero gradient) instead of ``NaN``.

The memory banks and both ``Z`` constants are registered buffers (saved in
checkpoints); the sampler's generator state is not (a resumed run draws
different negatives, which does not matter statistically). The heads are the
module's only parameters and must be given to the optimiser. Batches are
expected to hold distinct dataset indices; with duplicates, the memory update
of the repeated row keeps one of them (unspecified which).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kdistill.losses._reduce import _compute_dtype
from kdistill.losses.cosine import _safe_normalize

__all__ = ["CRDLoss", "crd_nce_loss"]

_NCE_EPS = 1e-7


def _check_positive_int(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def crd_nce_loss(scores: Tensor, num_samples: int) -> Tensor:
    """NCE objective of CRD given the normalised critic scores (RepDistiller ``ContrastLoss``).

    Args:
        scores: ``(B, K + 1)`` strictly positive scores ``exp(⟨v, m⟩ / τ) / Z``;
            column 0 is the positive pair, columns ``1..K`` the ``K >= 1``
            negatives.
        num_samples: ``N``, the dataset size; the noise distribution is
            uniform, ``P_n = 1 / N``.

    Returns:
        0-dim tensor ``−1/B · Σ_b [log(h_pos / (h_pos + K/N + eps)) +
        Σ_k log((K/N) / (h_neg + K/N + eps))]``, at least float32; exactly 0
        for an empty batch.

    Raises:
        ValueError: ``scores`` not ``(B, K + 1)`` with ``K >= 1`` or
            ``num_samples < 1``.
    """
    _check_positive_int("num_samples", num_samples)
    if scores.dim() != 2 or scores.shape[1] < 2:
        raise ValueError(
            f"scores must have shape (B, K + 1) with the positive in column 0 and K >= 1 "
            f"negatives, got {tuple(scores.shape)}"
        )
    x = scores.to(_compute_dtype(scores))  # (B, K + 1)
    noise = (x.shape[1] - 1) / num_samples  # m · P_n
    pos, neg = x[:, 0], x[:, 1:]  # (B,), (B, K)
    log_d1 = torch.log(pos / (pos + (noise + _NCE_EPS)))  # (B,)
    log_d0 = torch.log(noise / (neg + (noise + _NCE_EPS)))  # (B, K)
    return -(log_d1.sum() + log_d0.sum()) / max(x.shape[0], 1)


class CRDLoss(nn.Module):
    """CRD loss with its projection heads and memory banks (Tian et al. 2020).

    Args:
        student_dim: ``D_s``, size of the flattened student embedding.
        teacher_dim: ``D_t``, size of the flattened teacher embedding.
        num_samples: ``N``, number of samples in the training set (one memory
            row per sample; ``index`` must be in ``[0, N)``), ``>= 2``.
        feat_dim: ``F``, size of the contrastive embedding (128 in the paper).
        num_negatives: ``K``, negatives per anchor (RepDistiller's ``nce_k``,
            16384 for CIFAR-100); sampled with replacement, so it may exceed ``N``.
        nce_t: temperature ``τ > 0`` of the critic.
        momentum: in ``[0, 1)``, the memory banks' momentum.
        seed: seeds the generator that initialises the banks and samples the
            negatives.

    ``forward(student, teacher, *, index, contrast_index=None)``:
        student ``(B, ...)`` flattened to ``(B, D_s)``; teacher ``(B, ...)``
        flattened to ``(B, D_t)`` (detach it yourself; the teacher *head* is
        trained either way); ``index`` ``(B,)`` integer dataset indices of the
        samples; optional ``contrast_index`` ``(B, K')`` integer indices of
        the negatives to use instead of sampled ones. Returns a 0-dim tensor.
    """

    requires_index = True
    ddp_unsupported = (
        "its memory banks of past embeddings are updated per sample and would differ between "
        "processes (each sees only its share of the data)"
    )

    memory_student: Tensor
    memory_teacher: Tensor
    z_student: Tensor
    z_teacher: Tensor

    def __init__(
        self,
        student_dim: int,
        teacher_dim: int,
        num_samples: int,
        feat_dim: int = 128,
        num_negatives: int = 4096,
        nce_t: float = 0.07,
        momentum: float = 0.5,
        *,
        seed: int = 0,
    ) -> None:
        super().__init__()
        _check_positive_int("student_dim", student_dim)
        _check_positive_int("teacher_dim", teacher_dim)
        _check_positive_int("num_samples (the training-set size)", num_samples, minimum=2)
        _check_positive_int("feat_dim", feat_dim)
        _check_positive_int("num_negatives", num_negatives)
        if not (nce_t > 0 and math.isfinite(nce_t)):
            raise ValueError(
                f"nce_t must be a finite number > 0 (0.07 in the paper), got {nce_t!r}"
            )
        if not (0.0 <= momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1) (0.5 in the paper), got {momentum!r}")
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim
        self.num_samples = num_samples
        self.feat_dim = feat_dim
        self.num_negatives = num_negatives
        self.nce_t = nce_t
        self.momentum = momentum

        self.embed_student = nn.Linear(student_dim, feat_dim)
        self.embed_teacher = nn.Linear(teacher_dim, feat_dim)

        # CPU generator: negatives are drawn on the CPU and moved to the banks' device.
        self.generator = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(feat_dim / 3)  # RepDistiller: uniform(−stdv, stdv), E‖m‖² = 1
        for name in ("memory_student", "memory_teacher"):
            bank = torch.rand(num_samples, feat_dim, generator=self.generator) * (2 * stdv) - stdv
            self.register_buffer(name, bank)  # (N, F)
        # Normalisation constants Z, < 0 until estimated on the first forward.
        self.register_buffer("z_student", torch.tensor(-1.0))  # student anchor vs M_t
        self.register_buffer("z_teacher", torch.tensor(-1.0))  # teacher anchor vs M_s

    # ------------------------------------------------------------------ checks

    def _rows(self, x: Tensor, dim: int, who: str) -> Tensor:
        """``(B, ...)`` -> ``(B, dim)``, checking the flattened size."""
        size = math.prod(x.shape[1:]) if x.dim() >= 1 else 0
        if x.dim() < 2 or size != dim:
            raise ValueError(
                f"{who} embedding has shape {tuple(x.shape)} but CRDLoss was built with "
                f"{who}_dim={dim}; pass batched (B, {dim}) features (or (B, ...) that flatten "
                f"to {dim}), or build CRDLoss with {who}_dim equal to the flattened size"
            )
        return x.reshape(x.shape[0], size)

    def _check_indices(self, idx: Tensor, what: str) -> Tensor:
        """Integer dtype and values in ``[0, num_samples)``; returns a long tensor on the banks' device."""
        if idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(
                f"{what} must hold integer dataset indices (torch.long), got dtype {idx.dtype}"
            )
        if idx.numel() > 0:
            lo, hi = int(idx.min()), int(idx.max())
            if lo < 0 or hi >= self.num_samples:
                raise ValueError(
                    f"{what} holds values in [{lo}, {hi}] but must be in "
                    f"[0, num_samples={self.num_samples}); build CRDLoss with num_samples "
                    "equal to the training-set size"
                )
        return idx.to(device=self.memory_student.device, dtype=torch.long)

    # ------------------------------------------------------------------ sampling

    def sample_negatives(self, index: Tensor) -> Tensor:
        """``(B,)`` positive indices -> ``(B, num_negatives)`` uniform negatives ``≠`` the positive.

        Draws ``r`` uniformly from ``[0, N − 1)`` and shifts ``r >= index`` up
        by one, which is uniform over the ``N − 1`` other samples.
        """
        b = index.shape[0]
        r = torch.randint(
            0, self.num_samples - 1, (b, self.num_negatives), generator=self.generator
        ).to(index.device)  # (B, K)
        return r + (r >= index[:, None]).long()

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        student: Tensor,
        teacher: Tensor,
        *,
        index: Tensor,
        contrast_index: Tensor | None = None,
    ) -> Tensor:
        s_rows = self._rows(student, self.student_dim, "student")  # (B, D_s)
        t_rows = self._rows(teacher, self.teacher_dim, "teacher")  # (B, D_t)
        b = s_rows.shape[0]
        if t_rows.shape[0] != b:
            raise ValueError(
                f"student embedding {tuple(student.shape)} vs teacher {tuple(teacher.shape)}: "
                "batch sizes differ; run the teacher on the same batch as the student"
            )
        if tuple(index.shape) != (b,):
            raise ValueError(
                f"index has shape {tuple(index.shape)} but must have shape ({b},): the "
                "dataset index of every sample of the batch (have the dataset return "
                "(input, target, index))"
            )
        idx = self._check_indices(index, "index")  # (B,)
        if contrast_index is None:
            neg = self.sample_negatives(idx)  # (B, K)
        else:
            if (
                contrast_index.dim() != 2
                or contrast_index.shape[0] != b
                or contrast_index.shape[1] < 1
            ):
                raise ValueError(
                    f"contrast_index has shape {tuple(contrast_index.shape)} but must have "
                    f"shape ({b}, K) with K >= 1: the negatives' dataset indices per sample"
                )
            neg = self._check_indices(contrast_index, "contrast_index")  # (B, K)
        all_idx = torch.cat([idx[:, None], neg], dim=1)  # (B, K + 1), column 0 positive

        dtype = _compute_dtype(student, teacher, self.memory_student)
        w = self.embed_student.weight.dtype
        v_s = _safe_normalize(self.embed_student(s_rows.to(w)).to(dtype))  # (B, F)
        v_t = _safe_normalize(self.embed_teacher(t_rows.to(w)).to(dtype))  # (B, F)

        # Buffers carry no gradient: the banks act as fixed keys.
        keys_t = self.memory_teacher[all_idx].to(dtype)  # (B, K + 1, F)
        keys_s = self.memory_student[all_idx].to(dtype)  # (B, K + 1, F)
        exp_s = torch.exp(torch.einsum("bkf,bf->bk", keys_t, v_s) / self.nce_t)  # (B, K + 1)
        exp_t = torch.exp(torch.einsum("bkf,bf->bk", keys_s, v_t) / self.nce_t)  # (B, K + 1)

        z_s = self._normaliser(self.z_student, exp_s)
        z_t = self._normaliser(self.z_teacher, exp_t)
        loss = crd_nce_loss(exp_s / z_s, self.num_samples) + crd_nce_loss(
            exp_t / z_t, self.num_samples
        )

        if self.training and b > 0:
            self._update_memory(idx, v_s, v_t)
        return loss

    def _normaliser(self, z: Tensor, scores: Tensor) -> Tensor:
        """``Z``: the stored value, or (first use) ``mean(scores) · N``, then stored.

        Chosen with ``torch.where`` so no host synchronisation is needed.
        """
        with torch.no_grad():
            if scores.numel() == 0:  # empty batch: nothing to estimate from
                return z.to(scores.dtype)
            estimate = scores.mean() * self.num_samples
            value = torch.where(z < 0, estimate.to(z.dtype), z)
            z.copy_(value)
        return value.to(scores.dtype)

    @torch.no_grad()
    def _update_memory(self, idx: Tensor, v_s: Tensor, v_t: Tensor) -> None:
        m = self.momentum
        for bank, v in ((self.memory_student, v_s), (self.memory_teacher, v_t)):
            mixed = bank[idx] * m + v.detach().to(bank.dtype) * (1.0 - m)  # (B, F)
            bank.index_copy_(0, idx, _safe_normalize(mixed))

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, feat_dim={self.feat_dim}, "
            f"num_negatives={self.num_negatives}, nce_t={self.nce_t}, momentum={self.momentum}"
        )
