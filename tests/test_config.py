from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.cli import main
from kdistill.config import (
    ConfigError,
    ExperimentConfig,
    apply_overrides,
    config_from_dict,
    load_config,
)

# -- building -----------------------------------------------------------------------------


def test_defaults_build() -> None:
    cfg = config_from_dict({})
    assert cfg == ExperimentConfig()
    assert cfg.teacher is None
    assert cfg.distill.alpha == 0.9 and cfg.optim.name == "adamw"
    assert config_from_dict(cfg.to_dict()) == cfg


def test_nested_sections_build_typed_dataclasses() -> None:
    cfg = config_from_dict(
        {
            "seed": 3,
            "data": {"batch_size": 32, "augment": True},
            "teacher": {"model": "mlp", "kwargs": {"hidden": [64]}},
            "student": {"model": "mlp", "kwargs": {"hidden": [8]}},
            "distill": {
                "temperature": 2,
                "terms": [
                    {"name": "kd", "loss": "kd", "weight": 1},
                    {"name": "ce", "loss": "cross_entropy", "teacher": None},
                ],
            },
            "optim": {"name": "sgd", "schedule": "step", "milestones": [2, 4]},
        }
    )
    assert cfg.seed == 3 and cfg.data.batch_size == 32 and cfg.data.augment is True
    assert cfg.teacher is not None and cfg.teacher.kwargs == {"hidden": [64]}
    assert cfg.distill.temperature == 2.0 and isinstance(cfg.distill.temperature, float)
    assert [t.name for t in cfg.distill.terms] == ["kd", "ce"]
    assert cfg.distill.terms[1].teacher is None
    assert isinstance(cfg.distill.terms[0].weight, float)
    assert cfg.optim.milestones == [2, 4]


def test_overrides_parse_numbers_and_bools_as_yaml() -> None:
    data = apply_overrides(
        {"distill": {"alpha": 0.5}},
        ["distill.temperature=8", "train.epochs=3", "train.progress=false", "optim.lr=0.5"],
    )
    assert data == {
        "distill": {"alpha": 0.5, "temperature": 8},
        "train": {"epochs": 3, "progress": False},
        "optim": {"lr": 0.5},
    }
    cfg = config_from_dict(apply_overrides({}, ["distill.temperature=8", "train.epochs=3"]))
    assert cfg.distill.temperature == 8.0 and cfg.train.epochs == 3


def test_overrides_do_not_modify_the_input() -> None:
    original = {"distill": {"alpha": 0.5}}
    apply_overrides(original, ["distill.alpha=0.1"])
    assert original == {"distill": {"alpha": 0.5}}


@pytest.mark.parametrize("item", ["distill.temperature", "=3"])
def test_override_without_key_value_form_raises_config_error(item: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, [item])


def test_override_into_a_scalar_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"seed": 1}, ["seed.x=2"])


# -- errors name the dotted key ----------------------------------------------------------


def test_misspelt_key_names_it_and_suggests_the_right_one() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"distill": {"temprature": 8}})
    message = str(info.value)
    assert "distill.temprature" in message
    assert "did you mean 'distill.temperature'" in message


def test_unknown_top_level_section_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="optimizer"):
        config_from_dict({"optimizer": {}})


def test_literal_value_lists_the_allowed_choices() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_dict({"optim": {"name": "rmsprop"}})
    message = str(info.value)
    assert message.startswith("optim.name:")
    assert "sgd, adam, adamw" in message


def test_alpha_out_of_range_names_distill_alpha() -> None:
    with pytest.raises(ConfigError, match=r"^distill\.alpha:"):
        config_from_dict({"distill": {"alpha": 1.5}})


def test_string_for_an_integer_says_expected_an_integer() -> None:
    with pytest.raises(ConfigError, match=r"train\.epochs: expected an integer"):
        config_from_dict({"train": {"epochs": "ten"}})


def test_negative_term_weight_names_the_indexed_term_key() -> None:
    terms = [{"name": "a"}, {"name": "b", "weight": -1}]
    with pytest.raises(ConfigError, match=r"^distill\.terms\[1\]\.weight:"):
        config_from_dict({"distill": {"terms": terms}})


@pytest.mark.parametrize(("section", "key"), [("train", "epochs"), ("seed", None)])
def test_booleans_are_not_accepted_as_integers(section: str, key: str | None) -> None:
    data: dict[str, Any] = {section: True} if key is None else {section: {key: True}}
    with pytest.raises(ConfigError, match="expected an integer"):
        config_from_dict(data)


def test_booleans_are_not_accepted_as_numbers() -> None:
    with pytest.raises(ConfigError, match=r"distill\.temperature: expected a number"):
        config_from_dict({"distill": {"temperature": True}})


def test_null_for_a_required_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"optim\.lr: must not be null"):
        config_from_dict({"optim": {"lr": None}})


def test_section_given_as_a_scalar_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"^data: expected a mapping"):
        config_from_dict({"data": 3})


def test_duplicate_term_names_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"distill\.terms: duplicate"):
        config_from_dict({"distill": {"terms": [{"name": "kd"}, {"name": "kd"}]}})


