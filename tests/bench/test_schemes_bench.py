"""bench/schemes.py: its commands, the runs it reuses, and the mean ± std / Δ table."""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest

from kdistill.config import load_config
from kdistill.schemes.config import has_scheme, load_scheme_config

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "bench" / "schemes.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("schemes_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_bench()


def overrides(argv: list[str]) -> dict[str, str]:
    """``{key: value}`` of the ``--set key=value`` pairs of a command."""
    pairs = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    return dict(p.split("=", 1) for p in pairs)


def test_defaults_and_bad_values_are_refused(bench) -> None:
    args = bench.parse_args([])
    assert args.seeds == [0, 1, 2] and args.schemes == list(bench.SCHEMES)
    assert args.ramp_up_epochs == args.label_epochs / 2
    with pytest.raises(SystemExit):
        bench.parse_args(["--epochs", "0"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--schemes", "not_a_scheme"])


def test_each_scheme_runs_its_arms_once_and_its_baseline_too(bench) -> None:
    args = bench.parse_args(["--schemes", "dml", "aux_heads", "multi_teacher"])
    assert bench.arms_of(args.schemes, args) == [
        "baseline",
        "dml",
        "aux_heads",
        "single_teacher",
        "multi_teacher",
    ]
    args = bench.parse_args(["--schemes", "semi_supervised", "mean_teacher"])
    assert bench.arms_of(args.schemes, args) == [
        "labelled_only",
        "mean_teacher",
        "mean_teacher_ce",
        "semi_supervised",
    ]


def test_every_command_is_a_valid_config_of_the_shipped_examples(bench, tmp_path: Path) -> None:
    argv = ["--seeds", "0", "--threads", "1", "--output-dir", str(tmp_path)]
    args = bench.parse_args(argv)
    for arm in bench.ARMS:
        cmd = bench.command(arm, 1, args)
        assert cmd[0] == "run"
        path, sets = ROOT / cmd[1], [v for i, v in enumerate(cmd) if i and cmd[i - 1] == "--set"]
        if has_scheme(path):
            cfg, _ = load_scheme_config(path, sets)
        else:
            cfg = load_config(path, sets)
        assert cfg.seed == 1 and cfg.train.threads == 1 and not cfg.train.progress
        assert cfg.output_dir == str(tmp_path / arm / "seed1")


def test_compared_arms_share_the_protocol(bench) -> None:
    args = bench.parse_args(["--epochs", "4", "--train-subset", "12000", "--label-epochs", "3"])
    base = overrides(bench.command("baseline", 0, args))
    for arm in ("dml", "aux_heads", "single_teacher", "multi_teacher", "born_again"):
        sets = overrides(bench.command(arm, 0, args))
        assert sets["data.train_subset"] == base["data.train_subset"] == "12000"
        assert sets["train.epochs"] == base["train.epochs"] == "4"
        assert sets.get("data.augment", "false") == "false"  # the examples' default is false
    alone = overrides(bench.command("labelled_only", 0, args))
    assert alone["data.train_subset"] == "3000" and alone["train.epochs"] == "60"  # 3 / 0.05
    semi = overrides(bench.command("semi_supervised", 0, args))
    assert "data.train_subset" not in semi and semi["train.epochs"] == "3"


def test_a_run_is_reused_only_for_the_same_command(bench, tmp_path: Path) -> None:
    args = bench.parse_args(["--output-dir", str(tmp_path), "--epochs", "2"])
    folder = bench.run_dir(args, "baseline", 0)
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"student": {"test_accuracy": 0.5}}))
    meta = {"command": bench.shell("baseline", 0, args), "wall_s": 12.0, "commit": "abc1234"}
    (folder / "bench.json").write_text(json.dumps(meta))
    run = bench.load_run("baseline", 0, args)
    assert run == {"student": {"test_accuracy": 0.5}, "_wall_s": 12.0, "_commit": "abc1234"}
    assert "commit abc1234," in bench.header(args, [run["_commit"]])
    other = bench.parse_args(["--output-dir", str(tmp_path), "--epochs", "3"])
    assert bench.load_run("baseline", 0, other) is None


def test_table_has_mean_std_and_the_paired_difference(bench) -> None:
    args = bench.parse_args(["--schemes", "dml", "--seeds", "0", "1", "2"])
    alone = [0.80, 0.82, 0.81]
    peer0 = [0.83, 0.84, 0.80]
    peer1 = [0.79, 0.85, 0.82]
    runs = {}
    for s in range(3):
        runs["baseline", s] = {"student": {"test_accuracy": alone[s]}, "_wall_s": 10.0 + s}
        runs["dml", s] = {
            "student": {"test_accuracy": peer0[s]},
            "peers": [{"test_accuracy": peer0[s]}, {"test_accuracy": peer1[s]}],
            "_wall_s": 20.0,
        }
    table = bench.scheme_table(bench.SCHEMES["dml"], args, runs)
    rows = [line.split("|")[1:-1] for line in table.splitlines() if line.startswith("| ")]
    cells = {r[0].strip(): [c.strip() for c in r[1:]] for r in rows[1:]}

    def pct(values: list[float]) -> str:
        return f"{100 * statistics.mean(values):.2f} ± {100 * statistics.stdev(values):.2f}"

    first = cells[bench.ALONE]
    assert first == [pct(alone), "80.00, 82.00, 81.00", "—", "11"]
    student = cells["DML peer 0 (the student)"]
    assert student[0] == pct(peer0)
    diffs = [p - a for p, a in zip(peer0, alone, strict=True)]  # +3, +2, -1 points
    assert student[2] == "+" + pct(diffs) == "+1.33 ± 2.08"
    assert cells["DML peer 1"][0] == pct(peer1)
    assert "kdistill run examples/schemes/dml.yaml" in table


def test_table_leaves_out_seeds_that_miss_an_arm(bench) -> None:
    args = bench.parse_args(["--schemes", "dml", "--seeds", "0", "1"])
    runs = {
        ("baseline", 0): {"student": {"test_accuracy": 0.8}, "_wall_s": 1.0},
        ("baseline", 1): {"student": {"test_accuracy": 0.9}, "_wall_s": 1.0},
        ("dml", 0): {
            "student": {"test_accuracy": 0.85},
            "peers": [{}, {"test_accuracy": 0.84}],
            "_wall_s": 2.0,
        },
    }
    table = bench.scheme_table(bench.SCHEMES["dml"], args, runs)
    assert "Seeds 0;" in table and "80.00 ± 0.00" in table and "+5.00 ± 0.00" in table
    assert "no seed has finished" in bench.scheme_table(bench.SCHEMES["dino"], args, runs)
