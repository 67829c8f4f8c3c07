"""`kdistill report`: Markdown plus non-empty PNG figures for demo and run folders."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from kdistill.cli import main
from kdistill.report import REPORT_MARKER, confusion_counts, pick_samples, top_confusions

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 1024, f"{path} is only {len(data)} bytes"


def test_confusion_counts_and_top_confusions() -> None:
    target = torch.tensor([0, 0, 0, 1, 1, 2])
    predicted = torch.tensor([0, 1, 1, 1, 1, 0])
    matrix = confusion_counts(predicted, target, 3)
    assert matrix.tolist() == [[1, 2, 0], [0, 2, 0], [1, 0, 0]]
    assert top_confusions(matrix, ["a", "b", "c"], k=2) == [
        ("c", "a", 1.0),
        ("a", "b", pytest.approx(2 / 3)),
    ]


def test_pick_samples_takes_the_first_image_of_spread_out_classes() -> None:
    labels = torch.tensor([3, 0, 9, 0, 4, 9])
    assert pick_samples(labels, 3, 10) == [1, 4, 2]  # classes 0, 4 (round(4.5)), 9


def test_report_on_a_demo_folder_writes_every_figure(tiny_demo: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    folder = tmp_path / "demo"
    shutil.copytree(tiny_demo, folder)
    assert main(["report", str(folder), "--temperature", "1", "4"]) == 0
    names = {p.name for p in (folder / "plots").iterdir()}
    assert names == {
        "curves.png",
        "accuracy_vs_parameters.png",
        "accuracy_vs_latency.png",
        "confusion_matrix.png",
        "dark_knowledge.png",
    }
    for name in names:
        assert_png(folder / "plots" / name)
    text = (folder / "report.md").read_text()
    assert text.startswith("# demo")  # the demo's table stays on top
    for name in names:
        assert f"](plots/{name})" in text
    assert "student with KD" in text and "T = 1, 4" in text

    assert main(["report", str(folder)]) == 0  # regenerating replaces the figures section
    again = (folder / "report.md").read_text()
    assert again.count(REPORT_MARKER) == 1 and again.startswith("# demo")


def test_report_on_a_single_run_folder_has_curves_and_confusion_matrix(
    tiny_demo: Path, tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib")
    from kdistill.report import write_report

    run = tmp_path / "run"
    shutil.copytree(tiny_demo / "student_no_kd", run)
    result = write_report(run)
    assert set(result.figures) == {"curves", "confusion"}  # no teacher: no dark knowledge
    for path in result.figures.values():
        assert_png(path)
    text = result.markdown.read_text()
    assert "| student (mlp) |" in text and "plots/confusion_matrix.png" in text

    with_teacher = write_report(tiny_demo / "student_kd")
    assert set(with_teacher.figures) == {"curves", "confusion", "dark_knowledge"}
    assert_png(with_teacher.figures["dark_knowledge"])


def test_report_refuses_a_folder_that_is_not_a_run(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["report", str(tmp_path)]) == 2
    assert "neither a demo folder" in capsys.readouterr().err


def test_run_demo_adds_the_figures_to_its_report(tiny_demo: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from kdistill.demo import _figures

    folder = tmp_path / "demo"
    shutil.copytree(tiny_demo, folder)
    _figures(folder)  # what run_demo calls after writing report.md / report.json
    text = (folder / "report.md").read_text()
    assert text.startswith("# demo") and "](plots/dark_knowledge.png)" in text
    assert_png(folder / "plots" / "accuracy_vs_latency.png")


def test_run_demo_without_matplotlib_keeps_its_table(
    tiny_demo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    import kdistill.report
    from kdistill.demo import _figures
    from kdistill.plots import PlotsUnavailable

    def missing(*args: object, **kwargs: object) -> None:
        raise PlotsUnavailable("plots need matplotlib")

    monkeypatch.setattr(kdistill.report, "write_report", missing)
    folder = tmp_path / "demo"
    shutil.copytree(tiny_demo, folder)
    _figures(folder)
    assert "figures skipped: plots need matplotlib" in capsys.readouterr().out
    assert REPORT_MARKER not in (folder / "report.md").read_text()
