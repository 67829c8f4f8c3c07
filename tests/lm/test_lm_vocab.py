"""Specification tests for teacher / student vocabulary matching (`kdistill.lm.vocab`)."""

from __future__ import annotations

import pytest
import torch

from kdistill.lm import (
    MAX_PAD_FRACTION,
    PAD_MULTIPLE,
    align_vocab,
    shared_vocab_size,
    token_divergence,
)


def test_equal_sizes_are_returned_unchanged() -> None:
    s, t = torch.randn(2, 3, 10), torch.randn(2, 3, 10)
    s2, t2 = align_vocab(s, t)
    assert s2 is s and t2 is t
    assert shared_vocab_size(10, 10, allow_padded=False) == 10


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        (151_936, 152_064),  # Qwen2.5-0.5B vs Qwen2.5-7B embeddings, one tokenizer
        (152_064, 151_936),  # student is the padded one
        (32_000, 32_064),  # Llama-2 tokenizer, embedding padded to a multiple of 64
        (50_257, 50_304),  # GPT-2 padded to a multiple of 64
    ],
)
def test_padded_vocab_is_sliced_to_the_shared_ids_by_default(student: int, teacher: int) -> None:
    s = torch.randn(2, student)
    t = torch.randn(2, teacher)
    s2, t2 = align_vocab(s, t)
    shared = min(student, teacher)
    assert s2.shape == t2.shape == (2, shared)
    # views: no copy of the (large) logits
    assert s2.data_ptr() == s.data_ptr() and t2.data_ptr() == t.data_ptr()
    assert torch.equal(s2, s[:, :shared]) and torch.equal(t2, t[:, :shared])
    assert shared_vocab_size(student, teacher) == shared


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        (32_000, 151_936),  # Llama-2 vs Qwen: different tokenizers
        (128_256, 151_936),  # Llama-3 vs Qwen
        (100, 128),  # multiple of 64 but 22 % apart
        (50_257, 50_260),  # close, but the larger is no multiple of 64
    ],
)
def test_different_tokenizers_raise_naming_both_sizes(student: int, teacher: int) -> None:
    pattern = rf"vocabulary has {student} ids but the teacher's has {teacher}.*different tokenizers"
    with pytest.raises(ValueError, match=pattern):
        shared_vocab_size(student, teacher)
    with pytest.raises(ValueError, match=pattern):
        align_vocab(torch.zeros(1, student), torch.zeros(1, teacher))


def test_allow_padded_true_always_slices_and_false_never_does() -> None:
    assert shared_vocab_size(100, 128, allow_padded=True) == 100
    s2, t2 = align_vocab(torch.randn(3, 100), torch.randn(3, 128), allow_padded=True)
    assert s2.shape == t2.shape == (3, 100)
    with pytest.raises(
        ValueError, match=r"has 151936 ids but the teacher's has 152064 and allow_padded=False"
    ):
        shared_vocab_size(151_936, 152_064, allow_padded=False)


def test_rule_constants_are_the_documented_ones() -> None:
    assert PAD_MULTIPLE == 64
    assert MAX_PAD_FRACTION == 0.01


def test_shared_vocab_size_rejects_non_positive_sizes() -> None:
    with pytest.raises(ValueError, match="student_vocab must be a positive integer"):
        shared_vocab_size(0, 10)


def test_token_divergence_on_padded_teacher_equals_divergence_on_sliced_logits() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 148, generator=g)
    t = torch.randn(2, 3, 192, generator=g)  # padded teacher head (multiple of 64, but 23 % apart)
    with pytest.raises(ValueError, match="148 ids but the teacher's has 192"):
        token_divergence(s, t)
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", allow_padded=True), token_divergence(s, t[..., :148], "jsd")
    )


def test_padded_student_logits_get_zero_gradient_on_the_padding_ids() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 2_560, generator=g, requires_grad=True)  # 2,560 = 64 · 40
    t = torch.randn(4, 2_540, generator=g)  # 0.8 % smaller: auto rule slices
    token_divergence(s, t, "forward_kl").backward()
    assert torch.equal(s.grad[:, 2_540:], torch.zeros(4, 20))
    assert s.grad[:, :2_540].abs().sum() > 0
