"""The ``scheme:`` section of a YAML experiment, for the distillation schemes.

A scheme file is an ordinary experiment file (``data``, ``teacher``, ``student``,
``distill``, ``optim``, ``train``, ...) plus a ``scheme:`` section naming the scheme and
holding its settings in a sub-section of the same name::

    scheme:
      name: mutual
      mutual: {temperature: 1.0, alpha: 0.5, peers: [{model: small_cnn}]}

Only the sub-section of the named scheme may appear (a ``dino:`` block under ``name:
mutual`` is an error, not silently ignored). Keys are validated like every other section
(unknown keys get a "did you mean"), and ``--set scheme.mutual.alpha=0.3`` overrides work.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdistill.config import (
    CONFIG_DIR,
    ConfigError,
    ExperimentConfig,
    ModelConfig,
    _build,
    _check_positive,
    config_from_dict,
    parse_yaml,
    read_config_file,
)

SchemeName = Literal[
    "mutual",
    "online_teacher",
    "born_again",
    "aux_heads",
    "mean_teacher",
    "dino",
    "multi_teacher",
    "semi_supervised",
]


def _check_unit(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"{name}: must be in [0, 1], got {value}")


@dataclass
class MutualConfig:
    """Deep mutual learning: ``student`` is peer 0, ``peers`` are the others."""

    peers: list[ModelConfig] = field(default_factory=list)
    temperature: float = 1.0
    alpha: float = 0.5  # weight of each peer's soft term; (1 - alpha) on its CE

    def __post_init__(self) -> None:
        if not self.peers:
            raise ConfigError("peers: list at least one model besides the student (peer 0)")
        _check_positive(self, "temperature")
        _check_unit(self, "alpha")


@dataclass
class OnlineTeacherConfig:
    """``teacher:`` trains alongside ``student:`` (from its checkpoint, if it has one)."""

    temperature: float = 4.0
    alpha: float = 0.9  # the student's soft-term weight
    teacher_alpha: float = 0.0  # > 0: the teacher also learns from the student (mutual)

    def __post_init__(self) -> None:
        _check_positive(self, "temperature")
        _check_unit(self, "alpha", "teacher_alpha")


@dataclass
class BornAgainConfig:
    """Born-Again generations of ``student:``; ``distill:`` is each generation's objective."""

    generations: int = 3
    ensemble: bool = True  # also report the accuracy of the ensemble of generations 1..k

    def __post_init__(self) -> None:
        _check_positive(self, "generations")


@dataclass
class AuxHeadsConfig:
    """Deep-to-shallow self-distillation: automatic heads on the named student layers."""

    layers: list[str] = field(default_factory=list)
    temperature: float = 3.0
    alpha: float = 0.5  # weight of KD (from the final head) in each head's loss
    aux_weight: float = 1.0
    hint_layer: str | None = None
    hint_weight: float = 0.0

    def __post_init__(self) -> None:
        if not self.layers:
            raise ConfigError("layers: name at least one student layer to put a head on")
        _check_positive(self, "temperature")
        _check_unit(self, "alpha")
        if self.aux_weight < 0 or self.hint_weight < 0:
            raise ConfigError("aux_weight and hint_weight must be >= 0")


@dataclass
class MeanTeacherConfig:
    """Mean Teacher; ``labelled_fraction`` < 1 hides the other labels (stratified draw)."""

    labelled_fraction: float = 1.0
    labelled_share: float | None = None  # oversample labelled rows to ~this share of a batch
    momentum: float = 0.99
    final_momentum: float = 0.999
    schedule: Literal["cosine", "constant"] = "cosine"
    consistency: Literal["mse", "kl"] = "mse"
    consistency_weight: float = 10.0
    ramp_up_epochs: float = 5.0
    temperature: float = 1.0
    augment_views: bool = True  # independent augmentations for student and teacher

    def __post_init__(self) -> None:
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ConfigError(f"labelled_fraction: must be in (0, 1], got {self.labelled_fraction}")
        if self.labelled_share is not None and not 0.0 < self.labelled_share < 1.0:
            raise ConfigError(
                f"labelled_share: must be in (0, 1) or null (no oversampling), "
                f"got {self.labelled_share}"
            )
        _check_unit(self, "momentum", "final_momentum")
        _check_positive(self, "temperature")
        if self.consistency_weight < 0 or self.ramp_up_epochs < 0:
            raise ConfigError("consistency_weight and ramp_up_epochs must be >= 0")


@dataclass
class DINOConfig:
    """DINO-style label-free training of ``student:`` (the backbone)."""

    feature_layer: str | None = None  # e.g. "pool" for small_cnn; null: the model's output
    out_dim: int = 1024
    hidden_dim: int = 256
    bottleneck_dim: int = 64
    use_bn: bool = True  # BatchNorm in the projection head (keeps small CNNs from collapsing)
    views: int = 2
    views_augment: Literal["crop", "shift_flip"] = "crop"  # see kdistill.schemes.augment
    crop_scale: list[float] = field(default_factory=lambda: [0.3, 1.0])  # crop area range
    jitter: float = 0.4  # crop views: brightness/contrast jitter strength (0: none)
    max_shift: int = 2  # shift_flip views (Fashion-MNIST): shifts up to this many pixels
    teacher_temperature: float = 0.04
    student_temperature: float = 0.1
    center_momentum: float = 0.9
    momentum: float = 0.996
    final_momentum: float = 1.0
    schedule: Literal["cosine", "constant"] = "cosine"
    knn_k: int = 20
    knn_bank: int | None = 10000  # labelled training images in the per-epoch k-NN bank

    def __post_init__(self) -> None:
        _check_positive(self, "out_dim", "hidden_dim", "bottleneck_dim", "knn_k")
        _check_positive(self, "teacher_temperature", "student_temperature")
        if self.views < 2:
            raise ConfigError(f"views: DINO needs at least 2, got {self.views}")
        if self.max_shift < 0:
            raise ConfigError(f"max_shift: must be >= 0, got {self.max_shift}")
        if len(self.crop_scale) != 2 or not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ConfigError(
                f"crop_scale: need [low, high] with 0 < low <= high <= 1, got {self.crop_scale}"
            )
        if self.jitter < 0:
            raise ConfigError(f"jitter: must be >= 0, got {self.jitter}")
        _check_unit(self, "center_momentum", "momentum", "final_momentum")
        if self.knn_bank is not None and self.knn_bank < 1:
            raise ConfigError(f"knn_bank: must be >= 1 or null, got {self.knn_bank}")


