"""``run_dense(cfg)``: teacher, student without KD and student with KD on a dense task.

Reads like the classification run: data, models, loss terms, then the same
:class:`~kdistill.distiller.Distiller` and :class:`~kdistill.trainer.Trainer` for each model
(``<output_dir>/teacher``, ``student``, ``student_kd``), then a report. What is dense-specific
is built here and nothing else: the models (:mod:`kdistill.dense.models`), the label term
(:mod:`kdistill.dense.tasks`), the data loaders (tensors read from the files of
:mod:`kdistill.dense.formats`) and the metrics (:mod:`kdistill.dense.metrics`, passed as the
Trainer's ``evaluate_fn``: ``test_accuracy`` in ``metrics.csv`` is the validation mAP@[.5:.95]
or mIoU, ``test_map50`` / ``test_pixel_accuracy`` next to it).

Outputs: ``summary.json`` and ``report.md`` (test mAP@[.5:.95] and mAP@.5, or mIoU and pixel
accuracy; parameters; latency) and ``predictions.png`` (the same test images: ground truth,
teacher, student, student + KD).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.checkpoint import atomic_write_text, load_weights
from kdistill.config import ConfigError, DistillConfig, TermConfig
from kdistill.data.loader import TensorBatchLoader
from kdistill.dense.boxes import pad_boxes, unpad_boxes
from kdistill.dense.config import DenseConfig
from kdistill.dense.formats import IGNORE, read_coco, read_mask_folder, read_yolo
from kdistill.dense.metrics import coco_map, confusion_matrix, mean_iou
from kdistill.dense.models import CenterNetDetector, build_dense_model, decode_detections
from kdistill.dense.synthetic import SEGMENTATION_CLASSES as SYNTHETIC_CLASSES
from kdistill.dense.synthetic import SyntheticSpec, write_dataset
from kdistill.dense.tasks import CenterNetLoss, SegmentationCrossEntropy
from kdistill.distiller import LOGITS, Distiller, Inputs, LossTerm
from kdistill.experiment import build_terms, cache_teacher_outputs
from kdistill.models import count_parameters
from kdistill.report import measure_latency
from kdistill.runtime import build_trainer, start_run
from kdistill.taps import FeatureTaps

__all__ = [
    "DEFAULT_TERMS",
    "DenseData",
    "DenseDistiller",
    "DenseResult",
    "load_dense_data",
    "run_dense",
]

DEFAULT_TERMS: dict[str, list[TermConfig]] = {
    "detection": [TermConfig("cwd", "cwd", 5.0, "neck", "neck", {"temperature": 1.0})],
    "segmentation": [TermConfig("cwd", "cwd", 3.0, "logits", "logits", {"temperature": 4.0})],
}
"""The KD terms of a run whose ``distill.terms`` is empty: CWD where its paper applies it
(Shu et al. 2021: FPN features for detection, τ = 1; logits for segmentation, τ = 4)."""


STRIDE = CenterNetDetector.stride
"""Input pixels per output cell of the detector."""


# -- data ------------------------------------------------------------------------------------


@dataclass
class DenseData:
    """Tensors of the three splits: ``(images (N, ch, H, W), target)`` each; the target is
    padded boxes ``(N, M, 5)`` (detection) or masks ``(N, H, W)`` (segmentation)."""

    train: tuple[Tensor, Tensor]
    val: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    num_classes: int
    names: list[str]
    root: Path


def load_dense_data(cfg: DenseConfig) -> DenseData:
    """Write the synthetic set if asked, then read every split back from its files."""
    d, root = cfg.data, cfg.data_root
    if d.source == "synthetic":
        spec = SyntheticSpec(
            canvas=d.canvas,
            max_items=d.max_items,
            train=d.train_images,
            val=d.val_images,
            test=d.test_images,
            seed=cfg.seed,
        )
        write_dataset(root, spec, d.fashion_root)
    source = d.source if d.source != "synthetic" else {"detection": "coco"}.get(cfg.task, "masks")
    splits, names = {}, []
    num_classes = d.num_classes or (len(SYNTHETIC_CLASSES) if d.source == "synthetic" else None)
    for split in ("train", "val", "test"):
        if source == "masks":
            seg = read_mask_folder(root / "images" / split, root / "masks" / split, num_classes)
            splits[split] = (seg.images, seg.masks)
            continue
        if source == "coco":
            det = read_coco(root / "annotations" / f"{split}.json", root / "images" / split)
        else:
            det = read_yolo(root / "labels" / split, root / "images" / split)
        names = det.names
        splits[split] = (det.images, pad_boxes(det.boxes, det.labels))
    if cfg.task == "segmentation":
        num_classes = num_classes or int(splits["train"][1].max()) + 1
        names = ["background", *(f"class {k}" for k in range(1, num_classes))]
        if d.source == "synthetic":
            names = list(SYNTHETIC_CLASSES)
    else:
        num_classes = len(names)
    for split, (images, _) in splits.items():
        if images.shape[0] == 0 or images.shape[-1] % 16 or images.shape[-2] % 16:
            raise ConfigError(
                f"data: the {split} split under {root} has images {tuple(images.shape)}; need at "
                "least one image, with height and width multiples of 16"
            )
    return DenseData(splits["train"], splits["val"], splits["test"], num_classes, names, root)


# -- the distiller and the metrics -----------------------------------------------------------


class DenseDistiller(Distiller):
    """The :class:`Distiller`, its segmentation ``logits`` handed to the Trainer classes last.

    The Trainer's running ``train_accuracy`` compares ``logits.argmax(-1)`` with targets of
    the logits' leading shape; segmentation logits ``(B, C, H, W)`` go out as ``(B, H, W, C)``,
    so it is the pixel accuracy. Detection targets are boxes ``(B, M, 5)``, which no logits
    line up with: its ``train_accuracy`` is NaN (mAP is the test metric). Only the logged
    ``logits`` change; the loss terms see the models' own outputs.
    """

    def __init__(self, *args: Any, task: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.task = task

    def forward(
        self, inputs: Inputs, target: Tensor | None = None, **kwargs: Any
    ) -> dict[str, Tensor]:
        out = super().forward(inputs, target, **kwargs)
        if self.task == "segmentation":
            out["logits"] = out["logits"].movedim(1, -1)  # (B, H, W, C)
        return out


@torch.inference_mode()
def predict(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """The model's outputs over ``images`` in eval mode, on CPU."""
    was_training = model.training
    model.eval()
    out = [
        model(images[i : i + batch_size].to(device)).float().cpu()
        for i in range(0, len(images), batch_size)
    ]
    model.train(was_training)
    return torch.cat(out)


