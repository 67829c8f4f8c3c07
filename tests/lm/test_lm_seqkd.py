"""Specification tests for sequence-level KD and GKD on-policy mixing (`kdistill.lm.seqkd`)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")

from kdistill.distiller import Distiller, LossTerm  # noqa: E402
from kdistill.lm.batches import IGNORE_INDEX, CausalLMCollator  # noqa: E402
from kdistill.lm.losses import TokenCrossEntropy, TokenKDLoss  # noqa: E402
from kdistill.lm.seqkd import (  # noqa: E402
    GenerationSettings,
    OnPolicyLoader,
    build_seqkd_examples,
    generate_completions,
    left_pad,
)

VOCAB, PAD, BOS, EOS = 40, 0, 1, 2
PROMPTS = [[BOS, 5, 6], [BOS, 7], [BOS, 8, 9, 10, 11], [BOS, 12, 13, 14]]


def tiny_llama(layers: int = 2, hidden: int = 32, seed: int = 0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # sharper, less uniform random logits: greedy ties become unlikely
        model.lm_head.weight.mul_(8.0)
    return model.eval()


def manual_greedy(model, prompt: list[int], steps: int, eos: int | None) -> list[int]:
    """Textbook greedy decoding of one unpadded prompt: full forward, argmax, append."""
    ids = list(prompt)
    new: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        token = int(logits.argmax())
        new.append(token)
        ids.append(token)
        if token == eos:
            break
    return new


# --------------------------------------------------------------------------- generation


def test_left_pad_pads_prompts_on_the_left() -> None:
    ids, mask = left_pad([[1, 5, 6], [1, 7]], pad_token_id=PAD)
    assert ids.tolist() == [[1, 5, 6], [PAD, 1, 7]]
    assert mask.tolist() == [[1, 1, 1], [0, 1, 1]]


@pytest.mark.parametrize("eos", [None, EOS])
def test_greedy_targets_are_exactly_the_teachers_greedy_output(eos: int | None) -> None:
    """Batched, left-padded generate == one-prompt-at-a-time argmax decoding."""
    teacher = tiny_llama(seed=3)
    if eos is not None:  # make EOS likely after a few steps so that cutting is exercised
        with torch.no_grad():
            teacher.lm_head.weight[EOS] = teacher.lm_head.weight[9] * 1.01
    settings = GenerationSettings("greedy", max_new_tokens=6)
    got = generate_completions(
        teacher, PROMPTS, settings, pad_token_id=PAD, eos_token_id=eos, batch_size=4
    )
    expected = [manual_greedy(teacher, p, 6, eos) for p in PROMPTS]
    assert got == expected
    if eos is None:
        assert all(len(c) == 6 for c in got)


def test_beam_search_batched_equals_one_prompt_at_a_time() -> None:
    teacher = tiny_llama(seed=4)
    settings = GenerationSettings("beam", max_new_tokens=5, num_beams=3)
    batched = generate_completions(teacher, PROMPTS, settings, pad_token_id=PAD, batch_size=4)
    single = [generate_completions(teacher, [p], settings, pad_token_id=PAD)[0] for p in PROMPTS]
    assert batched == single


def test_sampling_is_seeded_and_leaves_the_global_rng_alone() -> None:
    model = tiny_llama(seed=5)
    settings = GenerationSettings("sample", max_new_tokens=8)
    state = torch.get_rng_state()
    a = generate_completions(model, PROMPTS, settings, pad_token_id=PAD, seed=11)
    assert torch.equal(torch.get_rng_state(), state)
    b = generate_completions(model, PROMPTS, settings, pad_token_id=PAD, seed=11)
    c = generate_completions(model, PROMPTS, settings, pad_token_id=PAD, seed=12)
    assert a == b and a != c


def test_generation_restores_the_training_mode() -> None:
    model = tiny_llama().train()
    generate_completions(model, PROMPTS[:1], pad_token_id=PAD)
    assert model.training


def test_settings_reject_bad_values() -> None:
    with pytest.raises(ValueError, match="num_beams"):
        GenerationSettings("beam", num_beams=1)
    with pytest.raises(ValueError, match="strategy"):
        GenerationSettings("nucleus")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- seq-KD data


def test_seqkd_examples_mask_the_prompt_and_target_exactly_the_completion() -> None:
    teacher = tiny_llama(seed=3)
    settings = GenerationSettings("greedy", max_new_tokens=5)
    examples = build_seqkd_examples(teacher, PROMPTS, settings, pad_token_id=PAD)
    batch = CausalLMCollator(PAD)(examples)
    for row, (prompt, example) in enumerate(zip(PROMPTS, examples, strict=True)):
        completion = example["input_ids"][len(prompt) :]
        assert example["prompt_length"] == len(prompt)
        assert completion == manual_greedy(teacher, prompt, 5, None)
        labels = batch["target"][row]
        assert (labels[: len(prompt) - 1] == IGNORE_INDEX).all()  # predicting prompt tokens
        assert labels[labels != IGNORE_INDEX].tolist() == completion


def test_student_learns_the_teachers_sequences_with_cross_entropy() -> None:
    teacher, student = tiny_llama(layers=3, seed=3), tiny_llama(layers=1, seed=4)
    examples = build_seqkd_examples(
        teacher, PROMPTS, GenerationSettings(max_new_tokens=6), pad_token_id=PAD
    )
    batch = CausalLMCollator(PAD)(examples)
    distiller = Distiller(student, [LossTerm("ce", TokenCrossEntropy(), teacher=None)])
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        out = distiller(batch["inputs"], batch["target"])
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert losses[-1] < 0.5 * losses[0]


# --------------------------------------------------------------------------- on-policy mixing


def _examples() -> list[dict]:
    return [
        {"input_ids": [BOS, 3 + i % 7, 4 + i % 5, 20 + i % 9, 21, 22, EOS], "prompt_length": 3}
        for i in range(16)
    ]


class CountingGenerate:
    """Wraps a model's generate and counts the calls."""

    def __init__(self, model) -> None:
        self.calls = 0
        self._generate = model.generate
        model.generate = self

    def __call__(self, *args, **kwargs):
        self.calls += 1
        assert not torch.is_grad_enabled()  # the student's samples carry no gradient
        return self._generate(*args, **kwargs)


