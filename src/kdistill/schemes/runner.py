"""Run a scheme file: data, models, the scheme, the Trainer, and ``summary.json``.

:func:`run_scheme` is the scheme counterpart of :func:`kdistill.experiment.run_experiment`
and reuses its pieces (``load_data``, ``load_model``, ``augmentation``, ``build_terms``, the
teacher-output cache). Every run folder holds the usual ``metrics.csv``, checkpoints and
``student.safetensors`` (the evaluated student: peer 0, the model without its auxiliary
heads, the DINO backbone, ...) and a ``summary.json`` whose ``config`` is the plain
experiment config — so ``kdistill report/export`` work on it — with the scheme's settings
under ``scheme`` and scheme-specific results beside them (peer accuracies, per-head
accuracies, the EMA teacher's accuracy, k-NN accuracies against a random initialisation,
each teacher's accuracy, pseudo-label statistics).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.checkpoint import atomic_write_text, save_weights
from kdistill.config import ConfigError, ExperimentConfig, ModelConfig, config_dir, given_keys
from kdistill.data.loader import TensorBatchLoader, random_shift_flip
from kdistill.data.sources import data_record
from kdistill.distiller import Distiller, LossTerm
from kdistill.experiment import (
    ValidationCallback,
    _val_summary,
    augmentation,
    build_terms,
    cached_teacher_outputs,
    load_data,
    load_model,
    load_validation,
    probe_terms,
)
from kdistill.losses import LabelSmoothingCrossEntropy
from kdistill.models import count_parameters
from kdistill.runtime import RunContext, build_trainer, start_run
from kdistill.schemes.augment import random_resized_crop
from kdistill.schemes.config import SchemeConfig
from kdistill.schemes.ema import DINO, MeanTeacher
from kdistill.schemes.knn import extract_features, knn_accuracy
from kdistill.schemes.multi_teacher import MultiTeacher
from kdistill.schemes.mutual import MutualLearning, OnlineDistillation
from kdistill.schemes.self_distill import AuxiliaryHeads, born_again
from kdistill.schemes.unlabelled import (
    UNLABELLED,
    MaskedCrossEntropy,
    fill_pseudo_labels,
    hide_labels,
    labelled_split,
    oversample_labelled,
    pseudo_label,
    semi_supervised_terms,
)
from kdistill.trainer import FitResult, best_of, evaluate


@dataclass
class SchemeRunResult:
    summary: dict[str, Any]
    fit: FitResult | None  # None for Born-Again (several runs; see summary["generations"])


@dataclass
class _Context:
    cfg: ExperimentConfig
    scheme: SchemeConfig
    run: RunContext
    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    eval_loader: TensorBatchLoader
    resume: bool

    @property
    def device(self) -> torch.device:
        return self.run.device


@dataclass
class _Built:
    """What a scheme builder hands back to the common loop."""

    model: Any  # a Scheme or a Distiller
    loader_tensors: dict[str, Tensor]
    student_model: nn.Module  # the ModelConfig-built student (for the summary)
    teacher: dict[str, Any] | None = None
    after: Callable[[FitResult], dict[str, Any]] | None = None


# Which of the experiment's ``teacher:`` / ``distill:`` sections each scheme reads; a section
# the scheme does not read is an error, not silently ignored (its settings live under
# ``scheme.<name>``).
_USES_TEACHER = {"online_teacher", "semi_supervised", "born_again"}
_USES_DISTILL = {"multi_teacher", "semi_supervised", "born_again"}


def _refuse_unused_sections(cfg: ExperimentConfig, scheme: SchemeConfig) -> None:
    given = given_keys(cfg)
    if "teacher" in given and cfg.teacher is not None and scheme.name not in _USES_TEACHER:
        where = "scheme.multi_teacher.teachers" if scheme.name == "multi_teacher" else None
        hint = f"; its teachers are {where}" if where else ""
        raise ConfigError(
            f"teacher: the {scheme.name} scheme does not use a teacher: section{hint}; remove it"
        )
    if "distill" in given and given_keys(cfg.distill) and scheme.name not in _USES_DISTILL:
        raise ConfigError(
            f"distill: the {scheme.name} scheme does not read the distill: section (its "
            f"settings are under scheme.{scheme.name}); remove "
            f"distill.{sorted(given_keys(cfg.distill))[0]}"
        )


def run_scheme(
    cfg: ExperimentConfig, scheme: SchemeConfig, resume: bool = False
) -> SchemeRunResult:
    """Train ``cfg`` with ``scheme`` and write ``output_dir/summary.json``."""
    if cfg.stages:
        raise ConfigError("stages: schemes run one stage; drop stages: or use kdistill run")
    _refuse_unused_sections(cfg, scheme)
    if scheme.name == "born_again":
        return _run_born_again(cfg, scheme, resume)
    run = start_run(cfg.seed, cfg.train)
    train, test = load_data(cfg)
    eval_loader = TensorBatchLoader(*test, batch_size=cfg.data.eval_batch_size)
    ctx = _Context(cfg, scheme, run, train, test, eval_loader, resume)
    built = _BUILDERS[scheme.name](ctx)
    train_loader = TensorBatchLoader(
        **built.loader_tensors,
        batch_size=cfg.data.batch_size,
        shuffle=True,
        augment=augmentation(cfg) if cfg.data.augment else False,
        drop_last=True,
        seed=cfg.seed,
        rank=run.rank,
        world_size=run.world_size,
    )
    if len(train_loader) == 0:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} is more than the {train[0].shape[0]} "
            "training samples (the last short batch is dropped)"
        )
    val = load_validation(cfg)  # data.val_size: held out of training, scored every epoch
    callbacks = (
        []
        if val is None
        else [ValidationCallback(TensorBatchLoader(*val, batch_size=cfg.data.eval_batch_size))]
    )
    trainer = build_trainer(
        built.model,
        train_loader,
        eval_loader,
        optim=cfg.optim,
        train=cfg.train,
        output_dir=cfg.output_dir,
        config={**cfg.to_dict(), "scheme": scheme.to_dict()},
        device=run.device,
        callbacks=callbacks,
    )
    fit = trainer.fit(resume=resume)
    summary: dict[str, Any] = {
        "scheme": scheme.to_dict(),
        "student": {
            "model": cfg.student.model,
            "parameters": count_parameters(built.student_model),
            "test_accuracy": fit.final["test_accuracy"],
            "best_test_accuracy": best_of(fit.history, "test_accuracy"),
            "weights": str(fit.student_path),
            **_val_summary(fit, val),  # where a plain run's summary has it
        },
        "teacher": built.teacher,
        "epochs": cfg.train.epochs,
        "train_samples": int(train[0].shape[0]),
        "seconds": sum(r["epoch_time_s"] for r in fit.history),
        "data": data_record(cfg.data, cfg.seed, train, test, config_dir(cfg)),  # what was read
        "config": cfg.to_dict(),
    }
    if built.after is not None and distributed.is_main():  # evaluations and files: rank 0
        summary.update(built.after(fit))
    if distributed.is_main():
        _write_summary(cfg, summary)
    return SchemeRunResult(summary, fit)


def run_scheme_file(
    path: str | Path, overrides: list[str] | tuple[str, ...] = (), resume: bool = False
) -> SchemeRunResult:
    """Load a scheme YAML file (with ``key=value`` overrides) and run it."""
    from kdistill.schemes.config import load_scheme_config

    cfg, scheme = load_scheme_config(path, overrides)
    return run_scheme(cfg, scheme, resume)


def _write_summary(cfg: ExperimentConfig, summary: dict[str, Any]) -> None:
    atomic_write_text(Path(cfg.output_dir) / "summary.json", json.dumps(summary, indent=2) + "\n")


# -- helpers -------------------------------------------------------------------------------


def _student(cfg: ExperimentConfig) -> nn.Module:
    torch.manual_seed(cfg.seed)  # the student's init does not depend on what came before
    return load_model(cfg.student)


def _accuracy(model: nn.Module, ctx: _Context) -> float:
    return evaluate(model, ctx.eval_loader, ctx.device)["accuracy"]


def _pretrain(
    ctx: _Context, model: nn.Module, x: Tensor, y: Tensor, epochs: int, output_dir: Path
) -> str:
    """Train ``model`` on ``(x, y)`` with cross-entropy (the run's optim and batch size)."""
    cfg = ctx.cfg
    distiller = Distiller(model, [LossTerm("ce", LabelSmoothingCrossEntropy(0.0), teacher=None)])
    batch = min(cfg.data.batch_size, x.shape[0])
    loader = TensorBatchLoader(
        x,
        y,
        batch_size=batch,
        shuffle=True,
        augment=augmentation(cfg) if cfg.data.augment else False,
        drop_last=True,
        seed=cfg.seed,
        rank=ctx.run.rank,
        world_size=ctx.run.world_size,
    )
    trainer = build_trainer(
        distiller,
        loader,
        ctx.eval_loader,
        optim=cfg.optim,
        train=cfg.train,
        output_dir=output_dir,
        config={"pretrain": cfg.to_dict(), "samples": int(x.shape[0])},
        device=ctx.device,
        epochs=epochs,
    )
    return str(trainer.fit(resume=ctx.resume).student_path)


def _ready_teacher(
    ctx: _Context, spec: ModelConfig, key: str, epochs: int, x: Tensor, y: Tensor, name: str
) -> nn.Module:
    """Load a teacher; one without a checkpoint is first trained for ``epochs`` on ``(x, y)``."""
    model = load_model(spec, key)
    if spec.checkpoint:
        return model
    if epochs <= 0:
        raise ConfigError(
            f"{key}.checkpoint: the teacher has no checkpoint; give one, or set the scheme's "
            "pretraining epochs to train it first"
        )
    print(f"training teacher {name!r} ({spec.model}) for {epochs} epochs on {x.shape[0]} samples")
    path = _pretrain(ctx, model, x, y, epochs, Path(ctx.cfg.output_dir) / name)
    return load_model(dataclasses.replace(spec, checkpoint=path), key)


def _distiller_with_cache(
    ctx: _Context, student: nn.Module, teacher: nn.Module, terms: list[LossTerm]
) -> tuple[Distiller, dict[str, Any]]:
    """A Distiller, and the teacher-output cache (in memory, or on disk with
    ``distill.cache_dir``) when ``distill.cache_teacher`` allows one."""
    cfg = ctx.cfg
    distiller = Distiller(student, terms, teacher if any(t.uses_teacher for t in terms) else None)
    distiller.build_adapters(ctx.train[0][: min(8, ctx.train[0].shape[0])])
    cached: dict[str, Any] = {}
    if distiller.teacher is not None and cfg.distill.cache_teacher:
        cached = cached_teacher_outputs(cfg, distiller, teacher, ctx.train[0], ctx.device)
    return distiller, cached


# -- builders ------------------------------------------------------------------------------


def _build_mutual(ctx: _Context) -> _Built:
    cfg, settings = ctx.cfg, ctx.scheme.settings
    student = _student(cfg)
    peers = [student] + [
        load_model(p, f"scheme.mutual.peers[{i}]") for i, p in enumerate(settings.peers)
    ]
    scheme = MutualLearning(peers, settings.temperature, settings.alpha)

    def after(fit: FitResult) -> dict[str, Any]:
        return {
            "peers": [
                {
                    "model": spec.model,
                    "parameters": count_parameters(peer),
                    "test_accuracy": _accuracy(peer, ctx),
                }
                for spec, peer in zip([cfg.student, *settings.peers], peers, strict=True)
            ]
        }

    return _Built(scheme, {"inputs": ctx.train[0], "target": ctx.train[1]}, student, after=after)


def _build_online_teacher(ctx: _Context) -> _Built:
    cfg, settings = ctx.cfg, ctx.scheme.settings
    teacher_spec = cfg.teacher
    if teacher_spec is None:
        raise ConfigError("teacher: the online teacher scheme trains the teacher: model alongside")
    teacher = load_model(teacher_spec, "teacher")
    student = _student(cfg)
    scheme = OnlineDistillation(
        student, teacher, settings.temperature, settings.alpha, settings.teacher_alpha
    )

    def after(fit: FitResult) -> dict[str, Any]:
        path = save_weights(Path(cfg.output_dir) / "teacher.safetensors", teacher.state_dict())
        return {
            "teacher": {
                "model": teacher_spec.model,
                "parameters": count_parameters(teacher),  # type: ignore[union-attr]
                "test_accuracy": _accuracy(teacher, ctx),
                "weights": str(path),
            }
        }

    return _Built(scheme, {"inputs": ctx.train[0], "target": ctx.train[1]}, student, after=after)


def _build_aux_heads(ctx: _Context) -> _Built:
    cfg, settings = ctx.cfg, ctx.scheme.settings
    student = _student(cfg)
    try:
        scheme = AuxiliaryHeads(
            student,
            {name: "auto" for name in settings.layers},
            example=ctx.train[0][:8],
            temperature=settings.temperature,
            alpha=settings.alpha,
            aux_weight=settings.aux_weight,
            hint_layer=settings.hint_layer,
            hint_weight=settings.hint_weight,
        )
    except ValueError as err:
        raise ConfigError(f"scheme.aux_heads.layers: {err}") from None

    def after(fit: FitResult) -> dict[str, Any]:
        heads = scheme.evaluate_heads(ctx.eval_loader, ctx.device)
        return {"heads": {name: r["accuracy"] for name, r in heads.items()}}

    return _Built(scheme, {"inputs": ctx.train[0], "target": ctx.train[1]}, student, after=after)


def _build_mean_teacher(ctx: _Context) -> _Built:
    cfg, s = ctx.cfg, ctx.scheme.settings
    x, y = ctx.train
    target = y
    if s.labelled_fraction < 1.0:
        labelled, _ = labelled_split(y, s.labelled_fraction, cfg.seed)
        target = hide_labels(y, labelled)
    labelled_samples = int((target != UNLABELLED).sum())
    if s.labelled_share is not None:
        epoch = oversample_labelled(target, s.labelled_share)
        x, target = x[epoch], target[epoch]
    student = _student(cfg)
    scheme = MeanTeacher(
        student,
        s.momentum,
        s.final_momentum,
        s.schedule,
        s.consistency,
        s.consistency_weight,
        s.ramp_up_epochs,
        s.temperature,
        augmentation(cfg) if s.augment_views else None,
        seed=cfg.seed,
    )

    def after(fit: FitResult) -> dict[str, Any]:
        path = save_weights(
            Path(cfg.output_dir) / "ema_teacher.safetensors", scheme.teacher.model.state_dict()
        )
        return {
            "labelled_samples": labelled_samples,
            "epoch_samples": int(x.shape[0]),  # labelled rows repeated with labelled_share
            "ema_teacher": {
                "test_accuracy": _accuracy(scheme.teacher.model, ctx),
                "weights": str(path),
            },
        }

    return _Built(scheme, {"inputs": x, "target": target}, student, after=after)


def _build_dino(ctx: _Context) -> _Built:
    cfg, s = ctx.cfg, ctx.scheme.settings
    x, y = ctx.train
    student = _student(cfg)
    initial = copy.deepcopy(student)  # the same network at random initialisation
    if s.knn_bank is not None and s.knn_bank < x.shape[0]:
        from kdistill.data import stratified_indices

        bank = stratified_indices(y, s.knn_bank, cfg.seed)
        reference = (x[bank], y[bank])
    else:
        reference = (x, y)
    views: Callable[[Tensor, torch.Generator], Tensor]
    if s.views_augment == "crop":
        views = functools.partial(
            random_resized_crop, scale=(s.crop_scale[0], s.crop_scale[1]), jitter=s.jitter
        )
    elif cfg.data.name == "fashion_mnist":
        views = functools.partial(random_shift_flip, max_shift=s.max_shift)
    else:
        views = augmentation(cfg)
    try:
        scheme = DINO(
            student,
            s.out_dim,
            s.feature_layer,
            example=x[:8],
            hidden_dim=s.hidden_dim,
            bottleneck_dim=s.bottleneck_dim,
            use_bn=s.use_bn,
            views=s.views,
            augment=views,
            teacher_temperature=s.teacher_temperature,
            student_temperature=s.student_temperature,
            center_momentum=s.center_momentum,
            momentum=s.momentum,
            final_momentum=s.final_momentum,
            schedule=s.schedule,
            seed=cfg.seed,
            knn_reference=reference,
            knn_k=s.knn_k,
        )
    except ValueError as err:
        raise ConfigError(f"scheme.dino: {err}") from None

    def after(fit: FitResult) -> dict[str, Any]:
        def knn(model: nn.Module) -> float:
            model.to(ctx.device)
            train_f = extract_features(model, x, s.feature_layer, cfg.data.eval_batch_size)
            test_f = extract_features(model, ctx.test[0], s.feature_layer, cfg.data.eval_batch_size)
            return knn_accuracy(train_f, y, test_f, ctx.test[1], k=s.knn_k)

        teacher_backbone: nn.Module = scheme.teacher.model.backbone  # type: ignore[assignment]
        path = save_weights(
            Path(cfg.output_dir) / "ema_teacher_backbone.safetensors", teacher_backbone.state_dict()
        )
        return {
            "knn": {
                "k": s.knn_k,
                "bank": "all training images",
                "student": knn(scheme.backbone),
                "ema_teacher": knn(teacher_backbone),
                "random_init": knn(initial),
            },
            "ema_teacher_weights": str(path),
        }

    return _Built(scheme, {"inputs": x}, student, after=after)


def _build_multi_teacher(ctx: _Context) -> _Built:
    cfg, s = ctx.cfg, ctx.scheme.settings
    x, y = ctx.train
    teachers = [
        _ready_teacher(
            ctx,
            spec,
            f"scheme.multi_teacher.teachers[{i}]",
            s.pretrain_epochs,
            x,
            y,
            f"teacher_{i}",
        )
        for i, spec in enumerate(s.teachers)
    ]
    temperature = s.temperature if s.temperature is not None else cfg.distill.temperature
    ensemble = MultiTeacher(teachers, s.weights, s.mode, s.confidence_weighting, temperature).to(
        ctx.device
    )
    teacher_rows = [
        {"model": spec.model, "parameters": count_parameters(t), "test_accuracy": _accuracy(t, ctx)}
        for spec, t in zip(s.teachers, teachers, strict=True)
    ]
    ensemble_accuracy = _accuracy(ensemble, ctx)
    student = _student(cfg)
    context = probe_terms(cfg.distill, student, ensemble, x[:8], int(x.shape[0]))
    uses = ["temperature"] if s.temperature is None else []  # the ensemble's temperature
    terms = build_terms(cfg.distill, True, context, uses)
    distiller, cached = _distiller_with_cache(ctx, student, ensemble, terms)
    summary_teacher = {
        "model": "multi_teacher",
        "teachers": teacher_rows,
        "test_accuracy": ensemble_accuracy,
        "weights": ensemble.weights,
    }
    return _Built(distiller, {"inputs": x, "target": y, **cached}, student, summary_teacher)


def _build_semi_supervised(ctx: _Context) -> _Built:
    cfg, s = ctx.cfg, ctx.scheme.settings
    x, y = ctx.train
    labelled, _ = labelled_split(y, s.labelled_fraction, cfg.seed)
    target = hide_labels(y, labelled)
    teacher_spec = cfg.teacher
    if teacher_spec is None:
        raise ConfigError("teacher: the semi-supervised scheme distils from a teacher")
    teacher = _ready_teacher(
        ctx, teacher_spec, "teacher", s.teacher_epochs, x[labelled], y[labelled], "teacher"
    )
    teacher.to(ctx.device)
    extra: dict[str, Any] = {"labelled_samples": int(labelled.numel())}
    if s.pseudo_label_threshold is not None:
        pseudo, _ = pseudo_label(
            teacher, x, s.pseudo_label_threshold, cfg.data.eval_batch_size, ctx.device
        )
        filled = fill_pseudo_labels(target, pseudo)
        new = (target == UNLABELLED) & (filled != UNLABELLED)
        extra["pseudo_labels"] = {
            "threshold": s.pseudo_label_threshold,
            "count": int(new.sum()),
            "accuracy": (filled[new] == y[new]).float().mean().item() if new.any() else None,
        }
        target = filled
    teacher_summary = {
        "model": teacher_spec.model,
        "parameters": count_parameters(teacher),
        "test_accuracy": _accuracy(teacher, ctx),
    }
    student = _student(cfg)
    if cfg.distill.terms:
        context = probe_terms(cfg.distill, student, teacher, x[:8], int(x.shape[0]))
        terms = build_terms(cfg.distill, True, context)
        for term in terms:
            if not term.uses_teacher and not isinstance(term.loss, MaskedCrossEntropy):
                raise ConfigError(
                    f"distill.terms: term {term.name!r} compares with labels but unlabelled rows "
                    "are marked -1; use loss: masked_cross_entropy for hard-label terms"
                )
    else:
        terms = semi_supervised_terms(cfg.distill.temperature, cfg.distill.alpha)
    distiller, cached = _distiller_with_cache(ctx, student, teacher, terms)
    after = lambda fit: extra  # noqa: E731
    return _Built(
        distiller, {"inputs": x, "target": target, **cached}, student, teacher_summary, after
    )


_BUILDERS: dict[str, Callable[[_Context], _Built]] = {
    "mutual": _build_mutual,
    "online_teacher": _build_online_teacher,
    "aux_heads": _build_aux_heads,
    "mean_teacher": _build_mean_teacher,
    "dino": _build_dino,
    "multi_teacher": _build_multi_teacher,
    "semi_supervised": _build_semi_supervised,
}


def _run_born_again(cfg: ExperimentConfig, scheme: SchemeConfig, resume: bool) -> SchemeRunResult:
    s = scheme.settings
    rows = born_again(cfg, s.generations, resume=resume, ensemble=s.ensemble)
    summaries = [
        json.loads((Path(r["output_dir"]) / "summary.json").read_text())
        for r in rows
        if r["output_dir"] is not None  # not a given generation 0
    ]
    last = summaries[-1]
    summary = {
        "scheme": scheme.to_dict(),
        "generations": rows,
        "student": last["student"],
        "teacher": last["teacher"],
        "epochs": cfg.train.epochs,
        "seconds": sum(s["seconds"] for s in summaries),  # every generation trained here
        "config": cfg.to_dict(),
    }
    _write_summary(cfg, summary)
    return SchemeRunResult(summary, None)
