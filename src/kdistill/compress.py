"""``kdistill compress``: prune and quantise a trained student, measuring every stage.

The stages build on each other, as one would ship a model:

1. ``student`` — the trained float32 weights, as they are;
2. ``unstructured prune`` — global L1 magnitude pruning over every conv and linear weight
   (:func:`torch.nn.utils.prune.global_unstructured`, ``amount`` of the weights zeroed);
3. ``+ structured prune`` — whole output channels of each conv / hidden linear layer with
   the smallest L2 norm zeroed (:func:`torch.nn.utils.prune.ln_structured`; the classifier
   keeps all its outputs);
4. ``+ KD fine-tune`` (optional) — a short :func:`~kdistill.experiment.run_experiment` from
   the pruned weights with the run's teacher and objective; pruned weights may regrow while
   training, so the masks are applied again afterwards and the figures are of the re-masked
   model;
5. ``dynamic int8`` — :func:`torch.ao.quantization.quantize_dynamic` on the Linear layers
   (weights int8, activations quantised on the fly);
6. ``static int8 (FX)`` — post-training static quantisation in FX graph mode
   (``prepare_fx`` → a calibration pass over training images → ``convert_fx``).

Both int8 stages start from the last float stage. Size on disk is the byte count of the
stage's ``torch.save`` d state dict; pruning stores zeros densely, so it only shrinks a file
once compressed — hence the gzip column. torch.ao.quantization is deprecated upstream in
favour of torchao; while this torch still ships it the quantisation stages use it, and a
stage that fails (a model FX cannot trace, an API that is gone) is reported as such.
Quantised kernels have no deterministic implementation: call the int8 models outside
``torch.use_deterministic_algorithms(True)`` (or with ``warn_only=True``), e.g. inside
``with determinism(False):``.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import io
import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import prune

from kdistill.checkpoint import atomic_write, atomic_write_text, save_weights
from kdistill.config import ExperimentConfig
from kdistill.data.loader import TensorBatchLoader
from kdistill.report import (
    KD_RUN,
    _human_bytes,
    is_demo_dir,
    load_run_student,
    load_test_split,
    measure_latency,
)
from kdistill.trainer import evaluate

LATENCY_BATCH = 256
PRUNABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


@dataclass
class StageRow:
    stage: str
    test_accuracy: float | None
    nonzero_weights: int | None  # non-zero entries of conv/linear weights (float stages)
    total_weights: int | None
    size_bytes: int | None
    gzip_bytes: int | None
    latency_ms: float | None
    note: str = ""


@dataclass
class CompressResult:
    rows: list[StageRow]
    output_dir: Path
    models: dict[str, nn.Module]


# -- pruning -------------------------------------------------------------------------------


Prunable = nn.Conv1d | nn.Conv2d | nn.Conv3d | nn.Linear


def prunable_layers(model: nn.Module) -> list[tuple[str, Prunable]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, PRUNABLE)]


def prune_unstructured(model: nn.Module, amount: float) -> nn.Module:
    """Zero the ``amount`` smallest-magnitude weights across all conv/linear layers (in place)."""
    params = [(m, "weight") for _, m in prunable_layers(model)]
    if amount > 0 and params:
        prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=amount)
        for module, name in params:
            prune.remove(module, name)  # fold the mask into the weight
    return model


def prune_structured(model: nn.Module, amount: float, n: int = 2) -> nn.Module:
    """Zero the ``amount`` lowest-Ln output channels of every conv/linear layer but the last.

    The last prunable layer is the classifier: zeroing its outputs would delete classes.
    Channels are zeroed, not removed, so tensor shapes (and dense latency) are unchanged.
    """
    layers = prunable_layers(model)[:-1]
    norms = _following_batchnorms(model)
    if amount > 0:
        for name, module in layers:
            prune.ln_structured(module, "weight", amount=amount, n=n, dim=0)
            prune.remove(module, "weight")
            dead = module.weight.detach().flatten(1).abs().sum(1) == 0
            if module.bias is not None:
                with torch.no_grad():
                    module.bias[dead] = 0
            if name in norms:  # a BatchNorm would turn a zero channel into a constant
                with torch.no_grad():
                    norms[name].weight[dead] = 0
                    norms[name].bias[dead] = 0
    return model


def _following_batchnorms(model: nn.Module) -> dict[str, nn.modules.batchnorm._BatchNorm]:
    """``{conv name: the BatchNorm registered right after it}`` when their channels agree.

    With BN after a conv, zeroing the conv's output channel leaves ``BN(0) = beta − gamma ·
    mean / std``, a constant; zeroing the BN's affine parameters too makes the channel as
    dead as if it were removed.
    """
    found: dict[str, nn.modules.batchnorm._BatchNorm] = {}
    modules = [(n, m) for n, m in model.named_modules() if not list(m.children())]
    for (name, layer), (_, following) in itertools.pairwise(modules):
        if (
            isinstance(layer, PRUNABLE)
            and isinstance(following, nn.modules.batchnorm._BatchNorm)
            and following.affine
            and following.num_features == layer.weight.shape[0]
        ):
            found[name] = following
    return found


def weight_masks(model: nn.Module) -> dict[str, Tensor]:
    """``{layer: weight != 0}`` for every conv/linear layer."""
    return {name: m.weight.detach() != 0 for name, m in prunable_layers(model)}


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    for name, module in prunable_layers(model):
        if name in masks:
            module.weight.mul_(masks[name])
    return model


def count_weights(model: nn.Module) -> tuple[int, int]:
    """(non-zero, total) entries of the conv/linear weights."""
    nonzero = total = 0
    for _, m in prunable_layers(model):
        nonzero += int((m.weight != 0).sum())
        total += m.weight.numel()
    return nonzero, total


# -- quantisation --------------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """torch.ao.quantization warns about its own deprecation on every call."""
    with warnings.catch_warnings(), determinism(False):
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*quantiz.*")
        yield


@contextmanager
def determinism(enabled: bool | None = None) -> Iterator[None]:
    """Restore torch's deterministic-algorithms setting (and its warn-only flag) on exit.

    Quantised kernels have no deterministic implementation, so a run that asked for strict
    determinism (as training does) would make them raise; ``enabled=False`` lifts it inside.
    """
    was_enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if enabled is not None:
        torch.use_deterministic_algorithms(enabled)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was_enabled, warn_only=warn_only)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """int8 weights for every ``nn.Linear`` (activations quantised at run time)."""
    from torch.ao.quantization import quantize_dynamic

    with _quiet():
        return quantize_dynamic(copy.deepcopy(model).eval(), {nn.Linear}, dtype=torch.qint8)


def quantization_engine() -> str:
    engines = torch.backends.quantized.supported_engines
    for name in ("x86", "fbgemm", "qnnpack", "onednn"):
        if name in engines:
            return name
    raise RuntimeError(f"no quantized engine in this torch build (have {engines})")


@torch.no_grad()
def quantize_static_fx(model: nn.Module, calibration: Tensor, batch_size: int = 256) -> nn.Module:
    """Post-training static int8 quantisation in FX graph mode, calibrated on ``calibration``."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    engine = quantization_engine()
    torch.backends.quantized.engine = engine
    with _quiet():
        float_model = copy.deepcopy(model).eval()
        prepared = prepare_fx(float_model, get_default_qconfig_mapping(engine), (calibration[:1],))
        for start in range(0, calibration.shape[0], batch_size):
            prepared(calibration[start : start + batch_size])
        return convert_fx(prepared)


