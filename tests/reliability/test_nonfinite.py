"""Non-finite loss or gradient norm: stop before the optimizer step, or skip and count."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from reliability_tiny import STEPS_PER_EPOCH, student_state, trainer
from torch import Tensor, nn

from kdistill.config import ConfigError, config_from_dict
from kdistill.distiller import LossTerm


class NaNAt(nn.Module):
    """A small finite loss, except NaN (or inf) at the given calls (0-based)."""

    def __init__(self, bad: set[int], value: float = math.nan) -> None:
        super().__init__()
        self.bad, self.value, self.calls = bad, value, 0

    def forward(self, student: Tensor, target: Tensor) -> Tensor:
        call, self.calls = self.calls, self.calls + 1
        loss = 0.01 * student.pow(2).mean()
        return loss * self.value if call in self.bad else loss


class _InfGrad(torch.autograd.Function):
    """Value 0, gradient +inf everywhere."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:
        ctx.shape = x.shape  # type: ignore[attr-defined]
        return x.sum() * 0.0

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        return torch.full(ctx.shape, math.inf)  # type: ignore[attr-defined]


class InfGradAt(nn.Module):
    """Finite (zero) loss whose gradient is infinite at the given calls."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, student: Tensor, target: Tensor) -> Tensor:
        call, self.calls = self.calls, self.calls + 1
        return _InfGrad.apply(student) if call in self.bad else student.sum() * 0.0


def _term(loss: nn.Module, name: str = "fragile") -> list[LossTerm]:
    return [LossTerm(name, loss, 0.5, teacher=None)]


def _steps(run: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_non_finite_loss_stops_before_the_optimizer_step_naming_term_and_step(
    tmp_path: Path, value: float
) -> None:
    t = trainer(tmp_path, extra=_term(NaNAt({2}, value)))
    before: dict[str, Tensor] = {}
    original = t._step

    def spy(out: Mapping[str, Tensor], epoch: int, step: int) -> bool:
        if step == 2:
            before.update(student_state(t))
        return original(out, epoch, step)

    t._step = spy  # type: ignore[method-assign]
    with pytest.raises(FloatingPointError) as info:
        t.fit()
    message = str(info.value)
    assert "non-finite loss at epoch 1, step 2" in message
    assert "terms ['fragile_loss']" in message
    assert "before the optimizer step" in message
    for key, value_ in student_state(t).items():  # the bad step changed nothing
        assert torch.equal(value_, before[key]), key


@pytest.mark.parametrize("grad_clip", [5.0, None], ids=["clipped", "unclipped"])
def test_non_finite_gradient_norm_stops_before_the_optimizer_step_naming_the_step(
    tmp_path: Path, grad_clip: float | None
) -> None:
    t = trainer(tmp_path, extra=_term(InfGradAt({3})), grad_clip=grad_clip)
    with pytest.raises(FloatingPointError) as info:
        t.fit()
    message = str(info.value)
    assert "non-finite gradient norm" in message and "epoch 1, step 3" in message
    assert "student.0.weight" in message  # the parameters whose gradients are not finite
    assert all(torch.isfinite(v).all() for v in student_state(t).values())
    # the optimizer took exactly the 3 good steps
    assert t.optimizer.state[next(iter(t.optimizer.state))]["step"].item() == 3


def test_skip_nonfinite_skips_and_counts_bad_batches(tmp_path: Path) -> None:
    bad = {1, 2, 7}  # two in a row, then one in the second epoch
    t = trainer(tmp_path, extra=_term(NaNAt(bad)), skip_nonfinite=2)
    result = t.fit()
    assert [row["skipped_steps"] for row in result.history] == [2, 1]
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    log = _steps(tmp_path)
    assert [row["global_step"] for row in log if row.get("skipped")] == sorted(bad)
    assert all(row["loss"] is None for row in log if row.get("skipped"))
    state = t.optimizer.state[next(iter(t.optimizer.state))]
    assert state["step"].item() == 2 * STEPS_PER_EPOCH - len(bad)


def test_skip_nonfinite_also_skips_non_finite_gradients(tmp_path: Path) -> None:
    t = trainer(tmp_path, extra=_term(InfGradAt({0, 4})), skip_nonfinite=1, grad_clip=None)
    result = t.fit()
    assert [row["skipped_steps"] for row in result.history] == [2, 0]
    assert all(torch.isfinite(v).all() for v in student_state(t).values())


def test_more_consecutive_non_finite_batches_than_allowed_is_an_error(tmp_path: Path) -> None:
    t = trainer(tmp_path, extra=_term(NaNAt({0, 1, 2, 3})), skip_nonfinite=3)
    with pytest.raises(
        FloatingPointError, match=r"4 non-finite batches in a row.*skip_nonfinite=3"
    ):
        t.fit()


def test_training_options_are_validated_naming_the_key() -> None:
    with pytest.raises(ConfigError, match=r"train\.checkpoint_every: must be > 0 or null"):
        config_from_dict({"train": {"checkpoint_every": 0}})
    with pytest.raises(ConfigError, match=r"train\.skip_nonfinite: must be >= 0"):
        config_from_dict({"train": {"skip_nonfinite": -1}})
    with pytest.raises(ConfigError, match=r"train\.skip_nonfinite: expected an integer"):
        config_from_dict({"train": {"skip_nonfinite": 1.5}})
    cfg = config_from_dict({"train": {"checkpoint_every": 50, "skip_nonfinite": 3}})
    assert (cfg.train.checkpoint_every, cfg.train.skip_nonfinite) == (50, 3)
