"""``kdistill export`` / ``kdistill predict``: a self-describing student file, and ONNX.

The exported ``.safetensors`` holds the student's weights only (no adapters, no auxiliary
heads, no teacher) and, in its metadata, everything needed to rebuild and feed it: the
model name and constructor kwargs, the input shape, the class names and the input
normalisation. So a file alone is enough::

    from kdistill.export import load_exported, predict
    model, meta = load_exported("student.safetensors")   # an nn.Module in eval mode
    classes = predict("student.safetensors", images)      # images: (N, H, W) uint8 or floats

The ONNX file (``torch.onnx.export``, dynamic batch axis) takes *normalised* float32 images
``(N, C, H, W)`` named ``images`` and returns ``logits``; its metadata carries the same
fields, and :func:`check_onnx` compares it with PyTorch through onnxruntime.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from torch import Tensor, nn

from kdistill.checkpoint import load_weights, save_weights
from kdistill.config import ExperimentConfig, add_import_dirs
from kdistill.models import build_model
from kdistill.report import KD_RUN, class_names, is_demo_dir, load_run_student

FORMAT = "kdistill.student/1"
INPUT_SHAPES = {"fashion_mnist": [1, 28, 28], "cifar10": [3, 32, 32], "cifar100": [3, 32, 32]}


class ExportError(ValueError):
    """A file is not a kdistill export, or the images do not fit the model."""


@dataclass
class ExportResult:
    safetensors: Path
    metadata: dict[str, Any]
    onnx: Path | None = None
    onnx_max_abs_diff: float | None = None  # vs PyTorch, when onnxruntime is installed


def normalization(cfg: ExperimentConfig) -> tuple[list[float], list[float]]:
    """Per-channel mean and std the run's images were standardised with."""
    from kdistill.data import CIFAR_STATS, FASHION_MNIST_MEAN, FASHION_MNIST_STD

    if cfg.data.name == "fashion_mnist":
        return [FASHION_MNIST_MEAN], [FASHION_MNIST_STD]
    mean, std = CIFAR_STATS[cfg.data.name]
    return list(mean), list(std)


def export_metadata(
    cfg: ExperimentConfig,
    model: nn.Module,
    source: Path,
    data: dict[str, Any] | None = None,
    import_dirs: list[str] | None = None,
) -> dict[str, Any]:
    """The file's metadata. ``data`` is the run's ``summary.json`` record of its data (input
    shape, standardisation, raw value range, class names); without one (runs written before
    it existed) the built-in data set's fixed values are used."""
    if data is not None and data.get("input_shape"):
        shape, mean, std = list(data["input_shape"]), list(data["mean"]), list(data["std"])
        value_range = list(data.get("input_range") or [0.0, 1.0])
    else:
        mean, std = normalization(cfg)
        shape, value_range = INPUT_SHAPES[cfg.data.name], [0.0, 1.0]
    with torch.inference_mode():
        num_classes = int(model.eval()(torch.zeros(1, *shape)).shape[-1])
    names = (data or {}).get("classes")
    if not names or len(names) != num_classes:
        names = list(class_names(cfg, num_classes)) if cfg.data.name in INPUT_SHAPES else None
    return {
        "format": FORMAT,
        "model": cfg.student.model,
        "kwargs": dict(cfg.student.kwargs),
        "data": cfg.data.name,
        "input_shape": shape,
        "num_classes": num_classes,
        "classes": names or [str(i) for i in range(num_classes)],
        "mean": mean,
        "std": std,
        "input_range": value_range,  # raw values before standardisation: what predict accepts
        "import_dirs": list(import_dirs or []),  # where a package.module:Class model imports from
        "source": str(source),
    }


