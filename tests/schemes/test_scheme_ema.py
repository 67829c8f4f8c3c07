from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scheme_helpers import CLASSES, TinyCNN, blobs, mlp
from torch import nn

from kdistill.callbacks import LambdaCallback
from kdistill.config import OptimConfig
from kdistill.data.loader import TensorBatchLoader, random_shift_flip
from kdistill.losses import cross_entropy, kd_loss
from kdistill.schemes import (
    DINO,
    EMATeacher,
    KNNClassifier,
    MeanTeacher,
    dino_loss,
    momentum_at,
    sigmoid_rampup,
    train_scheme,
)
from kdistill.trainer import Trainer


def test_cosine_momentum_schedule_matches_hand_values() -> None:
    # m_k = 1 - (1 - 0.9) (cos(pi k / 4) + 1) / 2
    expected = [0.9, 1 - 0.05 * (1 + math.sqrt(0.5)), 0.95, 1 - 0.05 * (1 - math.sqrt(0.5)), 1.0]
    got = [momentum_at(k, 4, base=0.9, final=1.0) for k in range(5)]
    assert got == pytest.approx(expected, abs=1e-12)
    assert momentum_at(10, 4, 0.9) == 1.0  # past the end
    assert momentum_at(3, None, 0.9, schedule="constant") == 0.9
    with pytest.raises(ValueError, match="total number of steps"):
        momentum_at(0, None)


def test_ema_update_is_exact_against_a_hand_computation() -> None:
    student = nn.Linear(2, 1)
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[1.0, -2.0]]))
        student.bias.fill_(0.5)
    ema = EMATeacher(student, momentum=0.9, final_momentum=1.0, schedule="cosine", total_steps=4)
    assert ema.step() is None  # first call: the copy ξ = θ
    torch.testing.assert_close(ema.model.weight, torch.tensor([[1.0, -2.0]]))
    with torch.no_grad():  # an "optimizer step"
        student.weight.copy_(torch.tensor([[3.0, 0.0]]))
        student.bias.fill_(1.5)
    assert ema.step() == pytest.approx(0.9)
    # ξ = 0.9 ξ + 0.1 θ
    torch.testing.assert_close(
        ema.model.weight, torch.tensor([[0.9 * 1 + 0.1 * 3, 0.9 * -2 + 0.0]])
    )
    torch.testing.assert_close(ema.model.bias, torch.tensor([0.9 * 0.5 + 0.1 * 1.5]))
    with torch.no_grad():
        student.weight.copy_(torch.tensor([[-1.0, 4.0]]))
    m1 = 1 - 0.05 * (1 + math.sqrt(0.5))  # 0.91464...
    assert ema.step() == pytest.approx(m1)
    w = torch.tensor([[1.2, -1.8]]) * m1 + torch.tensor([[-1.0, 4.0]]) * (1 - m1)
    torch.testing.assert_close(ema.model.weight, w)
    assert int(ema.num_updates) == 2
    assert not any(p.requires_grad for p in ema.model.parameters())
    assert not list(ema.parameters()) or all(not p.requires_grad for p in ema.parameters())


def test_ema_buffers_are_copied_or_the_teachers_own() -> None:
    student = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    ema = EMATeacher(student, momentum=0.5, schedule="constant", buffers="copy")
    ema.step()
    student.train()
    student(torch.randn(8, 3))  # changes the running statistics
    ema.step()
    torch.testing.assert_close(ema.model[1].running_mean, student[1].running_mean)
    ema.train()
    assert not ema.model.training  # "copy": always eval mode
    own = EMATeacher(student, momentum=0.5, schedule="constant")  # buffers="own"
    own.step()
    own.train()
    assert own.model.training  # normalises with batch statistics, like the student
    before = own.model[1].running_mean.clone()
    own(torch.randn(8, 3) + 5)
    assert not torch.equal(own.model[1].running_mean, before)  # its own statistics
    own.step()
    assert not torch.equal(own.model[1].running_mean, student[1].running_mean)
    own.eval()
    assert not own.model.training


