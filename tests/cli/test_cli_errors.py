"""Every mistake a user can make with config, data, files or disk ends ``kdistill`` with a short
message naming the culprit on stderr, exit code 2 and no traceback; ``--traceback`` and
``KDISTILL_DEBUG=1`` show the stack for bug reports.

The cases run through the real command line in subprocesses: most in one process
(``cli_driver.py``, which calls the CLI's ``main`` once per case, each with fresh stdout and
stderr, and turns an escaping exception into the traceback Python would print), a few as their
own ``python -m kdistill``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from cli_helpers import REPO, kdistill

TINY = ["train.epochs=1", "data.batch_size=20", "train.tensorboard=false"]


def _sets(*items: str) -> list[str]:
    return [arg for item in [*TINY, *items] for arg in ("--set", item)]


def _yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def _absolute_root(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    data["data"]["root"] = str(path.parent / data["data"]["root"])
    return data


def _cases(project: Path, work: Path) -> list[dict[str, Any]]:
    """``{"name", "argv", "expect": [substrings of stderr], "fault"?, "code"?}`` in run order."""
    folder, teacher_yaml = str(project / "distill_folder.yaml"), str(project / "teacher.yaml")
    out = lambda name: f"output_dir={work / name}"  # noqa: E731
    bad = np.load(project / "arrays.npz")
    np.savez(work / "wrong_keys.npz", a=bad["x_train"], b=bad["y_train"])
    nan_x = bad["x_train"].astype(np.float32)
    nan_x[3, 5, 5] = np.nan
    np.savez(work / "nan.npz", x_train=nan_x, y_train=bad["y_train"])
    corrupt = work / "corrupt_images"
    for sub in sorted((project / "images").iterdir())[:2]:
        (corrupt / sub.name).mkdir(parents=True)
        for image in sorted(sub.iterdir())[:3]:
            (corrupt / sub.name / image.name).write_bytes(image.read_bytes())
    (corrupt / sub.name / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    utf8 = work / "latin1.yaml"
    utf8.write_bytes("output_dir: runs/caf\xe9\n".encode("latin-1"))
    busy = work / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    hint = {
        "name": "hint",
        "loss": "hint",
        "student": "features.1",
        "teacher": "features.1",
        "adapter": "none",
    }
    terms = _yaml(
        work / "terms.yaml",
        {
            **_absolute_root(project / "distill_folder.yaml"),
            "distill": {"terms": [hint, {"name": "ce", "loss": "cross_entropy", "teacher": None}]},
        },
    )
    exported = str(project / "exported.safetensors")
    return [
        {
            "name": "missing config file",
            "argv": ["run", str(work / "nope.yaml")],
            "expect": ["nope.yaml", "not found"],
        },
        {
            "name": "KDISTILL_DEBUG=1",
            "argv": ["run", str(work / "nope.yaml")],
            "env": {"KDISTILL_DEBUG": "1"},
            "code": 1,
            "expect": [],
        },
        {
            "name": "config not UTF-8",
            "argv": ["run", str(utf8)],
            "expect": ["latin1.yaml", "UTF-8"],
        },
        {
            "name": "misspelt key",
            "argv": ["run", folder, *_sets(out("typo"), "distill.temprature=2")],
            "expect": ["distill.temprature", "distill.temperature"],
        },
        {
            "name": "built-in data.root missing",
            "argv": [
                "run",
                teacher_yaml,
                *_sets(
                    out("fm"),
                    "data.name=fashion_mnist",
                    "data.root=/nonexistent/fm",
                    "data.image_size=null",
                    "data.channels=null",
                    "data.test_fraction=0.2",
                ),
            ],
            "expect": ["data.root", "/nonexistent/fm", "looked at"],
        },
        {
            "name": "image folder missing",
            "argv": ["run", folder, *_sets(out("nofolder"), "data.root=no_such_images")],
            "expect": ["data.root", "no_such_images", str(project / "no_such_images")],
        },
        {
            "name": "corrupt image",
            "argv": ["run", folder, *_sets(out("corrupt"), f"data.root={corrupt}")],
            "expect": ["broken.png", "cannot read image"],
        },
        {
            "name": "npz without known arrays",
            "argv": [
                "run",
                str(project / "distill_npz.yaml"),
                *_sets(out("keys"), f"data.root={work / 'wrong_keys.npz'}"),
            ],
            "expect": ["wrong_keys.npz", "x_train"],
        },
        {
            "name": "NaN in the data",
            "argv": [
                "run",
                str(project / "distill_npz.yaml"),
                *_sets(out("nan_data"), f"data.root={work / 'nan.npz'}"),
            ],
            "expect": ["nan.npz:x_train[3]", "NaN"],
        },
        {
            "name": "model module not importable",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("import"), "student.model=no_such_module:Net", "teacher.checkpoint=null"
                ),
            ],
            "expect": ["student.model", "no_such_module"],
        },
        {
            "name": "student with 5 classes, 10-class teacher",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("five"),
                    "student.kwargs.num_classes=5",
                    f"teacher.checkpoint={project / 'teacher_ok.safetensors'}",
                ),
            ],
            "expect": ["student.kwargs", "5 classes", "10"],
        },
        {
            "name": "teacher with 5 classes",
            "argv": [
                "run",
                folder,
                *_sets(out("five_t"), "teacher.kwargs.num_classes=5", "teacher.checkpoint=null"),
            ],
            "expect": ["teacher", "5 classes", "num_classes"],
        },
        {
            "name": "feature shapes differ without adapter",
            "argv": [
                "run",
                terms,
                *_sets(out("terms"), f"teacher.checkpoint={project / 'teacher_ok.safetensors'}"),
            ],
            "expect": ["distill.terms", "features.1", "adapter"],
        },
        {
            "name": "truncated teacher checkpoint",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("trunc"), f"teacher.checkpoint={project / 'teacher_truncated.safetensors'}"
                ),
            ],
            "expect": ["teacher.checkpoint", "teacher_truncated.safetensors"],
        },
        {
            "name": "missing teacher checkpoint",
            "argv": [
                "run",
                folder,
                *_sets(out("nockpt"), f"teacher.checkpoint={project / 'nowhere.safetensors'}"),
            ],
            "expect": ["teacher.checkpoint", "nowhere.safetensors"],
        },
        {
            "name": "NaN in the teacher's weights",
            "argv": [
                "run",
                folder,
                *_sets(out("nan_w"), f"teacher.checkpoint={project / 'teacher_nan.safetensors'}"),
            ],
            "expect": ["teacher.checkpoint", "NaN", "head.weight"],
        },
        {
            "name": "NaN in the teacher's outputs",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("nan_out"),
                    "teacher.model=bad_models:NaNTeacher",
                    "teacher.kwargs={}",
                    "teacher.checkpoint=null",
                ),
            ],
            "expect": ["teacher", "NaN", "not the student"],
        },
        {
            "name": "resume without checkpoint",
            "argv": ["run", folder, *_sets(out("fresh")), "--resume"],
            "expect": ["--resume", "no complete checkpoint", str(work / "fresh")],
        },
        {
            "name": "output folder not empty",
            "argv": ["run", folder, *_sets(f"output_dir={busy}")],
            "expect": ["output_dir", str(busy), "--overwrite", "--resume"],
        },
        {
            "name": "overwrite refuses a folder that is not a run",
            "argv": ["run", folder, *_sets(f"output_dir={busy}"), "--overwrite"],
            "expect": ["--overwrite", "does not look like a kdistill run"],
        },
        {
            "name": "read-only output disk",
            "argv": ["run", folder, *_sets(out("readonly"))],
            "fault": "erofs",
            "expect": [str(work / "readonly"), "read-only"],
        },
        {
            "name": "full output disk",
            "argv": [
                "run",
                folder,
                *_sets(out("full"), f"teacher.checkpoint={project / 'teacher_ok.safetensors'}"),
            ],
            "fault": "enospc",
            "expect": [str(work / "full"), "no space left"],
        },
        {
            "name": "predict floats in 0-255",
            "argv": ["predict", exported, str(project / "float255.npy")],
            "expect": ["255]", "trained on [0, 1]", "divide by 255"],
        },
        {
            "name": "predict wrong image size",
            "argv": ["predict", exported, str(project / "small.npy")],
            "expect": ["(2, 14, 14)", "(1, 28, 28)"],
        },
        {
            "name": "LM teacher.path missing",
            "argv": [
                "lm",
                str(REPO / "examples/lm/tiny_token_kd.yaml"),
                "--set",
                "teacher.path=no/such/teacher",
                "--set",
                "teacher.config={}",
                "--set",
                out("lm"),
            ],
            "expect": ["teacher.path", "no/such/teacher", "does not exist"],
        },
        # the good path in the same process: epoch lines without progress bars, then
        # --overwrite clears the run (and its old export/)
        {
            "name": "run",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("good"),
                    "train.progress=false",
                    f"teacher.checkpoint={project / 'teacher_ok.safetensors'}",
                ),
            ],
            "code": 0,
            "expect": [],
        },
        {
            "name": "factory from the config's folder",
            "argv": [
                "run",
                str(project / "distill_npz.yaml"),
                *_sets(
                    out("factory"),
                    "data.name=factory",
                    "data.factory=my_data:load",
                    "data.kwargs={n: 50}",
                    "data.root=null",
                    f"teacher.checkpoint={project / 'teacher_ok.safetensors'}",
                ),
            ],
            "code": 0,
            "expect": [],
        },
        {
            "name": "export",
            "argv": ["export", str(work / "good")],
            "code": 0,
            "expect": [],
        },
        {
            "name": "overwrite",
            "argv": [
                "run",
                folder,
                *_sets(
                    out("good"),
                    "train.progress=false",
                    f"teacher.checkpoint={project / 'teacher_ok.safetensors'}",
                ),
                "--overwrite",
            ],
            "code": 0,
            "expect": [],
        },
    ]


@pytest.fixture(scope="module")
def driven(project: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every case of :func:`_cases` run in one subprocess; ``{name: result, "_cases": ...}``."""
    work = tmp_path_factory.mktemp("cases")
    _exported_fixtures(project)
    cases = _cases(project, work)
    (work / "cases.json").write_text(json.dumps(cases))
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).parent / "cli_driver.py"), str(work / "cases.json")],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"results": results, "cases": {c["name"]: c for c in cases}, "work": work}