def export_student(
    run_dir: str | Path,
    output: str | Path | None = None,
    onnx_path: str | Path | None = None,
    opset: int = 17,
    check: bool = True,
) -> ExportResult:
    """Write the run's student as a self-describing safetensors file (and optionally ONNX).

    ``run_dir`` is a run folder or a demo folder (its KD student). ``output`` defaults to
    ``run_dir/export/student.safetensors``. With ``check`` and onnxruntime installed, the ONNX
    model's logits are compared with PyTorch's on a batch of test-shaped random inputs.
    """
    run_dir = Path(run_dir)
    if is_demo_dir(run_dir):
        run_dir = run_dir / KD_RUN
    summary = _summary(run_dir)
    add_import_dirs(*summary.get("import_dirs", []))  # a package.module:Class student
    model, cfg = load_run_student(run_dir)
    meta = export_metadata(cfg, model, run_dir, summary.get("data"), summary.get("import_dirs"))
    output = Path(output) if output is not None else run_dir / "export" / "student.safetensors"
    save_weights(output, model.state_dict(), _encode(meta))
    result = ExportResult(output, meta)
    if onnx_path is not None:
        result.onnx = export_onnx(model, onnx_path, meta, opset)
        if check:
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                pass
            else:
                example = torch.randn(
                    5, *meta["input_shape"], generator=torch.Generator().manual_seed(0)
                )
                result.onnx_max_abs_diff = check_onnx(result.onnx, model, example)
    return result


def _summary(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "summary.json"
    if not path.is_file():
        raise ExportError(f"{run_dir}: no summary.json; point kdistill export at a run folder")
    try:
        return dict(json.loads(path.read_text()))
    except json.JSONDecodeError as err:
        raise ExportError(f"{path}: not valid JSON ({err}); the run did not finish") from None


def _encode(meta: dict[str, Any]) -> dict[str, str]:
    """safetensors metadata is ``str → str``: JSON-encode everything that is not a string."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The decoded metadata of an exported file; :class:`ExportError` if it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"exported student not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        raw = handle.metadata() or {}
    if raw.get("format") != FORMAT:
        raise ExportError(
            f"{path}: not a kdistill export (metadata format {raw.get('format')!r}); "
            "create one with kdistill export RUN_DIR"
        )
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            meta[key] = (
                json.loads(value) if key not in ("format", "model", "data", "source") else value
            )
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def load_exported(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the exported student (eval mode) from the file alone; returns ``(model, meta)``."""
    meta = read_metadata(path)
    # a package.module:Class student: from where the run imported it, next to the file, or here
    add_import_dirs(*meta.get("import_dirs", []), Path(path).expanduser().absolute().parent)
    try:
        model = build_model(meta["model"], **meta.get("kwargs", {}))
    except KeyError as err:
        raise ExportError(
            f"{path}: cannot rebuild the student: {err.args[0]}; put its module next to the "
            "exported file or in the working directory"
        ) from None
    model.load_state_dict(load_weights(path))
    return model.eval(), meta


def preprocess(
    images: Tensor | np.ndarray, meta: dict[str, Any], normalized: bool = False
) -> Tensor:
    """Images as the model expects them: ``(N, C, H, W)`` float32, standardised.

    Accepts ``(H, W)``, ``(N, H, W)``, ``(N, C, H, W)`` or channels-last ``(N, H, W, C)``;
    ``uint8`` pixels are scaled from 0–255, floats are taken as already in the range the model
    was trained on (``meta["input_range"]``, [0, 1] for images) — unless ``normalized`` says
    they are standardised already. Values outside that range (floats in 0–255, say) are an
    :class:`ExportError`: the model would answer confidently on inputs it never saw.
    """
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, Tensor) else images
    c, h, w = meta["input_shape"]
    given = tuple(x.shape)
    if x.dim() == 2:
        x = x.unsqueeze(0)
    if x.dim() == 3:
        x = x.unsqueeze(1) if c == 1 and tuple(x.shape[1:]) == (h, w) else x.unsqueeze(0)
    if x.dim() == 4 and x.shape[1] != c and x.shape[-1] == c:
        x = x.permute(0, 3, 1, 2)
    if x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        raise ExportError(
            f"images of shape {given} do not fit the model's input {tuple(meta['input_shape'])}"
        )
    was_uint8 = x.dtype == torch.uint8
    x = x.to(torch.float32)
    low, high = (float(v) for v in meta.get("input_range", (0.0, 1.0)))
    mean = torch.tensor(meta["mean"] or [0.0], dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(meta["std"] or [1.0], dtype=torch.float32).view(-1, 1, 1)
    if normalized:
        _check_range(x, (low - mean) / std, (high - mean) / std, "standardised images")
        return x
    if was_uint8:
        x = x / 255.0
    else:
        _check_range(x, torch.tensor(low), torch.tensor(high), "float images")
    return (x - mean) / std


RANGE_SLACK = 0.05
"""Share of the trained value range that inputs may lie outside it (rounding, resampling)."""


def _check_range(x: Tensor, low: Tensor, high: Tensor, what: str) -> None:
    """Refuse values outside ``[low, high]`` (per channel, widened by :data:`RANGE_SLACK`)."""
    slack = RANGE_SLACK * (high - low)
    lo, hi = float(x.min()), float(x.max())
    if not (
        torch.isfinite(x).all()
        and lo >= float((low - slack).min())
        and hi <= float((high + slack).max())
    ):
        expected = f"[{float(low.min()):.3g}, {float(high.max()):.3g}]"
        hint = (
            "pass uint8 pixels, or divide by 255"
            if hi > 2.0 and float(high.max()) <= 1.5
            else "check the preprocessing (or --normalized)"
        )
        raise ExportError(
            f"{what} hold values in [{lo:.3g}, {hi:.3g}] but the model was trained on {expected}; "
            f"{hint}"
        )


def load_images(path: str | Path) -> Tensor:
    """Images from a ``.npy`` or ``.pt`` file (a tensor, or a dict/tuple holding one first)."""
    path = Path(path)
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix in (".pt", ".pth"):
        data = torch.load(path, weights_only=True, map_location="cpu")
        if isinstance(data, dict):
            data = data.get("images", next(iter(data.values())))
        if isinstance(data, (list, tuple)):
            data = data[0]
        if not isinstance(data, Tensor):
            raise ExportError(f"{path}: expected a tensor of images, found {type(data).__name__}")
        return data
    raise ExportError(f"{path}: images must be a .npy or .pt file")


@torch.inference_mode()
def predict(
    exported: str | Path | tuple[nn.Module, dict[str, Any]],
    images: Tensor | np.ndarray,
    normalized: bool = False,
    batch_size: int = 512,
) -> tuple[Tensor, Tensor]:
    """``(classes, probabilities)`` of the exported student on ``images`` (see :func:`preprocess`)."""
    model, meta = load_exported(exported) if isinstance(exported, (str, Path)) else exported
    x = preprocess(images, meta, normalized)
    logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)])
    probs = logits.softmax(-1)
    return probs.argmax(-1), probs


