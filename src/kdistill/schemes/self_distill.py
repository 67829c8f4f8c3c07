"""Self-distillation: Born-Again generations and deep-to-shallow auxiliary heads.

Born-Again Networks (Furlanello et al. 2018): a network is trained from the labels
(generation 0), then a fresh network of the *same architecture* is distilled from it
(generation 1), which in turn teaches generation 2, and so on; later generations often beat
their teachers. :func:`born_again` chains ordinary :func:`kdistill.experiment.run_experiment`
runs — generation ``k``'s final student weights become generation ``k + 1``'s teacher
checkpoint — and reports each generation's test accuracy (and, optionally, that of the
ensemble of all generations, the paper's BAN-ensemble).

"Be Your Own Teacher" (Zhang et al. 2019): auxiliary classifiers on intermediate layers are
trained with the labels and by distillation from the network's own final head (and,
optionally, a feature hint from a deep layer), which also regularises the shallow layers.
:class:`AuxiliaryHeads` taps the layers with :class:`~kdistill.taps.FeatureTaps` — the model
is not modified — and owns the heads as submodules: they are trained and checkpointed with
the model, and left out of the exported student (``student`` is the bare model).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill.adapters import make_adapter
from kdistill.checkpoint import atomic_write_text
from kdistill.config import ConfigError, ExperimentConfig, ModelConfig
from kdistill.distiller import AUTO, probe_shapes
from kdistill.losses import hint_loss, kd_loss
from kdistill.models.cnn import conv_bn_relu
from kdistill.schemes.base import Scheme
from kdistill.schemes.unlabelled import UNLABELLED, masked_cross_entropy
from kdistill.taps import FeatureTaps
from kdistill.trainer import evaluate

# -- Born-Again networks -------------------------------------------------------------------


def born_again(
    cfg: ExperimentConfig,
    generations: int,
    resume: bool = False,
    ensemble: bool = False,
) -> list[dict[str, Any]]:
    """Train ``generations`` Born-Again generations of ``cfg.student``; one row per generation.

    Generation 0 is ``cfg.teacher`` when the config has one (it must have a checkpoint and is
    not trained; its test accuracy is reported), else ``cfg.student`` trained from the labels
    alone (``cfg.distill``'s label-only terms, or plain cross-entropy). Generation ``k ≥ 1``
    is ``cfg.student`` (fresh, initialised from ``cfg.seed`` like every generation) distilled
    with ``cfg.distill`` from generation ``k − 1``'s final weights. Run ``k`` lives in
    ``output_dir/gen<k>``; ``output_dir/born_again.json`` lists the generations.

    Returns:
        ``[{"generation", "test_accuracy", "best_test_accuracy", "weights", "teacher",
        "output_dir"}, ...]`` for generations ``0..generations`` (``teacher`` is the
        checkpoint that generation was distilled from, ``None`` for generation 0). With
        ``ensemble``, also writes ``"ensemble_test_accuracy"`` (the average of the
        softmax outputs of generations ``1..k``) into each row ``k ≥ 1``.
    """
    from kdistill.experiment import run_experiment

    if generations < 1:
        raise ValueError(f"generations must be >= 1, got {generations}")
    if cfg.stages:
        raise ConfigError("born_again: multi-stage configs are not supported; drop stages:")
    root = Path(cfg.output_dir)
    rows: list[dict[str, Any]] = []
    if cfg.teacher is not None:
        if not cfg.teacher.checkpoint:
            raise ConfigError(
                "born_again: teacher: is generation 0 and needs a checkpoint; leave teacher: "
                "out to train generation 0 from the labels"
            )
        previous = cfg.teacher.checkpoint
        rows.append(
            {
                "generation": 0,
                "test_accuracy": None,
                "best_test_accuracy": None,
                "weights": previous,
                "teacher": None,
                "output_dir": None,
            }
        )
    else:
        hard_terms = [t for t in cfg.distill.terms if t.teacher is None]
        gen0 = dataclasses.replace(
            cfg,
            output_dir=str(root / "gen0"),
            teacher=None,
            distill=dataclasses.replace(cfg.distill, terms=hard_terms),
        )
        result = run_experiment(gen0, resume=resume)
        previous = result.summary["student"]["weights"]
        rows.append(_row(0, result.summary, None, gen0.output_dir))
    for k in range(1, generations + 1):
        teacher = ModelConfig(
            model=cfg.student.model if k > 1 or cfg.teacher is None else cfg.teacher.model,
            kwargs=dict(cfg.student.kwargs if k > 1 or cfg.teacher is None else cfg.teacher.kwargs),
            checkpoint=str(previous),
        )
        gen = dataclasses.replace(cfg, output_dir=str(root / f"gen{k}"), teacher=teacher)
        result = run_experiment(gen, resume=resume)
        if rows[0]["test_accuracy"] is None and k == 1:  # a given generation-0 teacher
            rows[0]["test_accuracy"] = result.summary["teacher"]["test_accuracy"]
        rows.append(_row(k, result.summary, str(previous), gen.output_dir))
        previous = result.summary["student"]["weights"]
    if ensemble:
        _ensemble_accuracies(cfg, rows)
    atomic_write_text(root / "born_again.json", json.dumps(rows, indent=2) + "\n")
    return rows


def _row(
    k: int, summary: Mapping[str, Any], teacher: str | None, output_dir: str
) -> dict[str, Any]:
    student = summary["student"]
    return {
        "generation": k,
        "test_accuracy": student["test_accuracy"],
        "best_test_accuracy": student["best_test_accuracy"],
        "weights": student["weights"],
        "teacher": teacher,
        "output_dir": output_dir,
    }


@torch.inference_mode()
def _ensemble_accuracies(cfg: ExperimentConfig, rows: list[dict[str, Any]]) -> None:
    """BAN-ensemble: test accuracy of the mean softmax of generations 1..k, for each k."""
    from kdistill.experiment import load_data, load_model
    from kdistill.trainer import predict_logits, resolve_device

    _, (test_x, test_y) = load_data(cfg)
    device = resolve_device(cfg.train.device)
    summed = None
    for row in rows[1:]:
        spec = dataclasses.replace(cfg.student, checkpoint=row["weights"])
        model = load_model(spec).to(device)
        probs = torch.softmax(predict_logits(model, test_x, cfg.data.eval_batch_size, device), -1)
        summed = probs if summed is None else summed + probs
        row["ensemble_test_accuracy"] = (summed.argmax(-1) == test_y).float().mean().item()


# -- deep-to-shallow auxiliary heads -------------------------------------------------------


class _MeanOverSequence(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=1)


def auto_head(shape: torch.Size | tuple[int, ...], num_classes: int) -> nn.Module:
    """A small classifier for a tapped tensor of ``shape`` (batch dim first).

    Feature maps ``(B, C, H, W)``: 3×3 conv-BN-ReLU (BYOT's bottleneck, kept at ``C``
    channels) → global average pooling → linear. Sequences ``(B, T, D)``: mean over ``T`` →
    linear. Vectors ``(B, D)``: linear.
    """
    shape = tuple(shape)
    if len(shape) == 4:
        channels = shape[1]
        return nn.Sequential(
            conv_bn_relu(channels, channels),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(channels, num_classes),
        )
    if len(shape) == 3:
        return nn.Sequential(_MeanOverSequence(), nn.Linear(shape[2], num_classes))
    if len(shape) == 2:
        return nn.Linear(shape[1], num_classes)
    raise ValueError(f"no automatic head for a tensor of shape {shape}; give a head module")


def _key(name: str) -> str:
    """A module name usable as a ModuleDict key (no dots)."""
    return name.replace(".", "__")


class AuxiliaryHeads(Scheme):
    """Deep-to-shallow self-distillation ("Be Your Own Teacher", Zhang et al. 2019).

    For each tapped layer ``i`` a head gives logits ``q_i``; with the final logits ``z``::

        loss = CE(y, z) + aux_weight · Σ_i [(1 − alpha) · CE(y, q_i) + alpha · T² · KL(z ‖ q_i)
                                            + hint_weight · ‖adapter_i(f_i) − f_hint‖²]

    where ``z`` and the hint feature ``f_hint`` (layer ``hint_layer``) are detached — the deep
    part teaches the shallow ones, not the reverse. BYOT's values are ``T = 3``, ``alpha`` ≈
    0.3–0.5 and a small hint weight.

    Args:
        model: the network; ``student`` is this model (evaluated, exported without heads).
        layers: layer name (from ``model.named_modules()``) → head module, or ``"auto"`` for
            :func:`auto_head` sized from a dry run on ``example``.
        example: an input batch; needed for ``"auto"`` heads and for the hint adapters.
        temperature: ``T`` of the KD terms.
        alpha: weight of the KD term within each head's loss, in ``[0, 1]``.
        aux_weight: weight of each head's loss relative to the final CE.
        hint_layer / hint_weight: optional feature hint from a deep layer; adapters from each
            tapped layer to its shape are built with :func:`~kdistill.adapters.make_adapter`.

    ``forward`` returns ``loss``, ``logits`` (the final head's), ``ce_loss`` and, per head,
    ``aux_<layer>_ce_loss`` / ``aux_<layer>_kd_loss`` (and ``aux_<layer>_hint_loss``).
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, nn.Module | str],
        example: Tensor | None = None,
        temperature: float = 3.0,
        alpha: float = 0.5,
        aux_weight: float = 1.0,
        hint_layer: str | None = None,
        hint_weight: float = 0.0,
        ignore_index: int = UNLABELLED,
    ) -> None:
        super().__init__()
        if not layers:
            raise ValueError("AuxiliaryHeads needs at least one layer to put a head on")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1] (weight of the KD term), got {alpha}")
        if aux_weight < 0 or hint_weight < 0:
            raise ValueError("aux_weight and hint_weight must be >= 0")
        for name, head in layers.items():
            if isinstance(head, str) and head != AUTO:
                raise ValueError(f"layer {name!r}: a head is a module or 'auto', got {head!r}")
        hints = [hint_layer] if hint_layer is not None and hint_weight > 0 else []
        use_hint = bool(hints)
        self.model = model
        self.layer_names = list(layers)
        self._taps = FeatureTaps(model, self.layer_names + hints)
        needs_probe = use_hint or any(isinstance(h, str) for h in layers.values())
        shapes: dict[str, torch.Size] = {}
        if needs_probe:
            if example is None:
                raise ValueError("'auto' heads and feature hints need an example input batch")
            probe_layers = self.layer_names + hints
            shapes = probe_shapes(
                model, probe_layers, example.to(next(iter(model.parameters())).device)
            )
        heads = {}
        for name, head in layers.items():
            if isinstance(head, str):
                head = auto_head(shapes[name], int(shapes["logits"][-1]))
            heads[_key(name)] = head
        self.heads = nn.ModuleDict(heads)
        self.hint_adapters = nn.ModuleDict(
            {_key(n): make_adapter(shapes[n], shapes[hints[0]]) for n in self.layer_names}
            if use_hint
            else {}
        )
        device = next(iter(model.parameters())).device
        self.heads.to(device)
        self.hint_adapters.to(device)
        self.hint_layer = hint_layer if use_hint else None
        self.temperature = float(temperature)
        self.alpha = float(alpha)
        self.aux_weight = float(aux_weight)
        self.hint_weight = float(hint_weight)
        self.ignore_index = ignore_index

    @property
    def student(self) -> nn.Module:
        """The bare model: what is evaluated, saved as the student and exported (no heads)."""
        return self.model

    def export(self) -> nn.Module:
        """The model without its auxiliary heads."""
        return self.model

    def _run(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        with self._taps as taps:
            logits = self.model(inputs)
            features = taps.pop()
        aux = {n: self.heads[_key(n)](features[n]) for n in self.layer_names}
        return logits, aux, features

    def head_logits(self, inputs: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """``(final logits, {layer: head logits})`` for a batch."""
        logits, aux, _ = self._run(inputs)
        return logits, aux

    def forward(
        self,
        inputs: Tensor,
        target: Tensor | None = None,
        teacher_outputs: Mapping[str, Tensor] | None = None,
        index: Tensor | None = None,
    ) -> dict[str, Tensor]:
        if target is None:
            raise ValueError("auxiliary heads need labels (use -1 for unlabelled rows)")
        logits, aux, features = self._run(inputs)
        final = logits.detach()
        ce = masked_cross_entropy(logits, target, self.ignore_index)
        total = ce
        result: dict[str, Tensor] = {"ce_loss": ce.detach()}
        for name in self.layer_names:
            q = aux[name]
            head_ce = masked_cross_entropy(q, target, self.ignore_index)
            head_kd = kd_loss(q, final, self.temperature)
            head = (1.0 - self.alpha) * head_ce + self.alpha * head_kd
            label = _key(name)
            result[f"aux_{label}_ce_loss"] = head_ce.detach()
            result[f"aux_{label}_kd_loss"] = head_kd.detach()
            if self.hint_layer is not None:
                hint = hint_loss(
                    self.hint_adapters[label](features[name]), features[self.hint_layer].detach()
                )
                head = head + self.hint_weight * hint
                result[f"aux_{label}_hint_loss"] = hint.detach()
            total = total + self.aux_weight * head
        result["loss"] = total
        result["logits"] = final
        return result

    def head_model(self, layer: str) -> nn.Module:
        """A module computing one auxiliary head's logits from the inputs (an early exit)."""
        return _HeadView(self, layer)

    def evaluate_heads(
        self, loader: Iterable[Any], device: torch.device | str = "cpu"
    ) -> dict[str, dict[str, float]]:
        """Accuracy and loss of the final head (``"final"``) and of every auxiliary head."""
        results = {"final": evaluate(self.model, loader, device)}
        for name in self.layer_names:
            results[name] = evaluate(self.head_model(name), loader, device)
        return results


class _HeadView(nn.Module):
    owner: AuxiliaryHeads

    def __init__(self, owner: AuxiliaryHeads, layer: str) -> None:
        super().__init__()
        self.__dict__["owner"] = owner
        self.layer = layer
        self.training = owner.training

    def train(self, mode: bool = True) -> _HeadView:
        self.training = mode
        self.owner.train(mode)
        return self

    def forward(self, inputs: Tensor) -> Tensor:
        return self.owner.head_logits(inputs)[1][self.layer]
