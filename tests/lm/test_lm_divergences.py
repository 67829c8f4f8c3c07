"""Specification tests for the token-level LM divergences (`kdistill.lm.divergences`)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdistill.lm import (
    KINDS,
    TokenDivergenceLoss,
    token_divergence,
    token_divergence_reference,
)
from kdistill.losses import kd_loss

NEG_INF = float("-inf")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- textbook reference


def _softmax(row: list[float], temperature: float) -> list[float]:
    scaled = [v / temperature for v in row]
    top = max(scaled)
    exps = [math.exp(v - top) if v != NEG_INF else 0.0 for v in scaled]
    total = sum(exps)
    return [e / total for e in exps]


def _kl(a: list[float], b: list[float]) -> float:
    """Σ a log(a / b) over a > 0 (0 · log 0 = 0)."""
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _textbook_row(
    s_row: list[float],
    t_row: list[float],
    kind: str,
    beta: float,
    alpha: float,
    temperature: float,
) -> float:
    p = _softmax(t_row, temperature)  # teacher
    if kind == "reverse_kl" or (kind == "jsd" and beta == 1.0):
        # reverse KL renormalises the student over the teacher's support
        s_row = [NEG_INF if t == NEG_INF else s for s, t in zip(s_row, t_row, strict=True)]
    q = _softmax(s_row, temperature)  # student
    if kind == "forward_kl":
        return _kl(p, q)
    if kind == "reverse_kl":
        return _kl(q, p)
    if kind == "jsd":
        if beta == 0.0:
            return _kl(p, q)
        if beta == 1.0:
            return _kl(q, p)
        m = [beta * x + (1 - beta) * y for x, y in zip(p, q, strict=True)]
        return beta * _kl(p, m) + (1 - beta) * _kl(q, m)
    if kind == "skew_kl":
        return _kl(p, [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)])
    if kind == "skew_reverse_kl":
        return _kl(q, [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=True)])
    if kind == "tv":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    raise AssertionError(kind)


def _textbook(
    student: torch.Tensor,
    teacher: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    temperature: float = 1.0,
    keep: torch.Tensor | None = None,
) -> float:
    """Slow per-token loop: mean over kept tokens of the per-token divergence."""
    s_rows = student.reshape(-1, student.shape[-1]).tolist()
    t_rows = teacher.reshape(-1, teacher.shape[-1]).tolist()
    flags = [True] * len(s_rows) if keep is None else keep.reshape(-1).tolist()
    values = [
        _textbook_row(s, t, kind, beta, alpha, temperature)
        for s, t, k in zip(s_rows, t_rows, flags, strict=True)
        if k
    ]
    return sum(values) / max(len(values), 1)


def _pair(
    shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0
):
    g = _gen(seed)
    s = torch.randn(*shape, generator=g, dtype=dtype) * scale
    t = torch.randn(*shape, generator=g, dtype=dtype) * scale
    return s, t


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("kind", KINDS)
def test_each_kind_matches_the_textbook_per_token_loop(kind: str, temperature: float) -> None:
    s, t = _pair((2, 3, 7))
    labels = torch.tensor([[5, -100, 2], [1, 1, -100]])
    expected = _textbook(s, t, kind, temperature=temperature, keep=labels != -100)
    for fn in (token_divergence, token_divergence_reference):
        value = fn(s, t, kind, temperature=temperature, labels=labels)
        assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12), fn.__name__


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_jsd_matches_textbook_for_several_betas(beta: float) -> None:
    s, t = _pair((6, 5), seed=1)
    expected = _textbook(s, t, "jsd", beta=beta)
    assert token_divergence(s, t, "jsd", beta=beta, chunk_size=4).item() == pytest.approx(
        expected, rel=1e-10
    )


def test_jsd_end_points_follow_trl_beta_zero_forward_beta_one_reverse() -> None:
    s, t = _pair((4, 6), seed=2)
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", beta=0.0), token_divergence(s, t, "forward_kl")
    )
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", beta=1.0), token_divergence(s, t, "reverse_kl")
    )


@pytest.mark.parametrize("alpha", [0.1, 0.3, 0.9])
@pytest.mark.parametrize("kind", ["skew_kl", "skew_reverse_kl"])
def test_skew_kinds_match_textbook_for_several_alphas(kind: str, alpha: float) -> None:
    s, t = _pair((6, 5), seed=3)
    expected = _textbook(s, t, kind, alpha=alpha)
    assert token_divergence(s, t, kind, skew_alpha=alpha).item() == pytest.approx(
        expected, rel=1e-10
    )


def test_skew_alpha_zero_is_plain_forward_and_reverse_kl() -> None:
    s, t = _pair((4, 6), seed=4)
    torch.testing.assert_close(
        token_divergence(s, t, "skew_kl", skew_alpha=0.0), token_divergence(s, t, "forward_kl")
    )
    torch.testing.assert_close(
        token_divergence(s, t, "skew_reverse_kl", skew_alpha=0.0),
        token_divergence(s, t, "reverse_kl"),
    )


def test_jsd_at_beta_half_is_symmetric_in_student_and_teacher() -> None:
    s, t = _pair((3, 4, 9), seed=5)
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", beta=0.5), token_divergence(t, s, "jsd", beta=0.5)
    )
    # and bounded by log 2
    assert token_divergence(s * 20, t * 20, "jsd").item() <= math.log(2) + 1e-12


def test_forward_and_reverse_kl_swap_roles() -> None:
    s, t = _pair((5, 6), seed=6)
    torch.testing.assert_close(
        token_divergence(s, t, "reverse_kl"), token_divergence(t, s, "forward_kl")
    )


@pytest.mark.parametrize("kind", KINDS)
def test_zero_for_identical_logits(kind: str) -> None:
    z = torch.randn(2, 4, 11, generator=_gen())
    assert token_divergence(z, z.clone(), kind).item() == pytest.approx(0.0, abs=1e-6)
    assert token_divergence(z, z.clone(), kind, temperature=3.0).item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_forward_kl_equals_kd_loss_divided_by_t_squared(temperature: float) -> None:
    """Convention: no T² factor for LMs; kdistill.losses.kd_loss keeps Hinton's T²."""
    s, t = _pair((2, 5, 8), seed=7)
    mask = torch.tensor([[True, False, True, True, False], [True, True, True, False, True]])
    torch.testing.assert_close(
        token_divergence(s, t, "forward_kl", temperature=temperature, mask=mask),
        kd_loss(s, t, temperature, mask=mask) / temperature**2,
    )


