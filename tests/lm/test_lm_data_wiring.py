"""`kdistill lm` on record files: data keys, paths relative to the config, chat masking in
the run's batches, LoRA + gradient-checkpointed students and what the run folder holds
(`kdistill.lm.config`, `kdistill.lm.train`)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")
peft = pytest.importorskip("peft")
pytest.importorskip("datasets")

from kdistill.checkpoint import load_weights  # noqa: E402
from kdistill.cli import main  # noqa: E402
from kdistill.config import ConfigError  # noqa: E402
from kdistill.distiller import IGNORE_INDEX  # noqa: E402
from kdistill.lm.config import lm_config_from_dict, load_lm_config  # noqa: E402
from kdistill.lm.train import build_lm_run  # noqa: E402

WORDS = [
    "[UNK]", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "system", "user",
    "assistant", "be", "brief", "how", "are", "you", "fine", "thanks", "and", "good",
    "hello", "hi", "there", "what", "is", "two", "plus", "four", "say", "yes", "no",
]  # fmt: skip
CHATML = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CHATS = [
    [("system", "be brief"), ("user", "how are you"), ("assistant", "fine thanks")],
    [("user", "hello"), ("assistant", "hi there"), ("user", "and you"), ("assistant", "good")],
    [("system", "be brief"), ("user", "what is two plus two"), ("assistant", "four")],
    [("user", "say yes"), ("assistant", "yes")],
    [("user", "say no"), ("assistant", "no thanks")],
    [("system", "be brief"), ("user", "hi"), ("assistant", "hello there")],
    [("user", "are you good"), ("assistant", "yes thanks"), ("user", "and"), ("assistant", "fine")],
    [("user", "what is four"), ("assistant", "two plus two")],
]
LORA = {"r": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]}
HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 16, 4, 2, 4


def word_tokenizer():
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
    tok.chat_template = CHATML
    return tok


def tiny_llama(layers: int, seed: int):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    return transformers.LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A config folder: chat.jsonl, a tokenizer folder with a chat template, a local HF
    teacher and a local HF student base, and a YAML naming them by relative paths."""
    root = tmp_path_factory.mktemp("project")
    lines = [
        json.dumps({"messages": [{"role": r, "content": c} for r, c in chat], "id": i})
        for i, chat in enumerate(CHATS)
    ]
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    word_tokenizer().save_pretrained(str(root / "tok"))
    tiny_llama(2, seed=1).save_pretrained(str(root / "teacher"))
    tiny_llama(1, seed=2).save_pretrained(str(root / "student_base"))
    config = {
        "seed": 0,
        "data": {
            "file": "chat.jsonl",
            "tokenizer": "tok",
            "max_length": 40,
            "batch_size": 2,
            "eval_batch_size": 4,
            "eval_fraction": 0.25,
            "min_tokens": 2,
        },
        "teacher": {"path": "teacher"},
        "student": {"path": "student_base", "lora": LORA, "gradient_checkpointing": True},
        "distill": {"objective": "token_kd", "divergence": "forward_kl", "alpha": 0.5},
        "optim": {"name": "adamw", "lr": 0.05, "weight_decay": 0.0, "schedule": "constant"},
        "train": {"epochs": 2, "threads": 1, "progress": False, "accumulate_steps": 2},
    }
    (root / "run.yaml").write_text(json.dumps(config), encoding="utf-8")  # JSON is YAML
    return root


def assistant_targets(tokens: list[str]) -> set[int]:
    """Positions of the tokens of every assistant turn (its content and closing
    <|im_end|>), read off the rendered tokens: a slow reference for the loss mask."""
    out, inside = set(), False
    for t, token in enumerate(tokens):
        if inside:
            out.add(t)
            inside = token != "<|im_end|>"
        elif token == "assistant" and t > 0 and tokens[t - 1] == "<|im_start|>":
            inside = True
    return out


def test_chat_batches_carry_loss_on_assistant_tokens_only(project: Path, monkeypatch) -> None:
    monkeypatch.chdir(project.parent)  # paths in the YAML resolve against its folder
    cfg = load_lm_config(project / "run.yaml", ["output_dir=unused"])
    run = build_lm_run(cfg)
    tok = word_tokenizer()
    rows = 0
    for batch in run.train_loader:
        ids, mask = batch["inputs"]["input_ids"], batch["inputs"]["attention_mask"]
        labels = batch["target"]  # (B, T): labels[t - 1] is the target token t
        for row in range(ids.shape[0]):
            n = int(mask[row].sum())
            tokens = tok.convert_ids_to_tokens(ids[row, :n].tolist())
            targets = assistant_targets(tokens)
            assert targets and "user" in tokens
            expected = [int(ids[row, t]) if t in targets else IGNORE_INDEX for t in range(1, n)]
            expected += [IGNORE_INDEX] * (ids.shape[1] - n + 1)  # the last predicts nothing
            assert labels[row].tolist() == expected
            rows += 1
    assert rows == run.info["data"]["train_examples"] == 6
    base = run.student.get_base_model()
    flag = "is_activation_checkpointing"  # transformers >= 5.x; before: is_gradient_...
    assert getattr(base, flag if hasattr(type(base), flag) else "is_gradient_checkpointing")
    assert not base.config.use_cache


