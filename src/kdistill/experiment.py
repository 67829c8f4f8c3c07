"""Build a whole run from an :class:`~kdistill.config.ExperimentConfig` and execute it.

This is the glue between YAML and the Python API: it loads data, builds and loads the
models, turns ``distill`` settings into :class:`~kdistill.distiller.LossTerm` s, optionally
runs the frozen teacher once over the training set (the teacher-output cache), and hands
everything to the :class:`~kdistill.trainer.Trainer`.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import math
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.cache import (
    CacheError,
    ShardedTensor,
    dense_outputs,
    load_or_build,
    teacher_outputs,
)
from kdistill.callbacks import Callback
from kdistill.checkpoint import atomic_write_text, load_weights
from kdistill.config import (
    ConfigError,
    DistillConfig,
    ExperimentConfig,
    ModelConfig,
    TermConfig,
    config_dir,
    given_keys,
)
from kdistill.data import stratified_indices, train_val_indices
from kdistill.data.cifar import CIFAR_STATS, random_crop_flip
from kdistill.data.loader import TensorBatchLoader, random_shift_flip
from kdistill.data.sources import data_record, load_split
from kdistill.distiller import AUTO, LOGITS, Distiller, LossTerm, probe_shapes
from kdistill.losses import KDLoss, LabelSmoothingCrossEntropy
from kdistill.losses.registry import LOSSES
from kdistill.models import build_model, count_parameters, import_dirs
from kdistill.runtime import build_trainer, start_run
from kdistill.trainer import TEACHER_PREFIX, FitResult, best_of, evaluate

BUILTIN_PREFIX = "builtin:"


# -- models --------------------------------------------------------------------------------


def builtin_checkpoint(name: str) -> Path:
    """Path of a checkpoint shipped inside the package (``kdistill/assets/<name>.safetensors``)."""
    path = Path(str(resources.files("kdistill") / "assets" / f"{name}.safetensors"))
    if not path.is_file():
        raise FileNotFoundError(
            f"no built-in checkpoint {name!r} at {path}; rebuild it with the command in "
            "bench/RESULTS.md or point checkpoint: at a .safetensors file"
        )
    return path


def resolve_checkpoint(spec: str) -> Path:
    if spec.startswith(BUILTIN_PREFIX):
        return builtin_checkpoint(spec[len(BUILTIN_PREFIX) :])
    return Path(spec).expanduser()


def load_model(cfg: ModelConfig, key: str = "student") -> nn.Module:
    """Build the model and, when a checkpoint is named, load its weights strictly.

    Every mistake is a :class:`ConfigError` naming ``key``: an unknown name or a module that
    does not import (``package.module:Class`` is looked for on ``sys.path``, which holds the
    config's folder and the working directory), kwargs the constructor refuses, a checkpoint
    that is missing, unreadable (e.g. truncated), does not fit, or holds NaN/inf.
    """
    try:
        model = build_model(cfg.model, **cfg.kwargs)
    except KeyError as err:
        hint = (
            f" (looked on sys.path, which includes the config's folder and {Path.cwd()})"
            if ":" in cfg.model
            else ""
        )
        raise ConfigError(f"{key}.model: {err.args[0]}{hint}") from None
    except SyntaxError as err:
        raise ConfigError(
            f"{key}.model: {err.filename} line {err.lineno}: {err.msg}; fix the file"
        ) from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.kwargs: {cfg.model} {cfg.kwargs}: {err}") from None
    if cfg.checkpoint:
        path = resolve_checkpoint(cfg.checkpoint)
        try:
            state = load_weights(path)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(
                f"{key}.checkpoint: {err}; point it at a complete .safetensors file"
            ) from None
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            first = str(err).strip().splitlines()
            raise ConfigError(
                f"{key}.checkpoint: {path} does not fit model {cfg.model!r} {cfg.kwargs}: "
                + " ".join(line.strip() for line in first[:3])
            ) from None
        bad = [
            name for name, t in state.items() if t.is_floating_point() and not t.isfinite().all()
        ]
        if bad:
            raise ConfigError(
                f"{key}.checkpoint: {path} holds NaN or inf in {bad[:3]} — the {key}'s weights "
                "are broken; re-train or re-export them"
            )
    return model


def model_import_dirs(cfg: ExperimentConfig) -> list[str]:
    """Folders that make the config's ``package.module:Class`` models importable (recorded in
    ``summary.json`` so that ``kdistill export`` / ``predict`` find them from anywhere)."""
    specs = [cfg.student.model] + ([cfg.teacher.model] if cfg.teacher is not None else [])
    return list(dict.fromkeys(d for spec in specs for d in import_dirs(spec)))


def _finite_teacher_outputs(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on a teacher: non-finite outputs are the teacher's fault, said so."""
    if isinstance(output, Tensor) and output.is_floating_point() and not output.isfinite().all():
        raise FloatingPointError(
            f"the teacher ({type(module).__name__}) produced NaN or inf outputs {tuple(output.shape)}"
            " — its weights or the inputs are broken, not the student's training; check "
            "teacher.checkpoint and the data (a lower learning rate will not help)"
        )


