"""Compound compression: pruning (unstructured, structured), KD fine-tune, int8 quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kdistill.cli import main
from kdistill.compress import (
    compress_run,
    count_weights,
    determinism,
    prune_structured,
    prune_unstructured,
    quantize_dynamic_int8,
    quantize_static_fx,
    state_dict_bytes,
)
from kdistill.models import MLP, SmallCNN


def test_global_unstructured_pruning_zeroes_the_requested_share() -> None:
    model = prune_unstructured(SmallCNN(), 0.6)
    nonzero, total = count_weights(model)
    assert nonzero == total - round(0.6 * total)
    assert not any(n.endswith("_orig") or n.endswith("_mask") for n in model.state_dict())


def test_structured_pruning_kills_whole_channels_bn_included() -> None:
    model = prune_structured(SmallCNN(), 0.25).eval()
    conv, bn = model.features[0][0], model.features[0][1]
    dead = conv.weight.flatten(1).abs().sum(1) == 0
    assert int(dead.sum()) == 4  # 25 % of 16 channels
    assert (bn.weight[dead] == 0).all() and (bn.bias[dead] == 0).all()
    out = model.features[0](torch.randn(2, 1, 28, 28))
    assert (out[:, dead] == 0).all()  # as if the channels were removed
    assert (model.fc.weight != 0).all()  # the classifier keeps every class


def test_static_fx_quantisation_of_a_cnn_runs_and_is_smaller() -> None:
    model = SmallCNN().eval()
    calibration = torch.randn(64, 1, 28, 28)
    quantized = quantize_static_fx(model, calibration)
    x = torch.randn(5, 1, 28, 28)
    with determinism(False):  # int8 kernels refuse strict determinism
        out = quantized(x)
    assert out.shape == (5, 10) and torch.isfinite(out).all()
    assert len(state_dict_bytes(quantized)) < len(state_dict_bytes(model)) / 2


def test_dynamic_quantisation_of_linear_layers_is_smaller_and_close() -> None:
    model = MLP(hidden=(64,)).eval()
    quantized = quantize_dynamic_int8(model)
    x = torch.randn(8, 1, 28, 28)
    with determinism(False):
        assert torch.allclose(quantized(x), model(x), atol=0.1)
    assert len(state_dict_bytes(quantized)) < len(state_dict_bytes(model)) / 2


def test_compress_run_with_kd_finetune_reports_every_stage(
    tiny_demo: Path, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    result = compress_run(
        tiny_demo,  # a demo folder: its KD student is compressed
        amount=0.5,
        structured_amount=0.25,
        finetune_epochs=1,
        finetune_overrides=tiny_overrides,
        calibration_samples=64,
        output_dir=tmp_path / "compress",
        repeats=2,
        log=lambda _: None,
    )
    rows = {r.stage: r for r in result.rows}
    assert list(rows) == [
        "student (float32)",
        "unstructured prune 50 %",
        "+ structured prune 25 % of channels",
        "+ KD fine-tune 1 epoch",
        "dynamic int8 (Linear)",
        "static int8 (FX)",
    ]
    for row in result.rows:
        assert row.test_accuracy is not None, row.note
        assert 0.0 <= row.test_accuracy <= 1.0 and row.latency_ms > 0
    base, pruned = rows["student (float32)"], rows["unstructured prune 50 %"]
    assert pruned.nonzero_weights == pytest.approx(base.total_weights / 2, abs=1)
    assert pruned.size_bytes == pytest.approx(base.size_bytes, rel=0.05)  # zeros stay dense
    assert pruned.gzip_bytes < base.gzip_bytes  # ... but compress
    tuned = rows["+ KD fine-tune 1 epoch"]
    assert tuned.nonzero_weights <= rows["+ structured prune 25 % of channels"].nonzero_weights
    assert (tmp_path / "compress" / "finetune" / "summary.json").is_file()
    summary = json.loads((tmp_path / "compress" / "finetune" / "summary.json").read_text())
    assert summary["teacher"] is not None  # fine-tuned with the teacher
    for quantized in ("dynamic int8 (Linear)", "static int8 (FX)"):
        assert rows[quantized].size_bytes < base.size_bytes / 2
    assert "static int8 (FX)" in (tmp_path / "compress" / "compress.md").read_text()


def test_compress_command_without_finetune(tiny_demo: Path, tmp_path: Path) -> None:
    out = tmp_path / "c"
    args = ["compress", str(tiny_demo / "student_no_kd"), "--output-dir", str(out)]
    assert main([*args, "--repeats", "2", "--calibration", "64", "--structured", "0"]) == 0
    stages = [r["stage"] for r in json.loads((out / "compress.json").read_text())]
    assert stages == [
        "student (float32)",
        "unstructured prune 50 %",
        "dynamic int8 (Linear)",
        "static int8 (FX)",
    ]