# -- measuring -----------------------------------------------------------------------------


def state_dict_bytes(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def measure_stage(
    name: str,
    model: nn.Module,
    loader: TensorBatchLoader,
    example: Tensor,
    save_to: Path,
    repeats: int,
    note: str = "",
) -> StageRow:
    model.eval()
    raw = state_dict_bytes(model)

    def write(tmp: Path) -> None:
        tmp.write_bytes(raw)

    atomic_write(save_to, write)
    quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in model.modules())
    nonzero, total = (None, None) if quantized else count_weights(model)
    with _quiet():
        accuracy = evaluate(model, loader)["accuracy"]  # type: ignore[arg-type]
        latency = measure_latency(model, example, repeats=repeats, warmup=5)
    return StageRow(
        stage=name,
        test_accuracy=accuracy,
        nonzero_weights=nonzero,
        total_weights=total,
        size_bytes=len(raw),
        gzip_bytes=len(gzip.compress(raw, compresslevel=9)),
        latency_ms=latency,
        note=note,
    )


def markdown_table(rows: list[StageRow], batch_size: int = LATENCY_BATCH) -> str:
    header = (
        f"| stage | test acc. | non-zero conv/linear weights | size on disk | gzip'd "
        f"| latency / batch of {batch_size} | note |\n"
        "|---|---:|---:|---:|---:|---:|---|\n"
    )
    lines = []
    for r in rows:
        if r.test_accuracy is None:
            lines.append(f"| {r.stage} | – | – | – | – | – | {r.note} |")
            continue
        weights = (
            f"{r.nonzero_weights:,} / {r.total_weights:,} "
            f"({100 * r.nonzero_weights / max(1, r.total_weights):.0f} %)"
            if r.nonzero_weights is not None and r.total_weights is not None
            else "int8 (zeros kept)"
        )
        lines.append(
            f"| {r.stage} | {100 * r.test_accuracy:.2f} % | {weights} "
            f"| {_human_bytes(r.size_bytes or 0)} | {_human_bytes(r.gzip_bytes or 0)} "
            f"| {r.latency_ms:.2f} ms | {r.note} |"
        )
    return header + "\n".join(lines) + "\n"