def test_step_schedule_without_milestones_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"optim\.milestones"):
        config_from_dict({"optim": {"schedule": "step"}})


def test_huge_integer_for_a_float_key_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"distill\.temperature"):
        config_from_dict({"distill": {"temperature": 10**400}})


def test_scientific_notation_without_a_dot_is_read_as_a_number(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("optim:\n  lr: 2e-3\n")
    assert load_config(path, ["optim.weight_decay=1e-4"]).optim.lr == 0.002


# -- files --------------------------------------------------------------------------------


def test_load_config_reads_yaml_and_applies_overrides(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("seed: 7\ndistill:\n  alpha: 0.5\ntrain:\n  epochs: 2\n")
    cfg = load_config(path, ["train.epochs=4"])
    assert cfg.seed == 7 and cfg.distill.alpha == 0.5 and cfg.train.epochs == 4


def test_load_config_of_an_empty_file_gives_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(path) == ExperimentConfig()


def test_load_config_of_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_load_config_of_a_non_mapping_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(path)


def test_load_config_of_invalid_yaml_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("distill: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(path)


def test_shipped_configs_load() -> None:
    import kdistill

    folder = Path(kdistill.__file__).parent / "configs"
    paths = sorted(folder.glob("*.yaml"))
    assert paths
    for path in paths:
        load_config(path)


# -- the command line ---------------------------------------------------------------------


def test_cli_reports_a_bad_key_in_one_line_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("distill:\n  temprature: 8\n")
    assert main(["run", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("kdistill: error: distill.temprature")
    assert "Traceback" not in captured.err


def test_cli_reports_a_bad_override_value_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text("seed: 1\n")
    assert main(["run", str(path), "--set", "distill.alpha=2"]) == 2
    assert "distill.alpha" in capsys.readouterr().err


def test_cli_reports_a_missing_config_file_and_returns_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["run", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err


@pytest.fixture
def tiny_data(monkeypatch: pytest.MonkeyPatch) -> None:
    """Replace the data set with a few random images; keep global torch flags unchanged."""
    import torch

    import kdistill.experiment as experiment

    def fake_load_data(cfg: Any) -> Any:
        x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
        return (x, y), (x, y)

    monkeypatch.setattr(experiment, "load_data", fake_load_data)
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)


@pytest.mark.parametrize(
    "yaml_text",
    [
        "student:\n  model: no_such_model\n",
        "distill:\n  terms:\n    - {name: x, loss: no_such_loss, teacher: null}\n",
        "teacher: {model: mlp}\nstudent: {model: mlp}\ndata: {augment: true}\n",
    ],
    ids=["unknown-model", "unknown-loss", "cache-teacher-with-augment"],
)
def test_cli_reports_config_mistakes_found_while_building_the_run_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_data: None, yaml_text: str
) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(yaml_text + f"output_dir: {tmp_path / 'out'}\ntrain: {{progress: false}}\n")
    assert main(["run", str(path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


# -- property: bad input only ever raises ConfigError ------------------------------------

SECTION_KEYS = {
    "data": ["name", "root", "train_subset", "test_subset", "batch_size", "augment"],
    "teacher": ["model", "kwargs", "checkpoint"],
    "student": ["model", "kwargs", "checkpoint"],
    "distill": ["temperature", "alpha", "label_smoothing", "cache_teacher", "terms"],
    "optim": ["name", "lr", "weight_decay", "schedule", "milestones", "gamma", "grad_clip"],
    "train": ["epochs", "device", "threads", "progress", "deterministic"],
}
TERM_KEYS = ["name", "loss", "weight", "student", "teacher", "params"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
    st.sampled_from(["sgd", "adam", "cosine", "step", "cpu", "cuda:0", "logits", "kd"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.text(max_size=6), inner, max_size=3),
    ),
    max_leaves=8,
)
terms = st.lists(
    st.dictionaries(st.sampled_from([*TERM_KEYS, "bogus"]), values, max_size=4), max_size=3
)


@st.composite
def config_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    data: dict[Any, Any] = {}
    for section in draw(st.lists(st.sampled_from([*SECTION_KEYS, "seed", "output_dir", "x"]))):
        if section in ("seed", "output_dir", "x"):
            data[section] = draw(values)
            continue
        if draw(st.integers(0, 9)) == 0:
            data[section] = draw(values)  # sometimes not a mapping at all
            continue
        keys = st.one_of(st.sampled_from(SECTION_KEYS[section]), st.text(max_size=6))
        body: dict[Any, Any] = {}
        for key in draw(st.lists(keys, max_size=4)):
            body[key] = draw(terms) if key == "terms" else draw(values)
        data[section] = body
    return data


@settings(max_examples=100, deadline=None)
@given(config_dicts())
def test_random_configs_either_build_or_raise_config_error(data: dict[Any, Any]) -> None:
    try:
        cfg = config_from_dict(data)
    except ConfigError:
        return
    assert isinstance(cfg, ExperimentConfig)