def output_shape(model: nn.Module, example: Tensor, key: str) -> torch.Size:
    """The logits shape of ``model`` on ``example`` (eval mode, no autograd); a model that
    cannot take the data's inputs is a :class:`ConfigError` naming ``key``."""
    from kdistill.distiller import call_model, output_logits

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            logits = output_logits(call_model(model, example))
    except (RuntimeError, ValueError, TypeError) as err:
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{key}.model: {type(model).__name__} cannot take the data's inputs of shape "
            f"{tuple(example.shape)}: {message}; change the model (its in_channels / input "
            "size) or the data (data.channels, data.image_size)"
        ) from None
    finally:
        model.train(was_training)
    return logits.shape


def check_shapes(
    student_logits: torch.Size,
    teacher_logits: torch.Size | None,
    num_classes: int,
    terms: Sequence[LossTerm],
    context: TermContext,
) -> None:
    """Refuse, before training, the shape mismatches that would fail in the first step.

    A student with fewer outputs than the data has classes; a teacher whose class count
    differs from the student's when a term compares their logits; a term comparing tensors
    element-wise whose shapes differ without an adapter.
    """
    classes = student_logits[-1]
    if len(student_logits) == 2 and classes < num_classes:
        raise ConfigError(
            f"student.kwargs: the student outputs {classes} classes but the data has "
            f"{num_classes} (labels 0..{num_classes - 1}); give the student {num_classes} "
            "outputs (e.g. num_classes: " + f"{num_classes})"
        )
    for term in terms:
        if not term.uses_teacher or term.adapter is not None:
            continue
        s = context.student_shapes.get(term.student)
        t = context.teacher_shapes.get(term.teacher) if term.teacher else None
        if s is None or t is None or s[1:] == t[1:]:
            continue
        if term.student == LOGITS and term.teacher == LOGITS:
            raise ConfigError(
                f"teacher.model: the teacher outputs {t[-1]} classes and the student {s[-1]}; "
                f"loss term {term.name!r} compares their class distributions, so both need "
                f"the data's {num_classes} classes (check num_classes in student.kwargs / "
                "teacher.kwargs)"
            )
        if getattr(term.loss, "same_shape", False):
            raise ConfigError(
                f"distill.terms: term {term.name!r} compares student {term.student!r} "
                f"{tuple(s[1:])} with teacher {term.teacher!r} {tuple(t[1:])} element-wise "
                "without an adapter; set adapter: auto on the term or pick layers of the same "
                "shape"
            )


# -- loss terms ----------------------------------------------------------------------------


@dataclass
class TermContext:
    """What a dry run tells term construction: tensor shapes and the training-set size.

    Losses whose factories take ``student_dim``, ``teacher_dim`` or ``num_samples`` (CRD)
    get them from here unless the config sets them.
    """

    student_shapes: dict[str, torch.Size]
    teacher_shapes: dict[str, torch.Size]
    num_samples: int


HINTON_KEYS = ("temperature", "alpha", "label_smoothing")
"""``distill`` keys of the default objective, which have no effect next to ``terms``."""