@dataclass
class MultiTeacherConfig:
    """An ensemble of teachers in place of ``teacher:``; ``distill:`` says how to learn from it."""

    teachers: list[ModelConfig] = field(default_factory=list)
    weights: list[float] | None = None
    mode: Literal["probs", "logits"] = "probs"
    confidence_weighting: Literal["none", "max_prob", "entropy"] = "none"
    temperature: float | None = None  # of the probability average; null: distill.temperature
    pretrain_epochs: int = 0  # train teachers without a checkpoint on the labels first

    def __post_init__(self) -> None:
        if not self.teachers:
            raise ConfigError("teachers: list at least one teacher model")
        if self.weights is not None and len(self.weights) != len(self.teachers):
            raise ConfigError(
                f"weights: {len(self.weights)} weights for {len(self.teachers)} teachers"
            )
        if self.weights is not None and (
            any(not w >= 0 for w in self.weights) or sum(self.weights) <= 0
        ):
            raise ConfigError(f"weights: must be >= 0 and not all 0, got {self.weights}")
        if self.temperature is not None:
            _check_positive(self, "temperature")
        if self.pretrain_epochs < 0:
            raise ConfigError(f"pretrain_epochs: must be >= 0, got {self.pretrain_epochs}")


@dataclass
class SemiSupervisedConfig:
    """Only ``labelled_fraction`` of the training labels are kept; KD on every image."""

    labelled_fraction: float = 0.05
    teacher_epochs: int = 0  # train a teacher without checkpoint on the labelled part first
    pseudo_label_threshold: float | None = None  # also use confident teacher labels as hard labels

    def __post_init__(self) -> None:
        if not 0.0 < self.labelled_fraction <= 1.0:
            raise ConfigError(f"labelled_fraction: must be in (0, 1], got {self.labelled_fraction}")
        if self.teacher_epochs < 0:
            raise ConfigError(f"teacher_epochs: must be >= 0, got {self.teacher_epochs}")
        if self.pseudo_label_threshold is not None:
            _check_unit(self, "pseudo_label_threshold")


SECTIONS: dict[str, type] = {
    "mutual": MutualConfig,
    "online_teacher": OnlineTeacherConfig,
    "born_again": BornAgainConfig,
    "aux_heads": AuxHeadsConfig,
    "mean_teacher": MeanTeacherConfig,
    "dino": DINOConfig,
    "multi_teacher": MultiTeacherConfig,
    "semi_supervised": SemiSupervisedConfig,
}


@dataclass
class SchemeConfig:
    """``name`` and the settings of that scheme (the other sections are unused)."""

    name: SchemeName
    settings: Any = None  # the dataclass of SECTIONS[name]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, self.name: dataclasses.asdict(self.settings)}


def scheme_from_dict(data: Any) -> SchemeConfig:
    """Validate a ``scheme:`` mapping into a :class:`SchemeConfig`."""
    if not isinstance(data, dict):
        raise ConfigError(f"scheme: expected a mapping, got {data!r}")
    name = data.get("name")
    if name not in SECTIONS:
        raise ConfigError(
            f"scheme.name: {name!r} is not a scheme; choose one of: {', '.join(SECTIONS)}"
        )
    for key in data:
        if key == "name":
            continue
        if key in SECTIONS:
            if key != name:
                raise ConfigError(
                    f"scheme.{key}: settings for scheme {key!r}, but scheme.name is {name!r}"
                )
            continue
        raise ConfigError(f"scheme.{key}: unknown key in scheme; allowed keys: name, {name}")
    settings = _build(SECTIONS[name], data.get(name) or {}, f"scheme.{name}")
    return SchemeConfig(name, settings)


def split_scheme_dict(data: dict[str, Any]) -> tuple[ExperimentConfig, SchemeConfig]:
    """``(experiment, scheme)`` from the plain data of a scheme file."""
    data = dict(data)
    if "scheme" not in data:
        raise ConfigError(
            "no scheme: section; this is a plain experiment (run it with `kdistill run`)"
        )
    scheme = scheme_from_dict(data.pop("scheme"))
    return config_from_dict(data), scheme


def load_scheme_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> tuple[ExperimentConfig, SchemeConfig]:
    """Read a scheme YAML file, apply ``key.sub=value`` overrides, and validate both parts.

    As for a plain experiment, the file's folder is remembered (relative ``data.root`` and
    model imports resolve there too).
    """
    cfg, scheme = split_scheme_dict(read_config_file(path, overrides))
    object.__setattr__(cfg, CONFIG_DIR, Path(path).expanduser().absolute().parent)
    return cfg, scheme


def has_scheme(path: str | Path) -> bool:
    """Whether a YAML file has a ``scheme:`` section (for a CLI to pick the runner)."""
    try:
        data = parse_yaml(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "scheme" in data