def _env() -> dict[str, str]:
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KDISTILL_DEBUG")}
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = str(REPO / "src")  # the driver imports kdistill as installed
    return env


def _exported_fixtures(project: Path) -> None:
    """An exported ``models:Student`` file and images to feed it (float 0-255, wrong size)."""
    from kdistill.checkpoint import save_weights
    from kdistill.export import FORMAT, _encode

    sys.path.insert(0, str(project))
    try:
        import models

        state = models.Student().state_dict()
    finally:
        sys.path.remove(str(project))
        sys.modules.pop("models", None)
    meta = {
        "format": FORMAT,
        "model": "models:Student",
        "kwargs": {},
        "data": "image_folder",
        "input_shape": [1, 28, 28],
        "num_classes": 10,
        "classes": [str(i) for i in range(10)],
        "mean": [0.3],
        "std": [0.35],
        "input_range": [0.0, 1.0],
        "import_dirs": [str(project)],
        "source": str(project),
    }
    save_weights(project / "exported.safetensors", state, _encode(meta))
    rng = np.random.default_rng(0)
    np.save(project / "float255.npy", rng.uniform(0, 255, (3, 28, 28)).astype(np.float32))
    np.save(project / "small.npy", rng.integers(0, 255, (2, 14, 14)).astype(np.uint8))


