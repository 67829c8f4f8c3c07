"""Typed configuration of a dense-prediction run (``task: detection`` or ``segmentation``).

YAML is mapped onto these dataclasses by kdistill's validator (:mod:`kdistill.config`): an
unknown or ill-typed key stops the run with one line naming the dotted key. ``optim`` and
``train`` are the classification run's sections (``train.epochs`` is the students' epochs;
``teacher_epochs`` the teacher's when it is trained here); ``distill.terms`` are
:class:`~kdistill.config.TermConfig` entries, as in a classification run, naming dense
losses (``cwd``, ``pkd``, ``pixel_kd``, ``heatmap_kd``, ``box_kd``) and the layers they
compare, e.g. ``{loss: cwd, student: neck, teacher: neck, weight: 5, params:
{temperature: 1}}``. A term on layers of different widths gets an adapter (1×1 conv + BN)
from a dry run.

Data (``data.source``):

* ``synthetic`` — the Fashion-MNIST canvases (:mod:`kdistill.dense.synthetic`), written to
  ``data.root`` (default ``<output_dir>/data``) in every format, then read back from disk;
* ``coco`` — ``root/annotations/<split>.json`` + ``root/images/<split>/`` (detection);
* ``yolo`` — ``root/labels/<split>/*.txt`` + ``root/images/<split>/`` (detection);
* ``masks`` — ``root/images/<split>/`` + same-stem ``root/masks/<split>/*.png`` (segmentation),
  with ``<split>`` ``train``, ``val`` and ``test``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdistill.config import (
    ConfigError,
    OptimConfig,
    TermConfig,
    TrainConfig,
    _build,
    _check_optional_positive,
    _check_positive,
    read_config_file,
)

__all__ = [
    "DenseConfig",
    "DenseDataConfig",
    "DenseDistillConfig",
    "DenseEvalConfig",
    "DenseModelConfig",
    "dense_config_from_dict",
    "load_dense_config",
]

Task = Literal["detection", "segmentation"]
SOURCES_BY_TASK = {
    "detection": ("synthetic", "coco", "yolo"),
    "segmentation": ("synthetic", "masks"),
}


@dataclass
class DenseDataConfig:
    """Where the images and labels come from, and how they are batched."""

    source: Literal["synthetic", "coco", "yolo", "masks"] = "synthetic"
    root: str | None = None  # the data folder; synthetic: where it is written
    num_classes: int | None = None  # segmentation with background; null: from the data
    # synthetic only
    canvas: int = 64
    max_items: int = 4
    train_images: int = 2000
    val_images: int = 300
    test_images: int = 300
    fashion_root: str | None = None  # Fashion-MNIST folder; null: the usual lookup
    # batching
    batch_size: int = 32
    eval_batch_size: int = 64

    def __post_init__(self) -> None:
        _check_positive(
            self,
            "canvas",
            "max_items",
            "train_images",
            "val_images",
            "test_images",
            "batch_size",
            "eval_batch_size",
        )
        _check_optional_positive(self, "num_classes")
        if self.canvas % 16:
            raise ConfigError(
                f"canvas: must be a multiple of 16 (the models' coarsest stride), got {self.canvas}"
            )


@dataclass
class DenseModelConfig:
    """A detector or segmenter of :mod:`kdistill.dense.models` by named size, or widths."""

    size: Literal["teacher", "student"] | None = None  # null: the role's (teacher / student)
    widths: list[int] | None = None  # 4 channel counts; null: those of the named size
    neck: int | None = None  # detector FPN channels; null: the named size's
    checkpoint: str | None = None  # safetensors weights: load instead of training (teacher)

    def __post_init__(self) -> None:
        if self.widths is not None and (len(self.widths) != 4 or min(self.widths) < 1):
            raise ConfigError(f"widths: give 4 positive channel counts, got {self.widths}")
        _check_optional_positive(self, "neck")

    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if self.widths is not None:
            out["widths"] = tuple(self.widths)
        if self.neck is not None:
            out["neck"] = self.neck
        return out


@dataclass
class DenseDistillConfig:
    """The KD student's extra terms (the task loss is always there, weight 1)."""

    terms: list[TermConfig] = field(default_factory=list)  # empty: the task's default (CWD)
    cache_teacher: bool = True  # run the frozen teacher once over the training images
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # cached feature maps

    def __post_init__(self) -> None:
        names = [t.name for t in self.terms]
        if len(set(names)) != len(names) or "task" in names:
            raise ConfigError(
                f"terms: term names must be unique and not 'task' (the label term), got {names}"
            )


@dataclass
class DenseEvalConfig:
    """Detection decoding for mAP (CenterNet peaks, then class-wise NMS)."""

    top_k: int = 100
    score_threshold: float = 0.01
    nms_iou: float = 0.6
    plot_images: int = 4  # test images in predictions.png

    def __post_init__(self) -> None:
        _check_positive(self, "top_k")
        if not 0 <= self.score_threshold < 1 or not 0 < self.nms_iou <= 1:
            raise ConfigError("score_threshold: must be in [0, 1) and nms_iou in (0, 1]")


@dataclass
class DenseConfig:
    """A dense run: teacher (trained or loaded), student without KD, student with KD."""

    task: Task = "detection"
    seed: int = 0
    output_dir: str = "runs/dense"
    data: DenseDataConfig = field(default_factory=DenseDataConfig)
    teacher: DenseModelConfig = field(default_factory=DenseModelConfig)
    student: DenseModelConfig = field(default_factory=DenseModelConfig)
    teacher_epochs: int = 12
    baseline: bool = True  # also train the student without KD (same init, same batches)
    distill: DenseDistillConfig = field(default_factory=DenseDistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: DenseEvalConfig = field(default_factory=DenseEvalConfig)

    def __post_init__(self) -> None:
        _check_positive(self, "teacher_epochs")
        allowed = SOURCES_BY_TASK[self.task]
        if self.data.source not in allowed:
            raise ConfigError(
                f"data.source: {self.data.source!r} does not give {self.task} labels; use one "
                f"of {', '.join(allowed)}"
            )
        if self.data.source != "synthetic" and self.data.root is None:
            raise ConfigError(f"data.root: source {self.data.source!r} needs the data folder")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def data_root(self) -> Path:
        return Path(self.data.root) if self.data.root else Path(self.output_dir) / "data"


def dense_config_from_dict(data: dict[str, Any]) -> DenseConfig:
    """Validate plain data (a parsed YAML file) into a :class:`DenseConfig`."""
    return _build(DenseConfig, data, "")


def load_dense_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DenseConfig:
    """Read a YAML file, apply ``key.sub=value`` overrides (``--set``) and validate."""
    return dense_config_from_dict(read_config_file(path, overrides))