def test_per_row_constant_shift_of_logits_changes_nothing() -> None:
    s, t = _pair((4, 6), seed=8)
    shift = torch.randn(4, 1, generator=_gen(9), dtype=torch.float64) * 10
    for kind in KINDS:
        base = token_divergence(s, t, kind, temperature=1.5)
        torch.testing.assert_close(
            token_divergence(s + shift, t - shift, kind, temperature=1.5), base
        )


def test_reduction_sum_is_mean_times_counted_tokens() -> None:
    s, t = _pair((2, 4, 6), seed=10)
    labels = torch.tensor([[1, -100, 3, 4], [-100, -100, 0, 2]])
    for kind in KINDS:
        mean = token_divergence(s, t, kind, labels=labels)
        total = token_divergence(s, t, kind, labels=labels, reduction="sum")
        torch.testing.assert_close(total, mean * 5)
        torch.testing.assert_close(
            total, token_divergence_reference(s, t, kind, labels=labels, reduction="sum")
        )


# --------------------------------------------------------------------------- chunking


@pytest.mark.parametrize("chunk_size", [1, 2, 5, 7, 21, 64, None])
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked_values_and_grads(kind: str, chunk_size: int | None) -> None:
    """21 tokens: chunk sizes that divide it, that do not, and larger than it."""
    s0, t0 = _pair((3, 7, 13), seed=11)
    labels = torch.randint(0, 13, (3, 7), generator=_gen(12))
    labels[0, 2:5] = -100
    results = []
    for fn, kwargs in (
        (token_divergence, {"chunk_size": chunk_size}),
        (token_divergence_reference, {}),
    ):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss = fn(s, t, kind, temperature=1.7, labels=labels, **kwargs)
        loss.backward()
        results.append((loss.detach(), s.grad, t.grad))
    (v1, gs1, gt1), (v2, gs2, gt2) = results
    torch.testing.assert_close(v1, v2)
    torch.testing.assert_close(gs1, gs2)
    torch.testing.assert_close(gt1, gt2)


def test_chunked_backward_scales_by_the_incoming_gradient() -> None:
    s0, t0 = _pair((6, 5), seed=13)
    grads = []
    for factor in (1.0, -2.5):
        s = s0.clone().requires_grad_()
        (token_divergence(s, t0, "jsd", chunk_size=4) * factor).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0])