def build_terms(
    cfg: DistillConfig,
    has_teacher: bool,
    context: TermContext | None = None,
    uses: Sequence[str] = (),
) -> list[LossTerm]:
    """The weighted loss terms for a config.

    Without explicit ``terms``: ``alpha · KD`` + ``(1 − alpha) · CE`` (or label-smoothing CE)
    when there is a teacher, the hard-label term alone otherwise. Terms of weight 0 are
    dropped, so alpha = 0 trains without running the teacher at all. With ``terms``, a
    :data:`HINTON_KEYS` key set in the file is an error (it would do nothing) unless the
    caller ``uses`` it for something else (the multi-teacher ensemble's temperature).
    """
    if cfg.terms:
        unused = sorted((given_keys(cfg) & set(HINTON_KEYS)) - set(uses))
        if unused:
            raise ConfigError(
                f"distill.{unused[0]}: has no effect when distill.terms is given (the objective "
                "is exactly the listed terms); remove it, or set it on a term, e.g. "
                "params: {temperature: 4}"
            )
        terms = [
            _term_from_config(t, f"distill.terms[{i}]", context) for i, t in enumerate(cfg.terms)
        ]
        if not has_teacher and any(t.uses_teacher for t in terms):
            raise ConfigError(
                "distill.terms: terms use the teacher, but the config has no teacher: section"
            )
        return [t for t in terms if t.weight > 0]
    hard_name = "label_smoothing" if cfg.label_smoothing > 0 else "ce"
    hard = LabelSmoothingCrossEntropy(cfg.label_smoothing)
    if not has_teacher:
        return [LossTerm(hard_name, hard, 1.0, teacher=None)]
    terms = [
        LossTerm("kd", KDLoss(cfg.temperature), cfg.alpha),
        LossTerm(hard_name, hard, 1.0 - cfg.alpha, teacher=None),
    ]
    return [t for t in terms if t.weight > 0]


