"""Specification tests for DistilBERT's triple loss and MLM masking (`kdistill.lm.distilbert`)."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.distiller import Distiller  # noqa: E402
from kdistill.lm.batches import IGNORE_INDEX, ExampleLoader  # noqa: E402
from kdistill.lm.distilbert import (  # noqa: E402
    DISTILBERT_TEMPERATURE,
    DISTILBERT_WEIGHTS,
    MLMCollator,
    distilbert_loss,
    distilbert_terms,
    hidden_cosine_loss,
    last_layer_name,
    mask_tokens,
    soft_target_kd_loss,
)

VOCAB, PAD, CLS, SEP, MASK = 60, 0, 1, 2, 3


def tiny_bert(layers: int, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        max_position_embeddings=64,
        pad_token_id=PAD,
    )
    return transformers.BertForMaskedLM(config)


def reference_kd(s, t, select, temperature):
    """The reference implementation's KD term: masked_select rows, KLDivLoss(batchmean)·T²."""
    v = s.shape[-1]
    rows = select.unsqueeze(-1).expand_as(s)
    s_rows = torch.masked_select(s, rows).view(-1, v)
    t_rows = torch.masked_select(t, rows).view(-1, v)
    kl = nn.KLDivLoss(reduction="batchmean")(
        torch.log_softmax(s_rows / temperature, -1), torch.softmax(t_rows / temperature, -1)
    )
    return kl * temperature**2


def reference_cos(hs, ht, attention_mask):
    """The reference implementation's cosine term: CosineEmbeddingLoss(target 1) on real tokens."""
    d = hs.shape[-1]
    rows = attention_mask.bool().unsqueeze(-1).expand_as(hs)
    s_rows = torch.masked_select(hs, rows).view(-1, d)
    t_rows = torch.masked_select(ht, rows).view(-1, d)
    return nn.CosineEmbeddingLoss()(s_rows, t_rows, torch.ones(s_rows.shape[0]))


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    b, t, v, h = 3, 6, 11, 8
    attention_mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4])
    labels = torch.full((b, t), IGNORE_INDEX)
    labels[0, 1], labels[0, 4], labels[1, 2], labels[2, 1] = 3, 7, 1, 9
    return {
        "s": torch.randn(b, t, v, generator=g, dtype=torch.float64),
        "t": torch.randn(b, t, v, generator=g, dtype=torch.float64) * 2,
        "hs": torch.randn(b, t, h, generator=g, dtype=torch.float64),
        "ht": torch.randn(b, t, h, generator=g, dtype=torch.float64),
        "labels": labels,
        "attention_mask": attention_mask,
    }


# --------------------------------------------------------------------------- the three terms


def test_published_weights_and_temperature() -> None:
    assert DISTILBERT_WEIGHTS == {"kd": 5.0, "mlm": 2.0, "cos": 1.0}
    assert DISTILBERT_TEMPERATURE == 2.0


@pytest.mark.parametrize("restrict", [False, True])
def test_soft_target_kd_matches_the_reference_masked_select_kldiv(restrict: bool) -> None:
    x = _tensors()
    value = soft_target_kd_loss(
        x["s"],
        x["t"],
        temperature=2.0,
        attention_mask=x["attention_mask"],
        labels=x["labels"],
        restrict_to_masked=restrict,
    )
    select = x["labels"] != IGNORE_INDEX if restrict else x["attention_mask"].bool()
    assert value.item() == pytest.approx(
        reference_kd(x["s"], x["t"], select, 2.0).item(), rel=1e-10
    )


def test_soft_target_kd_by_hand_on_one_token() -> None:
    s = torch.tensor([[[0.0, 1.0, 2.0]]], dtype=torch.float64)
    t = torch.tensor([[[2.0, 0.0, 0.0]]], dtype=torch.float64)
    T = 2.0
    p = torch.softmax(t[0, 0] / T, -1)
    q = torch.softmax(s[0, 0] / T, -1)
    by_hand = T * T * sum(p[i] * (p[i].log() - q[i].log()) for i in range(3))
    assert soft_target_kd_loss(s, t, temperature=T).item() == pytest.approx(by_hand.item())


def test_hidden_cosine_matches_cosine_embedding_loss_on_real_tokens() -> None:
    x = _tensors(1)
    value = hidden_cosine_loss(x["hs"], x["ht"], x["attention_mask"])
    expected = reference_cos(x["hs"], x["ht"], x["attention_mask"])
    assert value.item() == pytest.approx(expected.item(), rel=1e-10)


def test_triple_loss_is_the_weighted_sum_of_the_reference_terms() -> None:
    x = _tensors(2)
    out = distilbert_loss(x["s"], x["t"], x["hs"], x["ht"], x["labels"], x["attention_mask"])
    kd = reference_kd(x["s"], x["t"], x["attention_mask"].bool(), 2.0)
    mlm = nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX)(
        x["s"].reshape(-1, x["s"].shape[-1]), x["labels"].reshape(-1)
    )
    cos = reference_cos(x["hs"], x["ht"], x["attention_mask"])
    assert out["kd"].item() == pytest.approx(kd.item(), rel=1e-10)
    assert out["mlm"].item() == pytest.approx(mlm.item(), rel=1e-10)
    assert out["cos"].item() == pytest.approx(cos.item(), rel=1e-10)
    total = 5.0 * kd + 2.0 * mlm + 1.0 * cos
    assert out["loss"].item() == pytest.approx(total.item(), rel=1e-10)