def test_chunked_loss_composes_with_other_terms_and_upstream_graph() -> None:
    g = _gen(14)
    h = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(9, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 9, generator=g, dtype=torch.float64)
    loss = token_divergence(h @ w.T, t, "skew_kl", chunk_size=4) + (h**2).sum() * 0.1
    loss.backward()
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = token_divergence_reference(h2 @ w2.T, t, "skew_kl") + (h2**2).sum() * 0.1
    ref.backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_no_grad_gives_the_same_value() -> None:
    s, t = _pair((3, 4, 6), seed=15)
    s.requires_grad_()
    with_grad = token_divergence(s, t, "tv", chunk_size=5)
    with torch.no_grad():
        without = token_divergence(s, t, "tv", chunk_size=5)
    assert without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_passes_gradcheck_for_student_and_teacher_in_float64(kind: str) -> None:
    s, t = _pair((2, 3, 5), seed=16, scale=1.0)
    s.requires_grad_()
    t.requires_grad_()
    labels = torch.tensor([[1, -100, 2], [0, 4, 3]])
    assert torch.autograd.gradcheck(
        lambda a, b: token_divergence(
            a, b, kind, temperature=1.3, labels=labels, chunk_size=2, skew_alpha=0.2, beta=0.3
        ),
        (s, t),
    )


def test_chunked_gradcheck_with_minus_inf_teacher_logits() -> None:
    s, t = _pair((4, 5), seed=17, scale=1.0)
    t[0, 1] = NEG_INF
    t[2, [0, 4]] = NEG_INF
    s.requires_grad_()
    for kind in KINDS:
        assert torch.autograd.gradcheck(
            lambda a, k=kind: token_divergence(a, t, k, chunk_size=3), (s,)
        )


# --------------------------------------------------------------------------- -inf logits


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_teacher_logits_give_finite_textbook_values_and_finite_grads(kind: str) -> None:
    s0, t0 = _pair((2, 3, 6), seed=18)
    t0[0, 0, 1] = NEG_INF
    t0[1, 2, [0, 3, 5]] = NEG_INF
    t0[:, :, 4] = NEG_INF  # a token masked out of the teacher's vocabulary everywhere
    expected = _textbook(s0, t0, kind)
    for fn in (token_divergence, token_divergence_reference):
        s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
        loss = fn(s, t, kind)
        loss.backward()
        assert math.isfinite(loss.item())
        assert loss.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)
        assert torch.isfinite(s.grad).all() and torch.isfinite(t.grad).all()