def _loader(student, lam: float, seed: int = 0) -> OnPolicyLoader:
    return OnPolicyLoader(
        _examples(),
        student,
        lam,
        CausalLMCollator(PAD),
        batch_size=2,
        pad_token_id=PAD,
        eos_token_id=EOS,
        student_settings=GenerationSettings("sample", max_new_tokens=4),
        seed=seed,
    )


def test_lambda_zero_never_calls_the_students_generate() -> None:
    student = tiny_llama()
    counter = CountingGenerate(student)
    batches = list(_loader(student, 0.0))
    assert counter.calls == 0 and len(batches) == 8
    assert not any(bool(b["on_policy"]) for b in batches)


def test_lambda_one_always_samples_from_the_student() -> None:
    student = tiny_llama()
    counter = CountingGenerate(student)
    loader = _loader(student, 1.0)
    batches = list(loader)
    assert counter.calls == len(batches) == 8 == loader.on_policy_batches
    original = CausalLMCollator(PAD)(_examples())["target"]
    for batch in batches:  # the student's completions: at most max_new_tokens = 4 tokens
        assert ((batch["target"] != IGNORE_INDEX).sum(1) <= 4).all()
    assert (original != IGNORE_INDEX).sum(1).min() == 4  # vs the data's own continuations
    sampled = torch.cat([b["target"][b["target"] != IGNORE_INDEX] for b in batches])
    assert not set(sampled.tolist()) <= {21, 22, 20, 23, 24, 25, 26, 27, 28, EOS}


def test_on_policy_coins_are_seeded_per_epoch_and_resume_exactly() -> None:
    student = tiny_llama()
    loader = _loader(student, 0.5, seed=3)
    loader.set_epoch(1)
    first = [b for b in loader]
    loader.set_epoch(1)
    again = [b for b in loader]
    flags = [bool(b["on_policy"]) for b in first]
    assert flags == [bool(b["on_policy"]) for b in again]
    assert 0 < sum(flags) < len(flags)  # λ = 0.5 mixes
    for a, b in zip(first, again, strict=True):  # same samples too (per-batch seed)
        assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])
    loader.set_epoch(1)
    loader.set_start_step(5)
    resumed = list(loader)
    assert [bool(b["on_policy"]) for b in resumed] == flags[5:]
    for a, b in zip(first[5:], resumed, strict=True):
        assert torch.equal(a["inputs"]["input_ids"], b["inputs"]["input_ids"])


def test_on_policy_batches_keep_each_prompt_and_mask_it() -> None:
    student = tiny_llama()
    examples = _examples()
    loader = OnPolicyLoader(
        examples,
        student,
        1.0,
        CausalLMCollator(PAD),
        batch_size=4,
        pad_token_id=PAD,
        eos_token_id=EOS,
        shuffle=False,
        student_settings=GenerationSettings("sample", max_new_tokens=4),
    )
    batch = next(iter(loader))
    ids = batch["inputs"]["input_ids"]
    for row in range(4):
        assert ids[row, :3].tolist() == examples[row]["input_ids"][:3]
        assert (batch["target"][row, :2] == IGNORE_INDEX).all()


def test_gkd_loss_on_student_samples_decreases() -> None:
    """JSD(β = 0.5) against the teacher on λ = 0.5 mixed batches goes down in a few steps."""
    teacher, student = tiny_llama(layers=3, seed=3), tiny_llama(layers=1, seed=4)
    distiller = Distiller(
        student, [LossTerm("jsd", TokenKDLoss(kind="jsd", beta=0.5))], teacher=teacher
    )
    held_out = CausalLMCollator(PAD)(_examples()[:8])

    def held_out_jsd() -> float:
        with torch.no_grad():
            return distiller(held_out["inputs"], held_out["target"])["loss"].item()

    before = held_out_jsd()
    optimizer = torch.optim.Adam(distiller.trainable_parameters(), lr=5e-3)
    loader = _loader(student, 0.5)
    for epoch in range(3):
        loader.set_epoch(epoch)
        for batch in loader:
            out = distiller(batch["inputs"], batch["target"])
            optimizer.zero_grad()
            out["loss"].backward()
            optimizer.step()
    assert loader.on_policy_batches > 0
    assert held_out_jsd() < 0.7 * before


def test_on_policy_loader_rejects_bad_lambda_and_missing_prompts() -> None:
    student = tiny_llama()
    with pytest.raises(ValueError, match="lam"):
        _loader(student, 1.5)
    with pytest.raises(ValueError, match="no prompt"):
        OnPolicyLoader(
            [{"input_ids": [1, 2]}], student, 0.5, CausalLMCollator(PAD), 1, pad_token_id=PAD
        )