def test_the_ema_updates_right_after_each_optimizer_step(tmp_path: Path) -> None:
    """EMA after a Trainer run == the hand recursion over the weights after each step, and the
    teacher read between two steps already holds the update of the step just taken."""
    x, y = blobs(64)
    loader = TensorBatchLoader(x, y, batch_size=16, shuffle=True, drop_last=True)
    student = mlp(8)
    scheme = MeanTeacher(student, momentum=0.8, final_momentum=1.0, augment=None)
    initial = student[0].weight.detach().clone()
    after_step: list[torch.Tensor] = []  # the student's weights after each optimizer step
    teacher_between: list[torch.Tensor] = []  # the EMA read between steps (at batch end)

    def record(trainer: Trainer, step: int, out: object) -> None:
        after_step.append(student[0].weight.detach().clone())
        teacher_between.append(scheme.teacher.model[0].weight.detach().clone())

    train_scheme(
        scheme,
        loader,
        loader,
        OptimConfig(lr=1e-2, schedule="constant"),
        2,
        tmp_path,
        progress=False,
        callbacks=[LambdaCallback(on_batch_end=record)],
    )
    total = 2 * len(loader)
    assert scheme.total_steps == total and len(after_step) == total
    expected = initial  # xi = theta at the start of training
    for k, weights in enumerate(after_step):
        m = momentum_at(k, total, 0.8, 1.0)
        expected = m * expected + (1 - m) * weights
        torch.testing.assert_close(teacher_between[k], expected)  # updated before step k + 1
    torch.testing.assert_close(scheme.teacher.model[0].weight, expected)
    assert int(scheme.teacher.num_updates) == total  # nothing pending: no finalize()
    assert not hasattr(scheme, "finalize")


def test_no_ema_update_in_the_forward() -> None:
    scheme = MeanTeacher(mlp(8), schedule="constant", augment=None)
    x, y = blobs(8)
    before = scheme.teacher.model[0].weight.detach().clone()
    scheme.eval()
    scheme(x, y)
    with torch.no_grad():
        scheme.train()(x, y)
    assert not bool(scheme.teacher.initialized) and int(scheme.steps) == 0
    scheme.train()(x, y)  # a training forward counts the step but leaves the EMA alone
    assert int(scheme.steps) == 1 and int(scheme.teacher.num_updates) == 0
    torch.testing.assert_close(scheme.teacher.model[0].weight, before)


def test_mean_teacher_ce_on_labelled_rows_and_consistency_on_all_rows() -> None:
    student = mlp(8)
    scheme = MeanTeacher(
        student, consistency_weight=3.0, ramp_up_epochs=0, augment=None, schedule="constant"
    )
    x, y = blobs(8)
    y[4:] = -1
    out = scheme(x, y)
    z = student(x)
    with torch.no_grad():
        zt = scheme.teacher.model(x)
    ce = cross_entropy(z[:4], y[:4])
    cons = ((torch.softmax(z, -1) - torch.softmax(zt, -1)) ** 2).sum(-1).mean()
    torch.testing.assert_close(out["ce_loss"], ce.detach())
    torch.testing.assert_close(out["consistency_loss"], cons.detach())
    torch.testing.assert_close(out["loss"], ce + 3.0 * cons)
    # the teacher gets no gradient; unlabelled rows get only the consistency gradient
    out["loss"].backward()
    assert all(p.grad is None for p in scheme.teacher.parameters())
    kl = MeanTeacher(mlp(8), consistency="kl", temperature=2.0, augment=None, schedule="constant")
    out = kl(x, y)
    torch.testing.assert_close(
        out["consistency_loss"], kd_loss(kl.student(x), kl.teacher.model(x), 2.0).detach()
    )


def test_sigmoid_rampup() -> None:
    assert sigmoid_rampup(0, 5) == pytest.approx(math.exp(-5))
    assert sigmoid_rampup(2.5, 5) == pytest.approx(math.exp(-1.25))
    assert sigmoid_rampup(7, 5) == 1.0 and sigmoid_rampup(0, 0) == 1.0


