"""`kdistill export` / `predict`: self-describing safetensors, ONNX checked by onnxruntime."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.cli import main
from kdistill.data import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdistill.export import (
    FORMAT,
    check_onnx,
    export_onnx,
    export_student,
    load_exported,
    predict,
    read_metadata,
)
from kdistill.models import SmallCNN
from kdistill.report import load_run_student


def test_export_is_self_describing_and_predict_matches_the_run(
    tiny_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "student.safetensors"
    assert main(["export", str(tiny_demo), "--output", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["format"] == FORMAT and meta["model"] == "mlp"
    assert meta["kwargs"] == {"hidden": [16]} and meta["input_shape"] == [1, 28, 28]
    assert meta["classes"] == list(FASHION_MNIST_CLASSES)

    model, _ = load_exported(out)  # the file alone rebuilds the student
    original, cfg = load_run_student(tiny_demo / "student_kd")
    assert set(model.state_dict()) == set(original.state_dict())  # no adapters, no teacher

    images_u8, _ = load_fashion_mnist("test")
    raw = (images_u8[:6, 0] * 255).round().to(torch.uint8).numpy()  # (6, 28, 28) uint8
    np.save(tmp_path / "images.npy", raw)
    capsys.readouterr()
    assert main(["predict", str(out), str(tmp_path / "images.npy")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    from kdistill.report import load_test_split

    cfg.data.test_subset = None
    test_x, _ = load_test_split(cfg)
    with torch.inference_mode():
        expected = original(test_x[:6]).argmax(-1).tolist()
    assert [int(line.split("\t")[1]) for line in lines] == expected
    assert lines[0].split("\t")[2] == FASHION_MNIST_CLASSES[expected[0]]

    classes, probs = predict(out, raw.astype(np.float32) / 255.0)  # floats in [0, 1] too
    assert classes.tolist() == expected and probs.shape == (6, 10)


def test_predict_refuses_a_file_that_is_not_an_export(
    tiny_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    np.save(tmp_path / "x.npy", np.zeros((1, 28, 28), dtype=np.uint8))
    plain = tiny_demo / "student_kd" / "student.safetensors"
    assert main(["predict", str(plain), str(tmp_path / "x.npy")]) == 2
    assert "not a kdistill export" in capsys.readouterr().err


def test_onnx_export_matches_pytorch_with_a_dynamic_batch(tiny_demo: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    result = export_student(
        tiny_demo, output=tmp_path / "s.safetensors", onnx_path=tmp_path / "s.onnx"
    )
    assert result.onnx_max_abs_diff is not None and result.onnx_max_abs_diff <= 1e-4
    model, _ = load_exported(result.safetensors)
    for batch in (1, 7):
        assert check_onnx(result.onnx, model, torch.randn(batch, 1, 28, 28)) <= 1e-4


def test_onnx_export_of_a_cnn_student(tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    model = SmallCNN().eval()
    meta = {"format": FORMAT, "model": "small_cnn", "kwargs": {}, "input_shape": [1, 28, 28]}
    path = export_onnx(model, tmp_path / "cnn.onnx", meta)
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["model"] == "small_cnn" and props["input_shape"] == "[1, 28, 28]"
    assert check_onnx(path, model, torch.randn(3, 1, 28, 28)) <= 1e-4
