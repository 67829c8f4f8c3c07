"""Specification tests for LM batches and HF models in the Distiller (`kdistill.lm.batches`)."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.config import OptimConfig  # noqa: E402
from kdistill.distiller import Distiller, LossTerm  # noqa: E402
from kdistill.lm import token_divergence_reference  # noqa: E402
from kdistill.lm.batches import (  # noqa: E402
    IGNORE_INDEX,
    ByteTokenizer,
    CausalLMCollator,
    ExampleLoader,
    causal_lm_labels,
    evaluate_lm,
    model_outputs,
)
from kdistill.lm.losses import TokenCrossEntropy, TokenKDLoss, token_cross_entropy  # noqa: E402
from kdistill.trainer import Trainer  # noqa: E402

VOCAB = 50
PAD = 0


def tiny_llama(layers: int = 2, hidden: int = 16, tie: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
        pad_token_id=PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).eval()


def tiny_bert(layers: int = 2, hidden: int = 16, seed: int = 0):
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
    return transformers.BertForMaskedLM(config).eval()


EXAMPLES = [
    {"input_ids": [1, 5, 6, 7, 8, 2]},
    {"input_ids": [1, 9, 10, 2]},
    {"input_ids": [1, 11, 12, 13, 14, 15, 16, 2], "prompt_length": 3},
]


# --------------------------------------------------------------------------- labels and collation


def test_causal_labels_are_the_next_token_with_padding_and_prompt_ignored() -> None:
    ids = torch.tensor([[1, 5, 6, 7], [1, 8, 0, 0], [1, 3, 4, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    labels = causal_lm_labels(ids, mask, prompt_lengths=torch.tensor([0, 0, 2]))
    x = IGNORE_INDEX
    expected = torch.tensor([[5, 6, 7, x], [8, x, x, x], [x, 4, 9, x]])
    assert torch.equal(labels, expected)


def test_causal_labels_refuse_left_padding() -> None:
    ids = torch.tensor([[0, 1, 5]])
    with pytest.raises(ValueError, match="right padding"):
        causal_lm_labels(ids, torch.tensor([[0, 1, 1]]))


def test_token_cross_entropy_with_aligned_labels_equals_hugging_face_shifted_loss() -> None:
    """The shift happens once: our aligned labels reproduce HF's own (internally shifted) loss."""
    model = tiny_llama()
    batch = CausalLMCollator(PAD)(EXAMPLES[:2])
    inputs = batch["inputs"]
    hf_labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, IGNORE_INDEX)
    with torch.no_grad():
        out = model(**inputs, labels=hf_labels)
        ours = token_cross_entropy(out.logits, batch["target"])
    assert ours.item() == pytest.approx(out.loss.item(), rel=1e-5)


def test_collator_right_pads_truncates_and_masks_the_prompt() -> None:
    batch = CausalLMCollator(PAD, max_length=7)(EXAMPLES)
    ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
    assert ids.shape == (3, 7)
    assert ids[1].tolist() == [1, 9, 10, 2, PAD, PAD, PAD]
    assert mask[1].tolist() == [1, 1, 1, 1, 0, 0, 0]
    assert ids[2].tolist() == [1, 11, 12, 13, 14, 15, 16]  # truncated to 7
    x = IGNORE_INDEX
    # prompt of 3 tokens: the first target is token 3 (id 13), predicted at position 2
    assert batch["target"][2].tolist() == [x, x, 13, 14, 15, 16, x]
    assert batch["prompt_lengths"].tolist() == [0, 0, 3]


def test_collator_rejects_a_prompt_longer_than_the_example() -> None:
    with pytest.raises(ValueError, match="prompt_length 9"):
        CausalLMCollator(PAD)([{"input_ids": [1, 2], "prompt_length": 9}])


def test_token_cross_entropy_matches_textbook_and_is_zero_without_counted_tokens() -> None:
    logits = torch.randn(2, 3, 7, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1, IGNORE_INDEX, 4], [IGNORE_INDEX, 6, 0]])
    loss = token_cross_entropy(logits, labels)
    logp = torch.log_softmax(logits.detach(), -1)
    manual = -(logp[0, 0, 1] + logp[0, 2, 4] + logp[1, 1, 6] + logp[1, 2, 0]) / 4
    assert loss.item() == pytest.approx(manual.item(), rel=1e-12)
    none = token_cross_entropy(logits, torch.full((2, 3), IGNORE_INDEX))
    none.backward()
    assert none.item() == 0.0 and torch.all(logits.grad == 0)


