"""Mixed precision (bf16/fp16 autocast, GradScaler skips counted) and TensorBoard logging."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from kdistill import experiment, runtime
from kdistill.callbacks import LambdaCallback
from kdistill.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from kdistill.config import ConfigError, OptimConfig, config_from_dict
from kdistill.data.loader import TensorBatchLoader
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.trainer import ResumeError, Trainer, evaluate

DIM, CLASSES, N, BATCH = 8, 3, 48, 8  # 6 steps per epoch
STEPS = N // BATCH


def _data(n: int, seed: int) -> tuple[Tensor, Tensor]:
    centres = 3.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return centres[y] + torch.randn(n, DIM, generator=g), y


class _InfGrad(torch.autograd.Function):
    """Value 0, gradient +inf everywhere (in the input's dtype)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        ctx.shape, ctx.dtype = x.shape, x.dtype
        return x.sum().float() * 0.0

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return torch.full(ctx.shape, math.inf, dtype=ctx.dtype)


class InfGradAt(nn.Module):
    """A zero loss whose gradient is infinite at the given calls (0-based)."""

    def __init__(self, bad: set[int]) -> None:
        super().__init__()
        self.bad, self.calls = bad, 0

    def forward(self, student: Tensor, target: Tensor) -> Tensor:
        call, self.calls = self.calls, self.calls + 1
        return _InfGrad.apply(student) if call in self.bad else student.sum().float() * 0.0


class Push(nn.Module):
    """``c · mean(logits)``: the same gradient for every logit (softmax ignores it); a large
    ``c`` overflows float16 gradients at the GradScaler's default initial scale."""

    def __init__(self, c: float) -> None:
        super().__init__()
        self.c = c

    def forward(self, student: Tensor, target: Tensor) -> Tensor:
        return self.c * student.float().mean()


def make_trainer(
    out: Path,
    amp: Any = "none",
    epochs: int = 2,
    extra: list[LossTerm] | None = None,
    cls: type[Trainer] = Trainer,
    **kwargs: Any,
) -> Trainer:
    torch.manual_seed(100)
    teacher = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, CLASSES))
    terms = [
        LossTerm("kd", KDLoss(2.0), 0.5),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 0.5, teacher=None),
        *(extra or []),
    ]
    x, y = _data(N, 0)
    train = TensorBatchLoader(x, y, batch_size=BATCH, shuffle=True, drop_last=True, seed=0)
    test = TensorBatchLoader(*_data(24, 1), batch_size=64)
    optim = OptimConfig(name="adamw", lr=1e-2, schedule="cosine", grad_clip=5.0)
    distiller = Distiller(student, terms, teacher=teacher)
    return cls(distiller, train, test, optim, epochs, out, progress=False, amp=amp, **kwargs)


def _eval_loss(t: Trainer) -> float:
    return evaluate(t.distiller.student, t.eval_loader)["loss"]


def _set_scale(t: Trainer, scale: float) -> None:
    assert t.scaler is not None
    t.scaler.load_state_dict({**t.scaler.state_dict(), "scale": scale})


def _skipped(out: Path) -> list[int]:
    rows = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    return [row["global_step"] for row in rows if row.get("skipped")]


# -- autocast ----------------------------------------------------------------------------------


@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_autocast_trains_a_tiny_model_with_finite_results(tmp_path: Path, amp: str) -> None:
    t = make_trainer(tmp_path, amp=amp, epochs=3)
    dtypes: set[torch.dtype] = set()
    student = t.distiller.student
    student.register_forward_hook(lambda m, i, o: dtypes.add(o.dtype) if m.training else None)
    result = t.fit()
    losses = [row["train_loss"] for row in result.history]
    assert dtypes == {torch.bfloat16 if amp == "bf16" else torch.float16}
    assert all(math.isfinite(v) for row in result.history for v in row.values())
    assert losses[-1] < losses[0]
    assert result.final["test_accuracy"] > 0.7  # float32: 0.79 on these 24 samples
    assert all(torch.isfinite(v).all() for v in student.state_dict().values())
    assert result.final["test_loss"] == pytest.approx(_eval_loss(t))  # evaluation in float32
    assert (t.scaler is not None) == (amp == "fp16")


def test_amp_is_validated() -> None:
    with pytest.raises(ValueError, match="amp must be one of"):
        make_trainer(Path("unused"), amp="fp8")
    with pytest.raises(ConfigError, match=r"train\.amp: 'fp8' is not allowed; choose one of"):
        config_from_dict({"train": {"amp": "fp8"}})


# -- GradScaler skips --------------------------------------------------------------------------


def test_a_skipped_grad_scaler_step_is_counted_and_training_continues(tmp_path: Path) -> None:
    # skip_nonfinite=0: an fp16 overflow at a loss scale above 1 is the scaler's, not an error
    t = make_trainer(
        tmp_path, amp="fp16", extra=[LossTerm("inf", InfGradAt({2, 7}), 1.0, teacher=None)]
    )
    _set_scale(t, 256.0)  # low enough that the tiny model's own gradients never overflow
    result = t.fit()
    assert [row["skipped_steps"] for row in result.history] == [1, 1]
    assert _skipped(tmp_path) == [2, 7]
    assert t.scaler is not None and t.scaler.get_scale() == 64.0  # halved twice
    state = t.optimizer.state[next(iter(t.optimizer.state))]
    assert state["step"].item() == 2 * STEPS - 2
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    assert all(torch.isfinite(v).all() for v in t.distiller.student.state_dict().values())