def dense_metrics(
    cfg: DenseConfig, num_classes: int, outputs: Tensor, target: Tensor
) -> dict[str, float]:
    """``{"accuracy": primary, ...}``: mAP@[.5:.95] and mAP@.5 (detection) or mIoU and pixel
    accuracy (segmentation) of ``outputs`` against ``target``."""
    if cfg.task == "detection":
        detections = _decode(cfg, num_classes, outputs)
        gt = unpad_boxes(target)
        size = (outputs.shape[-2] * STRIDE, outputs.shape[-1] * STRIDE)
        m = coco_map([b for b, _ in gt], [c for _, c in gt], detections, num_classes, size)
        return {"accuracy": m["map"], "map": m["map"], "map50": m["map50"], "map75": m["map75"]}
    matrix = confusion_matrix(outputs.argmax(1), target, num_classes)
    pixel = float(matrix.trace() / max(matrix.sum(), 1))
    miou = mean_iou(matrix)
    return {"accuracy": miou, "miou": miou, "pixel_accuracy": pixel}


def _decode(
    cfg: DenseConfig, num_classes: int, outputs: Tensor
) -> list[tuple[Tensor, Tensor, Tensor]]:
    e = cfg.eval
    return decode_detections(outputs, num_classes, STRIDE, e.top_k, e.score_threshold, e.nms_iou)


def evaluate_fn(cfg: DenseConfig, num_classes: int) -> Callable[..., dict[str, float]]:
    """The Trainer's ``evaluate_fn``: metrics over an ``{"inputs", "target"}`` loader."""

    def evaluate(
        model: nn.Module, loader: TensorBatchLoader, device: torch.device
    ) -> dict[str, float]:
        images, target = loader.named["inputs"], loader.named["target"]
        return dense_metrics(
            cfg, num_classes, predict(model, images, loader.batch_size, device), target
        )

    return evaluate


# -- training --------------------------------------------------------------------------------


def task_term(cfg: DenseConfig) -> LossTerm:
    """The label term: CenterNet focal + GIoU, or per-pixel cross-entropy."""
    loss = (
        CenterNetLoss(stride=STRIDE)
        if cfg.task == "detection"
        else SegmentationCrossEntropy(IGNORE)
    )
    return LossTerm("task", loss, 1.0, teacher=None)


