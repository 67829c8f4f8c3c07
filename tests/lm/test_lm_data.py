"""Specification tests for LM data files, record shapes and assistant-only labels
(`kdistill.lm.data`, and the ``loss_mask`` of `kdistill.lm.batches.CausalLMCollator`)."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from kdistill.config import ConfigError  # noqa: E402
from kdistill.lm import TokenKDLoss, token_cross_entropy  # noqa: E402
from kdistill.lm.batches import (  # noqa: E402
    IGNORE_INDEX,
    ByteTokenizer,
    CausalLMCollator,
    causal_lm_labels,
)
from kdistill.lm.data import (  # noqa: E402
    chat_example,
    detect_format,
    load_records,
    read_text_file,
    tokenize_records,
)

EXAMPLE_CHAT = Path(__file__).resolve().parents[2] / "examples" / "lm" / "chat.jsonl"

WORDS = [
    "[UNK]",
    "<pad>",
    "<s>",
    "</s>",
    "<|im_start|>",
    "<|im_end|>",
    "system",
    "user",
    "assistant",
    "be",
    "brief",
    "how",
    "are",
    "you",
    "fine",
    "thanks",
    "and",
    "good",
    "hello",
    "hi",
    "there",
]

CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATML_GENERATION = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>{% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CHAT = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "how are you"},
    {"role": "assistant", "content": "fine thanks"},
    {"role": "user", "content": "and you"},
    {"role": "assistant", "content": "good"},
]
# CHAT through CHATML and the word-level tokenizer ("\n" is whitespace, so no token):
CHAT_TOKENS = [
    "<s>",
    "<|im_start|>",
    "system",
    "be",
    "brief",
    "<|im_end|>",
    "<|im_start|>",
    "user",
    "how",
    "are",
    "you",
    "<|im_end|>",
    "<|im_start|>",
    "assistant",
    "fine",
    "thanks",
    "<|im_end|>",
    "<|im_start|>",
    "user",
    "and",
    "you",
    "<|im_end|>",
    "<|im_start|>",
    "assistant",
    "good",
    "<|im_end|>",
]
ASSISTANT_POSITIONS = (14, 15, 16, 24, 25)  # fine thanks <|im_end|>, good <|im_end|>

RECORDS = {
    "text": [{"text": "hello there"}, {"text": "how are you"}, {"text": "fine, 007"}],
    "prompt_completion": [
        {"prompt": "Q: 2+2?\n", "completion": "4"},
        {"prompt": "Say hi: ", "completion": "hi there"},
    ],
    "messages": [
        {"messages": CHAT},
        {
            "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"},
            ]
        },
    ],
}


def word_tokenizer(template: str | None = CHATML):
    vocab = {w: i for i, w in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    tok.chat_template = template
    return tok


def write(path: Path, records: list[dict], fmt: str) -> Path:
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    elif fmt == "csv":
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
    elif fmt == "parquet":
        datasets.Dataset.from_list(records).to_parquet(str(path))
    elif fmt == "hf_disk":
        datasets.Dataset.from_list(records).save_to_disk(str(path))
    return path


def load(path: Path, tmp_path: Path, **kwargs):
    return load_records(path, cache_dir=tmp_path / "hf_cache", **kwargs)


SUFFIX = {"jsonl": ".jsonl", "json": ".json", "csv": ".csv", "parquet": ".parquet", "hf_disk": ""}


@pytest.mark.parametrize(
    ("shape", "fmt"),
    [
        (shape, fmt)
        for shape in RECORDS
        for fmt in SUFFIX
        if not (shape == "messages" and fmt == "csv")  # a CSV cell cannot hold a list
    ],
)
def test_every_format_loads_the_same_records(tmp_path: Path, shape: str, fmt: str) -> None:
    path = write(tmp_path / f"data{SUFFIX[fmt]}", RECORDS[shape], fmt)
    data = load(path, tmp_path)
    assert detect_format(path) == fmt
    assert data.shape == shape
    assert data.records == RECORDS[shape]
    assert data.fingerprint.records == len(RECORDS[shape])
    assert data.fingerprint.format == fmt


def test_text_file_lines_and_paragraphs(tmp_path: Path) -> None:
    path = tmp_path / "corpus.txt"
    path.write_text("hello there\n\n  how are\nyou  \n", encoding="utf-8")
    assert load(path, tmp_path).records == [
        {"text": "hello there"},
        {"text": "how are"},
        {"text": "you"},
    ]
    paragraphs = load(path, tmp_path, split="paragraphs").records
    assert paragraphs == [{"text": "hello there"}, {"text": "how are you"}]


def test_fingerprint_names_path_size_sha256_and_record_count(tmp_path: Path) -> None:
    path = write(tmp_path / "pairs.jsonl", RECORDS["prompt_completion"], "jsonl")
    fp = load(path, tmp_path).fingerprint
    raw = path.read_bytes()
    assert fp.path == str(path)
    assert fp.bytes == fp.hashed_bytes == len(raw)
    assert fp.sha256 == hashlib.sha256(raw).hexdigest()  # == `sha256sum pairs.jsonl`
    assert fp.records == 2 and fp.shape == "prompt_completion"
    assert fp.files == [{"path": "pairs.jsonl", "bytes": len(raw)}]
    limited = load(path, tmp_path, hash_limit_mb=10 / (1 << 20)).fingerprint  # first 10 bytes
    assert limited.hashed_bytes == 10
    assert limited.sha256 == hashlib.sha256(raw[:10]).hexdigest()
    json.dumps(fp.to_dict())  # goes into summary.json as is


def test_folder_of_shards_is_read_in_order_and_an_error_names_the_shard(tmp_path: Path) -> None:
    folder = tmp_path / "shards"
    folder.mkdir()
    write(folder / "part-0.jsonl", RECORDS["text"][:2], "jsonl")
    write(folder / "part-1.jsonl", RECORDS["text"][2:], "jsonl")
    data = load(folder, tmp_path)
    assert data.records == RECORDS["text"]
    assert [f["path"] for f in data.fingerprint.files] == ["part-0.jsonl", "part-1.jsonl"]
    (folder / "part-1.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"part-1\.jsonl: line 2: the record has no 'text'"):
        load(folder, tmp_path)


def test_hf_disk_dataset_dict_takes_train_or_the_named_split(tmp_path: Path) -> None:
    train = datasets.Dataset.from_list(RECORDS["text"])
    test = datasets.Dataset.from_list(RECORDS["text"][:1])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    assert load(tmp_path / "dd", tmp_path).records == RECORDS["text"]
    assert len(load(tmp_path / "dd", tmp_path, hf_split="test")) == 1
    with pytest.raises(ConfigError, match=r"data\.hf_split: .*splits \['train', 'test'\]"):
        load(tmp_path / "dd", tmp_path, hf_split="validation")


# --------------------------------------------------------------------------- bad data


def test_wrong_shape_in_jsonl_names_file_and_line_counting_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    lines = [
        {"prompt": "a", "completion": "b"},
        None,  # a blank line
        {"prompt": "c", "completion": "d"},
        {"prompt": "e", "answer": "f"},
    ]
    path.write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ConfigError) as err:
        load(path, tmp_path)
    message = str(err.value)
    assert f"{path}: line 4: the record has no 'completion'" in message
    assert '{"prompt": str, "completion": str}' in message and '{"messages"' in message


def test_unknown_shape_of_the_first_record_lists_the_expected_shapes(tmp_path: Path) -> None:
    path = write(
        tmp_path / "chats.jsonl", [{"conversations": [{"from": "human", "value": "x"}]}], "jsonl"
    )
    with pytest.raises(
        ConfigError, match=r"line 1: .*\['conversations'\].*rename \"conversations\""
    ):
        load(path, tmp_path)


@pytest.mark.parametrize(
    ("fmt", "where"),
    [
        ("json", "record 3 of the JSON array"),
        ("csv", "row 3 after the header"),
        ("parquet", "row 2 (0-based)"),
        ("hf_disk", "row 2 (0-based)"),
    ],
)
def test_wrong_shape_in_other_formats_names_the_record_or_row(
    tmp_path: Path, fmt: str, where: str
) -> None:
    records = [{"text": "a", "note": "x"}, {"text": "b", "note": "y"}, {"text": None, "note": "z"}]
    path = write(tmp_path / f"data{SUFFIX[fmt]}", records, fmt)
    if fmt == "csv":  # a CSV row always has every column: a shape error is a wrong header
        path.write_text("note\nx\ny\n", encoding="utf-8")
        where = "row 1 after the header"
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {where}: the record has no 'text'")):
        load(path, tmp_path, shape="text")


def test_a_value_of_the_wrong_type_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": 5}\n')
    with pytest.raises(
        ConfigError, match=r"pairs\.jsonl: line 2: 'completion' is a int, not a string"
    ):
        load(path, tmp_path)


def test_invalid_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "a"}\n{"text": "b",}\n{"text": "c"}\n')
    with pytest.raises(ConfigError, match=r"broken\.jsonl: line 2: invalid JSON"):
        load(path, tmp_path)


def test_chat_without_an_assistant_turn_or_content_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}], "jsonl")
    with pytest.raises(ConfigError, match=r"line 1: no assistant turn \(roles \['user'\]\)"):
        load(path, tmp_path)
    bad = [{"messages": CHAT}, {"messages": [{"role": "assistant"}]}]
    path = write(tmp_path / "d.jsonl", bad, "jsonl")
    with pytest.raises(
        ConfigError, match=r"d\.jsonl: line 2: message 0 \(assistant\) has no string 'content'"
    ):
        load(path, tmp_path)


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_text_file_whose_lines_are_json_suggests_format_jsonl(tmp_path: Path, suffix: str) -> None:
    path = write(tmp_path / "pairs.jsonl", RECORDS["prompt_completion"], "jsonl").rename(
        tmp_path / f"pairs{suffix}"
    )
    with pytest.raises(
        ConfigError, match=r"2 of the first 2 lines are JSON records; set data\.format: jsonl"
    ):
        load(path, tmp_path)
    with pytest.raises(ConfigError, match=r"data\.format: jsonl"):
        read_text_file(path)
    array = tmp_path / "array.txt"
    array.write_text(json.dumps(RECORDS["text"], indent=2))
    with pytest.raises(ConfigError, match=r"one JSON array; set data\.format: json"):
        load(array, tmp_path, format="text")


@pytest.mark.parametrize("fmt", ["text", "jsonl", "csv"])
def test_invalid_utf8_names_the_file_and_byte_offset(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"data{SUFFIX.get(fmt, '.txt')}"
    head = {"text": b"hello\n", "jsonl": b'{"text": "hello"}\n', "csv": b"text\nhello\n"}[fmt]
    path.write_bytes(head + b"caf\xe9\n")  # latin-1 é
    offset, line = len(head) + 3, head.count(b"\n") + 1
    with pytest.raises(
        ConfigError,
        match=rf"data{path.suffix}: invalid UTF-8 at byte offset {offset} \(line {line}, byte 0xe9",
    ):
        load(path, tmp_path, format=fmt)


def test_invalid_utf8_offset_is_exact_across_a_read_chunk_border(tmp_path: Path) -> None:
    path = tmp_path / "big.txt"
    first = b"a" * ((1 << 20) - 1) + "é".encode()  # the 2-byte é straddles the 1 MiB border
    path.write_bytes(first + b"\xff")
    with pytest.raises(ConfigError, match=rf"byte offset {len(first)} \(line 1, byte 0xff"):
        load(path, tmp_path)


def test_missing_file_and_compressed_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.file: .*nope\.jsonl does not exist"):
        load(tmp_path / "nope.jsonl", tmp_path)
    (tmp_path / "d.jsonl.gz").write_bytes(b"\x1f\x8b")
    with pytest.raises(ConfigError, match=r"compressed \(\.gz\); decompress it first"):
        load(tmp_path / "d.jsonl.gz", tmp_path)


# --------------------------------------------------------------------------- labels


def test_prompt_completion_labels_mask_the_prompt_exactly(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    data = load(
        write(tmp_path / "p.jsonl", [{"prompt": "Q?", "completion": "A"}], "jsonl"), tmp_path
    )
    (example,) = tokenize_records(data, tok).examples
    q, mark, a = b"Q?A"
    assert example == {
        "input_ids": [tok.bos_token_id, q, mark, a, tok.eos_token_id],
        "prompt_length": 3,
    }
    labels = CausalLMCollator(tok.pad_token_id)([example])["target"][0].tolist()
    assert labels == [IGNORE_INDEX, IGNORE_INDEX, a, tok.eos_token_id, IGNORE_INDEX]


@pytest.mark.parametrize(
    ("template", "method"),
    [
        (CHATML, "incremental"),
        (CHATML, "auto"),
        (CHATML_GENERATION, "generation"),
        (CHATML_GENERATION, "auto"),
    ],
)
def test_multi_turn_chat_labels_only_assistant_tokens(template: str, method: str) -> None:
    tok = word_tokenizer(template)
    example = chat_example(CHAT, tok, method)
    assert tok.convert_ids_to_tokens(example["input_ids"]) == CHAT_TOKENS
    assert [t for t, m in enumerate(example["loss_mask"]) if m] == list(ASSISTANT_POSITIONS)
    labels = CausalLMCollator(tok.pad_token_id)([example])["target"][0].tolist()
    # labels[t] is the token at t + 1: "fine" is predicted at "assistant" (13), and so on.
    expected = [IGNORE_INDEX] * len(CHAT_TOKENS)
    for t in ASSISTANT_POSITIONS:
        expected[t - 1] = tok.convert_tokens_to_ids(CHAT_TOKENS[t])
    assert labels == expected
    named = [tok.convert_ids_to_tokens(x) for x in labels if x != IGNORE_INDEX]
    assert named == ["fine", "thanks", "<|im_end|>", "good", "<|im_end|>"]


def test_generation_markers_and_incremental_rendering_agree_on_every_record(tmp_path: Path) -> None:
    data = load(write(tmp_path / "c.jsonl", RECORDS["messages"], "jsonl"), tmp_path)
    plain = tokenize_records(data, word_tokenizer(CHATML), chat_mask="incremental").examples
    marked = tokenize_records(
        data, word_tokenizer(CHATML_GENERATION), chat_mask="generation"
    ).examples
    assert plain == marked


def test_generation_method_without_markers_is_an_error() -> None:
    with pytest.raises(
        ConfigError, match=r"generation needs a chat template with \{% generation %\}"
    ):
        chat_example(CHAT, word_tokenizer(CHATML), "generation")


def test_template_that_rewrites_earlier_turns_is_an_error_naming_the_fix() -> None:
    # Like templates that drop past reasoning: the last assistant turn renders differently.
    rewriting = CHATML.replace(
        "{{ m['content'] }}", "{{ m['content'] }}{% if loop.last %} there{% endif %}"
    )
    with pytest.raises(ConfigError, match=r"assistant turn 2 .*\{% generation %\} markers"):
        chat_example(CHAT, word_tokenizer(rewriting), "incremental")


def test_hf_tokenizer_without_chat_template_is_an_error(tmp_path: Path) -> None:
    data = load(write(tmp_path / "c.jsonl", RECORDS["messages"], "jsonl"), tmp_path)
    with pytest.raises(ConfigError, match=r"c\.jsonl: line 1: .*has no chat template"):
        tokenize_records(data, word_tokenizer(None))


def test_byte_tokenizer_renders_chatml_bytes_and_targets_assistant_turns() -> None:
    tok = ByteTokenizer()
    example = chat_example(CHAT, tok)
    ids, mask = example["input_ids"], example["loss_mask"]
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    text = bytes(i for i in ids[1:-1]).decode()
    assert text == "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in CHAT)
    targets = bytes(i for i, m in zip(ids[:-1], mask[:-1], strict=True) if m).decode()
    assert targets == "fine thanks<|im_end|>\ngood<|im_end|>\n"
    assert mask[-1] == 1  # the final eos closes the last assistant turn


def test_loss_and_kd_term_count_assistant_tokens_only() -> None:
    tok = word_tokenizer()
    batch = CausalLMCollator(tok.pad_token_id)(
        [chat_example(CHAT, tok), chat_example(CHAT[:3], tok)]
    )
    labels, mask = batch["target"], batch["inputs"]["attention_mask"]  # (2, 26)
    vocab = len(tok)
    student = torch.randn(*labels.shape, vocab, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(*labels.shape, vocab, dtype=torch.float64)
    loss = token_cross_entropy(student, labels) + TokenKDLoss()(student, teacher, labels, mask)
    loss.backward()
    counted = (student.grad.abs().sum(-1) > 0).nonzero().tolist()
    first = [[0, t - 1] for t in ASSISTANT_POSITIONS]
    second = [[1, t - 1] for t in ASSISTANT_POSITIONS[:3]]
    assert counted == first + second
    # the cross-entropy is the mean over exactly those positions (hand-written formula)
    logp = torch.log_softmax(student.detach(), -1)
    nll = [-logp[b, t, labels[b, t]] for b, t in first + second]
    assert torch.allclose(token_cross_entropy(student.detach(), labels), torch.stack(nll).mean())


def test_collator_loss_mask_combines_with_prompt_length_and_truncation() -> None:
    examples = [
        {"input_ids": [5, 6, 7, 8, 9], "loss_mask": [0, 1, 0, 1, 1], "prompt_length": 2},
        {"input_ids": [5, 6, 7]},  # no loss_mask: every token counts
    ]
    batch = CausalLMCollator(pad_token_id=0, max_length=4)(examples)
    assert batch["inputs"]["input_ids"].tolist() == [[5, 6, 7, 8], [5, 6, 7, 0]]
    assert batch["target"].tolist() == [[-100, -100, 8, -100], [6, 7, -100, -100]]
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"loss_mask .* must have the shape of input_ids"):
        causal_lm_labels(ids, torch.ones_like(ids), loss_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="example 0: loss_mask must be 3 values 0/1"):
        CausalLMCollator(0)([{"input_ids": [1, 2, 3], "loss_mask": [1, 1]}])


def test_truncation_drops_examples_left_without_targets_and_counts_them(tmp_path: Path) -> None:
    records = [{"prompt": "a long prompt", "completion": "x"}, {"prompt": "q", "completion": "yes"}]
    data = load(write(tmp_path / "p.jsonl", records, "jsonl"), tmp_path)
    result = tokenize_records(data, ByteTokenizer(), max_length=6)
    assert result.stats == {
        "records": 2,
        "examples": 1,
        "truncated": 1,
        "dropped_short": 0,
        "dropped_no_target": 1,
        "target_tokens": 4,  # bos q | y e s eos: 6 ids, not cut
    }
    assert result.examples == [{"input_ids": [257, *b"qyes", 258], "prompt_length": 2}]


def test_distilbert_objective_rejects_non_text_records(tmp_path: Path) -> None:
    data = load(write(tmp_path / "p.jsonl", RECORDS["prompt_completion"], "jsonl"), tmp_path)
    with pytest.raises(
        ConfigError, match=r"masked-LM objective .* holds prompt_completion records"
    ):
        tokenize_records(data, ByteTokenizer(), causal=False)


def test_the_example_chat_file_loads_with_targets_in_every_record(tmp_path: Path) -> None:
    data = load(EXAMPLE_CHAT, tmp_path)
    assert data.shape == "messages" and len(data) == 12
    assert any(sum(m["role"] == "assistant" for m in r["messages"]) > 1 for r in data.records)
    result = tokenize_records(data, ByteTokenizer())
    assert result.stats["examples"] == 12
    for record, example in zip(data.records, result.examples, strict=True):
        ids, mask = example["input_ids"], example["loss_mask"]
        said = bytes(i for i, m in zip(ids, mask, strict=True) if m and i < 256).decode()
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert said == "".join(f"{a}<|im_end|>\n" for a in answers)