def test_reverse_kl_renormalises_the_student_over_the_teacher_support() -> None:
    s, t = _pair((4, 6), seed=19)
    t_inf = t.clone()
    t_inf[:, [1, 4]] = NEG_INF
    keep = [0, 2, 3, 5]
    s_var = s.clone().requires_grad_()
    loss = token_divergence(s_var, t_inf, "reverse_kl")
    loss.backward()
    torch.testing.assert_close(loss, token_divergence(s[:, keep], t[:, keep], "reverse_kl"))
    assert torch.equal(s_var.grad[:, [1, 4]], torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("kind", KINDS)
def test_minus_inf_in_both_at_the_same_tokens_equals_loss_without_them(kind: str) -> None:
    s, t = _pair((3, 6), seed=20)
    keep = [0, 2, 3]
    s_inf, t_inf = s.clone(), t.clone()
    s_inf[:, [1, 4, 5]] = NEG_INF
    t_inf[:, [1, 4, 5]] = NEG_INF
    s_inf.requires_grad_()
    t_inf.requires_grad_()
    loss = token_divergence(s_inf, t_inf, kind, chunk_size=2)
    loss.backward()
    torch.testing.assert_close(loss, token_divergence(s[:, keep], t[:, keep], kind))
    assert torch.isfinite(s_inf.grad).all() and torch.isfinite(t_inf.grad).all()


def test_forward_kl_with_minus_inf_teacher_matches_kd_loss_gradient_formula() -> None:
    s, t = _pair((3, 5), seed=21)
    t[1, [0, 2]] = NEG_INF
    s.requires_grad_()
    token_divergence(s, t, "forward_kl", chunk_size=2).backward()
    expected = (torch.softmax(s.detach(), -1) - torch.softmax(t, -1)) / 3
    torch.testing.assert_close(s.grad, expected)


# --------------------------------------------------------------------------- masking


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_batch_is_exactly_zero_with_zero_grads(kind: str) -> None:
    s0, t0 = _pair((2, 3, 5), seed=22, dtype=torch.float32)
    for extra in (
        {"labels": torch.full((2, 3), -100)},
        {"mask": torch.zeros(2, 3, dtype=torch.bool)},
    ):
        for fn in (token_divergence, token_divergence_reference):
            s, t = s0.clone().requires_grad_(), t0.clone().requires_grad_()
            loss = fn(s, t, kind, **extra)
            assert loss.dim() == 0 and loss.item() == 0.0
            loss.backward()
            assert torch.equal(s.grad, torch.zeros_like(s))
            assert torch.equal(t.grad, torch.zeros_like(t))


def test_ignored_tokens_do_not_leak_even_nan_or_inf() -> None:
    s, t = _pair((2, 4, 5), seed=23)
    labels = torch.tensor([[3, -100, 1, -100], [-100, 2, 2, 0]])
    base = {k: token_divergence(s, t, k, labels=labels, chunk_size=2) for k in KINDS}
    s2, t2 = s.clone(), t.clone()
    s2[0, 1] = float("nan")
    t2[0, 3] = NEG_INF
    t2[1, 0] = float("nan")
    s2 = s2.requires_grad_()
    for kind in KINDS:
        loss = token_divergence(s2, t2, kind, labels=labels, chunk_size=2)
        assert torch.equal(loss.detach(), base[kind])
        (grad,) = torch.autograd.grad(loss, s2)
        assert torch.isfinite(grad).all()
        assert torch.equal(grad[labels == -100], torch.zeros(3, 5, dtype=torch.float64))


def test_labels_equal_selecting_the_counted_tokens_and_custom_ignore_index() -> None:
    s, t = _pair((2, 4, 5), seed=24)
    labels = torch.tensor([[3, 7, 1, 7], [7, 2, 2, 0]])
    keep = labels != 7
    for kind in KINDS:
        torch.testing.assert_close(
            token_divergence(s, t, kind, labels=labels, ignore_index=7),
            token_divergence(s[keep], t[keep], kind),
        )


def test_mask_and_labels_combine_with_and_and_integer_mask_works() -> None:
    s, t = _pair((2, 4, 5), seed=25)
    labels = torch.tensor([[3, -100, 1, 4], [-100, 2, 2, 0]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    keep = (labels != -100) & attention.bool()
    torch.testing.assert_close(
        token_divergence(s, t, "jsd", labels=labels, mask=attention),
        token_divergence(s[keep], t[keep], "jsd"),
    )


def test_two_dimensional_n_by_v_inputs_equal_three_dimensional() -> None:
    s, t = _pair((2, 3, 6), seed=26)
    for kind in KINDS:
        torch.testing.assert_close(
            token_divergence(s, t, kind), token_divergence(s.reshape(6, 6), t.reshape(6, 6), kind)
        )


# --------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_give_float32_loss_and_gradients_in_the_input_dtype(dtype: torch.dtype) -> None:
    s32, t32 = _pair((2, 8, 32), seed=27, dtype=torch.float32)
    s, t = s32.to(dtype).requires_grad_(), t32.to(dtype)
    loss = token_divergence(s, t, "jsd", chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert s.grad.dtype == dtype
    ref_s = s.detach().float().requires_grad_()
    ref = token_divergence_reference(ref_s, t.float(), "jsd")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(s.grad.float(), ref_s.grad, rtol=2e-2, atol=1e-4)


# --------------------------------------------------------------------------- memory


def _saved_bytes(fn):
    """Run ``fn`` and total the bytes autograd saves for backward while it builds the graph."""
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, total


def test_chunked_graph_does_not_keep_float32_n_by_v_tensors() -> None:
    n, v = 64, 512
    nv4 = n * v * 4
    g = _gen(28)
    s_bf16 = (torch.randn(4, 16, v, generator=g)).to(torch.bfloat16).requires_grad_()
    t_bf16 = torch.randn(4, 16, v, generator=g).to(torch.bfloat16)
    for kind in KINDS:
        loss, saved = _saved_bytes(lambda k=kind: token_divergence(s_bf16, t_bf16, k, chunk_size=8))
        # only the bf16 student gradient (N·V·2 bytes) is kept, no float32 (N, V) tensor
        assert saved <= n * v * 2 < nv4, (kind, saved)
        loss.backward()
        s_bf16.grad = None

    s32 = s_bf16.detach().float().requires_grad_()
    t32 = t_bf16.float()
    _, saved_chunked = _saved_bytes(lambda: token_divergence(s32, t32, "forward_kl", chunk_size=8))
    _, saved_plain = _saved_bytes(lambda: token_divergence_reference(s32, t32, "forward_kl"))
    assert saved_chunked <= nv4  # exactly the one float32 student gradient
    assert saved_plain >= 2 * nv4  # the plain graph keeps several (N, V) float32 tensors


def test_teacher_gradient_is_only_stored_when_the_teacher_requires_grad() -> None:
    s, t = _pair((8, 16), seed=29, dtype=torch.float32)
    s.requires_grad_()
    _, saved = _saved_bytes(lambda: token_divergence(s, t, "tv"))
    assert saved == 8 * 16 * 4
    t.requires_grad_()
    _, saved = _saved_bytes(lambda: token_divergence(s, t, "tv"))
    assert saved == 2 * 8 * 16 * 4


# --------------------------------------------------------------------------- validation


def test_rejects_unknown_kind_listing_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown divergence kind 'kl'.*forward_kl.*tv"):
        token_divergence(torch.randn(2, 3), torch.randn(2, 3), "kl")
    with pytest.raises(ValueError, match="unknown divergence kind"):
        TokenDivergenceLoss("js")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"beta": -0.1}, r"beta must be in \[0, 1\]"),
        ({"beta": float("nan")}, r"beta must be in \[0, 1\]"),
        ({"skew_alpha": 1.0}, r"skew_alpha must be in \[0, 1\)"),
        ({"skew_alpha": -0.5}, r"skew_alpha must be in \[0, 1\)"),
        ({"temperature": 0.0}, "temperature must be a finite number > 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number > 0"),
        ({"chunk_size": 0}, "chunk_size must be a positive int"),
        ({"chunk_size": 2.5}, "chunk_size must be a positive int"),
        ({"reduction": "none"}, "reduction must be 'mean'"),
    ],
)
def test_rejects_bad_hyper_parameters(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        token_divergence(torch.randn(2, 3), torch.randn(2, 3), "jsd", **kwargs)


def test_rejects_mismatched_token_shapes_naming_both() -> None:
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4, 5\).*same batch and sequence"):
        token_divergence(torch.randn(2, 3, 5), torch.randn(2, 4, 5))