# -- the pipeline --------------------------------------------------------------------------


def compress_run(
    run_dir: str | Path,
    amount: float = 0.5,
    structured_amount: float = 0.25,
    finetune_epochs: int = 0,
    finetune_overrides: list[str] | tuple[str, ...] = (),
    calibration_samples: int = 1024,
    test_subset: int | None = None,
    output_dir: str | Path | None = None,
    repeats: int = 10,
    threads: int | None = None,
    log: Callable[[str], None] = print,
) -> CompressResult:
    """Run the compression stages on a run (or demo) folder's student; write a table.

    Args:
        run_dir: a ``kdistill run`` folder, or a demo folder (its ``student_kd`` is used).
        amount: share of all conv/linear weights zeroed by global magnitude pruning.
        structured_amount: share of output channels zeroed per layer (0 skips the stage).
        finetune_epochs: epochs of KD fine-tuning after pruning (0 skips it).
        finetune_overrides: ``key=value`` overrides for the fine-tune run (e.g. subsets).
        calibration_samples: training images for static quantisation's calibration pass.
        test_subset: evaluate on this many test images instead of the run's test set.
        output_dir: where stage files and ``compress.md`` go (default ``run_dir/compress``).
        threads: torch CPU threads for every measurement (default: torch's current setting).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return _compress(
            Path(run_dir),
            amount,
            structured_amount,
            finetune_epochs,
            finetune_overrides,
            calibration_samples,
            test_subset,
            output_dir,
            repeats,
            log,
        )
    finally:
        torch.set_num_threads(previous)


def _compress(
    run_dir: Path,
    amount: float,
    structured_amount: float,
    finetune_epochs: int,
    finetune_overrides: list[str] | tuple[str, ...],
    calibration_samples: int,
    test_subset: int | None,
    output_dir: str | Path | None,
    repeats: int,
    log: Callable[[str], None],
) -> CompressResult:
    if not 0.0 <= amount < 1.0 or not 0.0 <= structured_amount < 1.0:
        raise ValueError("pruning amounts must be in [0, 1)")
    if is_demo_dir(run_dir):
        run_dir = run_dir / KD_RUN
    out = Path(output_dir) if output_dir is not None else run_dir / "compress"
    out.mkdir(parents=True, exist_ok=True)
    model, cfg = load_run_student(run_dir)
    if test_subset is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, test_subset=test_subset))
    test_x, test_y = load_test_split(cfg)
    loader = TensorBatchLoader(test_x, test_y, batch_size=512)
    example = test_x[:LATENCY_BATCH]
    rows: list[StageRow] = []
    models: dict[str, nn.Module] = {}

    def stage(name: str, m: nn.Module, file: str, note: str = "") -> None:
        log(f"[compress] {name}")
        rows.append(measure_stage(name, m, loader, example, out / file, repeats, note))
        models[name] = m

    stage("student (float32)", model, "0_student.pt")
    current = prune_unstructured(copy.deepcopy(model), amount)
    stage(f"unstructured prune {100 * amount:.0f} %", current, "1_pruned.pt")
    if structured_amount > 0:
        current = prune_structured(current, structured_amount)
        stage(
            f"+ structured prune {100 * structured_amount:.0f} % of channels",
            current,
            "2_structured.pt",
            "channels zeroed, shapes unchanged",
        )
    if finetune_epochs > 0:
        threads = torch.get_num_threads()
        try:
            with determinism():  # run_experiment turns it on
                current = _finetune(
                    current, cfg, run_dir, out, finetune_epochs, finetune_overrides, log
                )
        finally:  # and may change the threads; keep every stage measured alike
            torch.set_num_threads(threads)
        epochs = f"{finetune_epochs} epoch{'s' * (finetune_epochs != 1)}"
        stage(f"+ KD fine-tune {epochs}", current, "3_finetuned.pt", "re-masked")
    save_weights(out / "pruned_student.safetensors", current.state_dict())

    try:
        stage("dynamic int8 (Linear)", quantize_dynamic_int8(current), "4_dynamic_int8.pt")
    except Exception as err:  # an API removed from a future torch, an unsupported layer
        rows.append(_failed("dynamic int8 (Linear)", err))
    calibration = _calibration_images(cfg, calibration_samples)
    try:
        static = quantize_static_fx(current, calibration)
        stage("static int8 (FX)", static, "5_static_int8.pt", f"{len(calibration)} calib. images")
    except Exception as err:  # FX cannot trace every model
        log(f"[compress] static int8 (FX) failed on {cfg.student.model}: {err}")
        rows.append(_failed("static int8 (FX)", err))

    table = markdown_table(rows)
    text = (
        f"# kdistill compress: {cfg.student.model} from {run_dir}\n\n"
        f"Test set: {test_y.numel():,} images. Sizes are `torch.save` d state dicts; pruned "
        "weights are stored as dense zeros, so they only shrink once compressed (gzip "
        "column). Latency: median CPU forward over a batch, "
        f"{torch.get_num_threads()} threads; zeroed weights do not speed up dense kernels.\n\n"
        + table
    )
    atomic_write_text(out / "compress.md", text)
    atomic_write_text(out / "compress.json", json.dumps([asdict(r) for r in rows], indent=2) + "\n")
    return CompressResult(rows, out, models)


def _failed(name: str, err: Exception) -> StageRow:
    message = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:150] if str(err) else ''}"
    return StageRow(name, None, None, None, None, None, None, message)


def _calibration_images(cfg: ExperimentConfig, n: int) -> Tensor:
    from kdistill.data import cifar_dataset, fashion_mnist_dataset

    d = cfg.data
    subset = min(n, d.train_subset) if d.train_subset else n
    if d.name == "fashion_mnist":
        data = fashion_mnist_dataset("train", root=d.root, subset=subset, seed=cfg.seed)
    else:
        data = cifar_dataset(d.name, "train", root=d.root, subset=subset, seed=cfg.seed)
    return data.tensors[0]


def _finetune(
    model: nn.Module,
    cfg: ExperimentConfig,
    run_dir: Path,
    out: Path,
    epochs: int,
    overrides: list[str] | tuple[str, ...],
    log: Callable[[str], None],
) -> nn.Module:
    """A short run from the pruned weights (teacher and objective as the original run)."""
    from kdistill.config import apply_overrides, config_from_dict
    from kdistill.experiment import load_model, run_experiment

    masks = weight_masks(model)
    start = save_weights(out / "finetune_start.safetensors", model.state_dict())
    data: dict[str, Any] = cfg.to_dict()
    data["student"]["checkpoint"] = str(start)
    data["output_dir"] = str(out / "finetune")
    data["train"]["epochs"] = epochs
    data["optim"]["lr"] = cfg.optim.lr * 0.1  # gentle: the weights are already trained
    data["optim"]["schedule"] = "cosine"
    data["optim"]["warmup_epochs"] = 0.0
    ft_cfg = config_from_dict(apply_overrides(data, list(overrides)))
    who = "with the teacher" if ft_cfg.teacher is not None else "on labels (no teacher)"
    log(f"[compress] fine-tuning {epochs} epochs {who}")
    result = run_experiment(ft_cfg)
    tuned = load_model(dataclasses.replace(ft_cfg.student, checkpoint=str(result.fit.student_path)))
    return apply_masks(tuned, masks).eval()