def test_example_loader_is_reproducible_per_epoch_and_resumes_mid_epoch() -> None:
    examples = [{"input_ids": [1, i + 3, 2]} for i in range(10)]
    loader = ExampleLoader(examples, CausalLMCollator(PAD), batch_size=3, shuffle=True, seed=4)
    loader.set_epoch(2)
    full = [b["inputs"]["input_ids"] for b in loader]
    assert len(full) == len(loader) == 4
    loader.set_epoch(2)
    loader.set_start_step(2)
    rest = [b["inputs"]["input_ids"] for b in loader]
    assert all(torch.equal(a, b) for a, b in zip(full[2:], rest, strict=True))
    loader.set_epoch(3)
    other = [b["inputs"]["input_ids"] for b in loader]
    assert not all(torch.equal(a, b) for a, b in zip(full, other, strict=True))


# --------------------------------------------------------------------------- HF models in the Distiller


def test_model_outputs_reads_logits_and_tuple_layer_outputs_by_name() -> None:
    model = tiny_llama()
    batch = CausalLMCollator(PAD)(EXAMPLES[:2])
    with torch.no_grad():
        values = model_outputs(model, batch["inputs"], ["model.layers.1"])
        reference = model(**batch["inputs"], output_hidden_states=True)
    assert torch.equal(values["logits"], reference.logits)
    # the last decoder layer's output is the last hidden state before the final norm
    assert torch.allclose(
        model.model.norm(values["model.layers.1"]), reference.hidden_states[-1], atol=1e-6
    )


def test_model_outputs_of_a_headless_encoder_give_its_last_hidden_state() -> None:
    encoder = tiny_bert().bert
    batch = CausalLMCollator(PAD)(EXAMPLES[:2])
    with torch.no_grad():
        values = model_outputs(encoder, batch["inputs"])
        reference = encoder(**batch["inputs"]).last_hidden_state
    assert torch.equal(values["logits"], reference)
    assert torch.equal(values["last_hidden_state"], reference)


def test_distiller_token_kd_on_hf_models_counts_only_completion_tokens() -> None:
    teacher, student = tiny_llama(layers=4, seed=1), tiny_llama(layers=2, seed=2)
    term = LossTerm("kd", TokenKDLoss(kind="jsd", beta=0.3, temperature=2.0))
    distiller = Distiller(student, [term], teacher=teacher)
    batch = CausalLMCollator(PAD)(EXAMPLES)
    out = distiller(batch["inputs"], batch["target"])
    with torch.no_grad():
        s = student(**batch["inputs"]).logits
        t = teacher(**batch["inputs"]).logits
    keep = batch["target"] != IGNORE_INDEX  # (B, T)
    # float64 reference: a JSD this small (~3e-4) is a sum of nearly cancelling float32 terms,
    # so float32 evaluation orders differ by ~1e-4 relative; counting the ignored positions
    # too would move it by ~2e-3 relative (checked below), so rel=5e-4 still tells them apart
    expected = token_divergence_reference(
        s[keep].double(), t[keep].double(), "jsd", beta=0.3, temperature=2.0
    )
    assert out["kd_loss"].item() == pytest.approx(expected.item(), rel=5e-4)
    mask = batch["inputs"]["attention_mask"].bool()  # every real token, prompt included
    unmasked = token_divergence_reference(
        s[mask].double(), t[mask].double(), "jsd", beta=0.3, temperature=2.0
    )
    assert abs(unmasked.item() - expected.item()) > 1.5e-3 * expected.item()  # the mask matters
    assert out["logits"].shape == (3, 8, VOCAB)


def test_extra_padding_does_not_change_the_distiller_loss() -> None:
    teacher, student = tiny_llama(layers=3, seed=1), tiny_llama(seed=2)
    terms = [
        LossTerm("kd", TokenKDLoss(kind="forward_kl"), weight=0.5),
        LossTerm("ce", TokenCrossEntropy(), weight=0.5, teacher=None),
    ]
    distiller = Distiller(student, terms, teacher=teacher)
    tight = CausalLMCollator(PAD)(EXAMPLES)
    wide_examples = [*EXAMPLES, {"input_ids": [1, *range(3, 15), 2]}]
    wide = CausalLMCollator(PAD)(wide_examples)  # pads the first three rows further
    a = distiller(tight["inputs"], tight["target"])
    b_inputs = {k: v[:3] for k, v in wide["inputs"].items()}
    b = distiller(b_inputs, wide["target"][:3])
    assert b_inputs["input_ids"].shape[1] > tight["inputs"]["input_ids"].shape[1]
    assert b["loss"].item() == pytest.approx(a["loss"].item(), rel=1e-5)


