"""Specification tests for `label_smoothing_cross_entropy`, `cross_entropy` and the module."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.losses import LabelSmoothingCrossEntropy, cross_entropy, label_smoothing_cross_entropy


def _inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 5, generator=g), torch.randint(0, 5, (6,), generator=g)


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.5, 0.9])
def test_label_smoothing_equals_torch_cross_entropy_with_label_smoothing(smoothing: float) -> None:
    z, y = _inputs()
    torch.testing.assert_close(
        label_smoothing_cross_entropy(z, y, smoothing),
        F.cross_entropy(z, y, label_smoothing=smoothing),
    )


def test_label_smoothing_matches_textbook_smoothed_target_formula() -> None:
    z, y = _inputs()
    eps, n_classes = 0.2, z.shape[1]
    total = 0.0
    for row, label in zip(z.tolist(), y.tolist(), strict=True):
        log_norm = math.log(sum(math.exp(v) for v in row))
        for c, v in enumerate(row):
            q = (1 - eps) * (c == label) + eps / n_classes
            total -= q * (v - log_norm)
    expected = total / len(z)
    assert label_smoothing_cross_entropy(z, y, eps).item() == pytest.approx(expected, rel=1e-5)


def test_label_smoothing_with_zero_epsilon_equals_plain_cross_entropy() -> None:
    z, y = _inputs()
    torch.testing.assert_close(label_smoothing_cross_entropy(z, y, 0.0), cross_entropy(z, y))
    torch.testing.assert_close(cross_entropy(z, y), F.cross_entropy(z, y))


def test_label_smoothing_on_batch_time_classes_equals_flattened_rows() -> None:
    z, y = _inputs()
    torch.testing.assert_close(
        label_smoothing_cross_entropy(z.reshape(2, 3, 5), y.reshape(2, 3), 0.1),
        label_smoothing_cross_entropy(z, y, 0.1),
    )


def test_label_smoothing_with_mask_equals_loss_on_selected_rows_and_ignores_others() -> None:
    z, y = _inputs()
    mask = torch.tensor([True, False, True, True, False, False])
    expected = F.cross_entropy(z[mask], y[mask], label_smoothing=0.1)
    y_padded = y.clone()
    y_padded[~mask] = -100
    z_garbage = z.clone()
    z_garbage[~mask] = float("nan")
    torch.testing.assert_close(label_smoothing_cross_entropy(z, y, 0.1, mask), expected)
    torch.testing.assert_close(
        label_smoothing_cross_entropy(z_garbage, y_padded, 0.1, mask), expected
    )
    torch.testing.assert_close(
        cross_entropy(z_garbage, y_padded, mask), F.cross_entropy(z[mask], y[mask])
    )


def test_label_smoothing_fully_masked_is_exactly_zero_with_finite_zero_gradient() -> None:
    z, y = _inputs()
    z.requires_grad_()
    loss = label_smoothing_cross_entropy(z, y, 0.1, torch.zeros(6, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_label_smoothing_half_precision_gives_float32_close_to_float32(dtype: torch.dtype) -> None:
    z, y = _inputs()
    loss = label_smoothing_cross_entropy(z.to(dtype), y, 0.1)
    assert loss.dtype == torch.float32
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, label_smoothing_cross_entropy(z.to(dtype).float(), y, 0.1))


@pytest.mark.parametrize("smoothing", [-0.1, 1.0, float("nan")])
def test_label_smoothing_rejects_epsilon_outside_zero_one(smoothing: float) -> None:
    z, y = _inputs()
    with pytest.raises(ValueError, match=r"smoothing .* must be in \[0, 1\)"):
        label_smoothing_cross_entropy(z, y, smoothing)
    with pytest.raises(ValueError, match="smoothing"):
        LabelSmoothingCrossEntropy(smoothing)


def test_label_smoothing_rejects_target_with_wrong_shape_or_float_dtype() -> None:
    z, y = _inputs()
    with pytest.raises(ValueError, match=r"target has shape \(3,\).*leading shape \(6,\)"):
        label_smoothing_cross_entropy(z, y[:3])
    with pytest.raises(TypeError, match="class indices"):
        label_smoothing_cross_entropy(z, y.float())


def test_label_smoothing_rejects_mask_with_wrong_shape() -> None:
    z, y = _inputs()
    with pytest.raises(ValueError, match=r"mask has shape \(5,\)"):
        label_smoothing_cross_entropy(z, y, mask=torch.ones(5, dtype=torch.bool))


def test_label_smoothing_module_equals_function() -> None:
    z, y = _inputs()
    mask = torch.tensor([True, True, False, True, False, True])
    module = LabelSmoothingCrossEntropy(smoothing=0.2)
    assert list(module.parameters()) == []
    torch.testing.assert_close(module(z, y, mask), label_smoothing_cross_entropy(z, y, 0.2, mask))
