"""Config errors: each unknown or ill-typed key fails before training, in one clear line.

The message names the full dotted path (list items and stages included), what was expected
(type or allowed values) and, for a misspelt key, a "did you mean" hint.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kdistill.cli import main
from kdistill.config import (
    ConfigError,
    DataConfig,
    DistillConfig,
    ExperimentConfig,
    ModelConfig,
    OptimConfig,
    StageConfig,
    TermConfig,
    TrainConfig,
    config_from_dict,
)
from kdistill.distiller import Distiller, LossTerm
from kdistill.losses import KDLoss


def _error(data: dict[str, Any]) -> str:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


TWO_STAGES = [{"name": "hint"}, {"name": "kd"}]


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"distill": {"terms": [{"wieght": 1.0}]}},
            "distill.terms[0].wieght: unknown key in distill.terms[0]; allowed keys: name, "
            "loss, weight, student, teacher, params, adapter, warmup_epochs "
            "(did you mean 'distill.terms[0].weight'?)",
        ),
        (
            {"stages": [TWO_STAGES[0], {"name": "kd", "distill": {"temprature": 8}}]},
            "stages[1].distill.temprature: unknown key in stages[1].distill; allowed keys: "
            "temperature, alpha, label_smoothing, cache_teacher, cache_dtype, cache_dir, "
            "cache_rebuild, terms (did you mean 'stages[1].distill.temperature'?)",
        ),
        (
            {"stages": [{"name": "a", "optim": {"nme": "sgd"}}]},
            "(did you mean 'stages[0].optim.name'?)",
        ),
        (
            {"stages": [{"name": "a", "distill": {"terms": [{}, {"lose": "kd"}]}}]},
            "stages[0].distill.terms[1].lose: unknown key",
        ),
        ({"train": {"chekpoint_every": 5}}, "(did you mean 'train.checkpoint_every'?)"),
        ({"trian": {}}, "trian: unknown key at the top level"),
    ],
)
def test_unknown_keys_name_the_full_dotted_path_and_the_closest_key(
    data: dict[str, Any], expected: str
) -> None:
    assert expected in _error(data)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            {"distill": {"terms": [{"weight": "heavy"}]}},
            "distill.terms[0].weight: expected a number, got 'heavy' (str)",
        ),
        (
            {"distill": {"terms": [{}, {"adapter": "autoo"}]}},
            "distill.terms[1].adapter: 'autoo' is not allowed; choose one of: auto, none "
            "(did you mean 'auto'?)",
        ),
        (
            {"stages": [TWO_STAGES[0], {"name": "kd", "optim": {"schedule": "cosin"}}]},
            "stages[1].optim.schedule: 'cosin' is not allowed; choose one of: constant, cosine, "
            "onecycle, step (did you mean 'cosine'?)",
        ),
        (
            {"stages": [{"name": "a", "epochs": 1.5}]},
            "stages[0].epochs: expected an integer, got 1.5 (float)",
        ),
        (
            {"stages": [{"name": "a", "distill": {"temperature": -1}}]},
            "stages[0].distill.temperature: must be > 0, got -1.0",
        ),
        ({"train": {"checkpoint_every": "10"}}, "train.checkpoint_every: expected an integer"),
        ({"train": {"skip_nonfinite": True}}, "train.skip_nonfinite: expected an integer"),
        ({"distill": {"terms": ["kd"]}}, "distill.terms[0]: expected a mapping, got 'kd' (str)"),
        ({"stages": {"name": "a"}}, "stages: expected a list, got"),
        ({"optim": {"grad_clip": "off"}}, "optim.grad_clip: expected a number"),
    ],
)
def test_ill_typed_values_name_the_key_and_what_was_expected(
    data: dict[str, Any], expected: str
) -> None:
    assert expected in _error(data)


def test_a_bad_stage_key_stops_the_cli_before_training_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    path = tmp_path / "exp.yaml"
    data = {
        "output_dir": str(out),
        "stages": [{"name": "hint"}, {"name": "kd", "distill": {"temprature": 8}}],
    }
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "stages[1].distill.temprature" in err[0]
    assert "did you mean 'stages[1].distill.temperature'" in err[0]
    assert not out.exists()  # nothing was trained or written


# -- fuzz: a misspelt key anywhere ------------------------------------------------------------

SECTIONS: dict[str, type] = {
    "": ExperimentConfig,
    "data": DataConfig,
    "student": ModelConfig,
    "teacher": ModelConfig,
    "distill": DistillConfig,
    "distill.terms[0]": TermConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "stages[1]": StageConfig,
    "stages[1].distill": DistillConfig,
    "stages[1].distill.terms[0]": TermConfig,
    "stages[1].optim": OptimConfig,
}


def _place(prefix: str, key: str) -> dict[str, Any]:
    """A config holding ``{key: 1}`` in the section ``prefix`` (e.g. ``stages[1].optim``)."""
    node: dict[str, Any] = {key: 1}
    for part in reversed([p for p in prefix.split(".") if p]):
        match = re.fullmatch(r"(\w+)\[(\d+)\]", part)
        if match:
            items: list[dict[str, Any]] = [{} for _ in range(int(match[2]) + 1)]
            if match[1] == "stages":
                items = [{"name": f"s{i}"} for i in range(len(items))]
            items[-1].update(node)
            node = {match[1]: items}
        else:
            node = {part: node}
    return node


@st.composite
def typos(draw: st.DrawFn) -> tuple[str, str, str]:
    prefix = draw(st.sampled_from(sorted(SECTIONS)))
    keys = [f.name for f in dataclasses.fields(SECTIONS[prefix])]
    key = draw(st.sampled_from([k for k in keys if len(k) >= 4]))
    i = draw(st.integers(0, len(key) - 1))
    edit = draw(st.sampled_from(["delete", "double", "swap", "replace"]))
    if edit == "delete":
        typo = key[:i] + key[i + 1 :]
    elif edit == "double":
        typo = key[:i] + key[i] + key[i:]
    elif edit == "swap" and i + 1 < len(key):
        typo = key[:i] + key[i + 1] + key[i] + key[i + 2 :]
    else:
        typo = key[:i] + draw(st.sampled_from("xqz")) + key[i + 1 :]
    return prefix, key, typo


@settings(max_examples=40, deadline=None, derandomize=True)
@given(typos())
def test_any_misspelt_key_is_named_with_its_dotted_path_and_a_hint(
    case: tuple[str, str, str],
) -> None:
    prefix, _key, typo = case
    keys = {f.name for f in dataclasses.fields(SECTIONS[prefix])}
    if typo in keys:
        return  # the edit made another valid key
    message = _error(_place(prefix, typo))
    dotted = f"{prefix}.{typo}" if prefix else typo
    assert message.startswith(f"{dotted}: unknown key")
    hint = re.search(r"\(did you mean '([^']+)'\?\)$", message)
    assert hint is not None, message
    suggested = hint[1]
    assert suggested.rsplit(".", 1)[-1] in keys
    assert suggested == (f"{prefix}.{suggested.rsplit('.', 1)[-1]}" if prefix else suggested)


def test_every_dataclass_field_has_a_type_the_loader_checks() -> None:
    """No section field escapes validation (``Any`` only where a free mapping is meant)."""
    for cls in set(SECTIONS.values()):
        for name, hint in typing.get_type_hints(cls).items():
            assert hint is not Any, f"{cls.__name__}.{name}"


# -- mismatched models --------------------------------------------------------------------------


def test_teacher_and_student_class_counts_that_differ_say_what_to_map() -> None:
    student, teacher = nn.Linear(4, 3), nn.Linear(4, 5)
    distiller = Distiller(student, [LossTerm("kd", KDLoss(2.0))], teacher=teacher)
    with pytest.raises(ValueError, match=r"student has 3 classes, teacher has 5.*map the teacher"):
        distiller(torch.randn(2, 4), torch.tensor([0, 1]))
