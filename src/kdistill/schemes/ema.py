"""EMA teachers: the teacher is an exponential moving average of the student's weights.

:class:`EMATeacher` keeps a frozen copy ``ξ`` of a student ``θ`` and updates it as
``ξ ← m·ξ + (1 − m)·θ`` (BYOL, Grill et al. 2020; Mean Teacher; DINO). The momentum follows
BYOL/DINO's cosine schedule from ``momentum`` (0.996) to ``final_momentum`` (1) over the
run's ``K`` optimizer steps::

    m_k = final − (final − base) · (cos(π k / K) + 1) / 2          k = 0, 1, ..., K

(``schedule="constant"`` keeps ``m_k = base``). Only parameters are averaged. Buffers
(BatchNorm running statistics) follow ``buffers``: with ``"own"`` (the default, as in the
Mean Teacher, BYOL and DINO code) the averaged model runs in the scheme's mode — in training,
BatchNorm normalises with the batch's statistics and updates the teacher's *own* running
statistics, which match its own weights; with ``"copy"`` the averaged model always runs in
eval mode and its buffers are copied from the student at every update.

**When the update happens.** Right after every applied optimizer step, through a Trainer
callback (:class:`EMAUpdate`, which every EMA scheme attaches through ``callbacks()``): at the
start of training ``ξ = θ`` (unless a resumed checkpoint holds the average already), and
after optimizer step ``k`` (0-based, counted by ``num_updates``) ``ξ ← m_k·ξ + (1 − m_k)·θ``.
So after a run of ``K`` steps the average has had all ``K`` updates, and the forward of step
``s`` sees the average of the weights up to step ``s − 1``. A batch skipped as non-finite
takes no optimizer step and makes no EMA update. The EMA weights and the update counter
are part of the scheme's checkpoint, so a resumed run continues the same sequence. Training
such a scheme by hand: call :meth:`EMATeacher.step` after each ``optimizer.step()``.

Schemes:

- :class:`MeanTeacher` (Tarvainen & Valpola 2017): cross-entropy on the labelled rows
  (label ``-1`` = unlabelled) + a ramped-up consistency cost between the student's and the
  EMA teacher's predictions on differently augmented copies of every row.
- :class:`DINO` (Caron et al. 2021): label-free self-distillation. Two or more augmented
  views (random resized crops by default) go through the student (backbone + projection head) and the EMA teacher; the
  teacher's outputs are centred (``c ← m_c·c + (1 − m_c)·mean(teacher outputs)``) and sharpened
  (``τ_t = 0.04``), the student's softened with ``τ_s = 0.1``, and the loss is the
  cross-entropy ``−Σ softmax((t − c)/τ_t) · log softmax(s/τ_s)`` between every teacher view
  and every *other* student view.

Augmented views draw from a generator seeded by ``(seed, step)``, so they do not depend on
(or disturb) torch's global random state and are the same after a resume.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from kdistill import distributed
from kdistill.callbacks import Callback
from kdistill.data.loader import random_shift_flip
from kdistill.distiller import freeze
from kdistill.losses import kd_loss
from kdistill.schemes.augment import random_resized_crop
from kdistill.schemes.base import Scheme
from kdistill.schemes.knn import KNNClassifier, features_of, model_device
from kdistill.schemes.unlabelled import UNLABELLED, masked_cross_entropy

Augment = Callable[[Tensor, torch.Generator], Tensor]
Schedule = Literal["cosine", "constant"]


def momentum_at(
    step: int,
    total_steps: int | None,
    base: float = 0.996,
    final: float = 1.0,
    schedule: Schedule = "cosine",
) -> float:
    """EMA momentum of update ``step`` (0-based) of ``total_steps``; see the module doc."""
    if schedule == "constant":
        return base
    if schedule != "cosine":
        raise ValueError(f"unknown momentum schedule {schedule!r}; use cosine or constant")
    if total_steps is None:
        raise ValueError(
            "the cosine momentum schedule needs the run's total number of steps: train with "
            "kdistill.schemes.train_scheme, or call scheme.configure(total_steps) first"
        )
    k = min(max(step, 0), total_steps)
    return final - (final - base) * (math.cos(math.pi * k / total_steps) + 1.0) / 2.0


class EMATeacher(nn.Module):
    """A frozen exponential moving average of ``student`` (see the module doc).

    Args:
        student: the model followed; it is *not* a submodule (it stays the scheme's).
        momentum: ``m`` at the start (``base``), in ``[0, 1]``.
        final_momentum: ``m`` at the end of a cosine schedule.
        schedule: ``"cosine"`` (BYOL/DINO) or ``"constant"``.
        total_steps: ``K``; :meth:`configure` (called by the scheme) can set it later.
        buffers: ``"own"`` or ``"copy"`` (see the module doc).

    ``forward`` runs the averaged model without gradients. ``num_updates`` counts
    the EMA updates applied; ``initialized`` is set by the first :meth:`step`.
    """

    student: nn.Module
    num_updates: Tensor
    initialized: Tensor

    def __init__(
        self,
        student: nn.Module,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        schedule: Schedule = "cosine",
        total_steps: int | None = None,
        buffers: Literal["own", "copy"] = "own",
    ) -> None:
        super().__init__()
        if buffers not in ("own", "copy"):
            raise ValueError(f"buffers must be 'own' or 'copy', got {buffers!r}")
        for name, value in (("momentum", momentum), ("final_momentum", final_momentum)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {value}")
        if schedule not in ("cosine", "constant"):
            raise ValueError(f"unknown momentum schedule {schedule!r}; use cosine or constant")
        self.__dict__["student"] = student  # followed, not owned
        self.model = freeze(copy.deepcopy(student))
        self.momentum = float(momentum)
        self.final_momentum = float(final_momentum)
        self.schedule: Schedule = schedule
        self.total_steps = total_steps
        self.buffers_mode = buffers
        self.train(self.training)  # "own": the averaged model follows the owner's mode
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def configure(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)

    def train(self, mode: bool = True) -> EMATeacher:
        """With ``buffers="copy"`` the averaged model always stays in eval mode."""
        super().train(mode)
        if self.buffers_mode == "copy":
            self.model.eval()
        return self

    def current_momentum(self) -> float:
        """The momentum the next update will use."""
        return momentum_at(
            int(self.num_updates),
            self.total_steps,
            self.momentum,
            self.final_momentum,
            self.schedule,
        )

    @torch.no_grad()
    def reset(self) -> None:
        """Copy the student's weights and buffers into the average (``ξ = θ``)."""
        self.model.load_state_dict(self.student.state_dict())
        self.initialized.fill_(True)

    @torch.no_grad()
    def step(self) -> float | None:
        """Initialise on the first call, then apply one EMA update; returns the momentum used."""
        if not bool(self.initialized):
            self.reset()
            return None
        m = self.current_momentum()
        averaged = dict(self.model.named_parameters())
        for name, param in self.student.named_parameters():
            averaged[name].mul_(m).add_(param.detach().to(averaged[name].dtype), alpha=1.0 - m)
        if self.buffers_mode == "copy":
            own = dict(self.model.named_buffers())
            for name, buffer in self.student.named_buffers():
                own[name].copy_(buffer)
        self.num_updates += 1
        return m

    def forward(self, *args: Tensor) -> Tensor:
        with torch.no_grad():
            return self.model(*args)

    def extra_repr(self) -> str:
        return (
            f"momentum={self.momentum}, final_momentum={self.final_momentum}, "
            f"schedule={self.schedule!r}, total_steps={self.total_steps}, "
            f"buffers={self.buffers_mode!r}"
        )


def _augment(augment: Augment, inputs: Tensor, generator: torch.Generator) -> Tensor:
    """Apply a CPU-generator augmentation to a batch on any device."""
    if inputs.device.type == "cpu":
        return augment(inputs, generator)
    return augment(inputs.cpu(), generator).to(inputs.device)


def _view_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def sigmoid_rampup(epoch: float, ramp_up_epochs: float) -> float:
    """Mean Teacher's ramp-up ``exp(−5 (1 − t)²)``, ``t = clip(epoch / ramp_up_epochs, 0, 1)``."""
    if ramp_up_epochs <= 0:
        return 1.0
    t = min(max(epoch / ramp_up_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class EMAUpdate(Callback):
    """Updates an :class:`EMATeacher` right after every applied optimizer step.

    At the start of training the average is set to the student (``ξ = θ``) unless it was
    initialised already (a resumed run restores it from the checkpoint).
    """

    def __init__(self, teacher: EMATeacher) -> None:
        self.teacher = teacher

    def on_fit_start(self, trainer: Any) -> None:
        if not bool(self.teacher.initialized):
            self.teacher.reset()

    def on_optimizer_step(self, trainer: Any, step: int) -> None:
        momentum = self.teacher.step()
        if momentum is not None:
            trainer.log_metric("ema_momentum", momentum)


class _EMAScheme(Scheme):
    """Shared bookkeeping: an EMA teacher updated after each optimizer step (:class:`EMAUpdate`)."""

    teacher: EMATeacher
    steps: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # training forwards

    def configure(self, total_steps: int) -> None:
        super().configure(total_steps)
        self.teacher.configure(total_steps)

    def callbacks(self) -> list[Callback]:
        return [*super().callbacks(), EMAUpdate(self.teacher)]

    def _training_step(self) -> bool:
        """Whether this forward is a training step (training mode, gradients on)."""
        return self.training and torch.is_grad_enabled()


class MeanTeacher(_EMAScheme):
    """Mean Teacher (Tarvainen & Valpola 2017) semi-supervised consistency training.

    ``loss = CE(y, z_s)`` over labelled rows ``+ w(t) · consistency(z_s, z_t)`` over all rows,
    where ``z_s = student(aug(x))``, ``z_t = EMA(aug'(x))`` (independent augmentations; the
    same ``x`` when ``augment`` is ``None``), and ``w(t) = consistency_weight ·
    exp(−5 (1 − t)²)`` ramps up over ``ramp_up_epochs``. ``consistency="mse"`` is the paper's
    ``Σ_c (softmax(z_s/T) − softmax(z_t/T))²`` (mean over rows), ``"kl"`` is
    ``T² · KL(p_t ‖ p_s)``.

    ``student`` is evaluated and exported; the EMA teacher (``teacher``, often the better
    model) is saved in checkpoints and can be evaluated with ``scheme.teacher.model``.
    """

    def __init__(
        self,
        student: nn.Module,
        momentum: float = 0.99,
        final_momentum: float = 0.999,
        schedule: Schedule = "cosine",
        consistency: Literal["mse", "kl"] = "mse",
        consistency_weight: float = 10.0,
        ramp_up_epochs: float = 5.0,
        temperature: float = 1.0,
        augment: Augment | None = random_shift_flip,
        seed: int = 0,
        ignore_index: int = UNLABELLED,
    ) -> None:
        super().__init__()
        if consistency not in ("mse", "kl"):
            raise ValueError(f"consistency must be 'mse' or 'kl', got {consistency!r}")
        if not consistency_weight >= 0:
            raise ValueError(f"consistency_weight must be >= 0, got {consistency_weight}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.student = student
        self.teacher = EMATeacher(student, momentum, final_momentum, schedule)
        self.consistency = consistency
        self.consistency_weight = float(consistency_weight)
        self.ramp_up_epochs = float(ramp_up_epochs)
        self.temperature = float(temperature)
        self.augment = augment
        self.seed = seed
        self.ignore_index = ignore_index

    def consistency_cost(self, student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
        if self.consistency == "kl":
            return kd_loss(student_logits, teacher_logits, self.temperature)
        p_s = torch.softmax(student_logits.float() / self.temperature, dim=-1)
        p_t = torch.softmax(teacher_logits.float() / self.temperature, dim=-1)
        return ((p_s - p_t) ** 2).sum(-1).mean()

    def forward(
        self,
        inputs: Tensor,
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if target is None:
            raise ValueError("Mean Teacher needs labels; mark unlabelled rows with -1")
        training = self._training_step()
        if self.augment is not None:
            generator = _view_generator(self.seed, int(self.steps))
            student_in = _augment(self.augment, inputs, generator)
            teacher_in = _augment(self.augment, inputs, generator)
        else:
            student_in = teacher_in = inputs
        logits = self.student(student_in)
        teacher_logits = self.teacher(teacher_in)
        ce = masked_cross_entropy(logits, target, self.ignore_index)
        cons = self.consistency_cost(logits, teacher_logits)
        weight = self.consistency_weight * sigmoid_rampup(self.progress, self.ramp_up_epochs)
        if training:
            self.steps += 1
        return {
            "loss": ce + weight * cons,
            "logits": logits.detach(),
            "ce_loss": ce.detach(),
            "consistency_loss": cons.detach(),
        }


class NormalizedLinear(nn.Module):
    """``x ↦ x · normalize(V)ᵀ``: a weight-normalised linear layer with its norm fixed to 1.

    DINO's last layer (``weight_norm`` with ``weight_g`` frozen at 1), without a bias.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.trunc_normal_(self.weight, std=0.02)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head: MLP → L2-normalised bottleneck → weight-normalised ``out_dim``.

    ``use_bn`` puts BatchNorm after the hidden linear layers (DINO's ``use_bn_in_head``): it
    removes the component that all images share, which small convolutional backbones with
    post-ReLU features have in abundance; without it their projections are nearly parallel,
    centering then flattens the sharpened teacher targets to uniform and training stalls.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int = 1024,
        hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        use_bn: bool = True,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_dim
        for _ in range(2):
            layers.append(nn.Linear(width, hidden_dim))
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            width = hidden_dim
        layers.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        for module in self.mlp:
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last = NormalizedLinear(bottleneck_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(F.normalize(self.mlp(x), dim=-1))


class ProjectedBackbone(nn.Module):
    """Backbone features (its output, or layer ``feature_layer``, flattened) → projection head."""

    def __init__(
        self, backbone: nn.Module, head: nn.Module, feature_layer: str | None = None
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.feature_layer = feature_layer

    def features(self, inputs: Tensor) -> Tensor:
        return features_of(self.backbone, inputs, self.feature_layer)

    def forward(self, inputs: Tensor) -> Tensor:
        return self.head(self.features(inputs))


def dino_loss(
    student_out: list[Tensor],
    teacher_out: list[Tensor],
    center: Tensor,
    student_temperature: float = 0.1,
    teacher_temperature: float = 0.04,
) -> Tensor:
    """DINO's cross-view loss, averaged over the (teacher view i, student view j ≠ i) pairs.

    Args:
        student_out: one ``(B, K)`` tensor per student view.
        teacher_out: one ``(B, K)`` tensor per teacher view (the first ``len(teacher_out)``
            views; the student sees them too, at the same positions).
        center: ``(K,)`` or ``(1, K)`` running mean of the teacher outputs.
    """
    targets = [
        torch.softmax((t.float() - center) / teacher_temperature, dim=-1).detach()
        for t in teacher_out
    ]
    log_probs = [torch.log_softmax(s.float() / student_temperature, dim=-1) for s in student_out]
    terms = [
        -(targets[i] * log_probs[j]).sum(-1).mean()
        for i in range(len(targets))
        for j in range(len(log_probs))
        if j != i
    ]
    if not terms:
        raise ValueError("DINO needs at least two views (each teacher view against another)")
    return torch.stack(terms).mean()


class DINO(_EMAScheme):
    """DINO-style self-distillation without labels (Caron et al. 2021); see the module doc.

    Args:
        backbone: the network whose representation is learnt (e.g. ``SmallCNN``); with
            ``feature_layer`` the features are that layer's output (``"pool"`` for SmallCNN),
            flattened; otherwise the backbone's output.
        out_dim: ``K``, the dimension of the projection head's output.
        example: a batch of inputs, to size the head (not needed with ``feature_dim``).
        use_bn: BatchNorm in the projection head's MLP (see :class:`DINOHead`).
        views: number of augmented views of each batch (≥ 2); the teacher sees the first
            ``teacher_views`` (default all).
        augment: ``fn(batch, generator)`` making one view; by default
            :func:`~kdistill.schemes.augment.random_resized_crop` (crops + flips + jitter).
            ``kdistill.data.loader.random_shift_flip`` also works, but shifts and flips
            leave a globally pooled CNN almost nothing to learn (on 6000 Fashion-MNIST images
            for 12 epochs, 20-NN accuracy stayed at the random-init 0.75 with them and rose to
            0.78 with crops).
        teacher_temperature / student_temperature: ``τ_t`` (sharpening) and ``τ_s``.
        center_momentum: ``m_c`` of the EMA of the center.
        momentum / final_momentum / schedule: the EMA teacher's momentum schedule.
        knn_reference: labelled ``(x, y)`` used as the bank of a k-NN classifier; then
            ``student`` is a :class:`KNNClassifier` over the student backbone (``k = knn_k``),
            so the Trainer's per-epoch ``test_accuracy`` is k-NN accuracy and the saved student
            is the backbone alone. Without it ``student`` is the bare backbone (its own output
            layer is untrained; its test accuracy means nothing).

    ``forward`` ignores labels. It returns ``loss``, ``logits`` (the student's projection of
    view 0 — ``train_accuracy`` is meaningless here), ``dino_loss``, and on the metrics
    channel two collapse diagnostics that are *not* part of the loss: ``teacher_entropy``,
    the entropy of the batch-mean teacher target (→ 0 when every image maps to one
    dimension), and ``teacher_sample_entropy``, the mean entropy of the per-image targets
    (→ ``log K`` when the targets flatten to uniform). Under ``torchrun`` the center is
    updated with the mean over every rank's share of the batch, as in the DINO code. Healthy training keeps the first high and the
    second well below ``log K``.
    """

    center: Tensor

    def __init__(
        self,
        backbone: nn.Module,
        out_dim: int = 1024,
        feature_layer: str | None = None,
        example: Tensor | None = None,
        feature_dim: int | None = None,
        hidden_dim: int = 256,
        bottleneck_dim: int = 64,
        use_bn: bool = True,
        views: int = 2,
        teacher_views: int | None = None,
        augment: Augment = random_resized_crop,
        teacher_temperature: float = 0.04,
        student_temperature: float = 0.1,
        center_momentum: float = 0.9,
        momentum: float = 0.996,
        final_momentum: float = 1.0,
        schedule: Schedule = "cosine",
        seed: int = 0,
        knn_reference: tuple[Tensor, Tensor] | None = None,
        knn_k: int = 20,
    ) -> None:
        super().__init__()
        if views < 2:
            raise ValueError(f"DINO needs at least 2 views, got {views}")
        teacher_views = views if teacher_views is None else teacher_views
        if not 1 <= teacher_views <= views:
            raise ValueError(f"teacher_views must be in [1, {views}], got {teacher_views}")
        for name, value in (
            ("teacher_temperature", teacher_temperature),
            ("student_temperature", student_temperature),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0.0 <= center_momentum <= 1.0:
            raise ValueError(f"center_momentum must be in [0, 1], got {center_momentum}")
        if feature_dim is None:
            if example is None:
                raise ValueError("give DINO an example batch (or feature_dim) to size the head")
            was_training = backbone.training
            backbone.eval()
            with torch.no_grad():
                feature_dim = features_of(
                    backbone, example.to(model_device(backbone)), feature_layer
                ).shape[1]
            backbone.train(was_training)
        self.network = ProjectedBackbone(
            backbone,
            DINOHead(feature_dim, out_dim, hidden_dim, bottleneck_dim, use_bn),
            feature_layer,
        )
        self.teacher = EMATeacher(self.network, momentum, final_momentum, schedule)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.views = views
        self.teacher_views = teacher_views
        self.augment = augment
        self.teacher_temperature = float(teacher_temperature)
        self.student_temperature = float(student_temperature)
        self.center_momentum = float(center_momentum)
        self.seed = seed
        self.feature_layer = feature_layer
        self.__dict__["_knn"] = (
            KNNClassifier(backbone, knn_reference, feature_layer, k=knn_k)
            if knn_reference is not None
            else None
        )

    @property
    def backbone(self) -> nn.Module:
        return self.network.backbone

    @property
    def student(self) -> nn.Module:
        """What the Trainer evaluates and saves: the k-NN classifier or the bare backbone."""
        knn: KNNClassifier | None = self.__dict__["_knn"]
        if knn is None:
            return self.backbone
        knn.training = self.backbone.training  # evaluate() restores the mode it finds
        return knn

    @torch.no_grad()
    def update_center(self, teacher_out: list[Tensor]) -> None:
        """``c ← m_c · c + (1 − m_c) · mean of the teacher outputs over the batch and views``."""
        outputs = torch.cat(teacher_out).float()  # (V·B, K)
        total = distributed.all_sum(outputs.sum(0, keepdim=True))  # every rank's batch share
        count = outputs.shape[0] * distributed.world_size()
        batch_center = total / count
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)

    def forward(
        self,
        inputs: Tensor,
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        training = self._training_step()
        generator = _view_generator(self.seed, int(self.steps))
        views = [_augment(self.augment, inputs, generator) for _ in range(self.views)]
        student_out = [self.network(v) for v in views]
        teacher_out = [self.teacher(v) for v in views[: self.teacher_views]]
        loss = dino_loss(
            student_out,
            teacher_out,
            self.center,
            self.student_temperature,
            self.teacher_temperature,
        )
        with torch.no_grad():
            targets = torch.cat(
                [
                    torch.softmax((t.float() - self.center) / self.teacher_temperature, -1)
                    for t in teacher_out
                ]
            )  # (V·B, K)
            mean_p = targets.mean(0)
            entropy_of_mean = -(mean_p * mean_p.clamp(min=1e-12).log()).sum()
            mean_entropy = -(targets * targets.clamp(min=1e-12).log()).sum(-1).mean()
        if training:
            self.update_center(teacher_out)
            self.steps += 1
        return {
            "loss": loss,
            "logits": student_out[0].detach(),
            "dino_loss": loss.detach(),
            "metrics": {
                "teacher_entropy": entropy_of_mean,
                "teacher_sample_entropy": mean_entropy,
            },
        }
