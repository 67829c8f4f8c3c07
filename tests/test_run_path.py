"""Every entry point gets every run-level ``train.*`` option, through the one run path.

Each entry point — ``kdistill run``, a scheme file of each kind, ``kdistill lm`` for each
objective — is run through the CLI (in-process) with ``amp: bf16``, ``tensorboard: true``,
``threads: 2``, ``skip_nonfinite: 1`` and ``checkpoint_every: 1``. A probe attached to every
Trainer (through :func:`kdistill.runtime.build_trainer`, the one place a config becomes a
Trainer) records the autocast dtype and the thread count the model's training forward sees,
turns the first training loss into NaN (which ``skip_nonfinite`` must skip), and stops the run
right after its first mid-epoch checkpoint; ``--resume`` then finishes it. The test checks
each option took effect: bf16 autocast in the forward, 2 threads, a TensorBoard event file,
one skipped step in the metrics, a mid-epoch checkpoint, and a resumed run that completes.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from kdistill import cli, runtime
from kdistill.callbacks import Callback
from kdistill.checkpoint import list_checkpoints
from kdistill.data import DatasetNotFoundError, find_fashion_mnist
from kdistill.trainer import Trainer

ROOT = Path(__file__).parents[1]
SCHEMES = ROOT / "examples" / "schemes"
LM = ROOT / "examples" / "lm"

TINY_VISION = [
    "data.train_subset=96",
    "data.test_subset=64",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "train.epochs=1",
]
OPTIONS = [
    "train.amp=bf16",
    "train.tensorboard=true",
    "train.threads=2",
    "train.skip_nonfinite=1",
    "train.checkpoint_every=1",
    "train.progress=false",
]

ENTRY_POINTS: dict[str, tuple[str, Path | None, list[str]]] = {
    "run": ("run", None, TINY_VISION),
    "scheme-mutual": ("run", SCHEMES / "dml.yaml", TINY_VISION),
    "scheme-online_teacher": ("run", SCHEMES / "online_teacher.yaml", TINY_VISION),
    "scheme-aux_heads": ("run", SCHEMES / "aux_heads.yaml", TINY_VISION),
    "scheme-mean_teacher": (
        "run",
        SCHEMES / "mean_teacher.yaml",
        [*TINY_VISION, "scheme.mean_teacher.labelled_fraction=0.5"],
    ),
    "scheme-dino": (
        "run",
        SCHEMES / "dino.yaml",
        [*TINY_VISION, "scheme.dino.knn_bank=64", "scheme.dino.out_dim=32"],
    ),
    "scheme-multi_teacher": (
        "run",
        SCHEMES / "multi_teacher.yaml",
        [*TINY_VISION, "scheme.multi_teacher.pretrain_epochs=1"],
    ),
    "scheme-semi_supervised": (
        "run",
        SCHEMES / "semi_supervised.yaml",
        [
            *TINY_VISION,
            "scheme.semi_supervised.labelled_fraction=0.7",
            "scheme.semi_supervised.teacher_epochs=1",
        ],
    ),
    "scheme-born_again": (
        "run",
        SCHEMES / "born_again.yaml",
        [*TINY_VISION, "scheme.born_again.generations=1"],
    ),
    "lm-token_kd": ("lm", LM / "tiny_token_kd.yaml", ["data.max_examples=24"]),
    "lm-seqkd": ("lm", LM / "tiny_seqkd.yaml", ["data.max_examples=24"]),
    "lm-gkd": ("lm", LM / "tiny_gkd.yaml", ["data.max_examples=24"]),
    "lm-distilbert": ("lm", LM / "tiny_distilbert.yaml", ["data.max_examples=24"]),
}


FROZEN_TEACHER = {"run", "scheme-multi_teacher", "scheme-semi_supervised", "scheme-born_again"}
"""Entry points with a frozen teacher, where ``distill.cache_dir`` applies."""


class Stop(Exception):
    """Raised by the probe right after the first mid-epoch checkpoint is on disk."""


class Probe(Callback):
    """Watches what the training forward sees; breaks the first step; stops mid-epoch."""

    def __init__(self, record: dict[str, Any], stop: bool) -> None:
        self.record, self.stop = record, stop
        self.handle: Any = None

    def on_fit_start(self, trainer: Trainer) -> None:
        def forward_hook(module: Any, args: Any, out: Any) -> Any:
            if not (module.training and torch.is_grad_enabled()):
                return out
            self.record.setdefault("autocast", set()).add(
                torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            )
            self.record.setdefault("threads", set()).add(torch.get_num_threads())
            if trainer.global_step == 0 and not self.record.get("broken"):
                self.record["broken"] = True
                return {**out, "loss": out["loss"] * math.nan}
            return out

        self.handle = trainer.model.register_forward_hook(forward_hook)  # type: ignore[attr-defined]

    def on_checkpoint_saved(self, trainer: Trainer, epoch: int, step: int) -> None:
        if self.stop and step > 1:
            self.record["stopped_at"] = (epoch, step)
            raise Stop

    def on_fit_end(self, trainer: Trainer, result: Any) -> None:
        self.handle.remove()


@pytest.fixture
def probed(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Attach a :class:`Probe` to every Trainer the run path builds."""
    record: dict[str, Any] = {"stop": True}

    class ProbedTrainer(Trainer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            probe = Probe(record, stop=record["stop"])
            kwargs["callbacks"] = [*kwargs.get("callbacks", ()), probe]
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(runtime, "Trainer", ProbedTrainer)
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield record
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


def _vision_config(tmp_path: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        "seed: 0\n"
        "teacher: {model: mlp, kwargs: {hidden: [64]}}\n"
        "student: {model: mlp, kwargs: {hidden: [32]}}\n"
        "distill: {temperature: 4.0, alpha: 0.5}\n"
        "optim: {name: adamw, lr: 0.01, schedule: cosine}\n"
    )
    return path


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_every_entry_point_gets_every_train_option(
    entry: str, tmp_path: Path, probed: dict[str, Any]
) -> None:
    command, config, overrides = ENTRY_POINTS[entry]
    if command == "run":
        try:
            find_fashion_mnist()
        except DatasetNotFoundError as err:
            pytest.skip(str(err))
    else:
        pytest.importorskip("transformers")
    config = config or _vision_config(tmp_path)
    out = tmp_path / "out"
    args = [command, str(config), *[f"--set={o}" for o in [*overrides, *OPTIONS]]]
    args.append(f"--set=output_dir={out}")
    if entry in FROZEN_TEACHER:  # the on-disk teacher cache applies: it must be used
        args.append(f"--set=distill.cache_dir={tmp_path / 'cache'}")

    with pytest.raises(Stop):
        cli.main(args)
    assert probed["stopped_at"][1] > 1  # stopped inside an epoch
    folders = list(out.rglob("checkpoints"))
    mid_epoch = [i for f in folders for i in list_checkpoints(f) if i.complete and i.step > 0]
    assert mid_epoch, f"no mid-epoch checkpoint under {out}"

    probed["stop"] = False
    assert cli.main([*args, "--resume"]) == 0

    assert probed["autocast"] == {torch.bfloat16}, "train.amp=bf16 did not reach the forward"
    assert probed["threads"] == {2}, "train.threads=2 was not applied"
    events = list(out.rglob("events.out.tfevents.*"))
    if "tensorboard" in sys.modules or _has_tensorboard():
        assert events, "train.tensorboard=true wrote no event file"
    metrics = [json.loads(line) for f in out.rglob("metrics.jsonl") for line in f.open()]
    assert sum(row["skipped_steps"] for row in metrics) == 1, "the NaN step was not skipped"
    assert all(math.isfinite(row["train_loss"]) for row in metrics)
    if entry in FROZEN_TEACHER:
        assert (tmp_path / "cache" / "manifest.json").is_file(), "distill.cache_dir unused"


def _has_tensorboard() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def test_vision_code_does_not_import_the_language_model_package() -> None:
    """``import kdistill.experiment`` (and the schemes, the CLI) loads nothing of
    ``kdistill.lm``; ``kdistill.cache`` stores and verifies bytes and imports no LM maths."""
    import subprocess

    code = (
        "import sys, kdistill.experiment, kdistill.schemes.runner, kdistill.cli, kdistill.cache\n"
        "print(sorted(m for m in sys.modules if m.startswith(('kdistill.lm', 'transformers'))))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    import ast

    tree = ast.parse((ROOT / "src" / "kdistill" / "cache.py").read_text())
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.startswith(("kdistill.lm", "kdistill.serve"))]


def test_a_section_a_scheme_does_not_read_is_refused(tmp_path: Path) -> None:
    config = tmp_path / "dml.yaml"
    config.write_text((SCHEMES / "dml.yaml").read_text() + "distill: {temperature: 8.0}\n")
    from kdistill.config import ConfigError
    from kdistill.schemes.runner import run_scheme_file

    with pytest.raises(ConfigError, match=r"distill: the mutual scheme does not read"):
        run_scheme_file(config)


def test_a_scheme_run_reports_validation_accuracy(tmp_path: Path) -> None:
    """``data.val_size`` in a scheme file: trained on the rest, scored on it every epoch."""
    try:
        find_fashion_mnist()
    except DatasetNotFoundError as err:
        pytest.skip(str(err))
    from kdistill.schemes.runner import run_scheme_file

    overrides = [*TINY_VISION, "data.val_size=200", "train.progress=false"]
    result = run_scheme_file(SCHEMES / "dml.yaml", [*overrides, f"output_dir={tmp_path}"])
    student = result.summary["student"]  # where a plain run's summary has it
    assert 0.0 <= student["val_accuracy"] <= 1.0 and student["val_samples"] == 200
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert row["val_accuracy"] == student["val_accuracy"]


@pytest.mark.parametrize("scheme", [None, "dml.yaml"])
def test_eval_every_evaluates_every_n_epochs_and_after_the_last(
    tmp_path: Path, scheme: str | None
) -> None:
    """``train.eval_every: 2`` over 3 epochs: test and validation after epochs 2 and 3 only;
    the summary's best figures come from those rows; the curves are still drawn."""
    try:
        find_fashion_mnist()
    except DatasetNotFoundError as err:
        pytest.skip(str(err))
    config = SCHEMES / scheme if scheme else _vision_config(tmp_path)
    out = tmp_path / "out"
    overrides = [*TINY_VISION, "train.epochs=3", "train.eval_every=2", "data.val_size=200"]
    args = ["run", str(config), *[f"--set={o}" for o in overrides], "--set=train.progress=false"]
    assert cli.main([*args, f"--set=output_dir={out}"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["epoch"] for row in rows] == [1, 2, 3]
    assert "test_accuracy" not in rows[0] and "val_accuracy" not in rows[0]
    assert all("test_accuracy" in row and "val_accuracy" in row for row in rows[1:])
    summary = json.loads((out / "summary.json").read_text())["student"]
    assert summary["test_accuracy"] == rows[2]["test_accuracy"]
    assert summary["best_test_accuracy"] == max(r["test_accuracy"] for r in rows[1:])
    from kdistill.plots import training_curves

    with (out / "metrics.csv").open() as f:
        csv_rows = list(csv.DictReader(f))
    assert training_curves({"run": csv_rows}, tmp_path / "curves.png").is_file()


def test_eval_every_must_be_positive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", str(_vision_config(tmp_path)), "--set=train.eval_every=0"]) == 2
    assert "eval_every" in capsys.readouterr().err


def test_new_option_mistakes_are_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``optim.fused`` with SGD (vision) and ``teacher.parallel: fsdp`` in one process (LM)."""
    vision = [
        "run",
        str(_vision_config(tmp_path)),
        "--set=optim.name=sgd",
        "--set=optim.fused=true",
    ]
    assert cli.main(vision) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "fused" in err[-1] and "sgd" in err[-1]
    pytest.importorskip("transformers")
    lm = ["lm", str(LM / "tiny_token_kd.yaml"), f"--set=output_dir={tmp_path / 'lm'}",
          "--set=teacher.parallel=fsdp"]  # fmt: skip
    assert cli.main(lm) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) <= 2 and "teacher.parallel" in err[-1] and "torchrun" in err[-1]
