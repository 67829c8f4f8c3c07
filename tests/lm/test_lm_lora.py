"""Specification tests for LoRA students, their saved forms and gradient checkpointing
(`kdistill.lm.lora`)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from kdistill.config import ConfigError  # noqa: E402
from kdistill.lm.lora import (  # noqa: E402
    LoRAConfig,
    apply_lora,
    enable_gradient_checkpointing,
    is_lora,
    lora_target_names,
    peft_layer_name,
    save_student,
    trainable_parameter_count,
)

VOCAB, HIDDEN, HEADS, KV_HEADS, LAYERS = 40, 16, 4, 2, 2


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, tie: bool = False):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=32,
        tie_word_embeddings=tie,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return transformers.LlamaForCausalLM(config).to(dtype).eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def train_adapters(model) -> None:
    """Give every B matrix values, as training would (B = 0 at the start)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.2)


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"r": 0}, r"student\.lora\.r: the rank must be an integer >= 1, got 0"),
        ({"r": 2.5}, r"student\.lora\.r: .* got 2\.5"),
        ({"alpha": 0}, r"student\.lora\.alpha: must be > 0"),
        ({"dropout": 1.0}, r"student\.lora\.dropout: must be in \[0, 1\)"),
        ({"target_modules": []}, r"student\.lora\.target_modules: must be a non-empty list"),
        ({"target_modules": "q_proj"}, r"target_modules: a list of layer names .* got the string"),
    ],
)
def test_lora_config_names_the_bad_key(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        LoRAConfig(**kwargs)


def test_unknown_target_module_lists_the_available_layers() -> None:
    model = tiny_llama()
    with pytest.raises(ConfigError) as err:
        apply_lora(model, LoRAConfig(target_modules=["q_proj", "query"]))
    message = str(err.value)
    assert "has no layer named 'query'" in message
    names = "down_proj, embed_tokens, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj"
    assert f"layers LoRA can adapt: {names}" in message
    assert lora_target_names(model) == names.split(", ")
    with pytest.raises(ConfigError, match=r"'model\.norm' is a LlamaRMSNorm, not a linear"):
        apply_lora(model, LoRAConfig(target_modules=["norm"]))


# --------------------------------------------------------------------------- applying


def test_trainable_parameters_are_the_lora_matrices_r_times_in_plus_out() -> None:
    r = 4
    model = apply_lora(tiny_llama(), LoRAConfig(r=r, alpha=8, target_modules=["q_proj", "v_proj"]))
    head_dim = HIDDEN // HEADS
    q = r * (HIDDEN + HEADS * head_dim)  # A (r, 16) + B (16, r) = 128
    v = r * (HIDDEN + KV_HEADS * head_dim)  # A (r, 16) + B (8, r) = 96
    assert trainable_parameter_count(model) == LAYERS * (q + v) == 448
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == LAYERS * 2 * 2 and all("lora_" in n for n in trainable)
    # all-linear adapts every projection but not the output head
    everything = apply_lora(tiny_llama(), LoRAConfig(r=r))
    names = {
        n.split(".lora_")[0].rsplit(".", 1)[-1]
        for n, p in everything.named_parameters()
        if p.requires_grad
    }
    assert names == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def test_a_fresh_lora_student_computes_its_base_and_training_moves_only_adapters() -> None:
    inputs = batch()
    base = logits(tiny_llama(), inputs)
    model = apply_lora(tiny_llama(), LoRAConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert is_lora(model)
    assert torch.equal(logits(model, inputs), base)  # B = 0
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    model.train()
    model(**inputs).logits.logsumexp(-1).mean().backward()
    optimizer.step()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(logits(model.eval(), inputs), base)
    with pytest.raises(ConfigError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig())


def test_merged_update_is_w0_plus_alpha_over_r_times_ba() -> None:
    model = apply_lora(tiny_llama(), LoRAConfig(r=2, alpha=6, target_modules=["q_proj"]))
    train_adapters(model)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    expected = (
        layer.base_layer.weight
        + (6 / 2) * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    )
    from kdistill.lm.lora import merged_copy

    merged = merged_copy(model)
    assert torch.allclose(merged.model.layers[0].self_attn.q_proj.weight, expected, atol=1e-6)
    assert is_lora(model)  # the student itself is untouched


def test_peft_layer_name_prefixes_wrapped_models_only() -> None:
    plain = tiny_llama()
    assert peft_layer_name(plain, "model.layers.1") == "model.layers.1"
    wrapped = apply_lora(tiny_llama(), LoRAConfig(target_modules=["q_proj"]))
    name = peft_layer_name(wrapped, "model.layers.1")
    assert name == "base_model.model.model.layers.1" and name in dict(wrapped.named_modules())


# --------------------------------------------------------------------------- saving


@pytest.mark.parametrize("tie", [False, True])
def test_saved_lora_student_reloads_as_adapter_merged_folder_and_weights_file(
    tmp_path: Path, tie: bool
) -> None:
    inputs = batch()
    model = apply_lora(
        tiny_llama(tie=tie), LoRAConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])
    )
    train_adapters(model)
    expected = logits(model, inputs)
    saved = save_student(
        model, None, tmp_path / "student", weights_path=tmp_path / "student.safetensors"
    )
    assert saved.adapter == tmp_path / "student" / "adapter"
    assert is_lora(model) and torch.equal(logits(model, inputs), expected)  # untouched

    # 1. the merged folder: plain transformers, no LoRA key
    merged = transformers.AutoModelForCausalLM.from_pretrained(str(saved.merged)).eval()
    assert type(merged).__name__ == "LlamaForCausalLM"
    assert not any("lora" in k for k in merged.state_dict())
    assert torch.allclose(logits(merged, inputs), expected, atol=1e-5)

    # 2. the adapter on the base it records (written, since this base came from a config)
    adapter_config = json.loads((saved.adapter / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(saved.base.absolute())
    base = transformers.AutoModelForCausalLM.from_pretrained(
        adapter_config["base_model_name_or_path"]
    )
    reloaded = peft.PeftModel.from_pretrained(base, str(saved.adapter)).eval()
    assert torch.allclose(logits(reloaded, inputs), expected, atol=1e-6)
    auto = peft.AutoPeftModelForCausalLM.from_pretrained(str(saved.adapter)).eval()
    assert torch.allclose(logits(auto, inputs), expected, atol=1e-6)

    # 3. one safetensors file with Hugging Face key names
    state = load_file(str(saved.weights))
    fresh = tiny_llama(seed=7, tie=tie)
    fresh.load_state_dict(state)  # strict
    assert torch.allclose(logits(fresh, inputs), expected, atol=1e-5)


def test_adapter_of_a_student_loaded_from_a_folder_records_that_folder(tmp_path: Path) -> None:
    tiny_llama().save_pretrained(str(tmp_path / "pretrained"))
    student = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "pretrained"))
    model = apply_lora(student, LoRAConfig(r=2, target_modules=["v_proj"]))
    saved = save_student(model, None, tmp_path / "out")
    assert saved.base is None and saved.weights is None
    recorded = json.loads((saved.adapter / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "pretrained")


def test_plain_student_is_saved_without_adapter_with_its_tokenizer(tmp_path: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(
            tokenizers.models.WordLevel({"[UNK]": 0, "a": 1}, unk_token="[UNK]")
        ),
        unk_token="[UNK]",
    )
    model = tiny_llama()
    saved = save_student(model, tok, tmp_path / "s", weights_path=tmp_path / "w.safetensors")
    assert saved.adapter is None and saved.base is None
    assert (tmp_path / "s" / "tokenizer.json").is_file()
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "s"))
    assert torch.equal(logits(reloaded.eval(), batch()), logits(model, batch()))
    assert set(load_file(str(tmp_path / "w.safetensors"))) == set(model.state_dict())


