from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdistill.cli import main as kdistill_main
from kdistill.config import ConfigError, load_config
from kdistill.data.fashion_mnist import DatasetNotFoundError, find_fashion_mnist
from kdistill.schemes.__main__ import main
from kdistill.schemes.config import (
    SECTIONS,
    DINOConfig,
    MutualConfig,
    has_scheme,
    load_scheme_config,
    split_scheme_dict,
)
from kdistill.schemes.runner import run_scheme

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "schemes"
BASELINE = EXAMPLES / "baseline.yaml"  # a plain experiment: what the schemes are compared with
SCHEME_FILES = sorted(p for p in EXAMPLES.glob("*.yaml") if p != BASELINE)
TINY = [
    "data.train_subset=64",
    "data.test_subset=32",
    "data.batch_size=32",
    "data.eval_batch_size=64",
    "train.epochs=1",
    "train.progress=false",
]
PER_SCHEME = {
    "born_again": ["scheme.born_again.generations=1"],
    "dino": ["scheme.dino.knn_bank=null", "scheme.dino.out_dim=32", "scheme.dino.knn_k=5"],
    "multi_teacher": ["scheme.multi_teacher.pretrain_epochs=1"],
    "semi_supervised": [
        "scheme.semi_supervised.teacher_epochs=1",
        "scheme.semi_supervised.labelled_fraction=0.5",
        "scheme.semi_supervised.pseudo_label_threshold=0.0",
    ],
}


def test_every_scheme_has_an_example_and_each_example_parses() -> None:
    names = set()
    for path in SCHEME_FILES:
        assert has_scheme(path)
        _cfg, scheme = load_scheme_config(path)
        names.add(scheme.name)
        assert isinstance(scheme.settings, SECTIONS[scheme.name])
        assert scheme.to_dict()["name"] == scheme.name
    assert names == set(SECTIONS)


def base() -> dict:
    return {"student": {"model": "small_cnn"}}


def test_scheme_section_is_validated_with_helpful_messages() -> None:
    _cfg, scheme = split_scheme_dict(
        {
            **base(),
            "scheme": {"name": "mutual", "mutual": {"peers": [{"model": "mlp"}], "alpha": 0.3}},
        }
    )
    assert isinstance(scheme.settings, MutualConfig) and scheme.settings.alpha == 0.3
    assert scheme.settings.peers[0].model == "mlp"
    _, dino = split_scheme_dict({**base(), "scheme": {"name": "dino"}})
    assert isinstance(dino.settings, DINOConfig) and dino.settings.teacher_temperature == 0.04
    bad = [
        ({"name": "nope"}, "scheme.name"),
        ({"name": "mutual", "dino": {}}, "scheme.dino: settings for scheme 'dino'"),
        ({"name": "mutual", "mutual": {"peers": [{"model": "mlp"}], "alpah": 1}}, "did you mean"),
        ({"name": "mutual", "mutual": {}}, "scheme.mutual.peers"),
        ({"name": "dino", "dino": {"views": 1}}, "scheme.dino.views"),
        ({"name": "mean_teacher", "mean_teacher": {"labelled_fraction": 0}}, "labelled_fraction"),
        ({"name": "mean_teacher", "mean_teacher": {"labelled_share": 1.0}}, "labelled_share"),
        (
            {"name": "multi_teacher", "multi_teacher": {"teachers": [{}], "weights": [1, 2]}},
            "weights",
        ),
        ({"name": "dino", "extra": 1}, "scheme.extra"),
    ]
    for section, message in bad:
        with pytest.raises(ConfigError, match=message):
            split_scheme_dict({**base(), "scheme": section})
    with pytest.raises(ConfigError, match="no scheme"):
        split_scheme_dict(base())


def test_overrides_reach_the_scheme_section(tmp_path: Path) -> None:
    cfg, scheme = load_scheme_config(EXAMPLES / "dml.yaml", ["scheme.mutual.alpha=0.25", "seed=3"])
    assert scheme.settings.alpha == 0.25 and cfg.seed == 3


def _have_data() -> bool:
    try:
        find_fashion_mnist()
    except DatasetNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("path", SCHEME_FILES, ids=lambda p: p.stem)
def test_example_runs_on_a_tiny_subset(path: Path, tmp_path: Path) -> None:
    cfg, scheme = load_scheme_config(path)
    overrides = [*TINY, f"output_dir={tmp_path}", *PER_SCHEME.get(scheme.name, [])]
    cfg, scheme = load_scheme_config(path, overrides)
    result = run_scheme(cfg, scheme)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["scheme"]["name"] == scheme.name
    assert 0.0 <= summary["student"]["test_accuracy"] <= 1.0
    assert Path(summary["student"]["weights"]).is_file()
    extra = {
        "mutual": "peers",
        "aux_heads": "heads",
        "mean_teacher": "ema_teacher",
        "dino": "knn",
        "born_again": "generations",
        "semi_supervised": "pseudo_labels",
    }.get(scheme.name)
    if extra:
        assert summary[extra]
    if scheme.name == "multi_teacher":
        assert len(summary["teacher"]["teachers"]) == 3
    if scheme.name == "dino":
        assert set(summary["knn"]) >= {"student", "ema_teacher", "random_init"}
    if scheme.name == "mean_teacher":  # 3 of 64 labelled, each 7 times (labelled_share 0.25)
        assert summary["labelled_samples"] == 3 and summary["epoch_samples"] == 64 + 6 * 3
    if scheme.name == "born_again":
        assert result.fit is None
        assert summary["generations"][1]["teacher"] == summary["generations"][0]["weights"]


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed")
def test_baseline_example_is_a_plain_experiment_of_the_same_student(tmp_path: Path) -> None:
    assert not has_scheme(BASELINE)
    cfg = load_config(BASELINE)
    dml, _ = load_scheme_config(EXAMPLES / "dml.yaml")
    assert cfg.teacher is None and cfg.student == dml.student and cfg.optim == dml.optim
    args = ["run", str(BASELINE), "--set", f"output_dir={tmp_path}"]
    for item in TINY:
        args += ["--set", item]
    assert kdistill_main(args) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["teacher"] is None and 0.0 <= summary["student"]["test_accuracy"] <= 1.0


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not installed")
@pytest.mark.parametrize("main", [main, kdistill_main], ids=["python -m", "kdistill run"])
def test_command_line_runs_a_scheme_file(
    main: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["run", str(EXAMPLES / "aux_heads.yaml"), "--set", f"output_dir={tmp_path}"]
    for item in TINY:
        args += ["--set", item]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "aux_heads: student small_cnn test accuracy" in out and "heads:" in out
    assert main(["run", str(EXAMPLES / "dml.yaml"), "--set", "scheme.mutual.alpha=2"]) == 2
