"""Typed experiment configuration: YAML mapped onto dataclasses, validated before training.

Every error names the full dotted key (``distill.temperature``), what was expected, and —
for misspelt keys — the closest valid key, so a bad config fails in one clear line instead
of a traceback from deep inside torch.

The meaning of ``alpha`` is fixed here and used everywhere: **alpha is the weight of the
soft (teacher) term; 1 − alpha weighs the hard-label cross-entropy**. ``alpha = 0`` is plain
supervised training, ``alpha = 1`` is pure distillation.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-3`` / ``5E4`` as floats (YAML 1.1 needs a dot)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Parse YAML with :class:`_Loader` (safe, scientific notation as floats)."""
    return yaml.load(text, Loader=_Loader)


GIVEN_KEYS = "_given_keys"
"""Attribute of a section built from a file: the keys the file set."""


class ConfigError(ValueError):
    """A config key is unknown or has a bad value; the message names the dotted key."""


# --------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------


BUILTIN_DATA = ("fashion_mnist", "cifar10", "cifar100")
"""Data sets kdistill knows by name (standard files, fixed statistics)."""


@dataclass
class DataConfig:
    """Which data set, how much of it, and how it is batched.

    Besides the built-in sets, ``image_folder`` (``root/<class>/<image>``, or ``root/train/``
    and ``root/test/``), ``npz`` (a ``.npz`` file or a folder of ``.npy`` files: ``x_train``,
    ``y_train``, ``x_test``, ``y_test`` or ``images``, ``labels``) and ``factory`` (``factory:
    package.module:function`` called with ``kwargs``) read your own data; see
    :mod:`kdistill.data.custom`. ``image_size``, ``channels``, ``test_fraction``, ``mean``,
    ``std``, ``factory`` and ``kwargs`` apply to those only.
    """

    name: Literal["fashion_mnist", "cifar10", "cifar100", "image_folder", "npz", "factory"] = (
        "fashion_mnist"
    )
    # folder (or .npz file) of the data; a built-in set is then read from there only. Relative
    # paths: the working directory first, then the config file's folder.
    root: str | None = None
    factory: str | None = None  # package.module:function returning (train, test) datasets
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    image_size: list[int] | None = None  # [height, width] (or [side]) every image is resized to
    channels: int | None = None  # 1 (grayscale) or 3 (RGB); default: the first image's
    test_fraction: float = 0.2  # held out per class when the source has no test split
    normalize: bool = True  # standardise with mean/std (built-in sets: their fixed statistics)
    mean: list[float] | None = None  # per channel; null: computed on the training split
    std: list[float] | None = None
    train_subset: int | None = None  # stratified subset of the training set
    test_subset: int | None = None
    batch_size: int = 128  # the global batch: split across processes under torchrun
    eval_batch_size: int = 512
    num_workers: int = 0
    augment: bool = (
        False  # training only: ±2 px shifts + flips (Fashion-MNIST), crop + flip (CIFAR)
    )
    # hold out this many training images (class-stratified, the same for every seed) as a
    # validation set: the run trains on the rest (train_subset then draws from the rest) and
    # reports val_accuracy per epoch and in summary.json, so tuning never reads the test set
    val_size: int | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "batch_size", "eval_batch_size")
        _check_optional_positive(self, "train_subset", "test_subset", "val_size")
        _check_non_negative(self, "num_workers")
        self._check_source()

    def _check_source(self) -> None:
        """Each data source's keys, and only those: a key that would do nothing is an error."""
        if self.factory is not None and self.name == "fashion_mnist":
            self.name = "factory"  # data.factory alone says where the data comes from
        if self.name == "factory" and not self.factory:
            raise ConfigError("factory: data.name: factory needs factory: package.module:function")
        if self.name != "factory" and (self.factory is not None or self.kwargs):
            raise ConfigError(
                f"factory: only for data.name: factory (got name {self.name!r}); remove "
                "factory/kwargs or set name: factory"
            )
        if self.name == "factory" and self.root is not None:
            raise ConfigError("root: data.name: factory reads no root; pass it in data.kwargs")
        if self.name in ("image_folder", "npz") and not self.root:
            what = "folder of class sub-folders" if self.name == "image_folder" else ".npz file"
            raise ConfigError(f"root: data.name: {self.name} needs root: the {what}")
        if self.name in BUILTIN_DATA:
            defaults = {"image_size": None, "channels": None, "mean": None, "std": None}
            custom = [k for k, v in defaults.items() if getattr(self, k) != v]
            custom += ["test_fraction"] * (self.test_fraction != 0.2)
            if custom:
                raise ConfigError(
                    f"{custom[0]}: has no effect on the built-in data set {self.name!r} (fixed "
                    "size, split and statistics); remove it"
                )
        elif self.name != "image_folder" and (self.image_size, self.channels) != (None, None):
            key = "image_size" if self.image_size is not None else "channels"
            raise ConfigError(
                f"{key}: only for data.name: image_folder (arrays and factories keep their "
                "shape); remove it"
            )
        if self.name == "factory" and self.test_fraction != 0.2:
            raise ConfigError("test_fraction: a factory returns its own test split; remove it")
        if self.image_size is not None and (
            len(self.image_size) not in (1, 2) or min(self.image_size) < 1
        ):
            raise ConfigError(
                "image_size: expected [height, width] or [side] of positive integers, got "
                f"{self.image_size}"
            )
        if self.channels not in (None, 1, 3):
            raise ConfigError(f"channels: must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"test_fraction: must be in (0, 1), got {self.test_fraction}")


@dataclass
class ModelConfig:
    """A model by registry name (``small_cnn``) or import path (``my_pkg.models:build``)."""

    model: str = "small_cnn"
    kwargs: dict[str, Any] = field(default_factory=dict)
    checkpoint: str | None = None  # safetensors file, or ``builtin:<name>`` for shipped weights


@dataclass
class TermConfig:
    """One weighted loss term: which loss, on which student/teacher tensors.

    ``student`` and ``teacher`` are ``"logits"`` (the model's output) or a module name from
    ``model.named_modules()``. A term with ``teacher: null`` compares the student against
    the labels (cross-entropy, label smoothing).
    """

    name: str = "kd"
    loss: str = "kd"
    weight: float = 1.0
    student: str = "logits"
    teacher: str | None = "logits"
    params: dict[str, Any] = field(default_factory=dict)
    adapter: Literal["auto", "none"] = "auto"  # auto: built from a dry run when shapes differ
    warmup_epochs: float = 0.0  # linear ramp of the weight from 0 (e.g. DKD uses 20)

    def __post_init__(self) -> None:
        _check_non_negative(self, "weight", "warmup_epochs")


@dataclass
class DistillConfig:
    """How the student learns from the teacher.

    Without ``terms`` the objective is Hinton's: ``alpha · T² · KL(p_t^T ‖ p_s^T) +
    (1 − alpha) · CE(y, p_s)`` — alpha weighs the soft (teacher) term. With ``terms`` the
    objective is exactly the listed weighted sum, and ``alpha`` is not used.
    """

    temperature: float = 4.0
    alpha: float = 0.9
    label_smoothing: float = 0.0  # applied to the hard-label term
    cache_teacher: bool = True  # run the frozen teacher once over the training set
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float32"  # cached feature maps
    # Folder of an on-disk teacher cache (kdistill.cache): built on the first run, then read
    # instead of running the teacher; a stale or damaged cache is refused unless cache_rebuild.
    cache_dir: str | None = None
    cache_rebuild: bool = False  # rebuild the cache_dir cache even if one is there
    terms: list[TermConfig] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.temperature > 0:
            raise ConfigError(f"temperature: must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"alpha: must be in [0, 1] (weight of the soft term), got {self.alpha}"
            )
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError(f"label_smoothing: must be in [0, 1), got {self.label_smoothing}")
        if self.cache_dir is not None and not self.cache_teacher:
            raise ConfigError(
                "cache_dir: needs cache_teacher: true (the on-disk cache replaces the teacher "
                "pass); set cache_teacher: true or remove cache_dir"
            )
        names = [t.name for t in self.terms]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(
                f"terms: duplicate term names {duplicates}; give each term its own name"
            )


@dataclass
class OptimConfig:
    """Optimizer, learning-rate schedule and gradient clipping."""

    name: Literal["sgd", "adam", "adamw"] = "adamw"
    lr: float = 2e-3
    weight_decay: float = 5e-4
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    schedule: Literal["constant", "cosine", "onecycle", "step"] = "onecycle"
    warmup_epochs: float = 0.0  # linear warm-up, for cosine/constant
    milestones: list[int] = field(default_factory=list)  # step schedule, in epochs
    gamma: float = 0.1  # step schedule decay
    grad_clip: float | None = 5.0  # max global grad norm; null disables
    # adam/adamw: torch's fused kernel (no per-parameter temporaries in the step: a lower peak);
    # null: the run's default (on for kdistill lm, off for the vision runs)
    fused: bool | None = None

    def __post_init__(self) -> None:
        _check_positive(self, "lr")
        if self.fused and self.name == "sgd":
            raise ConfigError("fused: applies to name: adam or adamw; remove it for sgd")
        _check_non_negative(self, "weight_decay", "warmup_epochs")
        if not 0 < self.gamma <= 1:
            raise ConfigError(f"gamma: must be in (0, 1], got {self.gamma}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"grad_clip: must be > 0 or null, got {self.grad_clip}")
        if self.schedule == "step" and not self.milestones:
            raise ConfigError("milestones: the step schedule needs a list of epochs, e.g. [30, 60]")


@dataclass
class TrainConfig:
    """The loop: epochs, device, logging and progress."""

    epochs: int = 10
    device: str = "cpu"  # cpu, cuda, cuda:1, or auto
    threads: int | None = None  # torch.set_num_threads; null keeps torch's default
    progress: bool = True
    deterministic: bool = True
    checkpoint_every: int | None = None  # also checkpoint every N optimizer steps; null: epochs
    skip_nonfinite: int = 0  # skip up to N non-finite batches in a row; 0 stops at the first
    amp: Literal["none", "bf16", "fp16"] = "none"  # autocast the forward; fp16 adds a GradScaler
    tensorboard: bool = True  # also log epoch metrics to output_dir/tensorboard when installed
    # micro-batches per optimizer step (gradient accumulation): the step equals one step on
    # their concatenation; epochs, the LR schedule and checkpoint_every count optimizer steps
    accumulate_steps: int = 1
    # evaluate (test, and validation with data.val_size) every N epochs and after the last
    eval_every: int = 1

    def __post_init__(self) -> None:
        _check_positive(self, "epochs", "accumulate_steps", "eval_every")
        _check_optional_positive(self, "threads", "checkpoint_every")
        _check_non_negative(self, "skip_nonfinite")
        if not (self.device in ("cpu", "auto", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError(
                f"device: must be one of cpu, cuda, cuda:N, auto; got {self.device!r}"
            )


@dataclass
class StageConfig:
    """One stage of multi-stage training (e.g. a FitNets hint stage, then a KD stage).

    Each stage trains the student for ``epochs`` with its own ``distill`` (and optionally
    ``optim``); the next stage starts from the student weights the previous one ended with.
    Adapters belong to their stage and are not carried over.
    """

    name: str = "stage"
    epochs: int = 1
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig | None = None  # null: the experiment's optim section

    def __post_init__(self) -> None:
        _check_positive(self, "epochs")
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(
                f"name: {self.name!r} must be usable as a folder name ([A-Za-z0-9_.-])"
            )


@dataclass
class ExperimentConfig:
    """A whole run: data, teacher (optional), student, distillation, optimizer, loop."""

    seed: int = 0
    output_dir: str = "runs/experiment"
    data: DataConfig = field(default_factory=DataConfig)
    teacher: ModelConfig | None = None
    student: ModelConfig = field(default_factory=ModelConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stages: list[StageConfig] = field(default_factory=list)  # empty: one stage, as above

    def __post_init__(self) -> None:
        names = [s.name for s in self.stages]
        if len(set(names)) != len(names):
            raise ConfigError(f"stages: duplicate stage names {names}; name each stage once")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def read_config_file(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> dict[str, Any]:
    """The plain data of a YAML config file with ``key.sub=value`` overrides applied.

    Also puts the file's folder and the working directory on ``sys.path``
    (:func:`add_import_dirs`), so that ``package.module:Name`` references in the file import.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = parse_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"{path}: not valid UTF-8 (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save the file as UTF-8"
        ) from None
    add_import_dirs(path.expanduser().absolute().parent, Path.cwd())
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the top level must be a mapping of sections, got {type(data).__name__}"
        )
    return apply_overrides(data, overrides)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> ExperimentConfig:
    """Read a YAML file, apply ``key.sub=value`` overrides, and validate.

    The file's folder and the working directory are put on ``sys.path``, so that a
    ``model: my_models:Student`` or ``data.factory: my_data:load`` next to the config imports
    without setting ``PYTHONPATH``; the folder is also where a relative ``data.root`` is looked
    for when the working directory lacks it (:func:`config_dir`).
    """
    cfg = config_from_dict(read_config_file(path, overrides))
    object.__setattr__(cfg, CONFIG_DIR, Path(path).expanduser().absolute().parent)
    return cfg


CONFIG_DIR = "_config_dir"
"""Attribute of a config loaded from a file: the file's folder."""


def config_dir(cfg: Any) -> Path | None:
    """The folder of the file ``cfg`` was loaded from (``None`` for a config built in Python)."""
    return getattr(cfg, CONFIG_DIR, None)


def add_import_dirs(*folders: str | Path) -> None:
    """Put ``folders`` on ``sys.path`` (at the end, once each) so user modules there import."""
    for folder in folders:
        entry = str(Path(folder).expanduser().absolute())
        if entry not in sys.path:
            sys.path.append(entry)


def config_from_dict(data: dict[str, Any]) -> ExperimentConfig:
    """Build an :class:`ExperimentConfig` from plain data, validating every key."""
    return _build(ExperimentConfig, data, "")


def apply_overrides(data: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` strings (value parsed as YAML) to a nested dict, returning a copy."""
    data = _deepcopy(data)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. distill.temperature=8")
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        try:
            node[parts[-1]] = parse_yaml(raw)
        except yaml.YAMLError:
            node[parts[-1]] = raw
    return data


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            raise ConfigError(_unknown_key_message(prefix, str(key), list(fields)))
    kwargs = {key: _coerce(hints[key], value, _join(prefix, key)) for key, value in data.items()}
    try:
        built = cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{_join(prefix, str(err))}") from None
    # the keys the file set (not defaults): a key with no effect in the chosen mode is refused
    # where the mode is known (e.g. kdistill.experiment.build_terms)
    object.__setattr__(built, GIVEN_KEYS, frozenset(data))
    return built


def given_keys(section: Any) -> frozenset[str]:
    """The keys a config file set in ``section`` (empty for a section built in Python)."""
    return getattr(section, GIVEN_KEYS, frozenset())


def _coerce(annotation: Any, value: Any, key: str) -> Any:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        if value is None:
            if type(None) in args:
                return None
            raise ConfigError(f"{key}: must not be null")
        non_none = [a for a in args if a is not type(None)]
        return _coerce(non_none[0], value, key)
    if value is None and annotation is not Any:
        raise ConfigError(f"{key}: must not be null; expected {_type_name(annotation)}")
    if origin is Literal:
        if value not in args:
            allowed = ", ".join(str(a) for a in args)
            hint = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            extra = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"{key}: {value!r} is not allowed; choose one of: {allowed}{extra}")
        return value
    if dataclasses.is_dataclass(annotation):
        return _build(annotation, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {_describe(value)}")
        (item_type,) = args or (Any,)
        return [_coerce(item_type, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {_describe(value)}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {_describe(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {_describe(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {_describe(value)}")
        try:
            return float(value)
        except OverflowError:
            raise ConfigError(f"{key}: {value} is too large for a float") from None
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} for {key}")  # pragma: no cover


def _unknown_key_message(prefix: str, key: str, allowed: list[str]) -> str:
    hint = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    where = f"in {prefix}" if prefix else "at the top level"
    message = f"{_join(prefix, key)}: unknown key {where}; allowed keys: {', '.join(allowed)}"
    if hint:
        message += f" (did you mean {_join(prefix, hint[0])!r}?)"
    return message


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", str(annotation))


def _check_positive(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) > 0:
            raise ConfigError(f"{name}: must be > 0, got {getattr(obj, name)}")


def _check_optional_positive(obj: Any, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is not None and not value > 0:
            raise ConfigError(f"{name}: must be > 0 or null, got {value}")


def _check_non_negative(obj: Any, *names: str) -> None:
    for name in names:
        if not getattr(obj, name) >= 0:  # also rejects NaN
            raise ConfigError(f"{name}: must be >= 0, got {getattr(obj, name)}")
