from __future__ import annotations

import pytest
import torch

from kdistill.schemes.augment import random_resized_crop


def test_full_crop_without_flip_or_jitter_is_the_identity() -> None:
    x = torch.randn(3, 2, 10, 12)
    g = torch.Generator().manual_seed(0)
    out = random_resized_crop(x, g, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False, jitter=0)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_full_crop_with_flip_mirrors_some_images() -> None:
    x = torch.randn(16, 1, 8, 8)
    out = random_resized_crop(
        x, torch.Generator().manual_seed(1), scale=(1.0, 1.0), ratio=(1.0, 1.0), jitter=0
    )
    mirrored = [torch.allclose(o, xi.flip(-1), atol=1e-5) for o, xi in zip(out, x, strict=True)]
    same = [torch.allclose(o, xi, atol=1e-5) for o, xi in zip(out, x, strict=True)]
    assert all(m or s for m, s in zip(mirrored, same, strict=True))
    assert any(mirrored) and any(same)


def test_views_are_reproducible_from_the_generator_and_differ_between_draws() -> None:
    x = torch.randn(4, 1, 28, 28)
    a = random_resized_crop(x, torch.Generator().manual_seed(5))
    b = random_resized_crop(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and a.shape == x.shape
    g = torch.Generator().manual_seed(5)
    assert not torch.equal(random_resized_crop(x, g), random_resized_crop(x, g))
    with pytest.raises(ValueError, match="scale"):
        random_resized_crop(x, g, scale=(0.0, 1.0))
