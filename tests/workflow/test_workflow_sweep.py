"""`kdistill sweep`: any config key on the grid, seeds, selection on validation, its table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from kdistill.cli import main
from kdistill.config import ConfigError, load_config
from kdistill.sweep import (
    Grid,
    SeedRun,
    SweepPoint,
    SweepResult,
    check_point,
    markdown_table,
    paired_differences,
    parse_grid_item,
    point_labels,
    read_grid_file,
    run_sweep,
    set_key,
    verdict,
)

TERMS = [
    {"name": "ce", "loss": "cross_entropy", "teacher": None, "weight": 1.0},
    {"name": "kd", "loss": "kd", "weight": 0.9, "params": {"temperature": 4.0}},
]


def _config(tmp_path: Path, **extra: object) -> Path:
    path = tmp_path / "kd.yaml"
    data = {
        "output_dir": str(tmp_path / "sweep"),
        "teacher": {"model": "teacher_cnn", "checkpoint": "builtin:fashion_mnist_teacher"},
        "train": {"epochs": 1, "progress": False, "tensorboard": False},
        **extra,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def _run(seed: int, val: float | None, test: float) -> SeedRun:
    return SeedRun(seed, f"s{seed}", test, test, 0.9, val, val, 1.0)


def _result(points: list[SweepPoint], metric: str = "val_accuracy") -> SweepResult:
    best = max(round(p.mean(metric), 4) for p in points)
    ties = [p for p in points if round(p.mean(metric), 4) == best]
    return SweepResult(points, ties[0], ties, metric, Path("."))


# -- the grid's syntax -----------------------------------------------------------------------


def test_grid_item_parses_values_as_yaml() -> None:
    assert parse_grid_item("distill.terms[1].weight=0.1, 1,1e2,off") == (
        "distill.terms[1].weight",
        [0.1, 1, 100.0, False],
    )
    with pytest.raises(ConfigError, match="expected KEY=V1,V2"):
        parse_grid_item("distill.alpha")
    with pytest.raises(ConfigError, match=r"'distill.terms\[x\]' is not a config key"):
        parse_grid_item("distill.terms[x]=1")


def test_set_key_walks_sections_and_list_items() -> None:
    data = {"distill": {"terms": [dict(t) for t in TERMS]}}
    set_key(data, "distill.terms[1].params.temperature", 2)
    set_key(data, "optim.lr", 0.01)  # a section the file does not set yet
    assert data["distill"]["terms"][1]["params"] == {"temperature": 2}
    assert data["optim"] == {"lr": 0.01}
    with pytest.raises(ConfigError, match=r"distill.terms has 2 items .* indices 0..1"):
        set_key(data, "distill.terms[2].weight", 1)
    with pytest.raises(ConfigError, match=r"the config sets no student\.layers"):
        set_key(data, "student.layers[0].x", 1)


def test_a_misspelt_grid_key_is_named_with_the_closest_key() -> None:
    base = {"teacher": {"model": "teacher_cnn"}, "distill": {"terms": TERMS}}
    with pytest.raises(ConfigError) as err:
        check_point(base, {"distill.terms[1].wieght": 1.0})
    message = str(err.value)
    assert (
        "distill.terms[1].wieght=1.0" in message
        and "did you mean 'distill.terms[1].weight'" in message
    )
    with pytest.raises(ConfigError, match=r"distill.alpha: must be in \[0, 1\]"):
        check_point({"teacher": {"model": "teacher_cnn"}}, {"distill.alpha": 2})
    with pytest.raises(ConfigError, match=r"sets distill\.terms, which do not use it"):
        check_point(base, {"distill.temperature": 2})


def test_grid_file_holds_a_product_and_explicit_points(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(
        "grid:\n  distill.temperature: [1, 2]\n  distill.alpha: [0.5]\n"
        "points:\n  - {distill.alpha: 0}\n  - {distill.temperature: 2, distill.alpha: 0.5}\n"
    )
    grid = read_grid_file(path)
    points = grid.expand()
    assert points == [
        {"distill.temperature": 1, "distill.alpha": 0.5},
        {"distill.temperature": 2, "distill.alpha": 0.5},
        {"distill.alpha": 0},  # the duplicate point runs once
    ]
    assert point_labels(points, grid.keys) == ["T1_a0.5", "T2_a0.5", "a0"]
    path.write_text("grids: {distill.alpha: [0]}\n")
    with pytest.raises(ConfigError, match=r"'grid:' .* and/or 'points:'"):
        read_grid_file(path)


def test_labels_use_the_shortest_unique_tail_of_each_key() -> None:
    keys = ["distill.terms[0].weight", "distill.terms[1].weight", "optim.lr"]
    points = [{keys[0]: 1.0, keys[1]: 0.5, keys[2]: 0.003}]
    assert point_labels(points, keys) == ["lr0.003_terms0.weight1_terms1.weight0.5"]


# -- the table -------------------------------------------------------------------------------


def test_table_shows_mean_std_over_seeds_and_paired_differences() -> None:
    base = SweepPoint(
        {"w": 0}, "w0", [_run(0, 0.80, 0.70), _run(1, 0.82, 0.72), _run(2, 0.84, 0.71)]
    )
    better = SweepPoint(
        {"w": 1}, "w1", [_run(0, 0.90, 0.75), _run(1, 0.92, 0.76), _run(2, 0.88, 0.77)]
    )
    table = markdown_table(_result([base, better]), ["w"])
    # val 90 ± 2, test 76 ± 1; paired test differences +5, +4, +6 → 5.00 ± 1.00
    assert (
        "| 1 | 3 | **90.00 ± 2.00** | 76.00 ± 1.00 | 90.00 ± 0.00 | +5.00 ± 1.00 | wins |" in table
    )
    assert "| 0 | 3 | 82.00 ± 2.00 | 71.00 ± 1.00 | 90.00 ± 0.00 | – | baseline |" in table
    assert paired_differences(better, base, "test_accuracy") == pytest.approx([5.0, 4.0, 6.0])


def test_verdict_needs_the_mean_difference_beyond_its_spread() -> None:
    assert verdict([1.0, 1.2, 0.8]) == "wins"
    assert verdict([-1.0, -1.2, -0.8]) == "loses"
    assert verdict([1.0, -0.5, 0.2]) == "no difference"
    assert verdict([1.0]) == "one seed"
    # the arms' own seed-to-seed spread counts too: +0.09 ± 0.07 within a 0.3-point spread
    assert verdict([0.16, 0.09, 0.02], spread=0.3) == "no difference"
    assert verdict([0.16, 0.09, 0.02]) == "wins"


def test_equal_scores_are_reported_as_a_tie() -> None:
    a = SweepPoint({"w": 0.1}, "w0.1", [_run(0, 0.85, 0.8)])
    b = SweepPoint({"w": 1}, "w1", [_run(0, 0.85, 0.9)])  # same val, better test: still a tie
    c = SweepPoint({"w": 10}, "w10", [_run(0, 0.84999, 0.95)])  # equal to 0.01 points
    result = _result([a, b, c])
    assert [p.label for p in result.ties] == ["w0.1", "w1", "w10"]
    assert markdown_table(result, ["w"]).count("**85.00**") == 3


# -- whole sweeps ----------------------------------------------------------------------------


def test_sweep_of_a_term_weight_over_seeds_selects_on_validation(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture
) -> None:
    config = _config(tmp_path, data={"val_size": 64}, distill={"terms": TERMS})
    args = ["sweep", str(config), "--grid", "distill.terms[1].weight=0,1", "--seeds", "0", "1"]
    assert main(args + [f"--set={item}" for item in tiny_overrides]) == 0
    root = tmp_path / "sweep"
    result = json.loads((root / "sweep.json").read_text())
    assert result["metric"] == "val_accuracy" and [p["label"] for p in result["points"]] == [
        "weight0",
        "weight1",
    ]
    means = {}
    for point in result["points"]:
        runs = point["runs"]
        assert [r["seed"] for r in runs] == [0, 1]
        for run in runs:  # each run is a real run of its own config, on train minus val
            summary = json.loads((Path(run["output_dir"]) / "summary.json").read_text())
            assert summary["student"]["val_accuracy"] == run["val_accuracy"]
            assert summary["student"]["val_samples"] == 64 and summary["train_samples"] == 256
            assert summary["config"]["seed"] == run["seed"]
            weight = point["values"]["distill.terms[1].weight"]
            assert [t["name"] for t in summary["terms"]] == (
                ["ce"] if weight == 0 else ["ce", "kd"]
            )
        means[point["label"]] = sum(r["val_accuracy"] for r in runs) / 2
    assert means[result["best"]] == max(means.values())
    table = (root / "sweep.md").read_text()
    assert "chosen on val accuracy" in table and "test Δ vs weight0 (paired)" in table
    seeds_png = (root / "seeds.png").read_bytes()  # each seed a dot, mean ± std per point
    assert seeds_png[:4] == b"\x89PNG" and "![test accuracy per seed](seeds.png)" in table
    best = load_config(root / "best.yaml")  # a valid config for kdistill run
    assert best.distill.terms[1].weight == float(result["best"].removeprefix("weight"))
    assert best.output_dir == str(root / "best") and best.data.val_size == 64
    assert "best config" in capsys.readouterr().out


def test_resume_reads_finished_runs_instead_of_training_again(
    tmp_path: Path, tiny_overrides: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config(tmp_path, data={"val_size": 64})
    first = run_sweep(config, Grid({"distill.alpha": [0.0]}), overrides=tiny_overrides, seeds=[0])
    import kdistill.experiment

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(kdistill.experiment, "run_experiment", no_training)
    again = run_sweep(
        config,
        Grid(points=[{"distill.alpha": 0.0}]),
        overrides=tiny_overrides,
        seeds=[0],
        resume=True,
        name="final",
    )
    assert again.points[0].runs == first.points[0].runs
    assert (tmp_path / "sweep" / "final.md").is_file() and (
        tmp_path / "sweep" / "sweep.md"
    ).is_file()


def test_temperature_alpha_shorthand_writes_table_heatmap_and_best_yaml(
    tmp_path: Path, tiny_overrides: list[str], capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    args = ["sweep", str(_config(tmp_path)), "--temperature", "1", "4", "--alpha", "0.5"]
    args += [f"--set={item}" for item in tiny_overrides] + ["--jobs", "2"]
    assert main(args) == 0
    root = tmp_path / "sweep"
    for point in ("T1_a0.5", "T4_a0.5"):
        assert (root / point / "summary.json").is_file()
    table = (root / "sweep.md").read_text()
    assert "| distill.temperature | distill.alpha | seeds | test acc. (%) |" in table
    assert "selected on the test set" in table  # no data.val_size: said plainly
    heatmap = (root / "heatmap.png").read_bytes()
    assert heatmap[:4] == b"\x89PNG" and len(heatmap) > 1024
    result = json.loads((root / "sweep.json").read_text())
    tests = {p["label"]: p["runs"][0]["test_accuracy"] for p in result["points"]}
    assert tests[result["best"]] == max(tests.values())

    cfg = load_config(root / "best.yaml")  # a valid config for kdistill run
    assert f"T{cfg.distill.temperature:g}_a0.5" == result["best"] and cfg.distill.alpha == 0.5
    assert cfg.student.model == "mlp" and cfg.data.train_subset == 256
    assert "best config" in capsys.readouterr().out


def test_sweep_refuses_bad_grids_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "x")}))
    assert main(["sweep", str(path), "--temperature", "2"]) == 2
    assert "no teacher" in capsys.readouterr().err
    assert main(["sweep", str(_config(tmp_path)), "--grid", "optim.lrr=0.1,1"]) == 2
    assert "optim.lrr: unknown key in optim" in capsys.readouterr().err
    assert main(["sweep", str(_config(tmp_path)), "--select", "val_accuracy"]) == 2
    assert "set data.val_size" in capsys.readouterr().err
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize(
    ("scheme", "key", "values"),
    [
        ({"name": "mutual", "mutual": {"temperature": 1.0, "alpha": 0.5,
                                       "peers": [{"model": "small_cnn"}]}},
         "scheme.mutual.alpha", [0.5, 0.9]),
        ({"name": "born_again", "born_again": {"generations": 1}},
         "distill.temperature", [1.0, 4.0]),
    ],
)  # fmt: skip
def test_a_scheme_file_is_swept_selected_on_validation_and_resumed(
    tmp_path: Path,
    tiny_overrides: list[str],
    monkeypatch: pytest.MonkeyPatch,
    scheme: dict[str, object],
    key: str,
    values: list[float],
) -> None:
    """A file with a scheme: section (what ``kdistill run`` takes) sweeps like a plain one:
    each point is that scheme's run, scored on validation; resume reads it back."""
    path = tmp_path / "scheme.yaml"
    path.write_text(
        yaml.safe_dump({
            "output_dir": str(tmp_path / "sweep"), "data": {"val_size": 64},
            "student": {"model": "small_cnn"}, "scheme": scheme,
            "train": {"epochs": 1, "progress": False, "tensorboard": False},
        })
    )  # fmt: skip
    grid = Grid({key: values})
    first = run_sweep(path, grid, overrides=tiny_overrides, seeds=[0])
    for point in first.points:
        (run,) = point.runs
        summary = json.loads((Path(run.output_dir) / "summary.json").read_text())
        assert summary["scheme"]["name"] == scheme["name"]
        assert run.val_accuracy == summary["student"]["val_accuracy"] is not None
        assert run.test_accuracy == summary["student"]["test_accuracy"]
        assert 0 <= run.train_accuracy <= 1 and run.seconds > 0
    assert first.best.mean("val_accuracy") == max(p.mean("val_accuracy") for p in first.points)
    assert f"scheme {scheme['name']}" in (tmp_path / "sweep" / "sweep.md").read_text()
    best = yaml.safe_load((tmp_path / "sweep" / "best.yaml").read_text())
    assert best["scheme"]["name"] == scheme["name"]  # ready for kdistill run

    import kdistill.schemes.runner

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished scheme run was trained again")

    monkeypatch.setattr(kdistill.schemes.runner, "run_scheme", no_training)
    again = run_sweep(path, grid, overrides=tiny_overrides, seeds=[0], resume=True, name="again")
    assert [p.runs for p in again.points] == [p.runs for p in first.points]


def test_a_misspelt_scheme_key_on_the_grid_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A scheme file's grid key is checked before anything trains, through the CLI."""
    scheme = Path(__file__).parents[2] / "examples" / "schemes" / "dml.yaml"
    args = ["sweep", str(scheme), "--grid", "scheme.mutual.alpah=0.5,0.9",
            "--output-dir", str(tmp_path / "sweep")]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "alpah" in err[0] and "alpha" in err[0], err
    assert not (tmp_path / "sweep").exists()
