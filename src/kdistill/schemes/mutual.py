"""Online distillation: deep mutual learning and an online (co-trained) teacher.

Deep mutual learning (Zhang, Xiang, Hospedales & Lu 2018, "Deep Mutual Learning"): ``N``
peers train together from scratch; each learns from the labels and from the softened
predictions of every other peer. With logits ``z_k`` of peer ``k``, temperature ``T`` and
``alpha_k`` the weight of peer ``k``'s soft term::

    loss_k = (1 − alpha_k) · CE(y, z_k) + alpha_k · mean_{l ≠ k} T² · KL(p_l^T ‖ p_k^T)

where the other peers' ``p_l`` are *detached*: peer ``k``'s loss moves only peer ``k``. The
paper's objective ``CE + mean KL`` is ``alpha = 0.5`` up to a factor 2 (absorbed by the
learning rate). The training loss is ``Σ_k loss_k``: since each ``loss_k`` reaches only its
own peer's parameters, one optimizer over all peers takes exactly the per-peer steps of
the paper's alternating updates on the same batch (except that gradient clipping, when
set, acts on the global norm over all peers).

Online teacher: :class:`OnlineDistillation` is the two-peer case ``[student, teacher]``
where the (larger) teacher trains alongside the student on the labels only (``teacher_alpha
= 0``, not detached from its own CE) and the student distils from its current, detached
predictions. ``teacher_alpha > 0`` makes it two-way mutual learning again.

Peers may have any architecture and size; they only need to give logits over the same
classes. Labels equal to ``ignore_index`` (``-1``: unlabelled rows) drop out of the
cross-entropy while the soft terms still use every row.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.losses import kd_loss
from kdistill.schemes.base import Scheme
from kdistill.schemes.unlabelled import UNLABELLED, masked_cross_entropy
from kdistill.trainer import evaluate


class MutualLearning(Scheme):
    """Deep mutual learning of ``N ≥ 2`` peers; ``student`` (evaluated, exported) is peer 0.

    Args:
        peers: the models, each mapping inputs to ``(B, C)`` logits; all are trained.
        temperature: ``T`` of the soft terms.
        alpha: weight of the soft term in ``[0, 1]``, one for all peers or one per peer
            (``0`` trains that peer on the labels alone, as an online teacher).
        names: labels of the peers in the logged parts (default ``peer0``, ``peer1``, ...).
        ignore_index: label of unlabelled rows, left out of the cross-entropy.

    ``forward`` returns ``loss`` (``Σ_k loss_k``), ``logits`` (peer 0's, detached) and, per
    peer, ``<name>_loss``, ``<name>_ce_loss`` and ``<name>_kd_loss`` (detached).
    """

    def __init__(
        self,
        peers: Sequence[nn.Module],
        temperature: float = 1.0,
        alpha: float | Sequence[float] = 0.5,
        names: Sequence[str] | None = None,
        ignore_index: int = UNLABELLED,
    ) -> None:
        super().__init__()
        if len(peers) < 2:
            raise ValueError(f"mutual learning needs at least 2 peers, got {len(peers)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        alphas = [float(alpha)] * len(peers) if isinstance(alpha, (int, float)) else list(alpha)
        if len(alphas) != len(peers):
            raise ValueError(f"got {len(alphas)} alphas for {len(peers)} peers")
        for a in alphas:
            if not 0.0 <= a <= 1.0:
                raise ValueError(f"alpha must be in [0, 1] (weight of the soft term), got {a}")
        names = list(names) if names is not None else [f"peer{i}" for i in range(len(peers))]
        if len(names) != len(peers) or len(set(names)) != len(names):
            raise ValueError(f"need one unique name per peer, got {names}")
        if len({id(p) for p in peers}) != len(peers):
            raise ValueError("the same module was given twice as a peer; give distinct models")
        self.peers = nn.ModuleList(peers)
        self.names = names
        self.temperature = float(temperature)
        self.alphas = alphas
        self.ignore_index = ignore_index

    @property
    def student(self) -> nn.Module:
        """Peer 0: what the Trainer evaluates each epoch and saves as the student."""
        return self.peers[0]

    def forward(
        self,
        inputs: Tensor,
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """Losses of all peers on one batch; ``teacher_outputs`` and ``index`` are unused."""
        if target is None:
            raise ValueError("mutual learning needs labels (use -1 for unlabelled rows)")
        logits = [peer(inputs) for peer in self.peers]  # N × (B, C)
        detached = [z.detach() for z in logits]
        result: dict[str, Tensor] = {}
        total = logits[0].new_zeros((), dtype=torch.float32)
        for k, (name, z, alpha) in enumerate(zip(self.names, logits, self.alphas, strict=True)):
            ce = masked_cross_entropy(z, target, self.ignore_index)
            if alpha > 0:
                others = [
                    kd_loss(z, detached[j], self.temperature) for j in range(len(logits)) if j != k
                ]
                kd = torch.stack(others).mean()
            else:  # an online teacher: labels only, no soft term computed
                kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
            loss = (1.0 - alpha) * ce + alpha * kd
            total = total + loss
            result[f"{name}_loss"] = loss.detach()
            result[f"{name}_ce_loss"] = ce.detach()
            result[f"{name}_kd_loss"] = kd.detach()
        result["loss"] = total
        result["logits"] = detached[0]
        return result

    def evaluate_peers(
        self, loader: Iterable[Any], device: torch.device | str = "cpu"
    ) -> dict[str, dict[str, float]]:
        """Test accuracy and loss of every peer: ``{name: {"accuracy", "loss"}}``."""
        return {
            name: evaluate(peer, loader, device)
            for name, peer in zip(self.names, self.peers, strict=True)
        }


class OnlineDistillation(MutualLearning):
    """A student distilling from a teacher that keeps training alongside it.

    The teacher learns from the labels (``(1 − teacher_alpha)·CE``, plus ``teacher_alpha``
    times KD from the student when > 0); the student from
    ``(1 − alpha)·CE + alpha·T²·KL(p_teacher ‖ p_student)`` with the teacher's current
    predictions detached. Logged parts are ``student_*`` and ``teacher_*``.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        temperature: float = 4.0,
        alpha: float = 0.9,
        teacher_alpha: float = 0.0,
        ignore_index: int = UNLABELLED,
    ) -> None:
        super().__init__(
            [student, teacher],
            temperature=temperature,
            alpha=[alpha, teacher_alpha],
            names=["student", "teacher"],
            ignore_index=ignore_index,
        )

    @property
    def teacher(self) -> nn.Module:
        return self.peers[1]