def _term_from_config(t: TermConfig, key: str, context: TermContext | None) -> LossTerm:
    try:
        factory = LOSSES.get(t.loss)
    except KeyError as err:
        raise ConfigError(f"{key}.loss: {err.args[0]}") from None
    params = dict(t.params)
    accepted = _parameters(factory)
    if context is not None:
        inferred = {
            "student_dim": lambda: math.prod(context.student_shapes[t.student][1:]),
            "teacher_dim": lambda: math.prod(context.teacher_shapes[t.teacher][1:]),  # type: ignore[index]
            "num_samples": lambda: context.num_samples,
        }
        for name, value in inferred.items():
            if name in accepted and name not in params:
                params[name] = value()
    try:
        loss = factory(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.params: {err}") from None
    return LossTerm(
        t.name,
        loss,
        t.weight,
        student=t.student,
        teacher=t.teacher,
        adapter=AUTO if t.adapter == "auto" else None,
        warmup_epochs=t.warmup_epochs,
    )


def _parameters(factory: Any) -> set[str]:
    try:
        return set(inspect.signature(factory).parameters)
    except (TypeError, ValueError):  # pragma: no cover - builtins without signatures
        return set()


def probe_terms(
    cfg: DistillConfig,
    student: nn.Module,
    teacher: nn.Module | None,
    example: Tensor,
    num_samples: int,
) -> TermContext:
    """Dry-run both models on ``example`` to learn the shapes the configured terms compare."""
    student_layers = sorted({t.student for t in cfg.terms} - {LOGITS})
    teacher_layers = sorted({t.teacher for t in cfg.terms if t.teacher} - {LOGITS})
    try:
        student_shapes = probe_shapes(student, student_layers, example)
        teacher_shapes = (
            probe_shapes(teacher, teacher_layers, example) if teacher is not None else {}
        )
    except ValueError as err:  # an unknown layer name: FeatureTaps lists the close ones
        raise ConfigError(f"distill.terms: {err}") from None
    return TermContext(student_shapes, teacher_shapes, num_samples)


# -- data ----------------------------------------------------------------------------------


def load_data(cfg: ExperimentConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Training and test tensors ``(x, y)`` for the configured data set.

    With ``data.val_size`` the training tensors leave out the validation images
    (:func:`load_validation`).
    """
    d = cfg.data
    if d.val_size is not None:
        return _train_split(cfg, "train"), _dataset(cfg, "test", d.test_subset)
    return _dataset(cfg, "train", d.train_subset), _dataset(cfg, "test", d.test_subset)


def load_validation(cfg: ExperimentConfig) -> tuple[Tensor, Tensor] | None:
    """The ``data.val_size`` held-out training images ``(x, y)``, or None without one."""
    return None if cfg.data.val_size is None else _train_split(cfg, "val")


def _dataset(cfg: ExperimentConfig, split: str, subset: int | None) -> tuple[Tensor, Tensor]:
    """``(x, y)`` of ``split`` for any ``data.name`` (:func:`kdistill.data.sources.load_split`)."""
    return load_split(cfg.data, split, subset, cfg.seed, config_dir(cfg))


def _train_split(cfg: ExperimentConfig, part: str) -> tuple[Tensor, Tensor]:
    """``part`` ``"train"`` (the rest, then ``train_subset`` of it) or ``"val"`` of the
    training set split by :func:`~kdistill.data.train_val_indices`."""
    d = cfg.data
    assert d.val_size is not None
    x, y = _dataset(cfg, "train", None)
    try:
        rest, val = train_val_indices(y, d.val_size)
    except ValueError as err:
        raise ConfigError(f"data.val_size: {err}") from None
    if part == "val":
        return x[val], y[val]
    if d.train_subset is not None:
        try:
            rest = rest[stratified_indices(y[rest], d.train_subset, cfg.seed)]
        except ValueError as err:
            raise ConfigError(
                f"data.train_subset: {err} (the training images left after data.val_size)"
            ) from None
    return x[rest], y[rest]


class ValidationCallback(Callback):
    """Evaluate the student on the validation split after every epoch: ``val_accuracy``
    and ``val_loss`` in the epoch's row (``metrics.jsonl``, the summary)."""

    def __init__(self, loader: TensorBatchLoader) -> None:
        self.loader = loader

    def on_epoch_end(self, trainer: Any, epoch: int, row: MutableMapping[str, Any]) -> None:
        if not trainer.evaluates(epoch):  # train.eval_every
            return
        metrics = trainer.evaluate_fn(trainer.distiller.student, self.loader, trainer.device)
        row.update({f"val_{k}": v for k, v in metrics.items()})


# -- the run -------------------------------------------------------------------------------


def augmentation(cfg: ExperimentConfig) -> Callable[[Tensor, torch.Generator], Tensor]:
    """The standard training augmentation of the configured data set."""
    if cfg.data.name.startswith("cifar"):
        # RepDistiller pads raw images with black; our images are already normalised.
        mean, std = CIFAR_STATS[cfg.data.name]
        return functools.partial(
            random_crop_flip, fill=[-m / s for m, s in zip(mean, std, strict=True)]
        )
    return random_shift_flip


@dataclass
class RunResult:
    fit: FitResult
    summary: dict[str, Any]


def run_experiment(cfg: ExperimentConfig, resume: bool = False) -> RunResult:
    """Train the configured student (with or without a teacher) and write ``summary.json``.

    With ``stages`` the stages run in order, each in ``output_dir/<stage name>``, and the
    result is the last stage's.
    """
    if cfg.stages:
        return run_stages(cfg, resume)
    run = start_run(cfg.seed, cfg.train)
    device = run.device
    (train_x, train_y), (test_x, test_y) = load_data(cfg)

    data_used = data_record(
        cfg.data, cfg.seed, (train_x, train_y), (test_x, test_y), config_dir(cfg)
    )
    teacher = load_model(cfg.teacher, "teacher") if cfg.teacher is not None else None
    torch.manual_seed(cfg.seed)  # student init independent of whether a teacher was built
    student = load_model(cfg.student)
    example = train_x[: min(8, train_x.shape[0])]
    student_logits = output_shape(student, example, "student")
    teacher_logits = output_shape(teacher, example, "teacher") if teacher is not None else None
    context = probe_terms(cfg.distill, student, teacher, example, int(train_x.shape[0]))
    terms = build_terms(cfg.distill, teacher is not None, context)
    distiller = Distiller(student, terms, teacher if any(t.uses_teacher for t in terms) else None)
    distiller.build_adapters(example)
    terms_built = [t for t in distiller.terms if isinstance(t, LossTerm)]
    labels_seen = int(max(int(train_y.max()), int(test_y.max()))) + 1  # the classes trained on
    check_shapes(student_logits, teacher_logits, labels_seen, terms_built, context)
    if teacher is not None:
        teacher.register_forward_hook(_finite_teacher_outputs)

    eval_loader = TensorBatchLoader(test_x, test_y, batch_size=cfg.data.eval_batch_size)
    val = load_validation(cfg)
    callbacks = (
        []
        if val is None
        else [ValidationCallback(TensorBatchLoader(*val, batch_size=cfg.data.eval_batch_size))]
    )
    teacher_metrics: dict[str, float] | None = None
    cached: dict[str, Any] = {}  # "teacher.<key>": Tensor, or ShardedTensor from cache_dir
    if teacher is not None:
        teacher.to(device)
        teacher_metrics = evaluate(teacher, eval_loader, device)
        if not math.isfinite(teacher_metrics["loss"]):
            raise ConfigError(
                f"teacher: its outputs on the test data are NaN or inf (test loss "
                f"{teacher_metrics['loss']}); the teacher ({cfg.teacher.model}, checkpoint "  # type: ignore[union-attr]
                f"{cfg.teacher.checkpoint}) is broken, not the student — re-train or re-export it"  # type: ignore[union-attr]
            )
        if distiller.teacher is not None and cfg.distill.cache_teacher:
            cached = cached_teacher_outputs(cfg, distiller, teacher, train_x, device)

    train_loader = TensorBatchLoader(
        inputs=train_x,
        target=train_y,
        **cached,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        augment=augmentation(cfg) if cfg.data.augment else False,
        drop_last=True,
        seed=cfg.seed,
        rank=run.rank,
        world_size=run.world_size,
    )
    trainer = build_trainer(
        distiller,
        train_loader,
        eval_loader,
        optim=cfg.optim,
        train=cfg.train,
        output_dir=cfg.output_dir,
        config=cfg.to_dict(),
        device=device,
        callbacks=callbacks,
    )
    fit = trainer.fit(resume=resume)
    summary = {
        "student": {
            "model": cfg.student.model,
            "parameters": count_parameters(student),
            "test_accuracy": fit.final["test_accuracy"],
            "best_test_accuracy": best_of(fit.history, "test_accuracy"),
            "weights": str(fit.student_path),
            **_val_summary(fit, val),
        },
        "teacher": None
        if teacher is None
        else {
            "model": cfg.teacher.model if cfg.teacher else None,
            "parameters": count_parameters(teacher),
            "test_accuracy": teacher_metrics["accuracy"] if teacher_metrics else None,
        },
        "terms": [
            {"name": t.name, "weight": t.weight, "student": t.student, "teacher": t.teacher}
            for t in distiller.terms
        ],
        "epochs": cfg.train.epochs,
        "train_samples": int(train_x.shape[0]),
        "data": data_used,
        "import_dirs": model_import_dirs(cfg),
        "seconds": sum(r["epoch_time_s"] for r in fit.history),
        "config": cfg.to_dict(),
    }
    if distributed.is_main():
        atomic_write_text(
            Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n"
        )
    return RunResult(fit, summary)


def _val_summary(fit: FitResult, val: tuple[Tensor, Tensor] | None) -> dict[str, Any]:
    if val is None:
        return {}
    return {
        "val_accuracy": fit.final["val_accuracy"],
        "best_val_accuracy": best_of(fit.history, "val_accuracy"),
        "val_samples": int(val[1].shape[0]),
    }


def run_stages(cfg: ExperimentConfig, resume: bool = False) -> RunResult:
    """Multi-stage training: each stage starts from the previous stage's student weights.

    On ``resume`` every stage resumes from its own newest checkpoint, so finished stages
    return at once and the stage in progress continues where it stopped.
    """
    root = Path(cfg.output_dir)
    student = cfg.student
    results: list[tuple[str, RunResult]] = []
    for stage in cfg.stages:
        stage_cfg = dataclasses.replace(
            cfg,
            output_dir=str(root / stage.name),
            student=student,
            distill=stage.distill,
            optim=stage.optim or cfg.optim,
            train=dataclasses.replace(cfg.train, epochs=stage.epochs),
            stages=[],
        )
        print(f"stage {stage.name!r}: {stage.epochs} epochs")
        result = run_experiment(stage_cfg, resume=resume)
        results.append((stage.name, result))
        student = dataclasses.replace(cfg.student, checkpoint=result.summary["student"]["weights"])
    last = results[-1][1]
    last.summary["stages"] = [{"stage": n, **r.summary["student"]} for n, r in results]
    if distributed.is_main():
        atomic_write_text(root / "summary.json", json.dumps(last.summary, indent=2) + "\n")
    return last


def cached_teacher_outputs(
    cfg: ExperimentConfig,
    distiller: Distiller,
    teacher: nn.Module,
    train_x: Tensor,
    device: torch.device,
) -> dict[str, Any]:
    """Run the frozen teacher once and return its outputs as batch tensors; drop it from
    ``distiller``.

    On disk (``distill.cache_dir``, :func:`disk_teacher_outputs`) or in memory
    (:func:`cache_teacher_outputs`); every entry point with a frozen teacher (``kdistill run``,
    the multi-teacher and semi-supervised schemes) goes through here. Returns
    ``{"teacher.<key>": (N, ...)}``; afterwards every teacher output comes from the cache.
    """
    _check_cacheable(cfg)
    teacher.to(device)
    if cfg.distill.cache_dir is not None:
        cached: dict[str, Any] = disk_teacher_outputs(
            cfg, teacher, distiller.teacher_keys, train_x, device
        )
    else:
        cached = cache_teacher_outputs(
            teacher,
            distiller.teacher_keys,
            train_x,
            cfg.data.eval_batch_size,
            device,
            getattr(torch, cfg.distill.cache_dtype),
        )
    distiller.drop_teacher()
    teacher.cpu()
    return cached


def cache_teacher_outputs(
    teacher: nn.Module,
    keys: Sequence[str],
    inputs: Tensor,
    batch_size: int,
    device: torch.device | str = "cpu",
    map_dtype: torch.dtype = torch.float32,
) -> dict[str, Tensor]:
    """Run a frozen teacher once over ``inputs`` ``(N, ...)``, keeping the tensors ``keys`` name.

    ``keys`` are ``"logits"`` and/or layer names. Returns ``{"teacher.<key>": (N, ...)}`` on
    CPU, ready to be batched with the inputs (see :func:`kdistill.trainer.unpack_batch`).
    Feature maps (more than 2 dims) are stored in ``map_dtype`` — float16 halves the memory
    of a cache that would otherwise dwarf the data set; logits and vectors stay float32. The
    same pass and dtypes as the on-disk cache (:func:`kdistill.cache.build_cache`).
    """
    parts: dict[str, list[Tensor]] = {k: [] for k in keys}
    for outputs in teacher_outputs(teacher, inputs, keys, batch_size, device):
        for key, value in dense_outputs(outputs, keys, map_dtype).items():
            parts[key].append(value)
    return {f"{TEACHER_PREFIX}{key}": torch.cat(chunks) for key, chunks in parts.items()}


def disk_teacher_outputs(
    cfg: ExperimentConfig,
    teacher: nn.Module,
    keys: Sequence[str],
    train_x: Tensor,
    device: torch.device,
) -> dict[str, ShardedTensor]:
    """The teacher outputs ``keys`` from the on-disk cache ``distill.cache_dir``.

    Builds the cache (one teacher pass, :func:`kdistill.cache.build_cache`) when the folder
    has none or ``distill.cache_rebuild`` is set; otherwise opens it, refusing it when it was
    made by another teacher or from other data, or is damaged. Under torchrun rank 0 builds
    and the others wait, then open and check it. Returns ``{"teacher.<key>": (N, ...)}``
    memory-mapped tensors that the batch loader indexes per batch, holding exactly what
    :func:`cache_teacher_outputs` returns.
    """
    assert cfg.distill.cache_dir is not None
    path = Path(cfg.distill.cache_dir).expanduser()
    d = cfg.data
    build = {
        "data_name": f"{d.name}:train(subset={d.train_subset}, seed={cfg.seed})"
        if d.val_size is None
        # the validation split does not depend on the seed: without train_subset neither
        # do the training images, and one cache serves every seed
        else f"{d.name}:train(minus val_size={d.val_size}"
        + ("" if d.train_subset is None else f", subset={d.train_subset}, seed={cfg.seed}")
        + ")",
        "transform": "none",
        "keys": list(keys),
        "batch_size": d.eval_batch_size,
        "device": device,
        "map_dtype": getattr(torch, cfg.distill.cache_dtype),
    }
    try:
        if distributed.is_main():
            cache, built = load_or_build(
                path, teacher, train_x, rebuild=cfg.distill.cache_rebuild, **build
            )
            if built and cfg.train.progress:
                print(f"teacher cache: wrote {path} ({cache.num_rows} rows)")
        distributed.barrier()
        if not distributed.is_main():
            cache, _ = load_or_build(path, teacher, train_x, rebuild=False, **build)
    except CacheError as err:
        raise ConfigError(f"distill.cache_dir: {err}") from err
    return {f"{TEACHER_PREFIX}{key}": cache[key] for key in keys}


def _check_cacheable(cfg: ExperimentConfig) -> None:
    if cfg.data.augment:
        raise ConfigError(
            "distill.cache_teacher: true needs data.augment: false (the cache holds one teacher "
            "output per un-augmented image); set one of them to false"
        )