def test_non_finite_gradients_at_a_loss_scale_of_one_are_a_non_finite_step(tmp_path: Path) -> None:
    def bad() -> list[LossTerm]:
        return [LossTerm("inf", InfGradAt({3}), 1.0, teacher=None)]

    t = make_trainer(tmp_path, amp="fp16", extra=bad())
    _set_scale(t, 1.0)
    with pytest.raises(FloatingPointError, match=r"non-finite gradient norm .* epoch 1, step 3"):
        t.fit()

    t = make_trainer(tmp_path / "skip", amp="fp16", extra=bad(), skip_nonfinite=1)
    _set_scale(t, 1.0)
    result = t.fit()
    assert [row["skipped_steps"] for row in result.history] == [1, 0]


class Interrupted(Exception):
    pass


class StopMidEpoch(Trainer):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callbacks.callbacks.append(LambdaCallback(on_checkpoint_saved=self._stop))

    def _stop(self, trainer: Trainer, epoch: int, step: int) -> None:
        if epoch == 1 and step:
            raise Interrupted


def test_resume_restores_the_grad_scaler_state(tmp_path: Path) -> None:
    def run(folder: str, cls: type[Trainer] = Trainer) -> Trainer:
        push = [LossTerm("push", Push(200.0), 1.0, teacher=None)]
        return make_trainer(tmp_path / folder, "fp16", extra=push, checkpoint_every=4, cls=cls)

    full = run("full")
    full.fit()
    assert _skipped(tmp_path / "full")  # the first steps overflow, the scale backs off
    with pytest.raises(Interrupted):
        run("cut", StopMidEpoch).fit()
    folder = latest_checkpoint(tmp_path / "cut" / "checkpoints")
    assert folder is not None and folder.name == "epoch-0001-step-000002"
    assert load_checkpoint(folder)[1]["scaler"]["scale"] < 65536.0  # not the initial scale

    resumed = run("cut")
    resumed.fit(resume=True)
    assert resumed.scaler is not None and full.scaler is not None
    assert resumed.scaler.get_scale() == full.scaler.get_scale()
    for key, value in full.distiller.student.state_dict().items():
        assert torch.equal(value, resumed.distiller.student.state_dict()[key]), key
    assert _skipped(tmp_path / "cut") == _skipped(tmp_path / "full")


def test_an_fp16_checkpoint_without_scaler_state_cannot_be_resumed(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        make_trainer(tmp_path, amp="fp16", checkpoint_every=4, cls=StopMidEpoch).fit()
    folder = latest_checkpoint(tmp_path / "checkpoints")
    assert folder is not None
    weights, state = load_checkpoint(folder)
    del state["scaler"]
    save_checkpoint(folder.parent, state["epoch"], weights, state, step=state["step"])
    with pytest.raises(ResumeError, match=r"lacks \['scaler"):
        make_trainer(tmp_path, amp="fp16", checkpoint_every=4).fit(resume=True)


# -- TensorBoard -------------------------------------------------------------------------------


def test_tensorboard_gets_every_numeric_epoch_metric(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = make_trainer(tmp_path).fit()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    expected = {k for k in result.final if k != "epoch"}
    assert set(events.Tags()["scalars"]) == expected
    loss = events.Scalars("train_loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["train_loss"] for r in result.history])

    make_trainer(tmp_path / "off", tensorboard=False).fit()
    assert not (tmp_path / "off" / "tensorboard").exists()


def test_without_tensorboard_the_run_logs_csv_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    result = make_trainer(tmp_path).fit()
    assert not (tmp_path / "tensorboard").exists()
    lines = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(lines) == 1 + len(result.history) and "train_loss" in lines[0]


# -- config --------------------------------------------------------------------------------------


def test_run_experiment_passes_amp_and_tensorboard_to_the_trainer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: dict[str, Any] = {}

    class Spy(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            seen.update(amp=self.amp, tensorboard=self.tensorboard)

    def fake_load_data(cfg: Any) -> Any:
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
        return (x, y), (x, y)

    monkeypatch.setattr(experiment, "load_data", fake_load_data)
    monkeypatch.setattr(runtime, "Trainer", Spy)  # the one place a config becomes a Trainer
    cfg = config_from_dict(
        {
            "output_dir": str(tmp_path),
            "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
            "data": {"batch_size": 4},
            "train": {"epochs": 1, "progress": False, "amp": "bf16", "tensorboard": False},
        }
    )
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        result = experiment.run_experiment(cfg)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    assert seen == {"amp": "bf16", "tensorboard": False}
    assert math.isfinite(result.fit.final["train_loss"])
    assert not (tmp_path / "tensorboard").exists()