def test_lora_chat_run_trains_adapters_only_and_saves_every_form(
    project: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    monkeypatch.chdir(tmp_path)  # not the config's folder
    out = tmp_path / "run"
    assert main(["lm", str(project / "run.yaml"), "--set", f"output_dir={out}"]) == 0
    capsys.readouterr()
    summary = json.loads((out / "summary.json").read_text())

    # the data actually used: the config-relative chat.jsonl, fingerprinted
    data = summary["data"]
    raw = (project / "chat.jsonl").read_bytes()
    assert data["path"] == str(project / "chat.jsonl")
    assert data["sha256"] == hashlib.sha256(raw).hexdigest() and data["bytes"] == len(raw)
    assert (data["format"], data["shape"], data["records"]) == ("jsonl", "messages", 8)
    assert data["train_examples"] + data["eval_examples"] == data["examples"] == 8
    assert summary["config"]["data"]["file"] == str(project / "chat.jsonl")

    # trainable: r · (in + out) per adapted layer (q: 16 -> 16, v: 16 -> 8), one layer
    lora_numbers = LORA["r"] * ((HIDDEN + HEADS * HEAD_DIM) + (HIDDEN + KV_HEADS * HEAD_DIM))
    assert summary["student"]["trainable_parameters"] == lora_numbers
    assert summary["student"]["lora"]["r"] == 2

    # only the adapters moved: the checkpointed base weights are the student_base's
    base = transformers.AutoModelForCausalLM.from_pretrained(project / "student_base")
    ckpt = load_weights(out / "checkpoints" / "epoch-0002" / "model.safetensors")
    prefix = "student.base_model.model."
    moved = 0
    for key, value in ckpt.items():
        name = key.removeprefix(prefix).replace(".base_layer", "")
        if "lora_" in key:
            moved += int("lora_B" in key and bool(value.abs().sum() > 0))  # B starts at 0
        else:
            assert torch.equal(value, base.state_dict()[name]), key
    assert moved == 2  # q_proj and v_proj of the one layer

    # merged folder == adapter on its base == student.safetensors; and not the base
    merged = transformers.AutoModelForCausalLM.from_pretrained(out / "student").eval()
    adapter_cfg = json.loads((out / "student" / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str(project / "student_base")
    adapted = peft.PeftModel.from_pretrained(base, str(out / "student" / "adapter")).eval()
    plain = transformers.AutoModelForCausalLM.from_pretrained(project / "student_base").eval()
    ids = torch.tensor([[2, 4, 7, 11, 12, 13, 5, 4, 8, 14, 15, 5]])
    with torch.no_grad():
        a, b, c = merged(ids).logits, adapted(ids).logits, plain(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert (a - c).abs().max() > 1e-3
    merged.load_state_dict(load_weights(out / "student.safetensors"))  # HF key names
    assert transformers.AutoTokenizer.from_pretrained(out / "student").chat_template == CHATML


def test_jsonl_given_as_text_file_is_an_error_naming_data_format(
    project: Path, tmp_path: Path, capsys
) -> None:
    args = ["lm", str(project / "run.yaml"), "--set", f"output_dir={tmp_path / 'run'}"]
    args += ["--set", "data.file=null", "--set", f"data.text_file={project / 'chat.jsonl'}"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 2
    assert "data.text_file" in err and "data.format: jsonl" in err and "data.file" in err
    assert not (tmp_path / "run" / "summary.json").exists()


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, monkeypatch) -> None:
    folder = tmp_path / "configs"
    folder.mkdir()
    (folder / "c.yaml").write_text(
        "output_dir: runs/x\n"
        "data: {file: data/chat.jsonl, tokenizer: byte}\n"
        "teacher: {path: ../models/teacher, tokenizer: /abs/tok}\n"
        "student: {init_from_teacher: true}\n"
        "distill: {cache_dir: cache/kd}\n"
    )
    monkeypatch.chdir(tmp_path)
    cfg = load_lm_config(folder / "c.yaml")
    assert cfg.data.file == str(folder / "data" / "chat.jsonl")
    assert cfg.teacher is not None and cfg.teacher.path == str(folder / "../models/teacher")
    assert cfg.teacher.tokenizer == "/abs/tok" and cfg.data.tokenizer == "byte"
    assert cfg.output_dir == "runs/x" and cfg.distill.cache_dir == "cache/kd"  # where it writes
    # --set values come from the command line: relative to the working directory
    cfg = load_lm_config(folder / "c.yaml", ["data.file=mine.jsonl"])
    assert cfg.data.file == "mine.jsonl"


def test_text_file_runs_record_the_data_they_used() -> None:
    text = Path(__file__).parents[2] / "examples" / "lm" / "tiny.txt"
    cfg = load_lm_config(
        text.parent / "tiny_token_kd.yaml", ["data.max_examples=12", "output_dir=unused"]
    )
    data = build_lm_run(cfg).info["data"]
    assert data["path"] == str(text) and data["format"] == "text"
    assert data["sha256"] == hashlib.sha256(text.read_bytes()).hexdigest()
    assert data["records"] == len([x for x in text.read_text().splitlines() if x.strip()])
    assert data["records_used"] == 12 == data["train_examples"] + data["eval_examples"]


def _pairs_config(tmp_path: Path, objective: str, records: list[dict], **data) -> dict:
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return {
        "data": {"file": str(path), "tokenizer": "byte", "max_length": 64, "batch_size": 2,
                 "min_tokens": 2, "eval_fraction": 0.25, "prompt_tokens": 3, **data},
        "teacher": {"config": {"hidden_size": 16, "intermediate_size": 32,
                               "num_hidden_layers": 1, "num_attention_heads": 2}},
        "student": {"init_from_teacher": True},
        "distill": {"objective": objective},
        "output_dir": str(tmp_path / "run"),
    }  # fmt: skip


def test_gkd_continues_each_prompt_completion_record_after_its_own_prompt(
    tmp_path: Path,
) -> None:
    records = [{"prompt": f"Q{i}: {'x' * i}?\n", "completion": f"A{i}"} for i in range(1, 9)]
    run = build_lm_run(lm_config_from_dict(_pairs_config(tmp_path, "gkd", records)))
    examples = run.train_loader.examples.examples  # OnPolicyLoader -> ExampleLoader
    assert len(examples) == run.info["data"]["train_examples"] == 6
    byte_prompts = {len(r["prompt"].encode()) + 1 for r in records}  # + bos
    for x in examples:
        assert x["prompt_length"] in byte_prompts != {3}  # not data.prompt_tokens
        prompt = bytes(i for i in x["input_ids"][1 : x["prompt_length"]]).decode()
        assert prompt.startswith("Q") and prompt.endswith("?\n")


def test_objectives_that_continue_prompts_refuse_chat_records(tmp_path: Path) -> None:
    chat = [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    ]
    with pytest.raises(
        ConfigError, match=r"data\.file: holds chat messages records; objective gkd"
    ):
        build_lm_run(lm_config_from_dict(_pairs_config(tmp_path, "gkd", chat * 8)))
    with pytest.raises(ConfigError, match=r"data\.shape: objective seqkd"):
        lm_config_from_dict(_pairs_config(tmp_path, "seqkd", chat, shape="messages"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"teacher": {"config": {"hidden_size": 8}, "lora": {"r": 2}}}, "teacher.lora: the teacher is frozen"),
        ({"student": {"init_from_teacher": True, "lora": {"r": 0}}}, "student.lora.r: the rank"),
        ({"student": {"init_from_teacher": True, "lora": {"target_modules": "q_proj"}}},
         "student.lora.target_modules: a list of layer names"),
        ({"data": {"text_file": "a.txt", "format": "jsonl"}},
         "data.format: applies to data.file only; rename text_file to file"),
        ({"data": {"file": "a.jsonl", "corpus": "kjv"}}, "data.file: give exactly one of"),
    ],
)  # fmt: skip
def test_config_errors_name_the_key(change: dict, message: str) -> None:
    base = {"data": {"corpus": "kjv"}, "teacher": {"config": {"hidden_size": 8}}}
    with pytest.raises(ConfigError) as err:
        lm_config_from_dict({**base, **change})
    assert message in str(err.value)


def test_chat_lora_example_masks_all_but_the_assistant_bytes() -> None:
    example = Path(__file__).parents[2] / "examples" / "lm" / "chat_lora.yaml"
    cfg = load_lm_config(example, ["output_dir=unused"])
    assert cfg.train.accumulate_steps == 2 and cfg.student.lora is not None
    run = build_lm_run(cfg)
    eos, head, end = 258, b"<|im_start|>assistant\n", b"<|im_end|>\n"
    for batch in run.train_loader:
        ids, labels = batch["inputs"]["input_ids"], batch["target"]
        for row in range(ids.shape[0]):
            n = int(batch["inputs"]["attention_mask"][row].sum())
            seq = ids[row, :n].tolist()
            text = bytes(i if i < 256 else 0 for i in seq)  # specials as NUL
            targets, start = set(), text.find(head)
            while start >= 0:
                first = start + len(head)
                last = text.index(end, first) + len(end)  # content, <|im_end|> and newline
                targets |= set(range(first, last))
                start = text.find(head, last)
            if seq[-1] == eos and (n - 1) - 1 in targets:  # the conversation's end is learnt
                targets.add(n - 1)
            got = {t for t in range(1, n) if labels[row, t - 1] != IGNORE_INDEX}
            assert got == targets and all(labels[row, t - 1] == seq[t] for t in got)