ERROR_CASES = [
    "missing config file",
    "config not UTF-8",
    "misspelt key",
    "built-in data.root missing",
    "image folder missing",
    "corrupt image",
    "npz without known arrays",
    "NaN in the data",
    "model module not importable",
    "student with 5 classes, 10-class teacher",
    "teacher with 5 classes",
    "feature shapes differ without adapter",
    "truncated teacher checkpoint",
    "missing teacher checkpoint",
    "NaN in the teacher's weights",
    "NaN in the teacher's outputs",
    "resume without checkpoint",
    "output folder not empty",
    "overwrite refuses a folder that is not a run",
    "read-only output disk",
    "full output disk",
    "predict floats in 0-255",
    "predict wrong image size",
    "LM teacher.path missing",
]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_a_user_error_is_one_message_naming_the_culprit_with_exit_code_2(
    driven: dict[str, Any], name: str
) -> None:
    result, case = driven["results"][name], driven["cases"][name]
    stderr = result["stderr"]
    assert "Traceback" not in stderr, stderr
    assert result["code"] == 2, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("kdistill: error:")]
    assert len(lines) == 1, stderr
    for expected in case["expect"]:
        assert expected in stderr, f"{expected!r} not in {stderr!r}"
    if name != "built-in data.root missing":  # that one lists the places it searched
        assert len(stderr.strip().splitlines()) <= 2, stderr