def test_requires_mask_losses_receive_the_attention_mask() -> None:
    seen = {}

    class Probe(torch.nn.Module):
        requires_mask = True

        def forward(self, s, t, mask=None):
            seen["mask"] = mask
            return (s - t).pow(2).mean()

    teacher, student = tiny_bert(seed=1), tiny_bert(seed=2)
    distiller = Distiller(student, [LossTerm("p", Probe())], teacher=teacher)
    batch = CausalLMCollator(PAD)(EXAMPLES)
    distiller(batch["inputs"], batch["target"])
    assert torch.equal(seen["mask"], batch["inputs"]["attention_mask"])


def test_evaluate_lm_matches_a_manual_per_token_computation() -> None:
    model = tiny_llama()
    loader = ExampleLoader(EXAMPLES, CausalLMCollator(PAD), batch_size=2)
    metrics = evaluate_lm(model, loader)
    nll, correct, count = 0.0, 0, 0
    for example in EXAMPLES:  # one unpadded sequence at a time
        ids = torch.tensor([example["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0]
        start = max(example.get("prompt_length", 0), 1)
        for pos in range(start, ids.shape[1]):  # token `pos` predicted at `pos - 1`
            logp = torch.log_softmax(logits[pos - 1], -1)
            nll -= logp[ids[0, pos]].item()
            correct += int(logits[pos - 1].argmax() == ids[0, pos])
            count += 1
    assert metrics["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(correct / count)
    assert metrics["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_trainer_trains_a_tied_hf_student_and_saves_loadable_weights(tmp_path) -> None:
    teacher, student = tiny_llama(layers=3, tie=True, seed=1), tiny_llama(tie=True, seed=2)
    distiller = Distiller(
        student,
        [
            LossTerm("kd", TokenKDLoss(kind="reverse_kl"), weight=0.5),
            LossTerm("ce", TokenCrossEntropy(), weight=0.5, teacher=None),
        ],
        teacher=teacher,
    )
    examples = [{"input_ids": [1, *[(3 * i + j) % 40 + 3 for j in range(6)], 2]} for i in range(12)]
    loader = ExampleLoader(examples, CausalLMCollator(PAD), batch_size=4, shuffle=True)
    eval_loader = ExampleLoader(examples[:4], CausalLMCollator(PAD), batch_size=4)
    trainer = Trainer(
        distiller,
        loader,
        eval_loader,
        OptimConfig(lr=1e-2, schedule="constant"),
        epochs=2,
        output_dir=tmp_path,
        progress=False,
        tensorboard=False,
        evaluate_fn=evaluate_lm,
    )
    result = trainer.fit()
    row = result.final
    assert 0.0 <= row["train_accuracy"] <= 1.0
    assert row["test_perplexity"] == pytest.approx(math.exp(row["test_loss"]))
    assert result.history[1]["train_loss"] < result.history[0]["train_loss"]
    # tied embeddings were saved (cloned) and load back into a fresh tied model
    fresh = tiny_llama(tie=True, seed=9)
    from kdistill.checkpoint import load_weights

    fresh.load_state_dict(load_weights(result.student_path))
    assert torch.equal(fresh.lm_head.weight, student.lm_head.weight)
    assert fresh.lm_head.weight.data_ptr() == fresh.model.embed_tokens.weight.data_ptr()


def test_byte_tokenizer_round_trips_utf8() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("naïve café")
    assert ids[0] == tok.bos_token_id and max(ids) < tok.vocab_size
    assert tok.decode(ids) == "naïve café"


def test_token_kd_loss_ignores_labels_marked_ignore_index_only() -> None:
    s, t = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    labels = torch.tensor([[3, IGNORE_INDEX, 2, 1], [IGNORE_INDEX, IGNORE_INDEX, 5, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    value = TokenKDLoss(kind="tv")(s, t, labels, mask=mask)
    keep = (labels != IGNORE_INDEX) & mask.bool()
    p, q = F.softmax(t[keep], -1), F.softmax(s[keep], -1)
    assert value.item() == pytest.approx((0.5 * (p - q).abs().sum(-1)).mean().item(), rel=1e-5)