class CrashAfterFirst(Trainer):
    """'Crashes' right after the checkpoint of the first epoch is on disk."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.callbacks.callbacks.append(LambdaCallback(on_checkpoint_saved=self._crash))

    def _crash(self, trainer: Trainer, epoch: int, step: int) -> None:
        if epoch == 1 and step == 0:
            raise KeyboardInterrupt


def _mean_teacher_run(output_dir: Path, cls: type[Trainer], resume: bool) -> MeanTeacher:
    torch.manual_seed(0)
    x, y = blobs(64)
    hidden = y.clone()
    hidden[::3] = -1
    images = x[:, :9].reshape(-1, 1, 3, 3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(9, 8), nn.ReLU(), nn.Linear(8, CLASSES))
    scheme = MeanTeacher(model, momentum=0.9, augment=lambda b, g: random_shift_flip(b, g, 1))
    loader = TensorBatchLoader(images, hidden, batch_size=16, shuffle=True, drop_last=True)
    test = TensorBatchLoader(images, y, batch_size=64)
    scheme.configure(2 * len(loader))
    trainer = cls(
        scheme, loader, test, OptimConfig(lr=1e-2, schedule="cosine"), 2, output_dir, progress=False
    )
    trainer.fit(resume=resume)
    return scheme


def test_mean_teacher_resume_gives_the_same_student_and_ema_teacher(tmp_path: Path) -> None:
    full = _mean_teacher_run(tmp_path / "a", Trainer, resume=False)
    with pytest.raises(KeyboardInterrupt):
        _mean_teacher_run(tmp_path / "b", CrashAfterFirst, resume=False)
    resumed = _mean_teacher_run(tmp_path / "b", Trainer, resume=True)
    for key, value in full.trainable_state_dict().items():
        assert torch.equal(resumed.trainable_state_dict()[key], value), key
    assert any(k.startswith("teacher.model.") for k in full.trainable_state_dict())


def test_dino_loss_matches_a_hand_computation() -> None:
    s = [torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])]
    t = [torch.tensor([[0.5, 0.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0]])]
    center = torch.tensor([[0.1, 0.2, 0.3]])
    pt = [torch.softmax((ti - center) / 0.04, -1) for ti in t]
    ls = [torch.log_softmax(si / 0.1, -1) for si in s]
    expected = (-(pt[0] * ls[1]).sum() - (pt[1] * ls[0]).sum()) / 2
    torch.testing.assert_close(dino_loss(s, t, center, 0.1, 0.04), expected)
    with pytest.raises(ValueError, match="two views"):
        dino_loss(s[:1], t[:1], center)


def test_dino_trains_the_student_only_and_centers_the_teacher() -> None:
    backbone = TinyCNN()
    images = torch.randn(8, 1, 8, 8)
    dino = DINO(
        backbone,
        out_dim=16,
        feature_layer="gap",
        example=images,
        hidden_dim=8,
        bottleneck_dim=4,
        views=3,
        teacher_views=2,
        center_momentum=0.5,
        augment=random_shift_flip,
        schedule="constant",
    )
    out = dino(images)  # first training forward: center updated
    assert out["logits"].shape == (8, 16)
    assert set(out) == {"loss", "logits", "dino_loss", "metrics"}  # diagnostics apart
    assert set(out["metrics"]) == {"teacher_entropy", "teacher_sample_entropy"}
    out["loss"].backward()
    assert (
        backbone.conv1[0].weight.grad is not None and dino.network.head.last.weight.grad is not None
    )
    assert all(p.grad is None for p in dino.teacher.parameters())
    assert backbone.fc.weight.grad is None  # features are taken before the classifier
    # center = 0.5 * 0 + 0.5 * mean of the teacher outputs of the two teacher views
    g = torch.Generator().manual_seed(0)
    views = [random_shift_flip(images, g) for _ in range(3)]
    with torch.no_grad():
        teacher_out = torch.cat([dino.teacher.model(v) for v in views[:2]])
    torch.testing.assert_close(dino.center, 0.5 * teacher_out.mean(0, keepdim=True))
    assert int(dino.steps) == 1


def test_dino_student_is_a_knn_classifier_saving_the_backbone_alone(tmp_path: Path) -> None:
    torch.manual_seed(0)
    y = torch.arange(4).repeat(8)
    images = torch.randn(32, 1, 8, 8) * 0.1 + y.float().view(-1, 1, 1, 1)
    backbone = TinyCNN()
    dino = DINO(
        backbone,
        out_dim=16,
        feature_layer="gap",
        example=images,
        hidden_dim=8,
        bottleneck_dim=4,
        knn_reference=(images, y),
        knn_k=3,
    )
    assert isinstance(dino.student, KNNClassifier)
    assert set(dino.student.state_dict()) == set(backbone.state_dict())
    loader = TensorBatchLoader(inputs=images, batch_size=8, shuffle=True, drop_last=True)
    test = TensorBatchLoader(images, y, batch_size=16)
    result = train_scheme(
        dino, loader, test, OptimConfig(lr=1e-3, schedule="constant"), 1, tmp_path, progress=False
    )
    assert 0.0 <= result.final["test_accuracy"] <= 1.0
    assert backbone.training  # evaluation left the backbone in the mode it found
    from kdistill.checkpoint import load_weights

    assert set(load_weights(result.student_path)) == set(backbone.state_dict())
    assert "train_dino_loss" in result.final