# --------------------------------------------------------------------------- checkpointing


def _gradients(model, inputs) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad()
    out = model(**inputs).logits  # (B, T, V)
    (out.double().log_softmax(-1)[..., 3] * inputs["attention_mask"]).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _layer_calls(model) -> list[int]:
    """Count runs of a module inside the first checkpointed block (module hooks do not
    fire in the recomputation, so its ``forward`` is wrapped instead)."""
    calls = [0]
    mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
    forward = mlp.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    mlp.forward = counted
    return calls


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients_and_recomputes(lora: bool) -> None:
    inputs = batch()

    def build():
        model = tiny_llama(dtype=torch.float64)
        return (
            apply_lora(model, LoRAConfig(r=2, target_modules=["q_proj", "down_proj"]))
            if lora
            else model
        )

    plain, checkpointed = build(), build()
    if lora:
        train_adapters(plain)
        checkpointed.load_state_dict(plain.state_dict())
    enable_gradient_checkpointing(checkpointed)
    assert checkpointed.config.use_cache is False
    calls = _layer_calls(checkpointed)
    reference, got = _gradients(plain, inputs), _gradients(checkpointed, inputs)
    assert calls[0] == 2  # forward, then again in the backward pass
    assert reference.keys() == got.keys() and len(got) > 0
    for name, grad in reference.items():
        assert torch.allclose(got[name], grad, rtol=1e-10, atol=1e-12), name
    if lora:
        assert all("lora_" in n for n in got)


def test_gradient_checkpointing_of_a_plain_module_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"student\.gradient_checkpointing: the student \(Linear\)"
    ):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_lora_student_distils_in_the_distiller_on_masked_chat_labels() -> None:
    from kdistill.distiller import Distiller, LossTerm
    from kdistill.lm import TokenCrossEntropy, TokenKDLoss
    from kdistill.lm.batches import CausalLMCollator

    teacher = tiny_llama(seed=1)
    student = apply_lora(tiny_llama(seed=2), LoRAConfig(r=2, target_modules=["q_proj", "v_proj"]))
    layer = peft_layer_name(student, "model.layers.1")
    terms = [
        LossTerm("kd", TokenKDLoss(), weight=0.5),
        LossTerm("ce", TokenCrossEntropy(), weight=0.5, teacher=None),
        LossTerm("hidden", torch.nn.MSELoss(), weight=0.1, student=layer, teacher="model.layers.1"),
    ]
    distiller = Distiller(student, terms, teacher=teacher)
    trainable = list(distiller.trainable_parameters())
    assert (
        sum(p.numel() for p in trainable)
        == trainable_parameter_count(student)
        == LAYERS * 2 * ((16 + 16) + (16 + 8))
    )
    examples = [
        {"input_ids": [1, 5, 6, 7, 8, 9, 2], "loss_mask": [0, 0, 0, 1, 1, 1, 1]},
        {"input_ids": [1, 5, 6, 10, 2], "loss_mask": [0, 0, 0, 1, 1]},
    ]
    batch = CausalLMCollator(pad_token_id=0)(examples)
    before = {n: p.detach().clone() for n, p in student.named_parameters()}
    optimizer = torch.optim.SGD(trainable, lr=0.5)
    distiller.train()
    out = distiller(batch["inputs"], batch["target"])
    assert torch.isfinite(out["loss"]) and {"kd_loss", "ce_loss", "hidden_loss"} <= out.keys()
    out["loss"].backward()
    optimizer.step()
    moved = {n for n, p in student.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
