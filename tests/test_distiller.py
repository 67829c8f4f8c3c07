from __future__ import annotations

import pytest
import torch
from torch import nn

from kdistill.config import DistillConfig
from kdistill.distiller import Distiller, LossTerm
from kdistill.experiment import build_terms
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy, hinton_loss
from kdistill.losses.fitnets import HintLoss

IN, CLASSES = 6, 3


class Net(nn.Module):
    """in -> fc1 (width) -> relu -> fc2 -> logits."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(IN, width)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(width, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ExplodingTeacher(Net):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise AssertionError("the teacher must not run when its outputs are given")


def batch(n: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, IN), torch.randint(0, CLASSES, (n,))


def kd_ce_terms() -> list[LossTerm]:
    return [
        LossTerm("kd", KDLoss(2.0), 0.6),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 0.4, teacher=None),
    ]


def feature_distiller(adapter: nn.Module | None = None) -> Distiller:
    terms = [
        LossTerm("kd", KDLoss(2.0), 1.0),
        LossTerm("hint", HintLoss(), 0.5, student="fc1", teacher="fc1", adapter=adapter),
    ]
    return Distiller(Net(4), terms, teacher=Net(8))


# -- the frozen teacher ----------------------------------------------------------------


def test_teacher_params_never_require_grad_and_get_no_grad_after_backward() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    x, y = batch()
    distiller(x, y)["loss"].backward()
    assert distiller.teacher is not None
    for param in distiller.teacher.parameters():
        assert not param.requires_grad
        assert param.grad is None
    assert all(p.grad is not None for p in distiller.student.parameters())


def test_teacher_stays_in_eval_after_train_call_while_student_trains() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    distiller.train()
    assert distiller.teacher is not None
    assert not distiller.teacher.training
    assert all(not m.training for m in distiller.teacher.modules())
    assert distiller.student.training
    assert distiller.training
    distiller.eval()
    assert not distiller.student.training and not distiller.teacher.training


def test_teacher_is_not_among_trainable_parameters() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert trainable == {id(p) for p in distiller.student.parameters()}


# -- forward's result --------------------------------------------------------------------


def test_forward_returns_loss_with_grad_detached_logits_and_one_detached_part_per_term() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    x, y = batch()
    out = distiller(x, y)
    assert set(out) == {"loss", "logits", "kd_loss", "ce_loss"}
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert not out["logits"].requires_grad and out["logits"].shape == (5, CLASSES)
    assert not out["kd_loss"].requires_grad and not out["ce_loss"].requires_grad
    torch.testing.assert_close(out["logits"], distiller.student(x))


def test_loss_is_the_weighted_sum_of_the_unweighted_parts() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    out = distiller(*batch())
    expected = 0.6 * out["kd_loss"] + 0.4 * out["ce_loss"]
    torch.testing.assert_close(out["loss"].detach(), expected)


def test_hooks_are_removed_after_forward() -> None:
    distiller = feature_distiller(adapter=nn.Linear(4, 8))
    distiller(*batch())
    assert distiller.teacher is not None
    for model in (distiller.student, distiller.teacher):
        for module in model.modules():
            assert not module._forward_hooks


# -- feature terms and adapters ------------------------------------------------------------


def test_adapter_parameters_are_trainable_and_saved_under_terms_prefix() -> None:
    adapter = nn.Linear(4, 8)
    distiller = feature_distiller(adapter=adapter)
    out = distiller(*batch())
    assert set(out) == {"loss", "logits", "kd_loss", "hint_loss"}
    out["loss"].backward()
    assert adapter.weight.grad is not None

    trainable = {id(p) for p in distiller.trainable_parameters()}
    assert {id(p) for p in adapter.parameters()} <= trainable

    state = distiller.trainable_state_dict()
    assert {k for k in state if k.startswith("terms.")} == {
        "terms.1.adapter.weight",
        "terms.1.adapter.bias",
    }
    assert all(k.startswith(("student.", "terms.")) for k in state)
    assert not any(k.startswith("teacher") for k in state)
    assert distiller.teacher is not None
    teacher_tensors = {v.data_ptr() for v in distiller.teacher.state_dict().values()}
    assert not teacher_tensors & {v.data_ptr() for v in state.values()}


def test_load_trainable_state_dict_round_trips_student_and_adapter() -> None:
    source = feature_distiller(adapter=nn.Linear(4, 8))
    target = feature_distiller(adapter=nn.Linear(4, 8))  # different random init
    assert not torch.equal(source.student.fc1.weight, target.student.fc1.weight)
    target.load_trainable_state_dict(source.trainable_state_dict())
    for key, value in source.trainable_state_dict().items():
        assert torch.equal(target.trainable_state_dict()[key], value), key
    # The teacher is untouched by loading.
    assert source.teacher is not None and target.teacher is not None
    assert not torch.equal(source.teacher.fc1.weight, target.teacher.fc1.weight)


def test_feature_shape_mismatch_without_adapter_raises_value_error_suggesting_adapter() -> None:
    distiller = feature_distiller(adapter=None)
    with pytest.raises(ValueError, match="adapter") as info:
        distiller(*batch())
    assert "hint" in str(info.value)


def test_label_shape_is_not_compared_with_student_logits() -> None:
    term = LossTerm("ce", LabelSmoothingCrossEntropy(0.0), teacher=None)
    logits, target = torch.randn(4, CLASSES), torch.randint(0, CLASSES, (4,))
    assert term(logits, target).dim() == 0


# -- precomputed teacher outputs ---------------------------------------------------------


def test_precomputed_teacher_logits_give_the_same_loss_as_the_live_teacher() -> None:
    teacher = Net(8)
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=teacher)
    x, y = batch()
    live = distiller(x, y)["loss"]
    calls: list[int] = []
    handle = teacher.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        cached_logits = teacher(x)
    calls.clear()
    cached = distiller(x, y, teacher_outputs={"logits": cached_logits})["loss"]
    handle.remove()
    assert calls == []
    torch.testing.assert_close(cached, live)


def test_precomputed_teacher_outputs_mean_the_teacher_is_never_called() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=ExplodingTeacher(8))
    x, y = batch()
    out = distiller(x, y, teacher_outputs={"logits": torch.randn(5, CLASSES)})
    assert torch.isfinite(out["loss"])


def test_distiller_without_teacher_works_with_precomputed_logits() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=None)
    x, y = batch()
    out = distiller(x, y, teacher_outputs={"logits": torch.randn(5, CLASSES)})
    out["loss"].backward()
    with pytest.raises(RuntimeError, match="no teacher"):
        distiller(x, y)


def test_precomputed_outputs_missing_a_needed_key_raise_key_error_naming_it() -> None:
    distiller = feature_distiller(adapter=nn.Linear(4, 8))
    with pytest.raises(KeyError, match="fc1"):
        distiller(*batch(), teacher_outputs={"logits": torch.randn(5, CLASSES)})


# -- construction errors -----------------------------------------------------------------


def test_duplicate_term_names_raise_value_error() -> None:
    terms = [LossTerm("kd", KDLoss()), LossTerm("kd", KDLoss())]
    with pytest.raises(ValueError, match="unique"):
        Distiller(Net(4), terms, teacher=Net(8))


def test_empty_term_list_raises_value_error() -> None:
    with pytest.raises(ValueError, match="at least one"):
        Distiller(Net(4), [], teacher=Net(8))


def test_negative_term_weight_raises_value_error() -> None:
    with pytest.raises(ValueError, match="weight"):
        LossTerm("kd", KDLoss(), weight=-0.5)


def test_unknown_layer_name_fails_at_construction() -> None:
    terms = [LossTerm("hint", nn.MSELoss(), student="nope", teacher="fc1")]
    with pytest.raises(ValueError, match="nope"):
        Distiller(Net(4), terms, teacher=Net(8))


def test_label_term_without_target_raises_clear_error() -> None:
    distiller = Distiller(Net(4), kd_ce_terms(), teacher=Net(8))
    x, _ = batch()
    with pytest.raises(ValueError, match=r"'ce' compares with labels, but none were given"):
        distiller(x)


# -- agreement with the Hinton objective ---------------------------------------------------


def test_built_alpha_terms_equal_hinton_loss() -> None:
    terms = build_terms(DistillConfig(alpha=0.7, temperature=4), has_teacher=True)
    assert [(t.name, t.weight) for t in terms] == [("kd", 0.7), ("ce", pytest.approx(0.3))]
    teacher, student = Net(8), Net(4)
    distiller = Distiller(student, terms, teacher=teacher)
    x, y = batch(16)
    loss = distiller(x, y)["loss"]
    with torch.no_grad():
        expected = hinton_loss(student(x), teacher(x), y, temperature=4.0, alpha=0.7)
    torch.testing.assert_close(loss.detach(), expected)


def test_alpha_zero_keeps_only_the_label_term_and_needs_no_teacher() -> None:
    terms = build_terms(DistillConfig(alpha=0.0), has_teacher=True)
    assert [t.name for t in terms] == ["ce"]
    distiller = Distiller(Net(4), terms, teacher=ExplodingTeacher(8))
    assert not distiller.needs_teacher
    x, y = batch()
    out = distiller(x, y)
    torch.testing.assert_close(
        out["loss"].detach(), nn.functional.cross_entropy(distiller.student(x), y).detach()
    )


def test_alpha_one_keeps_only_the_kd_term() -> None:
    terms = build_terms(DistillConfig(alpha=1.0), has_teacher=True)
    assert [(t.name, t.weight) for t in terms] == [("kd", 1.0)]


# -- weight schedules and extra loss inputs ----------------------------------------------


def test_term_weight_warms_up_linearly_then_stays_constant() -> None:
    term = LossTerm("dkd", KDLoss(), weight=8.0, warmup_epochs=4)
    assert [term.weight_at(e) for e in (0.0, 1.0, 2.0, 4.0, 10.0)] == [0.0, 2.0, 4.0, 8.0, 8.0]


def test_distiller_applies_the_scheduled_weight_to_the_total_loss() -> None:
    teacher, student = Net(8), Net(4)
    terms = [LossTerm("kd", KDLoss(), weight=2.0, warmup_epochs=2)]
    distiller = Distiller(student, terms, teacher)
    x, _ = batch(4)
    distiller.set_progress(1.0)
    out = distiller(x)
    assert torch.allclose(out["loss"], 1.0 * out["kd_loss"])
    distiller.set_progress(5.0)
    assert torch.allclose(distiller(x)["loss"], 2.0 * out["kd_loss"])


class NeedsEverything(nn.Module):
    requires_target = True
    requires_index = True

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def forward(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        target: torch.Tensor,
        *,
        index: torch.Tensor,
    ) -> torch.Tensor:
        self.seen = {"target": target, "index": index}
        return (student - teacher).pow(2).mean()


def test_losses_that_ask_for_labels_and_indices_receive_them() -> None:
    loss = NeedsEverything()
    distiller = Distiller(Net(4), [LossTerm("x", loss)], Net(4))
    target, index = torch.tensor([1, 0, 2]), torch.tensor([7, 3, 5])
    distiller(batch(3)[0], target, index=index)
    assert torch.equal(loss.seen["target"], target)
    assert torch.equal(loss.seen["index"], index)
    with pytest.raises(ValueError, match="index"):
        distiller(batch(3)[0], target)