def test_epoch_lines_are_printed_without_progress_bars_and_overwrite_clears_the_run(
    driven: dict[str, Any],
) -> None:
    run, again = driven["results"]["run"], driven["results"]["overwrite"]
    assert run["code"] == 0 and again["code"] == 0, run["stderr"] + again["stderr"]
    assert driven["results"]["export"]["code"] == 0, driven["results"]["export"]["stderr"]
    assert not (driven["work"] / "good" / "export").exists()  # --overwrite cleared the old one
    assert "epoch 1: train_loss" in run["stdout"] and "\r" not in run["stdout"] + run["stderr"]
    summary = json.loads((driven["work"] / "good" / "summary.json").read_text())
    data = summary["data"]
    assert data["name"] == "image_folder" and data["image_files"] == 60
    assert data["train_samples"] + data["test_samples"] == 60 and data["num_classes"] == 10
    assert len(data["fingerprint"]["sha256"]) == 64 and data["bytes"] > 0


def test_a_factory_next_to_the_config_feeds_a_run(driven: dict[str, Any]) -> None:
    result = driven["results"]["factory from the config's folder"]
    assert result["code"] == 0, result["stderr"]
    data = json.loads((driven["work"] / "factory" / "summary.json").read_text())["data"]
    assert data["factory"] == "my_data:load" and data["path"].endswith("my_data.py")
    assert (data["train_samples"], data["test_samples"]) == (50, 20)
    assert data["classes"][:2] == ["c0", "c1"] and data["input_range"] == [0.0, 1.0]


def test_traceback_flag_and_debug_variable_show_the_stack(
    driven: dict[str, Any], tmp_path: Path
) -> None:
    flagged = kdistill("run", str(tmp_path / "missing.yaml"), "--traceback", cwd=tmp_path)
    assert flagged.returncode == 1 and "Traceback (most recent call last)" in flagged.stderr
    assert "ConfigError: config file not found" in flagged.stderr
    debug = driven["results"]["KDISTILL_DEBUG=1"]
    assert debug["code"] == 1 and "Traceback" in debug["stderr"]
    assert "ConfigError: config file not found" in debug["stderr"]


def test_a_missing_data_root_never_falls_back_to_the_system_copy(driven: dict[str, Any]) -> None:
    result = driven["results"]["built-in data.root missing"]
    assert "data.root: /nonexistent/fm not found" in result["stderr"]
    folder = driven["work"] / "fm"  # created and probed for writing, then nothing written
    assert not folder.exists() or not any(folder.iterdir())