# -- ONNX ----------------------------------------------------------------------------------


def export_onnx(model: nn.Module, path: str | Path, meta: dict[str, Any], opset: int = 17) -> Path:
    """``torch.onnx.export`` with a dynamic batch axis; metadata stored as ONNX properties.

    Uses the TorchScript-based exporter (``dynamo=False``), which needs no onnxscript; when a
    torch without it raises, the dynamo exporter is tried.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    model = model.eval()
    example = torch.zeros(2, *meta["input_shape"])
    kwargs: dict[str, Any] = {
        "input_names": ["images"],
        "output_names": ["logits"],
        "opset_version": opset,
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
                **kwargs,
            )
        except (TypeError, RuntimeError, NotImplementedError):
            batch = torch.export.Dim("batch")
            torch.onnx.export(
                model, (example,), str(path), dynamo=True, dynamic_shapes=({0: batch},), **kwargs
            )
    _add_onnx_metadata(path, meta)
    return path


def _add_onnx_metadata(path: Path, meta: dict[str, Any]) -> None:
    try:
        import onnx
    except ImportError:  # the file is valid without it; only the descriptive properties lack
        return
    proto = onnx.load(str(path))
    for key, value in _encode(meta).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def check_onnx(path: str | Path, model: nn.Module, inputs: Tensor) -> float:
    """Max absolute difference between onnxruntime's and PyTorch's logits on ``inputs``."""
    import onnxruntime as ort  # type: ignore[import-untyped]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (onnx_logits,) = session.run(["logits"], {"images": inputs.numpy().astype(np.float32)})
    with torch.inference_mode():
        torch_logits = model.eval()(inputs).numpy()
    return float(np.abs(onnx_logits - torch_logits).max())