def test_rejects_labels_with_wrong_shape_or_dtype() -> None:
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match=r"labels has shape \(2, 4\).*leading shape \(2, 3\)"):
        token_divergence(s, t, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be integer token ids"):
        token_divergence(s, t, labels=torch.zeros(2, 3))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        token_divergence(s, t, mask=torch.ones(2, 3))


def test_rejects_integer_logits() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        token_divergence(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))


# --------------------------------------------------------------------------- module


def test_module_equals_function_and_holds_no_parameters() -> None:
    s, t = _pair((2, 3, 6), seed=30)
    labels = torch.tensor([[1, -100, 2], [3, 4, -100]])
    module = TokenDivergenceLoss("skew_reverse_kl", skew_alpha=0.2, temperature=2.0, chunk_size=2)
    assert list(module.parameters()) == []
    torch.testing.assert_close(
        module(s, t, labels),
        token_divergence(s, t, "skew_reverse_kl", skew_alpha=0.2, temperature=2.0, labels=labels),
    )
    assert "skew_alpha=0.2" in repr(module) and "chunk_size=2" in repr(module)
    assert "beta" in repr(TokenDivergenceLoss("jsd", beta=0.3))


# --------------------------------------------------------------------------- property


@settings(max_examples=25, deadline=None)
@given(
    rows=st.integers(min_value=0, max_value=6),
    vocab=st.integers(min_value=1, max_value=9),
    kind=st.sampled_from(KINDS),
    temperature=st.floats(min_value=0.2, max_value=5.0),
    scale=st.floats(min_value=0.0, max_value=40.0),
    chunk=st.integers(min_value=1, max_value=4),
    seed=st.integers(min_value=0, max_value=2**16),
)
def test_finite_non_negative_and_equal_to_reference_for_random_inputs(
    rows: int, vocab: int, kind: str, temperature: float, scale: float, chunk: int, seed: int
) -> None:
    g = _gen(seed)
    s = (torch.randn(rows, vocab, generator=g) * scale).requires_grad_()
    t = torch.randn(rows, vocab, generator=g) * scale
    loss = token_divergence(s, t, kind, temperature=temperature, chunk_size=chunk)
    assert torch.isfinite(loss)
    assert loss.item() >= -1e-5
    if kind == "tv":
        assert loss.item() <= 1 + 1e-5
    torch.testing.assert_close(
        loss, token_divergence_reference(s, t, kind, temperature=temperature), rtol=1e-4, atol=1e-5
    )
    loss.backward()
    assert torch.isfinite(s.grad).all()


