from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kdistill.callbacks import LambdaCallback
from kdistill.checkpoint import latest_checkpoint, load_weights
from kdistill.config import OptimConfig
from kdistill.data.loader import TensorBatchLoader, epoch_generator, random_shift_flip
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.trainer import ResumeError, Trainer, build_scheduler, evaluate

DIM, CLASSES, N = 20, 4, 256


def make_data(n: int = N, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian blobs around fixed random class centres: nearly linearly separable.

    The centres are the same for every ``seed``; ``seed`` only draws the samples.
    """
    centres = 3.0 * torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed + 1)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = centres[y] + torch.randn(n, DIM, generator=g)
    return x, y


def mlp(hidden: int, dropout: float = 0.0) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(DIM, hidden), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(hidden, CLASSES))
    return nn.Sequential(*layers)


def make_distiller(student_seed: int = 0) -> Distiller:
    """The same teacher every time (a trained teacher is loaded, not drawn); a seeded student."""
    torch.manual_seed(12345)
    teacher = mlp(32)
    torch.manual_seed(student_seed)
    student = mlp(16, dropout=0.2)
    terms = [
        LossTerm("kd", KDLoss(2.0), 0.5),
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), 0.5, teacher=None),
    ]
    return Distiller(student, terms, teacher=teacher)


def loaders() -> tuple[TensorBatchLoader, TensorBatchLoader]:
    x, y = make_data()
    test_x, test_y = make_data(64, seed=1)
    train = TensorBatchLoader(x, y, batch_size=32, shuffle=True, drop_last=True, seed=0)
    test = TensorBatchLoader(test_x, test_y, batch_size=64)
    return train, test


def run_config(**optim: Any) -> dict[str, Any]:
    return {
        "optim": {"name": "adamw", "lr": 1e-2, "schedule": "cosine", **optim},
        "train": {"epochs": 4, "progress": False},
    }


def make_trainer(
    output_dir: Path,
    schedule: str = "constant",
    epochs: int = 3,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    cls: type[Trainer] = Trainer,
    **kwargs: Any,
) -> Trainer:
    train, test = loaders()
    optim = OptimConfig(name="adamw", lr=1e-2, schedule=schedule)
    return cls(
        make_distiller(seed), train, test, optim, epochs, output_dir,
        progress=False, config=config, **kwargs,
    )  # fmt: skip


class Interrupted(Exception):
    pass


class CrashAfter(Trainer):
    """A Trainer that 'crashes' right after writing the checkpoint of epoch ``stop``."""

    stop = 2

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.callbacks.callbacks.append(LambdaCallback(on_checkpoint_saved=self._crash))

    def _crash(self, trainer: Trainer, epoch: int, step: int) -> None:
        if epoch == self.stop and step == 0:
            raise Interrupted


class CrashAfterFirst(CrashAfter):
    stop = 1


# -- a short run -------------------------------------------------------------------------


def test_short_run_lowers_training_loss_and_writes_metrics_weights_and_checkpoint(
    tmp_path: Path,
) -> None:
    result = make_trainer(tmp_path, epochs=3).fit()

    losses = [row["train_loss"] for row in result.history]
    assert len(losses) == 3
    assert losses[0] > losses[-1]
    assert result.final["test_accuracy"] > 0.5
    assert {"train_kd_loss", "train_ce_loss", "train_accuracy", "lr", "test_loss"} <= set(
        result.final
    )

    rows = list(csv.DictReader((tmp_path / "metrics.csv").read_text().splitlines()))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    assert all(0.0 <= float(r["test_accuracy"]) <= 1.0 for r in rows)
    jsonl = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in jsonl] == [1, 2, 3]
    assert [r["test_accuracy"] for r in jsonl] == [r["test_accuracy"] for r in result.history]

    assert result.student_path == tmp_path / "student.safetensors"
    saved = load_weights(result.student_path)
    student_state = result_student_state(tmp_path, result)
    assert saved.keys() == student_state.keys()
    for key, value in student_state.items():
        assert torch.equal(saved[key], value)

    assert (tmp_path / "checkpoints" / "latest").is_file()
    assert latest_checkpoint(tmp_path / "checkpoints") == tmp_path / "checkpoints" / "epoch-0003"
    # keep_last=2 by default
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("epoch-*")) == [
        "epoch-0002",
        "epoch-0003",
    ]


def result_student_state(tmp_path: Path, result: Any) -> dict[str, torch.Tensor]:
    """The trained student's weights, read back from the newest checkpoint."""
    from kdistill.checkpoint import load_checkpoint

    weights, _ = load_checkpoint(latest_checkpoint(tmp_path / "checkpoints"))  # type: ignore[arg-type]
    return {k[len("student.") :]: v for k, v in weights.items() if k.startswith("student.")}


def test_checkpoint_never_holds_teacher_weights(tmp_path: Path) -> None:
    make_trainer(tmp_path, epochs=1).fit()
    from kdistill.checkpoint import load_checkpoint

    weights, state = load_checkpoint(tmp_path / "checkpoints" / "epoch-0001")
    assert weights and all(k.startswith("student.") for k in weights)
    assert state["epoch"] == 1


def test_teacher_weights_do_not_change_during_training(tmp_path: Path) -> None:
    trainer = make_trainer(tmp_path, epochs=1)
    assert trainer.distiller.teacher is not None
    before = {k: v.clone() for k, v in trainer.distiller.teacher.state_dict().items()}
    trainer.fit()
    for key, value in trainer.distiller.teacher.state_dict().items():
        assert torch.equal(value, before[key])


def test_cached_teacher_logits_in_the_batch_replace_the_live_teacher(tmp_path: Path) -> None:
    x, y = make_data()
    distiller = make_distiller()
    assert distiller.teacher is not None
    with torch.no_grad():
        cached = distiller.teacher(x)
    cached_distiller = Distiller(distiller.student, list(distiller.terms), teacher=None)
    train = TensorBatchLoader(x, y, cached, batch_size=32, shuffle=True, seed=0)
    _, test = loaders()
    trainer = Trainer(cached_distiller, train, test, OptimConfig(schedule="constant"), 1,
                      tmp_path, progress=False)  # fmt: skip
    assert math.isfinite(trainer.fit().final["train_kd_loss"])


# -- exact resume ------------------------------------------------------------------------


def test_resumed_run_ends_with_the_same_weights_as_an_uninterrupted_one(tmp_path: Path) -> None:
    config = run_config()
    torch.manual_seed(1)
    full = make_trainer(tmp_path / "a", schedule="cosine", epochs=4, config=config)
    full_result = full.fit()

    torch.manual_seed(1)
    crashing = make_trainer(tmp_path / "b", schedule="cosine", epochs=4, config=config,
                            cls=CrashAfter)  # fmt: skip
    with pytest.raises(Interrupted):
        crashing.fit()
    assert latest_checkpoint(tmp_path / "b" / "checkpoints") == (
        tmp_path / "b" / "checkpoints" / "epoch-0002"
    )

    # A fresh process: different student init and RNG state, all overwritten by resume.
    resumed = make_trainer(tmp_path / "b", schedule="cosine", epochs=4, config=config, seed=7)
    torch.manual_seed(999)
    assert not torch.equal(resumed.distiller.student[0].weight, full.distiller.student[0].weight)
    resumed_result = resumed.fit(resume=True)

    for key, value in full.distiller.student.state_dict().items():
        assert torch.equal(resumed.distiller.student.state_dict()[key], value), key
    assert [r["train_loss"] for r in resumed_result.history] == [
        r["train_loss"] for r in full_result.history
    ]
    assert [r["epoch"] for r in resumed_result.history] == [1, 2, 3, 4]
    assert resumed.optimizer.param_groups[0]["lr"] == full.optimizer.param_groups[0]["lr"]
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 4


def test_resume_without_a_checkpoint_starts_from_scratch(tmp_path: Path) -> None:
    result = make_trainer(tmp_path, epochs=1).fit(resume=True)
    assert [r["epoch"] for r in result.history] == [1]


def test_resume_with_a_changed_learning_rate_raises_value_error_naming_the_key(
    tmp_path: Path,
) -> None:
    make_trainer(tmp_path, epochs=1, config=run_config()).fit()
    changed = make_trainer(tmp_path, epochs=2, config=run_config(lr=0.5))
    with pytest.raises(ValueError, match=r"optim\.lr"):
        changed.fit(resume=True)


def test_resume_accepts_a_change_of_progress_display(tmp_path: Path) -> None:
    with pytest.raises(Interrupted):
        make_trainer(tmp_path, epochs=2, config=run_config(), cls=CrashAfterFirst).fit()
    config = run_config()
    config["train"]["progress"] = True
    result = make_trainer(tmp_path, epochs=2, config=config).fit(resume=True)
    assert [r["epoch"] for r in result.history] == [1, 2]


def test_resume_with_a_changed_epoch_count_in_the_config_is_refused(tmp_path: Path) -> None:
    config = run_config(schedule="onecycle")
    make_trainer(tmp_path, schedule="onecycle", epochs=1, config=config).fit()
    config["train"]["epochs"] = 2  # reshapes the LR schedule, so not an exact resume
    longer = make_trainer(tmp_path, schedule="onecycle", epochs=2, config=config)
    with pytest.raises(ValueError, match=r"train\.epochs"):
        longer.fit(resume=True)


def test_resume_with_more_epochs_and_no_config_is_refused_before_training(
    tmp_path: Path,
) -> None:
    make_trainer(tmp_path, schedule="onecycle", epochs=1).fit()
    longer = make_trainer(tmp_path, schedule="onecycle", epochs=2)
    with pytest.raises(ResumeError, match="1 epochs of 8 steps, this run has 2 epochs"):
        longer.fit(resume=True)
    assert sorted(p.name for p in longer.checkpoint_dir.glob("epoch-*")) == ["epoch-0001"]


# -- failures ------------------------------------------------------------------------------


class NaNLoss(nn.Module):
    def forward(self, student: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        return student.sum() * float("nan")


def test_non_finite_loss_raises_floating_point_error_naming_the_term(tmp_path: Path) -> None:
    train, test = loaders()
    terms = [
        LossTerm("ce", LabelSmoothingCrossEntropy(0.0), teacher=None),
        LossTerm("broken", NaNLoss(), 0.1, teacher=None),
    ]
    trainer = Trainer(Distiller(mlp(8), terms), train, test, OptimConfig(), 1, tmp_path,
                      progress=False)  # fmt: skip
    with pytest.raises(FloatingPointError, match="broken_loss") as info:
        trainer.fit()
    assert "ce_loss" not in str(info.value).split("(all parts")[0]


# -- evaluate ------------------------------------------------------------------------------


def test_evaluate_reports_accuracy_and_restores_training_mode() -> None:
    model = nn.Linear(2, 2)
    with torch.no_grad():
        model.weight.copy_(torch.eye(2))
        model.bias.zero_()
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([0, 1, 1, 1])
    model.train()
    metrics = evaluate(model, TensorBatchLoader(x, y, batch_size=3))
    assert metrics["accuracy"] == 0.75
    assert model.training


def test_evaluate_on_an_empty_loader_raises_value_error() -> None:
    with pytest.raises(ValueError, match="no samples"):
        evaluate(nn.Linear(2, 2), [])


# -- learning-rate schedules ---------------------------------------------------------------


def lrs(schedule: str, steps: int, epochs: int = 4, steps_per_epoch: int = 10,
        **cfg: Any) -> list[float]:  # fmt: skip
    """The LR used at each of the first ``steps`` optimizer steps, with base lr 1."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0)
    config = OptimConfig(name="sgd", lr=1.0, schedule=schedule, **cfg)
    scheduler = build_scheduler(optimizer, config, epochs, steps_per_epoch)
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def test_constant_schedule_keeps_the_learning_rate() -> None:
    assert lrs("constant", 40) == [1.0] * 40


def test_constant_schedule_with_warmup_ramps_linearly() -> None:
    got = lrs("constant", 8, warmup_epochs=0.5)  # 5 warm-up steps
    assert got == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0, 1.0, 1.0, 1.0])


def test_cosine_schedule_follows_half_a_cosine_over_all_steps() -> None:
    got = lrs("cosine", 40)
    assert got[0] == pytest.approx(1.0)
    assert got[10] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert got[20] == pytest.approx(0.5)
    assert got[39] == pytest.approx(0.5 * (1 + math.cos(math.pi * 39 / 40)))
    assert all(a >= b for a, b in itertools.pairwise(got))


def test_cosine_schedule_with_warmup_starts_decaying_after_warmup() -> None:
    got = lrs("cosine", 40, warmup_epochs=1)  # 10 warm-up steps, then 30 cosine steps
    assert got[:10] == pytest.approx([(k + 1) / 10 for k in range(10)])
    assert got[10] == pytest.approx(1.0)
    assert got[25] == pytest.approx(0.5)


def test_step_schedule_decays_by_gamma_at_each_milestone_epoch() -> None:
    got = lrs("step", 40, milestones=[1, 3], gamma=0.1)
    assert got[:10] == pytest.approx([1.0] * 10)
    assert got[10:30] == pytest.approx([0.1] * 20)
    assert got[30:] == pytest.approx([0.01] * 10)


def test_onecycle_schedule_warms_up_over_a_quarter_then_anneals() -> None:
    got = lrs("onecycle", 40)
    assert got[0] == pytest.approx(1.0 / 25)  # max_lr / div_factor
    assert max(got) == pytest.approx(1.0)
    assert got.index(max(got)) == 9  # end of the first 25 % of 40 steps
    assert got[39] == pytest.approx(1.0 / 25 / 1e4)
    assert all(a <= b for a, b in itertools.pairwise(got[:10]))
    assert all(a >= b for a, b in itertools.pairwise(got[9:]))


# -- TensorBatchLoader ---------------------------------------------------------------------


def batches(loader: TensorBatchLoader, epoch: int) -> list[tuple[torch.Tensor, ...]]:
    loader.set_epoch(epoch)
    return list(loader)


def test_loader_order_depends_only_on_seed_and_epoch() -> None:
    x, y = torch.arange(50.0)[:, None], torch.arange(50)
    first = TensorBatchLoader(x, y, batch_size=8, shuffle=True, seed=3)
    second = TensorBatchLoader(x, y, batch_size=8, shuffle=True, seed=3)
    batches(second, 5)  # consuming other epochs first changes nothing
    a, b = batches(first, 1), batches(second, 1)
    assert all(torch.equal(p[1], q[1]) for p, q in zip(a, b, strict=True))
    assert torch.equal(torch.cat([p[1] for p in a]).sort().values, y)  # a permutation
    other = torch.cat([p[1] for p in batches(first, 2)])
    assert not torch.equal(torch.cat([p[1] for p in a]), other)
    assert all(torch.equal(p[0][:, 0].long(), p[1]) for p in a)  # rows stay aligned


def test_loader_without_shuffle_keeps_the_order() -> None:
    y = torch.arange(10)
    got = torch.cat([b[0] for b in TensorBatchLoader(y, batch_size=4)])
    assert torch.equal(got, y)


@pytest.mark.parametrize(
    ("drop_last", "length", "sizes"), [(True, 3, [16, 16, 16]), (False, 4, [16, 16, 16, 2])]
)
def test_loader_length_respects_drop_last(drop_last: bool, length: int, sizes: list[int]) -> None:
    loader = TensorBatchLoader(torch.zeros(50, 2), batch_size=16, drop_last=drop_last)
    assert len(loader) == length
    assert [b[0].shape[0] for b in loader] == sizes


def test_loader_rejects_misaligned_tensors_and_bad_batch_size() -> None:
    with pytest.raises(ValueError, match="first dimension"):
        TensorBatchLoader(torch.zeros(3), torch.zeros(4), batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        TensorBatchLoader(torch.zeros(3), batch_size=0)


def test_augmentation_keeps_shape_and_is_deterministic_per_epoch() -> None:
    images = torch.randn(12, 1, 8, 8)
    labels = torch.arange(12)
    loader = TensorBatchLoader(images, labels, batch_size=6, shuffle=True, augment=True, seed=1)
    a, b = batches(loader, 4), batches(loader, 4)
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.shape == (6, 1, 8, 8)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    c = batches(loader, 5)
    assert not all(torch.equal(p[0], q[0]) for p, q in zip(a, c, strict=True))
    changed = torch.cat([p[0] for p in a]) != images[torch.cat([p[1] for p in a])]
    assert changed.any()  # it really augments


def test_shift_flip_with_zero_shift_gives_the_image_or_its_mirror() -> None:
    images = torch.randn(16, 2, 5, 5)
    out = random_shift_flip(images, epoch_generator(0, 0), max_shift=0)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    same = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or s for f, s in zip(flipped, same, strict=True))
    assert any(flipped) and any(same)


def test_shift_flip_moves_content_by_at_most_max_shift() -> None:
    image = torch.zeros(1, 1, 9, 9)
    image[0, 0, 4, 4] = 1.0
    out = random_shift_flip(image.repeat(32, 1, 1, 1), epoch_generator(0, 1), max_shift=2)
    for sample in out:
        row, col = (sample[0] == 1.0).nonzero()[0].tolist()
        assert abs(row - 4) <= 2 and abs(col - 4) <= 2
    positions = {tuple((s[0] == 1.0).nonzero()[0].tolist()) for s in out}
    assert len(positions) > 1


# -- gradient accumulation -----------------------------------------------------------------


def test_accumulated_micro_batches_equal_one_big_batch(tmp_path: Path) -> None:
    """4 micro-batches of 8 accumulated == one batch of 32: the same weights after training.

    Token-style targets with ignored entries make the micro-batches count different numbers
    of targets, so a plain average of micro-batch means would differ from the big batch."""
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))
    y[::5] = -100  # ignored targets, unevenly spread over the micro-batches
    ce = LossTerm("ce", nn.CrossEntropyLoss(ignore_index=-100), teacher=None)

    def train(batch_size: int, accumulate: int, folder: str) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        student = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
        loader = TensorBatchLoader(x, y, batch_size=batch_size, shuffle=False)
        trainer = Trainer(
            Distiller(student, [ce]),
            loader,
            TensorBatchLoader(x, y.clamp_min(0), batch_size=64),
            OptimConfig(name="sgd", lr=0.5, momentum=0.0, weight_decay=0.0, schedule="constant"),
            2,
            tmp_path / folder,
            progress=False,
            accumulate_steps=accumulate,
        )
        assert trainer.steps_per_epoch == 2
        trainer.fit()
        return {k: v.clone() for k, v in student.state_dict().items()}

    big = train(32, 1, "big")
    accumulated = train(8, 4, "accumulated")
    for key in big:
        torch.testing.assert_close(accumulated[key], big[key], rtol=1e-5, atol=1e-6)
    steps = [json.loads(line) for line in (tmp_path / "accumulated" / "steps.jsonl").open()]
    assert [s["global_step"] for s in steps] == [0, 1, 2, 3]  # optimizer steps, not batches


def test_optim_fused_picks_torchs_fused_adamw_and_refuses_what_it_cannot_fuse() -> None:
    """``optim.fused``: torch's fused AdamW (the same update, one kernel, no temporaries);
    off by default for the vision runs; with SGD, or on parameters it cannot take, an error."""
    from kdistill.config import ConfigError
    from kdistill.trainer import build_optimizer

    model = nn.Linear(4, 3)
    assert not build_optimizer(model.parameters(), OptimConfig()).defaults["fused"]
    fused = build_optimizer(model.parameters(), OptimConfig(fused=True))
    assert fused.defaults["fused"]
    plain = nn.Linear(4, 3)
    plain.load_state_dict(model.state_dict())
    reference = build_optimizer(plain.parameters(), OptimConfig(fused=False))
    x = torch.randn(8, 4)
    for m, opt in ((model, fused), (plain, reference)):
        for _ in range(3):
            opt.zero_grad()
            m(x).square().mean().backward()
            opt.step()
    for a, b in zip(model.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # the same update
    with pytest.raises(ConfigError, match="fused: applies to name: adam or adamw"):
        OptimConfig(name="sgd", fused=True)
    integer = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)
    with pytest.raises(ConfigError, match=r"optim\.fused: .*floating-point"):
        build_optimizer([integer], OptimConfig(fused=True))


class _MaskedCE(nn.Module):
    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        from kdistill.schemes.unlabelled import masked_cross_entropy

        return masked_cross_entropy(logits, target)


def test_train_accuracy_counts_the_labelled_samples_only(tmp_path: Path) -> None:
    """Semi-supervised batches (Mean Teacher, semi-supervised KD) carry unlabelled samples
    as label -1: they weigh the losses but are not wrong answers of the train accuracy."""
    x, y = make_data()
    unlabelled = torch.arange(len(y)) % 3 != 0  # two thirds without a label
    torch.manual_seed(0)
    student = mlp(16)
    with torch.no_grad():
        hits = (student(x).argmax(-1) == y) & ~unlabelled
    expected = hits.sum().item() / (~unlabelled).sum().item()
    train = TensorBatchLoader(x, torch.where(unlabelled, -1, y), batch_size=32)
    _, test = loaders()
    terms = [LossTerm("ce", _MaskedCE(), teacher=None)]
    optim = OptimConfig(name="sgd", lr=1e-12, schedule="constant")  # the model stays put
    trainer = Trainer(Distiller(student, terms), train, test, optim, 1, tmp_path, progress=False)
    row = trainer.fit().final
    assert row["train_accuracy"] == pytest.approx(expected, abs=1e-9)
    assert expected > 2 * hits.sum().item() / len(y)  # what counting every sample would give
