"""DistilBERT-style student initialisation from tiny, randomly initialised HF teachers."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdistill.lm.student_init import (  # noqa: E402
    default_layer_map,
    find_layer_stack,
    init_student_from_teacher,
)

VOCAB = 61


def tiny_bert(cls_name: str = "BertModel", layers: int = 6) -> torch.nn.Module:
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=32,
    )
    return getattr(transformers, cls_name)(config).eval()


def tiny_llama(tied: bool = True, layers: int = 6) -> torch.nn.Module:
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    # Random norms, so that a wrong copy of a norm weight shows up in the outputs.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _params_with_prefix(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in model.state_dict().items() if k.startswith(prefix)}


@pytest.mark.parametrize(
    ("make", "stack"),
    [
        (lambda: tiny_bert("BertModel"), "encoder.layer"),
        (lambda: tiny_bert("BertForMaskedLM"), "bert.encoder.layer"),
        (lambda: tiny_llama(tied=True), "model.layers"),
        (lambda: tiny_llama(tied=False), "model.layers"),
    ],
)
def test_student_layers_are_copies_of_the_mapped_teacher_layers(make, stack):
    teacher = make()
    layer_map = [5, 1, 3]
    student = init_student_from_teacher(teacher, layer_map=layer_map)
    assert type(student) is type(teacher)
    assert student.config.num_hidden_layers == 3
    assert teacher.config.num_hidden_layers == 6  # teacher config untouched
    assert find_layer_stack(student)[0] == stack
    for i, j in enumerate(layer_map):
        s_layer = _params_with_prefix(student, f"{stack}.{i}.")
        t_layer = _params_with_prefix(teacher, f"{stack}.{j}.")
        assert s_layer.keys() == t_layer.keys() and s_layer
        for key in t_layer:
            assert torch.equal(s_layer[key], t_layer[key]), (i, j, key)
    s_rest = {k: v for k, v in student.state_dict().items() if not k.startswith(stack)}
    t_rest = {k: v for k, v in teacher.state_dict().items() if not k.startswith(stack)}
    assert s_rest.keys() == t_rest.keys()
    for key in t_rest:
        assert torch.equal(s_rest[key], t_rest[key]), key


def test_student_owns_its_parameters():
    teacher = tiny_llama()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = init_student_from_teacher(teacher, num_layers=2)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    for key, value in teacher.state_dict().items():
        assert torch.equal(value, before[key]), key
    teacher_ptrs = {p.data_ptr() for p in teacher.parameters()}
    assert not teacher_ptrs & {p.data_ptr() for p in student.parameters()}


def test_bert_student_hidden_states_equal_teacher_layers_applied_by_hand():
    """Independent check: teacher embeddings, then teacher layers 1, 3, 5 called directly."""
    teacher = tiny_bert()
    student = init_student_from_teacher(teacher, layer_map=[1, 3, 5])
    ids = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        h = teacher.embeddings(input_ids=ids)
        for j in (1, 3, 5):
            h = teacher.encoder.layer[j](h)
        out = student(input_ids=ids).last_hidden_state
    torch.testing.assert_close(out, h, rtol=0, atol=1e-6)


@pytest.mark.parametrize("tied", [True, False])
def test_identity_layer_map_reproduces_llama_teacher_exactly(tied):
    teacher = tiny_llama(tied=tied)
    student = init_student_from_teacher(teacher, layer_map=range(6))
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0  # left padding in one row
    with torch.no_grad():
        expected = teacher(input_ids=ids, attention_mask=mask).logits
        actual = student(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(actual, expected)


@pytest.mark.parametrize("cls_name", ["BertModel", "BertForMaskedLM"])
def test_identity_layer_map_reproduces_bert_teacher_exactly(cls_name):
    teacher = tiny_bert(cls_name)
    student = init_student_from_teacher(teacher, layer_map=list(range(6)))
    ids = torch.randint(0, VOCAB, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    with torch.no_grad():
        t_out = teacher(input_ids=ids, attention_mask=mask)
        s_out = student(input_ids=ids, attention_mask=mask)
    for key in t_out:
        assert torch.equal(s_out[key], t_out[key]), key


def test_tied_embeddings_stay_tied_and_untied_stay_untied():
    tied = init_student_from_teacher(tiny_llama(tied=True), num_layers=2)
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    teacher = tiny_llama(tied=False)
    untied = init_student_from_teacher(teacher, num_layers=2)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight
    assert torch.equal(untied.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(untied.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    mlm = init_student_from_teacher(tiny_bert("BertForMaskedLM"), num_layers=3)
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight


def test_causal_student_decodes_with_kv_cache_like_a_full_forward():
    """Each student layer has its own layer_idx, so cached decoding matches a full pass."""
    student = init_student_from_teacher(tiny_llama(layers=6), layer_map=[4, 2, 0])
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1, 2]
    ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        full = student(input_ids=ids).logits
        prefix = student(input_ids=ids[:, :5], use_cache=True)
        step = student(input_ids=ids[:, 5:], past_key_values=prefix.past_key_values)
    torch.testing.assert_close(step.logits, full[:, 5:], rtol=1e-5, atol=1e-5)


def test_student_trains():
    student = init_student_from_teacher(tiny_llama(), num_layers=3).train()
    ids = torch.randint(0, VOCAB, (2, 8))
    loss = student(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in student.parameters())


def test_per_layer_config_lists_follow_the_layer_map():
    config = transformers.Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=4,
        max_window_layers=2,
    )
    teacher = transformers.Qwen2ForCausalLM(config).eval()
    assert teacher.config.layer_types[1:3] == ["full_attention", "sliding_attention"]
    student = init_student_from_teacher(teacher, layer_map=[3, 0])
    assert student.config.layer_types == ["sliding_attention", "full_attention"]
    ids = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        assert student(input_ids=ids).logits.shape == (1, 6, VOCAB)


def test_default_layer_map_is_one_layer_out_of_two():
    assert default_layer_map(6) == [0, 2, 4]
    assert default_layer_map(12) == [0, 2, 4, 6, 8, 10]
    assert default_layer_map(30, 10) == list(range(0, 30, 3))
    assert default_layer_map(6, 6) == list(range(6))
    assert default_layer_map(1) == [0]
    student = init_student_from_teacher(tiny_bert())
    assert student.config.num_hidden_layers == 3


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"layer_map": [0, 6]}, r"out of range.*6 layers.*0\.\.5"),
        ({"layer_map": [-1, 2]}, r"out of range"),
        ({"layer_map": [0, 2], "num_layers": 3}, r"2 entries but num_layers=3"),
        ({"layer_map": []}, r"empty"),
        ({"layer_map": [0, 1.0]}, r"must hold ints"),
        ({"num_layers": 7}, r"num_layers must be an int in 1\.\.6"),
        ({"num_layers": 0}, r"num_layers must be an int in 1\.\.6"),
    ],
)
def test_bad_layer_map_errors_name_the_problem(kwargs, match):
    with pytest.raises(ValueError, match=match):
        init_student_from_teacher(tiny_bert(), **kwargs)


def test_unsupported_architecture_names_the_supported_ones():
    gpt2 = transformers.GPT2Model(
        transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2)
    )
    with pytest.raises(TypeError, match=r"GPT2Model.*encoder\.layer.*BERT.*layers.*Llama"):
        init_student_from_teacher(gpt2)
    with pytest.raises(TypeError, match=r"Linear has no `config.num_hidden_layers`"):
        init_student_from_teacher(torch.nn.Linear(2, 2))