# --------------------------------------------------------------------------- memory budget

from live_tensor_memory import PeakTensorBytes  # noqa: E402  (tests/lm helper)

from kdistill.lm.divergences import (  # noqa: E402
    _WORKING_SET,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_CHUNK_ELEMENTS,
    _chunk_rows,
    release_workspace,
)


def test_default_chunk_comes_from_a_32_mib_budget_not_a_fixed_row_count() -> None:
    """Issue 18: at V = 49,152 the old default (341 rows) held almost a whole 4 × 128 batch."""
    assert DEFAULT_CHUNK_BYTES == 32 * 2**20
    assert DEFAULT_CHUNK_ELEMENTS // 49152 == 341  # the old default, for reference
    assert _chunk_rows(None, 49152, working_set=_WORKING_SET["jsd"]) == 42  # 32 MiB / (4·V·4 B)
    assert _chunk_rows(None, 49152, working_set=_WORKING_SET["forward_kl"]) == 56
    assert _chunk_rows(None, 151936, working_set=4.0) == 13
    assert _chunk_rows(None, 49152, working_set=4.0, itemsize=8) == 21  # float64 halves it
    assert _chunk_rows(None, 49152, chunk_bytes=1 << 20, working_set=4.0) == 1  # at least 1
    assert _chunk_rows(None, 10, chunk_bytes=1 << 30, working_set=4.0) == (1 << 30) // 160
    assert _chunk_rows(7, 49152, working_set=4.0) == 7  # chunk_size overrides


def _peak_working_bytes(kind: str, *, n: int, v: int, chunk_bytes: int, **kwargs) -> int:
    """Peak bytes created by forward-with-grad, minus the stored (N, V) gradients."""
    dtype = kwargs.pop("dtype", torch.float32)
    teacher_grad = kwargs.pop("teacher_grad", False)
    s, t = _pair((n, v), seed=40, dtype=torch.float32)
    s, t = s.to(dtype).requires_grad_(), t.to(dtype).requires_grad_(teacher_grad)
    release_workspace()  # count every chunk buffer, none left over from earlier calls
    with PeakTensorBytes() as memory:
        loss = token_divergence(s, t, kind, chunk_bytes=chunk_bytes, **kwargs)
    loss.backward()
    stored = s.numel() * s.element_size() * (2 if teacher_grad else 1)
    return memory.peak - stored


@pytest.mark.parametrize(
    "case",
    [
        {},
        {"temperature": 2.0},
        {"dtype": torch.bfloat16, "temperature": 2.0},
        {"labels": "some ignored"},
        {"dtype": torch.bfloat16, "labels": "some ignored", "temperature": 0.5},
        {"teacher_grad": True, "temperature": 2.0},
        {"teacher_grad": True, "labels": "some ignored", "beta": 0.3, "skew_alpha": 0.2},
    ],
    ids=["plain", "T2", "bf16_T2", "labels", "bf16_labels_T05", "teacher_grad", "teacher_labels"],
)
@pytest.mark.parametrize("kind", KINDS)
def test_working_memory_beyond_the_stored_gradient_stays_within_chunk_bytes(
    kind: str, case: dict
) -> None:
    """Every (rows, V) float32 temporary of a chunk counts against the budget."""
    n, v = 48, 1024
    budget = 4 * 8 * v * 4  # 8 rows at the largest working set (4)
    kwargs = dict(case)
    if kwargs.get("labels"):
        labels = torch.arange(n) % 5
        labels[::3] = -100
        kwargs["labels"] = labels
    peak = _peak_working_bytes(kind, n=n, v=v, chunk_bytes=budget, **kwargs)
    slack = 64 * n * 8  # (N,) index / mask / per-row vectors
    assert peak <= budget + slack, (kind, case, peak / (v * 4 * 8))
    # and it does act: one chunk over all the counted rows needs far more
    whole = _peak_working_bytes(kind, n=n, v=v, chunk_bytes=64 * n * v * 4, **kwargs)
    assert whole > 2.5 * budget