def test_identical_student_and_teacher_leave_only_the_mlm_term() -> None:
    x = _tensors(3)
    out = distilbert_loss(x["s"], x["s"], x["hs"], x["hs"] * 3.0, x["labels"], x["attention_mask"])
    assert abs(out["kd"].item()) < 1e-12 and abs(out["cos"].item()) < 1e-12
    assert out["loss"].item() == pytest.approx(2.0 * out["mlm"].item())


def test_padding_positions_do_not_change_the_loss() -> None:
    x = _tensors(4)
    base = distilbert_loss(x["s"], x["t"], x["hs"], x["ht"], x["labels"], x["attention_mask"])
    pad = ~x["attention_mask"].bool()
    s, hs = x["s"].clone(), x["hs"].clone()
    s[pad] = 50.0
    hs[pad] = -7.0
    changed = distilbert_loss(s, x["t"], hs, x["ht"], x["labels"], x["attention_mask"])
    assert changed["loss"].item() == pytest.approx(base["loss"].item(), rel=1e-12)


# --------------------------------------------------------------------------- masking


def test_mask_tokens_follows_15_percent_and_80_10_10() -> None:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, VOCAB, (400, 500), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    mask = torch.ones_like(ids)
    mask[:, 450:] = 0
    ids[:, 450:] = PAD
    masked, labels = mask_tokens(
        ids,
        mask,
        mask_token_id=MASK,
        vocab_size=VOCAB,
        special_token_ids=[CLS, SEP, PAD],
        generator=g,
    )
    selected = labels != IGNORE_INDEX
    candidates = mask.bool() & (ids != CLS) & (ids != SEP)
    assert not (selected & ~candidates).any()  # never padding or special tokens
    assert torch.equal(labels[selected], ids[selected])
    n = selected.sum().item()
    assert n / candidates.sum().item() == pytest.approx(0.15, abs=0.003)
    became_mask = (masked == MASK) & selected
    kept = (masked == ids) & selected
    assert became_mask.sum().item() / n == pytest.approx(0.8, abs=0.01)
    # a random replacement can draw the original id (1/VOCAB of the 10 %): it then counts as kept
    assert kept.sum().item() / n == pytest.approx(0.1 + 0.1 / VOCAB, abs=0.01)
    assert torch.equal(masked[~selected], ids[~selected])


def test_mlm_collator_masks_reproducibly_per_epoch() -> None:
    examples = [{"input_ids": [CLS, *range(4 + i, 14 + i), SEP]} for i in range(8)]
    collate = MLMCollator(PAD, MASK, VOCAB, special_token_ids=[CLS, SEP], max_length=8)
    loader = ExampleLoader(examples, collate, batch_size=4, seed=1, takes_generator=True)
    first = [b["inputs"]["input_ids"] for b in loader]
    second = [b["inputs"]["input_ids"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    loader.set_epoch(1)
    third = [b["inputs"]["input_ids"] for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(first, third, strict=True))
    assert first[0].shape == (4, 8)


# --------------------------------------------------------------------------- with HF models


def test_last_layer_name_finds_bert_and_llama_blocks() -> None:
    assert last_layer_name(tiny_bert(3)) == "bert.encoder.layer.2"
    llama = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    assert last_layer_name(llama) == "model.layers.1"
    with pytest.raises(ValueError, match="layer list"):
        last_layer_name(nn.Linear(2, 2))


def test_distiller_with_distilbert_terms_equals_the_triple_loss_on_hf_outputs() -> None:
    """Hooks on the last layer vs HF's own output_hidden_states: the same objective."""
    teacher, student = tiny_bert(4, seed=1).eval(), tiny_bert(2, seed=2).eval()
    examples = [{"input_ids": [CLS, *range(4 + i, 4 + i + 3 + i), SEP]} for i in range(4)]
    collate = MLMCollator(PAD, MASK, VOCAB, special_token_ids=[CLS, SEP], probability=0.4)
    batch = collate(examples, torch.Generator().manual_seed(0))
    assert (batch["target"] != IGNORE_INDEX).any()
    terms = distilbert_terms(last_layer_name(student), last_layer_name(teacher))
    distiller = Distiller(student, terms, teacher=teacher)
    out = distiller(batch["inputs"], batch["target"])
    with torch.no_grad():
        s = student(**batch["inputs"], output_hidden_states=True)
        t = teacher(**batch["inputs"], output_hidden_states=True)
    expected = distilbert_loss(
        s.logits,
        t.logits,
        s.hidden_states[-1],
        t.hidden_states[-1],
        batch["target"],
        batch["inputs"]["attention_mask"],
    )
    for key in ("kd", "mlm", "cos"):
        assert out[f"{key}_loss"].item() == pytest.approx(expected[key].item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx(expected["loss"].item(), rel=1e-5)
    out["loss"].backward()
    assert student.bert.encoder.layer[1].output.dense.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
