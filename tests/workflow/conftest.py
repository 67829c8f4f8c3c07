"""A tiny demo-like folder shared by the workflow tests (built once, in a few seconds).

``student_no_kd/`` and ``student_kd/`` are real ``run_experiment`` runs of a 16-unit MLP on
256 training / 128 test images for one epoch (the KD run taught by the shipped teacher), and
``report.json`` holds the demo's measured rows, as ``kdistill demo`` would leave them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdistill.data import find_fashion_mnist

TINY = [
    "data.train_subset=256",
    "data.test_subset=128",
    "data.batch_size=64",
    "student.model=mlp",
    "student.kwargs={hidden: [16]}",
    "optim.schedule=cosine",
]


def _have_fashion_mnist() -> bool:
    try:
        find_fashion_mnist()
    except FileNotFoundError:  # pragma: no cover - CI installs the Debian package
        return False
    return True


@pytest.fixture
def tiny_overrides() -> list[str]:
    """``--set`` overrides that make any Fashion-MNIST config a seconds-long run."""
    if not _have_fashion_mnist():
        pytest.skip("Fashion-MNIST not installed")
    return list(TINY)


@pytest.fixture(scope="session")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A demo output folder with tiny runs: student_no_kd/, student_kd/, report.json."""
    if not _have_fashion_mnist():
        pytest.skip("Fashion-MNIST not installed")
    from kdistill.demo import _measure, demo_configs
    from kdistill.experiment import builtin_checkpoint, run_experiment
    from kdistill.report import comparison_table

    root = tmp_path_factory.mktemp("tiny_demo")
    no_kd_cfg, kd_cfg = demo_configs(root, False, 0, 1, None, False, extra=TINY)
    no_kd = run_experiment(no_kd_cfg)
    kd = run_experiment(kd_cfg)
    rows = _measure(kd_cfg, builtin_checkpoint("fashion_mnist_teacher"), no_kd, kd, repeats=2)
    (root / "report.json").write_text(json.dumps({"rows": [r.to_dict() for r in rows]}))
    (root / "report.md").write_text("# demo\n\n" + comparison_table(rows, rows[0], 256))
    return root