def test_working_set_table_is_tight_for_float32_jsd() -> None:
    """The budget is not padded: JSD really holds 4 (rows, V) float32 tensors at its peak."""
    n, v = 32, 2048
    peak = _peak_working_bytes("jsd", n=n, v=v, chunk_bytes=4 * n * v * 4, beta=0.3)
    assert 3.5 * n * v * 4 < peak <= 4 * n * v * 4 + 64 * n * 8


@pytest.mark.parametrize("kind", KINDS)
def test_chunk_bytes_equals_the_same_chunk_size_values_and_grads(kind: str) -> None:
    n, v = 30, 64
    budget = 7 * v * 8 * int(_WORKING_SET[kind] * 2) // 2  # float64: 7 rows
    s, t = _pair((n, v), seed=41)
    labels = torch.arange(n) % 4
    labels[2::5] = -100
    rows = _chunk_rows(None, v, chunk_bytes=budget, working_set=_WORKING_SET[kind], itemsize=8)
    assert rows == 7
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    by_bytes = token_divergence(s1, t, kind, labels=labels, chunk_bytes=budget)
    by_rows = token_divergence(s2, t, kind, labels=labels, chunk_size=rows)
    by_bytes.backward()
    by_rows.backward()
    assert torch.equal(by_bytes, by_rows)
    assert torch.equal(s1.grad, s2.grad)
    torch.testing.assert_close(by_bytes, token_divergence_reference(s, t, kind, labels=labels))


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"chunk_bytes": 0}, r"chunk_bytes must be a positive int \(bytes of working memory\)"),
        ({"chunk_bytes": 1.5e6}, "chunk_bytes must be a positive int"),
        ({"chunk_bytes": True}, "chunk_bytes must be a positive int"),
        (
            {"chunk_size": 8, "chunk_bytes": 1 << 20},
            r"give chunk_size .* or chunk_bytes .* not both",
        ),
    ],
)
def test_rejects_bad_chunk_bytes_and_both_chunk_settings(kwargs: dict, pattern: str) -> None:
    s, t = _pair((4, 6))
    with pytest.raises(ValueError, match=pattern):
        token_divergence(s, t, **kwargs)
    with pytest.raises(ValueError, match=pattern):
        TokenDivergenceLoss(**kwargs)


def test_module_passes_chunk_bytes_and_shows_it() -> None:
    loss = TokenDivergenceLoss("jsd", chunk_bytes=1 << 20)
    assert "chunk_bytes=1048576" in repr(loss)
    s, t = _pair((3, 5, 7), seed=42)
    torch.testing.assert_close(loss(s, t), token_divergence(s, t, "jsd", chunk_bytes=1 << 20))


def test_chunk_buffers_are_reused_across_calls_and_released_on_request() -> None:
    """A second step allocates no (rows, V) buffer: no page faults from re-allocation."""
    n, v = 48, 1024
    s, t = _pair((n, v), seed=43, dtype=torch.float32)
    labels = torch.arange(n) % 6
    labels[::5] = -100
    budget = 4 * 8 * v * 4
    release_workspace()
    first = []
    for _ in range(2):
        leaf = s.clone().requires_grad_()
        with PeakTensorBytes() as memory:
            loss = token_divergence(leaf, t, "jsd", labels=labels, chunk_bytes=budget)
        loss.backward()
        first.append((memory.peak - n * v * 4, loss.detach(), leaf.grad))
    (peak_1, loss_1, grad_1), (peak_2, loss_2, grad_2) = first
    assert peak_1 > 3 * 8 * v * 4  # the first call fills the pool
    assert peak_2 < 8 * v * 4  # the second reuses it: less than one chunk buffer is new
    assert torch.equal(loss_1, loss_2) and torch.equal(grad_1, grad_2)
    release_workspace()
    leaf = s.clone().requires_grad_()
    with PeakTensorBytes() as memory:
        token_divergence(leaf, t, "jsd", labels=labels, chunk_bytes=budget).backward()
    assert memory.peak - n * v * 4 > 3 * 8 * v * 4  # released: allocated again