def kd_terms(cfg: DenseConfig, num_classes: int) -> list[LossTerm]:
    """The configured dense KD terms (the task's default when none are given)."""
    terms = [  # the detection head's class count is known here, not in the YAML
        dataclasses.replace(t, params={"num_classes": num_classes, **t.params})
        if t.loss == "box_kd"
        else t
        for t in cfg.distill.terms or DEFAULT_TERMS[cfg.task]
    ]
    return build_terms(DistillConfig(terms=terms), has_teacher=True)


def train_model(
    cfg: DenseConfig,
    data: DenseData,
    model: nn.Module,
    terms: Sequence[LossTerm],
    teacher: nn.Module | None,
    folder: Path,
    epochs: int,
    device: torch.device,
    resume: bool = False,
) -> dict[str, Any]:
    """Train ``model`` on the label term plus ``terms`` (against the frozen ``teacher``)."""
    all_terms = [task_term(cfg), *terms]
    uses_teacher = any(t.uses_teacher for t in all_terms)
    distiller = DenseDistiller(model, all_terms, teacher if uses_teacher else None, task=cfg.task)
    train_x, train_y = data.train
    distiller.build_adapters(train_x[:4])
    cached: dict[str, Tensor] = {}
    if uses_teacher and cfg.distill.cache_teacher:
        assert teacher is not None
        keys = distiller.teacher_keys
        dtype = getattr(torch, cfg.distill.cache_dtype)
        cached = cache_teacher_outputs(
            teacher.to(device), keys, train_x, cfg.data.eval_batch_size, device, dtype
        )
        distiller.drop_teacher()
    d = cfg.data
    train_loader = TensorBatchLoader(
        inputs=train_x,
        target=train_y,
        **cached,
        batch_size=d.batch_size,
        shuffle=True,
        drop_last=True,
        seed=cfg.seed,
    )
    val_loader = TensorBatchLoader(
        inputs=data.val[0], target=data.val[1], batch_size=d.eval_batch_size
    )
    trainer = build_trainer(  # every train.* key, as for every other entry point
        distiller,
        train_loader,
        val_loader,
        optim=cfg.optim,
        train=cfg.train,
        output_dir=folder,
        config=cfg.to_dict(),
        device=device,
        evaluate_fn=evaluate_fn(cfg, data.num_classes),
        epochs=epochs,
    )
    began = time.perf_counter()
    fit = trainer.fit(resume=resume)
    return {
        "seconds": time.perf_counter() - began,
        "weights": str(fit.student_path),
        "history": fit.history,
        "terms": [
            {"name": t.name, "loss": type(t.loss).__name__, "weight": t.weight} for t in all_terms
        ],
    }


def _build(cfg: DenseConfig, role: str, num_classes: int, channels: int) -> nn.Module:
    m = cfg.teacher if role == "teacher" else cfg.student
    try:
        return build_dense_model(
            cfg.task, num_classes, m.size or role, in_channels=channels, **m.kwargs()
        )
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{role}: {err}") from None


# -- the run ---------------------------------------------------------------------------------


@dataclass
class DenseResult:
    summary: dict[str, Any]
    models: dict[str, nn.Module] = field(default_factory=dict)


