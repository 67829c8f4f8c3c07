"""Specification tests for the LM run configuration (`kdistill.lm.config`)."""

from __future__ import annotations

import typing
from pathlib import Path

import pytest

from kdistill.config import ConfigError
from kdistill.lm.config import (
    LMDistillConfig,
    LMExperimentConfig,
    lm_config_from_dict,
    load_lm_config,
)
from kdistill.lm.divergences import KINDS

EXAMPLES = sorted((Path(__file__).parents[2] / "examples" / "lm").glob("*.yaml"))
TINY = {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2}


def _config(**sections) -> dict:
    base = {
        "data": {"text_file": "x.txt"},
        "teacher": {"config": dict(TINY)},
        "student": {"init_from_teacher": True},
    }
    base.update(sections)
    return base


def test_every_example_config_validates() -> None:
    assert len(EXAMPLES) >= 4
    objectives = {load_lm_config(path).distill.objective for path in EXAMPLES}
    assert objectives == {"token_kd", "seqkd", "gkd", "distilbert"}


def test_divergence_names_are_those_of_the_loss() -> None:
    hints = typing.get_type_hints(LMDistillConfig)
    assert set(typing.get_args(hints["divergence"])) == set(KINDS)


def test_defaults_are_a_valid_config() -> None:
    cfg = LMExperimentConfig(teacher=lm_config_from_dict(_config()).teacher)
    assert cfg.distill.objective == "token_kd" and cfg.distill.alpha == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"distill": {"divergnce": "jsd"}}, "distill.divergnce: unknown key.*'distill.divergence'"),
        ({"distill": {"divergence": "jsdd"}}, "distill.divergence: 'jsdd' is not allowed"),
        ({"distill": {"beta": 1.5}}, r"distill.beta: must be in \[0, 1\]"),
        ({"distill": {"alpha": -0.1}}, "distill.alpha: must be in"),
        ({"distill": {"weights": {"kd": 1, "mse": 2}}}, r"distill.weights: unknown keys \['mse'\]"),
        ({"data": {"text_file": "a", "corpus": "kjv"}}, "data.text_file: give exactly one"),
        ({"data": {"corpus": "wiki"}}, "data.corpus: 'wiki' is not allowed"),
        ({"data": {"text_file": "a", "max_length": 1}}, "data.max_length: must be >= 2"),
        ({"seqkd": {"lam": 2}}, r"seqkd.lam: the on-policy fraction must be in \[0, 1\]"),
        ({"seqkd": {"strategy": "beam", "num_beams": 1}}, "seqkd.num_beams"),
        ({"student": {"path": "p", "config": TINY}}, "student.path: give only one"),
        ({"student": {"config": TINY, "num_layers": 2}}, "student.num_layers: .*init_from_teacher"),
        ({"teacher": None}, "teacher: student.init_from_teacher needs a teacher"),
        ({"optim": {"lr": 0}}, "optim.lr: must be > 0"),
        ({"distill": {"cache_topk": 0}}, "distill.cache_topk: must be > 0"),
        ({"distill": {"cache_dtype": "int8"}}, "distill.cache_dtype: 'int8' is not allowed"),
        (
            {"distill": {"cache_dir": "c", "objective": "seqkd"}},
            "distill.cache_dir: .*token_kd only, not seqkd",
        ),
        (
            {"distill": {"cache_dir": "c", "alpha": 0.0}},
            "distill.cache_dir: alpha: 0 trains without the teacher",
        ),
    ],
)
def test_bad_values_name_the_dotted_key(override: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        lm_config_from_dict(_config(**override))


def test_teacher_cache_keys_mirror_the_vision_config() -> None:
    cfg = lm_config_from_dict(_config(distill={"cache_dir": "runs/cache", "cache_topk": 8}))
    d = cfg.distill
    assert (d.cache_dir, d.cache_topk) == ("runs/cache", 8)
    assert (d.cache_dtype, d.cache_rebuild) == ("float16", False)
    assert lm_config_from_dict(_config()).distill.cache_dir is None  # live teacher by default


def test_objective_and_architecture_must_agree() -> None:
    with pytest.raises(ConfigError, match=r"distill\.objective: distilbert needs masked-LM"):
        lm_config_from_dict(_config(distill={"objective": "distilbert"}))
    bert = {"arch": "bert", "config": dict(TINY)}
    with pytest.raises(ConfigError, match=r"distill\.objective: token_kd needs causal LMs"):
        lm_config_from_dict(_config(teacher=bert))
    assert lm_config_from_dict(_config(teacher=bert, distill={"objective": "distilbert"}))


def test_teacher_free_baseline_needs_no_teacher() -> None:
    cfg = lm_config_from_dict(
        _config(teacher=None, student={"config": TINY}, distill={"alpha": 0.0})
    )
    assert cfg.teacher is None
    with pytest.raises(ConfigError, match="teacher: seqkd needs a teacher"):
        lm_config_from_dict(
            _config(teacher=None, student={"config": TINY}, distill={"objective": "seqkd"})
        )


def test_temperature_defaults_per_objective() -> None:
    assert LMDistillConfig().resolved_temperature == 1.0
    assert LMDistillConfig(objective="distilbert").resolved_temperature == 2.0
    assert LMDistillConfig(objective="distilbert", temperature=4.0).resolved_temperature == 4.0


def test_overrides_apply_to_nested_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "data: {text_file: t.txt}\nteacher: {config: {hidden_size: 16}}\n"
        "student: {init_from_teacher: true}\n"
    )
    cfg = load_lm_config(path, ["distill.divergence=reverse_kl", "seqkd.lam=1.0"])
    assert cfg.distill.divergence == "reverse_kl" and cfg.seqkd.lam == 1.0


def test_kdistill_lm_steps_with_fused_adamw_by_default() -> None:
    assert lm_config_from_dict(_config()).optim.fused is True
    assert lm_config_from_dict(_config(optim={"fused": False})).optim.fused is False
    assert lm_config_from_dict(_config(optim={"name": "sgd"})).optim.fused is False
