from __future__ import annotations

from pathlib import Path

import pytest
import torch
from scheme_helpers import CLASSES, blobs, mlp
from torch import nn

from kdistill.checkpoint import load_weights
from kdistill.config import OptimConfig
from kdistill.data.loader import TensorBatchLoader
from kdistill.losses import cross_entropy, kd_loss
from kdistill.schemes import MutualLearning, OnlineDistillation, train_scheme


def grads(model: nn.Module) -> list[torch.Tensor]:
    return [
        p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in model.parameters()
    ]


def test_every_peer_receives_gradients_even_peers_of_different_sizes() -> None:
    peers = [mlp(8), mlp(32), nn.Sequential(nn.Linear(12, CLASSES))]
    scheme = MutualLearning(peers, temperature=2.0, alpha=0.5)
    x, y = blobs(16)
    scheme(x, y)["loss"].backward()
    for k, peer in enumerate(peers):
        for name, p in peer.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"peer {k} {name}"
    assert set(scheme.trainable_parameters()) == {p for peer in peers for p in peer.parameters()}


def test_each_peer_loss_is_ce_plus_kd_to_the_other_peers_detached() -> None:
    peers = [mlp(8), mlp(16), mlp(4)]
    t, a = 3.0, 0.7
    scheme = MutualLearning(peers, temperature=t, alpha=a)
    x, y = blobs(16)
    out = scheme(x, y)
    z = [p(x) for p in peers]
    for k in range(3):
        kd = torch.stack([kd_loss(z[k], z[j].detach(), t) for j in range(3) if j != k]).mean()
        ce = cross_entropy(z[k], y)
        expected = (1 - a) * ce + a * kd
        torch.testing.assert_close(out[f"peer{k}_loss"], expected.detach())
        torch.testing.assert_close(out[f"peer{k}_ce_loss"], ce.detach())
        torch.testing.assert_close(out[f"peer{k}_kd_loss"], kd.detach())
        # peer k's parameters get exactly the gradient of its own loss
        scheme.zero_grad()
        out = scheme(x, y)
        out["loss"].backward()
        via_scheme = grads(peers[k])
        scheme.zero_grad()
        z = [p(x) for p in peers]
        kd = torch.stack([kd_loss(z[k], z[j].detach(), t) for j in range(3) if j != k]).mean()
        ((1 - a) * cross_entropy(z[k], y) + a * kd).backward()
        for g1, g2 in zip(via_scheme, grads(peers[k]), strict=True):
            torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(out["logits"], z[0].detach())


def test_online_teacher_learns_from_labels_only_and_student_from_the_detached_teacher() -> None:
    student, teacher = mlp(8), mlp(64)
    scheme = OnlineDistillation(student, teacher, temperature=4.0, alpha=0.9)
    assert scheme.student is student and scheme.teacher is teacher
    x, y = blobs(16)
    out = scheme(x, y)
    out["loss"].backward()
    got_t, got_s = grads(teacher), grads(student)
    scheme.zero_grad()
    cross_entropy(teacher(x), y).backward()
    for g1, g2 in zip(got_t, grads(teacher), strict=True):
        torch.testing.assert_close(g1, g2)
    scheme.zero_grad()
    zs, zt = student(x), teacher(x)
    (0.1 * cross_entropy(zs, y) + 0.9 * kd_loss(zs, zt.detach(), 4.0)).backward()
    for g1, g2 in zip(got_s, grads(student), strict=True):
        torch.testing.assert_close(g1, g2)
    assert out["teacher_kd_loss"] == 0
    assert {"student_loss", "student_ce_loss", "student_kd_loss", "teacher_ce_loss"} <= set(out)


def test_unlabelled_rows_drop_out_of_the_cross_entropy_only() -> None:
    peers = [mlp(8), mlp(16)]
    scheme = MutualLearning(peers, temperature=2.0, alpha=0.5)
    x, y = blobs(8)
    y_part = y.clone()
    y_part[4:] = -1
    out = scheme(x, y_part)
    torch.testing.assert_close(out["peer0_ce_loss"], cross_entropy(peers[0](x[:4]), y[:4]).detach())
    z0, z1 = peers[0](x), peers[1](x)
    torch.testing.assert_close(out["peer0_kd_loss"], kd_loss(z0, z1, 2.0).detach())


def test_checkpoint_state_holds_all_peers_and_round_trips() -> None:
    scheme = MutualLearning([mlp(8), mlp(16)], alpha=0.5)
    state = scheme.trainable_state_dict()
    assert any(k.startswith("peers.0.") for k in state) and any(
        k.startswith("peers.1.") for k in state
    )
    other = MutualLearning([mlp(8), mlp(16)], alpha=0.5)
    other.load_trainable_state_dict(state)
    for k, v in other.trainable_state_dict().items():
        assert torch.equal(v, state[k])
    with pytest.raises(RuntimeError, match="missing"):
        other.load_trainable_state_dict({k: v for k, v in state.items() if "peers.1" not in k})


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        MutualLearning([mlp(4)])
    with pytest.raises(ValueError, match="alpha"):
        MutualLearning([mlp(4), mlp(4)], alpha=1.5)
    with pytest.raises(ValueError, match="alphas"):
        MutualLearning([mlp(4), mlp(4)], alpha=[0.5])
    shared = mlp(4)
    with pytest.raises(ValueError, match="twice"):
        MutualLearning([shared, shared])


def test_trainer_trains_all_peers_evaluates_and_saves_peer_zero(tmp_path: Path) -> None:
    x, y = blobs(128)
    tx, ty = blobs(64, seed=1)
    train = TensorBatchLoader(x, y, batch_size=32, shuffle=True, drop_last=True)
    test = TensorBatchLoader(tx, ty, batch_size=64)
    peers = [mlp(8), mlp(32)]
    before = [[p.detach().clone() for p in peer.parameters()] for peer in peers]
    scheme = MutualLearning(peers, temperature=2.0, alpha=0.5)
    result = train_scheme(
        scheme, train, test, OptimConfig(lr=1e-2, schedule="constant"), 2, tmp_path, progress=False
    )
    for peer, old in zip(peers, before, strict=True):
        assert any(not torch.equal(p, o) for p, o in zip(peer.parameters(), old, strict=True))
    row = result.final
    assert {"train_peer0_kd_loss", "train_peer1_ce_loss", "test_accuracy"} <= set(row)
    saved = load_weights(result.student_path)
    assert set(saved) == set(peers[0].state_dict())
    accuracies = scheme.evaluate_peers(test)
    assert accuracies["peer0"]["accuracy"] == pytest.approx(row["test_accuracy"])
    assert accuracies["peer1"]["accuracy"] > 0.5
