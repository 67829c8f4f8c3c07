"""Specification tests for the fused lm_head + divergence (`kdistill.lm.fused`)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdistill.lm import (
    KINDS,
    FusedLinearDivergenceLoss,
    fused_linear_divergence,
    token_divergence,
    token_divergence_reference,
)

NEG_INF = float("-inf")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _setup(
    n_shape: tuple[int, ...] = (2, 5),
    hidden: int = 6,
    vocab: int = 11,
    teacher_hidden: int = 4,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> dict[str, torch.Tensor]:
    g = _gen(seed)
    return {
        "h": torch.randn(*n_shape, hidden, generator=g, dtype=dtype),
        "w": torch.randn(vocab, hidden, generator=g, dtype=dtype) * 0.7,
        "b": torch.randn(vocab, generator=g, dtype=dtype) * 0.3,
        "th": torch.randn(*n_shape, teacher_hidden, generator=g, dtype=dtype),
        "tw": torch.randn(vocab, teacher_hidden, generator=g, dtype=dtype),
        "tb": torch.randn(vocab, generator=g, dtype=dtype) * 0.3,
    }


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [x.detach().clone().requires_grad_() for x in tensors]


# --------------------------------------------------------------------------- equal to plain


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 10, None])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_plain_values_and_grads_wrt_hidden_weight_and_bias(
    kind: str, chunk_size: int | None
) -> None:
    """10 tokens (3 and 4 do not divide it); the plain side is lm_head then the reference."""
    x = _setup()
    t_logits = F.linear(x["th"], x["tw"], x["tb"])
    labels = torch.tensor([[1, -100, 3, 4, 0], [2, 2, -100, -100, 5]])
    kwargs = {"temperature": 1.5, "labels": labels, "beta": 0.3, "skew_alpha": 0.2}

    h, w, b = _leaves(x["h"], x["w"], x["b"])
    fused = fused_linear_divergence(
        h, w, t_logits, kind, student_bias=b, chunk_size=chunk_size, **kwargs
    )
    fused.backward()

    h2, w2, b2 = _leaves(x["h"], x["w"], x["b"])
    plain = token_divergence_reference(F.linear(h2, w2, b2), t_logits, kind, **kwargs)
    plain.backward()

    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(b.grad, b2.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_hidden_and_head_equal_teacher_logits(kind: str) -> None:
    x = _setup(seed=1)
    h, w = _leaves(x["h"], x["w"])
    from_head = fused_linear_divergence(
        h,
        w,
        kind=kind,
        teacher_hidden=x["th"],
        teacher_weight=x["tw"],
        teacher_bias=x["tb"],
        chunk_size=3,
    )
    from_head.backward()
    h2, w2 = _leaves(x["h"], x["w"])
    from_logits = fused_linear_divergence(
        h2, w2, F.linear(x["th"], x["tw"], x["tb"]), kind, chunk_size=4
    )
    from_logits.backward()
    torch.testing.assert_close(from_head, from_logits)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


def test_fused_equals_chunked_token_divergence_without_bias_and_mask() -> None:
    x = _setup(seed=2)
    t_logits = F.linear(x["th"], x["tw"])
    mask = torch.tensor([[True, True, False, True, True], [False, True, True, True, True]])
    for kind in KINDS:
        torch.testing.assert_close(
            fused_linear_divergence(x["h"], x["w"], t_logits, kind, mask=mask, chunk_size=2),
            token_divergence(x["h"] @ x["w"].T, t_logits, kind, mask=mask, chunk_size=2),
        )


def test_fused_backward_scales_by_incoming_gradient_and_sum_reduction() -> None:
    x = _setup(seed=3)
    t_logits = F.linear(x["th"], x["tw"])
    h, w = _leaves(x["h"], x["w"])
    (fused_linear_divergence(h, w, t_logits, "tv", chunk_size=3) * 3.0).backward()
    h2, w2 = _leaves(x["h"], x["w"])
    (token_divergence_reference(h2 @ w2.T, t_logits, "tv") * 3.0).backward()
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)
    torch.testing.assert_close(
        fused_linear_divergence(x["h"], x["w"], t_logits, "tv", reduction="sum"),
        token_divergence_reference(x["h"] @ x["w"].T, t_logits, "tv", reduction="sum"),
    )


def test_only_the_weight_requiring_grad_still_gets_its_gradient() -> None:
    x = _setup(seed=4)
    t_logits = F.linear(x["th"], x["tw"])
    (w,) = _leaves(x["w"])
    fused_linear_divergence(x["h"], w, t_logits, "jsd", chunk_size=3).backward()
    (w2,) = _leaves(x["w"])
    token_divergence_reference(x["h"] @ w2.T, t_logits, "jsd").backward()
    torch.testing.assert_close(w.grad, w2.grad)


def test_teacher_gets_no_gradient_on_the_fused_path() -> None:
    x = _setup(seed=5)
    th, tw = _leaves(x["th"], x["tw"])
    h, w = _leaves(x["h"], x["w"])
    fused_linear_divergence(h, w, teacher_hidden=th, teacher_weight=tw).backward()
    assert th.grad is None and tw.grad is None
    assert h.grad is not None


def test_no_grad_gives_the_same_value() -> None:
    x = _setup(seed=6)
    t_logits = F.linear(x["th"], x["tw"])
    h, w = _leaves(x["h"], x["w"])
    with_grad = fused_linear_divergence(h, w, t_logits, "skew_kl", chunk_size=3)
    with torch.no_grad():
        without = fused_linear_divergence(h, w, t_logits, "skew_kl", chunk_size=3)
    assert without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without)


# --------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("kind", KINDS)
def test_fused_passes_gradcheck_in_float64(kind: str) -> None:
    x = _setup(n_shape=(5,), hidden=3, vocab=6, seed=7)
    t_logits = F.linear(x["th"], x["tw"], x["tb"])
    labels = torch.tensor([1, -100, 0, 5, 2])
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    assert torch.autograd.gradcheck(
        lambda a, c, d: fused_linear_divergence(
            a, c, t_logits, kind, student_bias=d, labels=labels, chunk_size=2, temperature=1.3
        ),
        (h, w, b),
    )


# --------------------------------------------------------------------------- -inf, masking


@pytest.mark.parametrize("kind", KINDS)
def test_fused_with_minus_inf_teacher_logits_is_finite_and_equals_plain(kind: str) -> None:
    x = _setup(seed=8)
    t_logits = F.linear(x["th"], x["tw"])
    t_logits[..., 3] = NEG_INF
    t_logits[0, 1, [0, 5]] = NEG_INF
    h, w = _leaves(x["h"], x["w"])
    fused = fused_linear_divergence(h, w, t_logits, kind, chunk_size=3)
    fused.backward()
    h2, w2 = _leaves(x["h"], x["w"])
    plain = token_divergence_reference(h2 @ w2.T, t_logits, kind)
    plain.backward()
    assert math.isfinite(fused.item())
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(fused, plain)
    torch.testing.assert_close(h.grad, h2.grad)
    torch.testing.assert_close(w.grad, w2.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_fully_masked_is_exactly_zero_with_zero_grads(kind: str) -> None:
    x = _setup(seed=9, dtype=torch.float32)
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    loss = fused_linear_divergence(
        h,
        w,
        kind=kind,
        student_bias=b,
        teacher_hidden=x["th"],
        teacher_weight=x["tw"],
        labels=torch.full((2, 5), -100),
    )
    assert loss.item() == 0.0
    loss.backward()
    for leaf in (h, w, b):
        assert torch.equal(leaf.grad, torch.zeros_like(leaf))


def test_fused_ignored_rows_do_not_leak_nan() -> None:
    x = _setup(seed=10)
    t_logits = F.linear(x["th"], x["tw"])
    labels = torch.tensor([[1, -100, 3, 4, 0], [2, 2, -100, 1, 5]])
    base = fused_linear_divergence(x["h"], x["w"], t_logits, "jsd", labels=labels, chunk_size=3)
    h_nan = x["h"].clone()
    h_nan[0, 1] = float("nan")
    t_nan = t_logits.clone()
    t_nan[1, 2] = float("nan")
    h, w = _leaves(h_nan, x["w"])
    loss = fused_linear_divergence(h, w, t_nan, "jsd", labels=labels, chunk_size=3)
    loss.backward()
    assert torch.equal(loss.detach(), base)
    assert torch.isfinite(w.grad).all()
    assert torch.equal(h.grad[labels == -100], torch.zeros(2, 6, dtype=torch.float64))


# --------------------------------------------------------------------------- dtypes, vocab


def test_fused_bfloat16_gives_float32_loss_and_bf16_grads_close_to_float32() -> None:
    x = _setup(n_shape=(4, 8), hidden=16, vocab=64, teacher_hidden=8, seed=11, dtype=torch.float32)
    t_logits = F.linear(x["th"], x["tw"])
    h, w = (y.to(torch.bfloat16).requires_grad_() for y in (x["h"], x["w"]))
    loss = fused_linear_divergence(h, w, t_logits.to(torch.bfloat16), "forward_kl", chunk_size=5)
    loss.backward()
    assert loss.dtype == torch.float32
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    h2, w2 = (y.detach().float().requires_grad_() for y in (h, w))
    ref = token_divergence_reference(h2 @ w2.T, t_logits.to(torch.bfloat16).float(), "forward_kl")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(w.grad.float(), w2.grad, rtol=5e-2, atol=2e-3)


def test_fused_with_a_padded_teacher_head_slices_to_the_shared_ids() -> None:
    x = _setup(seed=12)
    extra = torch.randn(3, 4, generator=_gen(13), dtype=torch.float64)
    tw_padded = torch.cat([x["tw"], extra])  # teacher head with 3 padding rows
    h, w = _leaves(x["h"], x["w"])
    loss = fused_linear_divergence(
        h, w, teacher_hidden=x["th"], teacher_weight=tw_padded, allow_padded=True
    )
    torch.testing.assert_close(
        loss, fused_linear_divergence(x["h"], x["w"], F.linear(x["th"], x["tw"]))
    )
    with pytest.raises(
        ValueError, match=r"student's vocabulary has 11 ids but the teacher's has 14"
    ):
        fused_linear_divergence(h, w, teacher_hidden=x["th"], teacher_weight=tw_padded)


def test_fused_with_a_padded_student_head_gives_zero_grad_to_padding_rows() -> None:
    x = _setup(seed=14)
    w_padded = torch.cat([x["w"], torch.randn(2, 6, dtype=torch.float64, generator=_gen(15))])
    (w,) = _leaves(w_padded)
    t_logits = F.linear(x["th"], x["tw"])
    fused_linear_divergence(x["h"], w, t_logits, "reverse_kl", allow_padded=True).backward()
    assert torch.equal(w.grad[11:], torch.zeros(2, 6, dtype=torch.float64))
    (w2,) = _leaves(x["w"])
    token_divergence_reference(x["h"] @ w2.T, t_logits, "reverse_kl").backward()
    torch.testing.assert_close(w.grad[:11], w2.grad)


# --------------------------------------------------------------------------- memory


def test_fused_graph_saves_no_n_by_v_tensor() -> None:
    n, hid, v = 64, 16, 512
    g = _gen(16)
    h = torch.randn(n, hid, generator=g, requires_grad=True)
    w = torch.randn(v, hid, generator=g, requires_grad=True)
    t_logits = torch.randn(n, v, generator=g)
    total = 0

    def pack(x: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += x.numel() * x.element_size()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = fused_linear_divergence(h, w, t_logits, "jsd", chunk_size=8)
    # only the gradients of h (N·H) and W (V·H) in float32, far below one (N, V) float32
    assert total == (n * hid + v * hid) * 4
    assert total < n * v * 4 / 3
    loss.backward()


# --------------------------------------------------------------------------- validation, module


def test_fused_rejects_both_or_neither_teacher_form() -> None:
    x = _setup()
    t_logits = F.linear(x["th"], x["tw"])
    with pytest.raises(ValueError, match="exactly one of the two"):
        fused_linear_divergence(x["h"], x["w"])
    with pytest.raises(ValueError, match="exactly one of the two"):
        fused_linear_divergence(
            x["h"], x["w"], t_logits, teacher_hidden=x["th"], teacher_weight=x["tw"]
        )
    with pytest.raises(ValueError, match="go together"):
        fused_linear_divergence(x["h"], x["w"], teacher_hidden=x["th"])


def test_fused_rejects_mismatched_hidden_size_and_token_shapes() -> None:
    x = _setup()
    with pytest.raises(ValueError, match=r"student_hidden has shape \(2, 5, 6\).*\(11, 7\)"):
        fused_linear_divergence(x["h"], torch.randn(11, 7, dtype=torch.float64), x["h"])
    with pytest.raises(ValueError, match=r"teacher_logits has shape \(2, 4, 11\)"):
        fused_linear_divergence(x["h"], x["w"], torch.randn(2, 4, 11, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"student_bias has shape \(10,\)"):
        fused_linear_divergence(x["h"], x["w"], torch.randn(2, 5, 11), student_bias=torch.zeros(10))


def test_fused_module_equals_function() -> None:
    x = _setup(seed=17)
    t_logits = F.linear(x["th"], x["tw"])
    labels = torch.tensor([[1, -100, 3, 4, 0], [2, 2, -100, 1, 5]])
    module = FusedLinearDivergenceLoss("jsd", beta=0.7, temperature=2.0, chunk_size=3)
    assert list(module.parameters()) == []
    torch.testing.assert_close(
        module(x["h"], x["w"], t_logits, student_bias=x["b"], labels=labels),
        fused_linear_divergence(
            x["h"],
            x["w"],
            t_logits,
            "jsd",
            beta=0.7,
            temperature=2.0,
            student_bias=x["b"],
            labels=labels,
        ),
    )
    assert "beta=0.7" in repr(module)


# --------------------------------------------------------------------------- teacher head path

from live_tensor_memory import PeakTensorBytes  # noqa: E402  (tests/lm helper)

from kdistill.cache import topk_log_probs  # noqa: E402
from kdistill.lm.divergences import _WORKING_SET, release_workspace  # noqa: E402
from kdistill.lm.fused import (  # noqa: E402
    FusedTopKDivergenceLoss,
    causal_lm_head_inputs,
    fused_topk_divergence,
)

try:  # the top-k maths moved from kdistill.cache to kdistill.lm.topk
    from kdistill.lm.topk import topk_divergence
except ImportError:  # pragma: no cover - before the move
    from kdistill.cache import topk_divergence  # type: ignore[attr-defined,no-redef]

LABELS = torch.tensor([[1, -100, 3, 4, 0], [2, 2, -100, -100, 5]])


@pytest.mark.parametrize("kind", KINDS)
def test_teacher_head_path_equals_the_reference_with_ignored_tokens_values_and_grads(
    kind: str,
) -> None:
    """Teacher logits computed chunk by chunk from (hidden, W_t, b_t) == the plain loss."""
    x = _setup(seed=30)
    kwargs = {"labels": LABELS, "temperature": 1.7, "beta": 0.4, "skew_alpha": 0.2}
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    fused = fused_linear_divergence(
        h,
        w,
        kind=kind,
        student_bias=b,
        teacher_hidden=x["th"],
        teacher_weight=x["tw"],
        teacher_bias=x["tb"],
        chunk_size=2,
        **kwargs,
    )
    fused.backward()
    h2, w2, b2 = _leaves(x["h"], x["w"], x["b"])
    plain = token_divergence_reference(
        F.linear(h2, w2, b2), F.linear(x["th"], x["tw"], x["tb"]), kind, **kwargs
    )
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for got, want in ((h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(got.grad, want.grad)
    assert torch.equal(h.grad[LABELS == -100], torch.zeros(3, 6, dtype=torch.float64))


def test_teacher_head_path_under_cpu_bfloat16_autocast_matches_the_plain_path() -> None:
    """bf16 autocast on CPU: both paths project in bf16 and compute the loss in float32.

    Stated tolerance, fused vs plain (both under autocast): loss to 1e-6 relative (the same
    bf16 logits), gradients to 1 % of their largest entry (measured ≤ 0.5 % over 4 seeds:
    the plain path stores dL/dz in bf16 and multiplies in bf16, the fused one keeps dL/dz and
    accumulates dL/dW in float32). Against float32 without autocast both paths are off by
    the bf16 rounding of the logits, ≤ 5 % of the largest entry (measured ≤ 3.3 %), the
    fused path no further than the plain one.
    """
    x = _setup(
        n_shape=(4, 16), hidden=32, vocab=96, teacher_hidden=24, seed=32, dtype=torch.float32
    )
    labels = torch.arange(64).reshape(4, 16) % 7
    labels[:, :3] = -100
    teacher = {"teacher_hidden": x["th"], "teacher_weight": x["tw"], "teacher_bias": x["tb"]}
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    h2, w2, b2 = _leaves(x["h"], x["w"], x["b"])
    h3, w3, b3 = _leaves(x["h"], x["w"], x["b"])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = fused_linear_divergence(
            h, w, kind="jsd", student_bias=b, labels=labels, chunk_size=10, **teacher
        )
        with torch.no_grad():
            t_logits = F.linear(x["th"], x["tw"], x["tb"])
        student_logits = F.linear(h2, w2, b2)
        assert student_logits.dtype == t_logits.dtype == torch.bfloat16
        plain = token_divergence(student_logits, t_logits, "jsd", labels=labels)
    fused.backward()
    plain.backward()
    exact = token_divergence_reference(
        F.linear(h3, w3, b3), F.linear(x["th"], x["tw"], x["tb"]), "jsd", labels=labels
    )
    exact.backward()
    assert fused.dtype == plain.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(fused, exact, rtol=2e-3, atol=0)
    for got, want, ref in ((h, h2, h3), (w, w2, w3), (b, b2, b3)):
        assert got.grad.dtype == torch.float32
        top = ref.grad.abs().max().item()
        torch.testing.assert_close(got.grad, want.grad, rtol=0, atol=1e-2 * top)
        off_fused = (got.grad - ref.grad).abs().max().item()
        off_plain = (want.grad - ref.grad).abs().max().item()
        assert off_fused <= 5e-2 * top and off_fused <= 1.1 * off_plain


def _fused_peak(fn, n: int, hid: int, v: int) -> int:
    """Peak bytes created by ``fn()`` (forward with grad) minus the stored ∂h and ∂W."""
    release_workspace()  # count every chunk buffer, none left over from earlier calls
    with PeakTensorBytes() as memory:
        loss = fn()
    loss.backward()
    return memory.peak - (n * hid + v * hid) * 4


@pytest.mark.parametrize("teacher_form", ["logits", "head"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_working_memory_stays_within_chunk_bytes(kind: str, teacher_form: str) -> None:
    n, hid, v, th = 48, 8, 1024, 6
    g = _gen(32)
    h = torch.randn(n, hid, generator=g, requires_grad=True)
    w = torch.randn(v, hid, generator=g, requires_grad=True)
    t_hidden, t_weight = torch.randn(n, th, generator=g), torch.randn(v, th, generator=g)
    teacher = (
        {"teacher_logits": t_hidden @ t_weight.T}
        if teacher_form == "logits"
        else {"teacher_hidden": t_hidden, "teacher_weight": t_weight}
    )
    labels = torch.arange(n) % 5
    labels[::4] = -100
    budget = 4 * 6 * v * 4
    peak = _fused_peak(
        lambda: fused_linear_divergence(
            h, w, kind=kind, labels=labels, temperature=2.0, chunk_bytes=budget, **teacher
        ),
        n,
        hid,
        v,
    )
    assert peak <= budget + 64 * n * 8 + 4 * n * hid * 4, (kind, peak / (6 * v * 4))
    rows = int(budget // (_WORKING_SET[kind] * v * 4))
    assert rows >= 6


# --------------------------------------------------------------------------- fused top-k


def _topk_setup(k: int, seed: int, dtype: torch.dtype = torch.float64):
    x = _setup(seed=seed, dtype=dtype)
    values, indices, rest = topk_log_probs(F.linear(x["th"], x["tw"], x["tb"]), k)
    return x, values, indices, rest


@pytest.mark.parametrize(
    ("k", "temperature", "chunk_size"),
    [(4, 1.0, 3), (4, 1.6, None), (1, 1.0, 2), (10, 0.7, 4), (11, 1.0, 3), (11, 2.0, None)],
)
@pytest.mark.parametrize("kind", KINDS)
def test_fused_topk_equals_topk_divergence_of_the_full_logits_values_and_grads(
    kind: str, k: int, temperature: float, chunk_size: int | None
) -> None:
    """k < V (rest bucket), k = V (exact), T ≠ 1, chunks not dividing the 7 counted rows."""
    x, values, indices, rest = _topk_setup(k, seed=33)
    kwargs = {"temperature": temperature, "labels": LABELS, "beta": 0.3, "skew_alpha": 0.2}
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    fused = fused_topk_divergence(
        h, w, b, values, indices, rest, kind, chunk_size=chunk_size, **kwargs
    )
    fused.backward()
    h2, w2, b2 = _leaves(x["h"], x["w"], x["b"])
    plain = topk_divergence(F.linear(h2, w2, b2), values, indices, rest, kind, **kwargs)
    plain.backward()
    torch.testing.assert_close(fused, plain)
    for got, want in ((h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_topk_with_k_equal_v_is_the_dense_fused_divergence(kind: str) -> None:
    x, values, indices, rest = _topk_setup(11, seed=34)
    from_cache = fused_topk_divergence(x["h"], x["w"], None, values, indices, rest, kind)
    dense = fused_linear_divergence(
        x["h"],
        x["w"],
        kind=kind,
        teacher_hidden=x["th"],
        teacher_weight=x["tw"],
        teacher_bias=x["tb"],
    )
    torch.testing.assert_close(from_cache, dense)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_topk_passes_gradcheck_in_float64(kind: str) -> None:
    x, values, indices, rest = _topk_setup(3, seed=35)
    h, w, b = (
        y.detach()[:1].clone() if y.dim() == 3 else y.detach().clone()
        for y in (x["h"], x["w"], x["b"])
    )
    h, w, b = h.requires_grad_(), w.requires_grad_(), b.requires_grad_()
    v, i, r = values[:1], indices[:1], rest[:1]
    assert torch.autograd.gradcheck(
        lambda a, c, d: fused_topk_divergence(
            a, c, d, v, i, r, kind, labels=LABELS[:1], chunk_size=2, temperature=1.3
        ),
        (h, w, b),
    )


def test_fused_topk_reads_cache_dtypes_and_saves_no_n_by_v_tensor() -> None:
    """float16 values, uint16 ids, float32 rest as stored; only ∂h and ∂W are saved."""
    n, hid, v, k = 64, 16, 512, 8
    g = _gen(36)
    h = torch.randn(n, hid, generator=g, requires_grad=True)
    w = torch.randn(v, hid, generator=g, requires_grad=True)
    values, indices, rest = topk_log_probs(torch.randn(n, v, generator=g) * 3, k)
    values16, ids16 = values.to(torch.float16), indices.to(torch.uint16)
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fused_topk_divergence(h, w, None, values16, ids16, rest, "forward_kl")
    assert total == (n * hid + v * hid) * 4
    loss.backward()
    (h2, w2) = _leaves(h, w)
    ref = topk_divergence(h2 @ w2.T, values16, ids16.long(), rest, "forward_kl")
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(w.grad, w2.grad)
    # working memory: the chunk's logits (overwritten into their gradient), within the budget
    budget = 2 * 8 * v * 4
    peak = _fused_peak(
        lambda: fused_topk_divergence(
            h, w, None, values16, ids16, rest, "jsd", chunk_bytes=budget, temperature=2.0
        ),
        n,
        hid,
        v,
    )
    assert peak <= budget + 64 * n * 8 + 4 * n * hid * 4 + 8 * n * (k + 1) * 4 * 4


def test_fused_topk_bfloat16_head_gives_float32_loss_close_to_float32() -> None:
    x, values, indices, rest = _topk_setup(5, seed=37, dtype=torch.float32)
    h, w = (y.to(torch.bfloat16).requires_grad_() for y in (x["h"], x["w"]))
    loss = fused_topk_divergence(h, w, None, values, indices, rest, "jsd", chunk_size=3)
    loss.backward()
    assert loss.dtype == torch.float32 and w.grad.dtype == torch.bfloat16
    h2, w2 = (y.detach().float().requires_grad_() for y in (h, w))
    ref = topk_divergence(h2 @ w2.T, values, indices, rest, "jsd")
    ref.backward()
    torch.testing.assert_close(loss, ref, rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(w.grad.float(), w2.grad, rtol=5e-2, atol=2e-3)


def test_fused_topk_fully_masked_is_zero_and_no_grad_equals_grad() -> None:
    x, values, indices, rest = _topk_setup(4, seed=38)
    h, w = _leaves(x["h"], x["w"])
    zero = fused_topk_divergence(h, w, None, values, indices, rest, labels=torch.full((2, 5), -100))
    zero.backward()
    assert zero.item() == 0.0 and torch.equal(w.grad, torch.zeros_like(w))
    with_grad = fused_topk_divergence(h, w, None, values, indices, rest, "tv")
    with torch.no_grad():
        without = fused_topk_divergence(h, w, None, values, indices, rest, "tv")
    assert without.grad_fn is None
    torch.testing.assert_close(with_grad.detach(), without)


def test_fused_topk_rejects_mismatched_cache_rows_and_out_of_vocabulary_ids() -> None:
    x, values, indices, rest = _topk_setup(4, seed=39)
    h, w = x["h"], x["w"]
    with pytest.raises(ValueError, match=r"leading shape \(2, 5\)"):
        fused_topk_divergence(h, w, None, values[:, :4], indices[:, :4], rest[:, :4])
    with pytest.raises(ValueError, match=r"rest_log_mass has shape \(2, 4\), expected \(2, 5\)"):
        fused_topk_divergence(h, w, None, values, indices, rest[:, :4])
    with pytest.raises(ValueError, match=r"outside the student's vocabulary \[0, 11\)"):
        fused_topk_divergence(h, w, None, values, indices + 8, rest)
    with pytest.raises(TypeError, match="integer token ids"):
        fused_topk_divergence(h, w, None, values, indices.double(), rest)
    with pytest.raises(ValueError, match="not both"):
        fused_topk_divergence(h, w, None, values, indices, rest, chunk_size=2, chunk_bytes=64)


def test_fused_topk_module_equals_function() -> None:
    x, values, indices, rest = _topk_setup(4, seed=40)
    module = FusedTopKDivergenceLoss("skew_kl", skew_alpha=0.3, temperature=1.5, chunk_bytes=4096)
    assert list(module.parameters()) == [] and "chunk_bytes=4096" in repr(module)
    torch.testing.assert_close(
        module(x["h"], x["w"], values, indices, rest, student_bias=x["b"], labels=LABELS),
        fused_topk_divergence(
            x["h"],
            x["w"],
            x["b"],
            values,
            indices,
            rest,
            "skew_kl",
            skew_alpha=0.3,
            temperature=1.5,
            labels=LABELS,
        ),
    )


# --------------------------------------------------------------------------- HF models

transformers = pytest.importorskip("transformers")


def _tiny_llama(tied: bool, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
    )
    return transformers.LlamaForCausalLM(config).float()


@pytest.mark.parametrize("tied", [True, False])
def test_causal_lm_head_inputs_give_the_models_logits_and_gradients_reach_the_parameters(
    tied: bool,
) -> None:
    """The fused path on (hidden, lm_head.weight) trains every parameter as the plain path."""
    student, teacher = _tiny_llama(tied, seed=50), _tiny_llama(False, seed=51)
    ids = torch.randint(0, 64, (2, 9), generator=_gen(52))
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    with torch.no_grad():
        t_logits = teacher(**inputs).logits

    hidden, weight, bias = causal_lm_head_inputs(student, inputs)
    assert hidden.shape == (2, 9, 16) and bias is None
    assert weight is student.lm_head.weight
    assert (weight is student.model.embed_tokens.weight) == tied
    assert not student.model._forward_hooks  # the hook is gone
    fused_linear_divergence(hidden, weight, t_logits, "jsd", labels=labels).backward()
    fused_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad()

    logits = student(**inputs).logits
    torch.testing.assert_close(F.linear(hidden.detach(), weight.detach()), logits.detach())
    token_divergence_reference(logits, t_logits, "jsd", labels=labels).backward()
    for name, param in student.named_parameters():
        torch.testing.assert_close(fused_grads[name], param.grad, rtol=1e-4, atol=1e-6)


def test_causal_lm_head_inputs_reject_a_model_without_a_head() -> None:
    with pytest.raises(TypeError, match=r"Linear has no get_decoder\(\).*distill.fused: false"):
        causal_lm_head_inputs(torch.nn.Linear(3, 4), {})


# --------------------------------------------------------------------------- fused cross-entropy

from kdistill.lm.losses import token_cross_entropy  # noqa: E402


@pytest.mark.parametrize("kind", ["forward_kl", "jsd"])
@pytest.mark.parametrize("teacher_form", ["logits", "head", "topk"])
def test_fused_kd_plus_ce_equals_the_two_plain_terms_values_and_grads(
    kind: str, teacher_form: str
) -> None:
    """alpha · D + (1 − alpha) · CE from one pass over the chunks == the two plain terms."""
    x, values, indices, rest = _topk_setup(4, seed=60)
    t_logits = F.linear(x["th"], x["tw"], x["tb"])
    alpha, temperature = 0.3, 1.4
    kw = {"labels": LABELS, "temperature": temperature, "chunk_size": 3}
    h, w, b = _leaves(x["h"], x["w"], x["b"])
    weights = {"kd_weight": alpha, "ce_weight": 1 - alpha, "return_parts": True}
    if teacher_form == "topk":
        loss, kd, ce = fused_topk_divergence(h, w, b, values, indices, rest, kind, **kw, **weights)
    else:
        teacher = (
            {"teacher_logits": t_logits}
            if teacher_form == "logits"
            else {"teacher_hidden": x["th"], "teacher_weight": x["tw"], "teacher_bias": x["tb"]}
        )
        loss, kd, ce = fused_linear_divergence(
            h, w, kind=kind, student_bias=b, **teacher, **kw, **weights
        )
    loss.backward()
    h2, w2, b2 = _leaves(x["h"], x["w"], x["b"])
    logits = F.linear(h2, w2, b2)
    kw.pop("chunk_size")
    if teacher_form == "topk":
        plain_kd = topk_divergence(logits, values, indices, rest, kind, **kw)
    else:
        plain_kd = token_divergence_reference(logits, t_logits, kind, **kw)
    plain_ce = token_cross_entropy(logits, LABELS)
    (alpha * plain_kd + (1 - alpha) * plain_ce).backward()
    torch.testing.assert_close(kd, plain_kd.detach())
    torch.testing.assert_close(ce, plain_ce.detach())
    torch.testing.assert_close(loss, (alpha * plain_kd + (1 - alpha) * plain_ce).detach())
    assert not kd.requires_grad and not ce.requires_grad
    for got, want in ((h, h2), (w, w2), (b, b2)):
        torch.testing.assert_close(got.grad, want.grad)


def test_fused_ce_alone_is_token_cross_entropy_and_passes_gradcheck() -> None:
    x = _setup(n_shape=(5,), hidden=3, vocab=6, seed=61)
    t_logits = F.linear(x["th"], x["tw"])
    labels = torch.tensor([1, -100, 0, 5, 2])
    only_ce = fused_linear_divergence(
        x["h"], x["w"], t_logits, kd_weight=0.0, ce_weight=1.0, labels=labels
    )
    torch.testing.assert_close(only_ce, token_cross_entropy(x["h"] @ x["w"].T, labels))
    h, w = _leaves(x["h"], x["w"])
    assert torch.autograd.gradcheck(
        lambda a, c: fused_linear_divergence(
            a, c, t_logits, "tv", kd_weight=0.6, ce_weight=0.4, labels=labels, chunk_size=2
        ),
        (h, w),
    )


def test_fused_ce_needs_labels_inside_the_vocabulary_and_non_negative_weights() -> None:
    x = _setup()
    t_logits = F.linear(x["th"], x["tw"])
    with pytest.raises(ValueError, match=r"ce_weight > 0 adds the cross-entropy.*pass labels"):
        fused_linear_divergence(x["h"], x["w"], t_logits, ce_weight=0.5)
    bad = LABELS.clone()
    bad[0, 0] = 11
    with pytest.raises(
        ValueError, match=r"span \[0, 11\], outside the student's vocabulary \[0, 11\)"
    ):
        fused_linear_divergence(x["h"], x["w"], t_logits, ce_weight=0.5, labels=bad)
    with pytest.raises(ValueError, match="kd_weight must be a finite number >= 0"):
        fused_linear_divergence(x["h"], x["w"], t_logits, kd_weight=-1.0)