def run_dense(cfg: DenseConfig, resume: bool = False) -> DenseResult:
    """Teacher (trained, or loaded from ``teacher.checkpoint``), student without KD (when
    ``baseline``), student with the KD terms; test metrics, parameters and latency of each
    in ``summary.json`` / ``report.md``, and ``predictions.png``."""
    device = start_run(cfg.seed, cfg.train).device
    if distributed.is_distributed():
        raise ConfigError("task: dense runs train in one process; start them without torchrun")
    out_dir = Path(cfg.output_dir)
    data = load_dense_data(cfg)
    channels = data.train[0].shape[1]
    runs: dict[str, dict[str, Any]] = {}

    teacher = _build(cfg, "teacher", data.num_classes, channels)
    kd = kd_terms(cfg, data.num_classes)
    _check_layers(
        kd, _build(cfg, "student", data.num_classes, channels), teacher
    )  # before training
    if cfg.teacher.checkpoint is not None:
        _load(teacher, cfg.teacher.checkpoint)
    else:
        runs["teacher"] = train_model(
            cfg, data, teacher, [], None, out_dir / "teacher", cfg.teacher_epochs, device, resume
        )
    models = {"teacher": teacher.to(device)}
    for name, terms in (("student", []), ("student_kd", kd)):
        if name == "student" and not cfg.baseline:
            continue
        torch.manual_seed(cfg.seed)  # the same student initialisation with and without KD
        student = _build(cfg, "student", data.num_classes, channels)
        runs[name] = train_model(
            cfg, data, student, terms, teacher, out_dir / name, cfg.train.epochs, device, resume
        )
        models[name] = student
    summary = {
        "task": cfg.task,
        "models": {name: _test_row(cfg, data, model, device) for name, model in models.items()},
        "runs": {name: {k: v for k, v in r.items() if k != "history"} for name, r in runs.items()},
        "train_images": int(data.train[0].shape[0]),
        "config": cfg.to_dict(),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", report_markdown(summary))
    _plot(cfg, data, models, device, out_dir / "predictions.png")
    return DenseResult(summary, models)


def _check_layers(terms: Sequence[LossTerm], student: nn.Module, teacher: nn.Module) -> None:
    """Fail on a misspelt layer name now, not after the teacher has trained."""
    try:
        FeatureTaps(student, [t.student for t in terms if t.student != LOGITS])
        FeatureTaps(teacher, [t.teacher for t in terms if t.teacher not in (None, LOGITS)])
    except ValueError as err:  # FeatureTaps names the closest layers
        raise ConfigError(f"distill.terms: {err}") from None


def _load(model: nn.Module, path: str) -> None:
    try:
        model.load_state_dict(load_weights(path))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        raise ConfigError(
            f"teacher.checkpoint: {path} does not fit the teacher model: {err}"
        ) from None


def _test_row(
    cfg: DenseConfig, data: DenseData, model: nn.Module, device: torch.device
) -> dict[str, Any]:
    images, target = data.test
    metrics = dense_metrics(
        cfg, data.num_classes, predict(model, images, cfg.data.eval_batch_size, device), target
    )
    example = images[: min(16, len(images))].to(device)
    return {
        **{k: v for k, v in metrics.items() if k != "accuracy"},
        "parameters": count_parameters(model),
        "latency_ms": measure_latency(model, example, repeats=10, warmup=2),
        "latency_batch": int(example.shape[0]),
    }


def report_markdown(summary: Mapping[str, Any]) -> str:
    """The report: one row per model with its test metrics, parameters and latency."""
    detection = summary["task"] == "detection"
    metric_cols = ("map", "map50") if detection else ("miou", "pixel_accuracy")
    header = ("mAP@[.5:.95]", "mAP@.5") if detection else ("mIoU", "pixel accuracy")
    rows = summary["models"]
    batch = next(iter(rows.values()))["latency_batch"]
    lines = [
        f"# Dense distillation: {summary['task']}",
        "",
        f"Test split, {summary['train_images']} training images. Latency: median ms per "
        f"forward of {batch} images on this machine.",
        "",
        f"| model | {' | '.join(header)} | parameters | latency (ms) |",
        "|---|" + "---:|" * (len(header) + 2),
    ]
    for name, row in rows.items():
        values = " | ".join(f"{100 * row[c]:.2f}" for c in metric_cols)
        lines.append(f"| {name} | {values} | {row['parameters']:,} | {row['latency_ms']:.1f} |")
    kd = summary["runs"].get("student_kd")
    if kd:
        terms = ", ".join(f"{t['name']} ({t['loss']}, weight {t['weight']})" for t in kd["terms"])
        lines += ["", f"student_kd terms: {terms}."]
    lines += ["", "![predictions](predictions.png)", ""]
    return "\n".join(lines)


def _plot(
    cfg: DenseConfig,
    data: DenseData,
    models: Mapping[str, nn.Module],
    device: torch.device,
    path: Path,
) -> None:
    from kdistill.dense.plots import prediction_grid
    from kdistill.plots import PlotsUnavailable

    images, target = data.test
    images, target = images[: cfg.eval.plot_images], target[: cfg.eval.plot_images]
    columns: dict[str, Any] = {}
    for name, model in models.items():
        out = predict(model, images, cfg.data.eval_batch_size, device)
        columns[name] = (
            _decode(cfg, data.num_classes, out) if cfg.task == "detection" else out.argmax(1)
        )
    truth: Any = unpad_boxes(target) if cfg.task == "detection" else target
    with contextlib.suppress(
        PlotsUnavailable
    ):  # matplotlib is optional: the report has the figures
        prediction_grid(images, truth, columns, data.names, path, cfg.task)
