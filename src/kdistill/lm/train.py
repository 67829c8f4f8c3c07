"""Build and run a language-model distillation from an :class:`LMExperimentConfig`.

The glue between YAML and the Python API, as :mod:`kdistill.experiment` is for vision:
text → tokenised examples → batches (:mod:`kdistill.lm.batches`), Hugging Face teacher and
student (a folder, a random model from a config, or a DistilBERT-style copy of the
teacher), the objective's loss terms in a :class:`~kdistill.distiller.Distiller`, and the
ordinary :class:`~kdistill.trainer.Trainer` (checkpoints, exact resume, non-finite guards,
AMP) with per-token evaluation (:func:`~kdistill.lm.batches.evaluate_lm`).

A run folder holds what a vision run's does (``metrics.csv``, ``steps.jsonl``,
``checkpoints/``, ``student.safetensors``) plus ``student/`` (``save_pretrained`` of the
student, and of the tokenizer when it is a Hugging Face one), ``summary.json`` (teacher and
student per-token accuracy, cross-entropy and perplexity on the held-out texts, parameter
counts, timings) and, for ``seqkd``, ``seqkd_examples.jsonl`` (the teacher's targets,
reused on ``--resume``).

``token_kd`` runs may read the teacher from an on-disk top-k cache (``distill.cache_dir``,
:func:`_teacher_topk_cache`, :class:`TopKTokenKDLoss`) and may run under ``torchrun`` with
DDP (the :class:`~kdistill.trainer.Trainer` wraps the student; :class:`RankShareLoader`
splits every global batch; :class:`_GlobalTokenMean` keeps the loss the global token mean).
With ``train.parallel: fsdp`` :func:`run_lm` shards the student with
:func:`kdistill.distributed.shard_student` before the Trainer builds its optimizer; the
Trainer then skips DDP and gathers full tensors for every file it writes (FSDP2 averages the
gradients over the ranks as DDP does, so the same rescaled loss gives the same step).

Python::

    from kdistill.lm.config import load_lm_config
    from kdistill.lm.train import run_lm
    result = run_lm(load_lm_config("examples/lm/tiny_token_kd.yaml"))
    result.summary["student"]["final"]["perplexity"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdistill import distributed
from kdistill.cache import (
    REST_LOG_MASS,
    TOPK_INDICES,
    TOPK_VALUES,
    CacheError,
    TeacherCache,
    TopKRows,
    load_or_build,
    load_or_build_topk,
)
from kdistill.checkpoint import atomic_write_text
from kdistill.config import ConfigError
from kdistill.distiller import IGNORE_INDEX, Distiller, LossTerm
from kdistill.lm.alignment import AlignmentError, SpanTokenizer, tokenizer_identity
from kdistill.lm.batches import (
    ByteTokenizer,
    CausalLMCollator,
    ExampleLoader,
    evaluate_lm,
    pad_right,
)
from kdistill.lm.bpb import evaluate_bits_per_byte
from kdistill.lm.config import (
    LMDataConfig,
    LMDistillConfig,
    LMExperimentConfig,
    LMModelConfig,
    ServedTeacherConfig,
)
from kdistill.lm.cross_tokenizer import (
    CrossTokenizerCollator,
    TopKTeacher,
    VocabMap,
    tokenize_spans,
    vocab_map,
)
from kdistill.lm.data import DataFingerprint, LMRecords, load_records, tokenize_records
from kdistill.lm.distilbert import (
    DISTILBERT_WEIGHTS,
    MLMCollator,
    distilbert_terms,
    last_layer_name,
)
from kdistill.lm.fused_run import FusedTokenKD
from kdistill.lm.generated import (
    CoveredTopKTokenKDLoss,
    GeneratedData,
    GeneratedTopKCollator,
    load_generated,
    token_map_for,
)
from kdistill.lm.lora import (
    SavedStudent,
    apply_lora,
    enable_gradient_checkpointing,
    is_lora,
    peft_layer_name,
    save_student,
    trainable_parameter_count,
)
from kdistill.lm.losses import TokenCrossEntropy, TokenKDLoss
from kdistill.lm.seqkd import GenerationSettings, OnPolicyLoader, build_seqkd_examples
from kdistill.lm.served_cross import (
    ROWS_FILE,
    ServedCacheError,
    ServedCrossTokenizerCollator,
    ServedTeacherRows,
    load_or_score,
    rows_metadata,
    served_vocab_map,
    teacher_records,
)
from kdistill.lm.topk import TOPK, TopKTokenKDLoss, pack_topk, unpack_topk
from kdistill.lm.uld import HybridULDLoss, ULDLoss
from kdistill.models import count_parameters
from kdistill.runtime import build_trainer, start_run
from kdistill.trainer import TEACHER_PREFIX, FitResult

__all__ = [
    "OBJECTIVES",
    "LMResult",
    "LMRun",
    "RankShareLoader",
    "Tokenizers",
    "build_lm_run",
    "load_data_records",
    "load_texts",
    "run_lm",
    "same_tokenizer",
    "tokenizer_label",
]


# --------------------------------------------------------------------------- text


def load_texts(cfg: LMDataConfig) -> list[str]:
    """The raw texts of ``data``: a text file's lines / paragraphs
    (:func:`kdistill.lm.data.read_text_file`: UTF-8 checked, JSON-looking lines refused), the
    ``text`` records of ``data.file``, or a built-in corpus."""
    if cfg.text_file is not None:
        return _read_text_file(cfg)
    if cfg.file is not None:
        records = load_data_records(cfg)
        if records.shape != "text":
            raise ConfigError(
                f"data.file: {records.fingerprint.path} holds {records.shape} records, not text"
            )
        return [r["text"] for r in records.records]
    from kdistill.data import text as corpora

    if cfg.corpus == "pydoc_topics":
        return corpora.load_pydoc_topics()
    if cfg.corpus == "kjv":
        return corpora.load_kjv(None if cfg.root is None else Path(cfg.root) / "kjv.txt")
    if cfg.corpus == "wordnet":
        return corpora.load_wordnet_glosses(cfg.root).texts
    if cfg.corpus == "fortunes":
        return corpora.load_fortunes(cfg.root).texts
    raise ConfigError(f"data.corpus: unknown corpus {cfg.corpus!r}")  # pragma: no cover


def _text_file_records(cfg: LMDataConfig) -> LMRecords:
    """``data.text_file`` as ``text`` records; errors name ``data.text_file`` and, for a file
    of JSON records, say to give it as ``data.file`` (where ``data.format`` applies)."""
    assert cfg.text_file is not None
    path = Path(cfg.text_file).expanduser()
    if not path.is_file():
        raise ConfigError(f"data.text_file: {path} does not exist (or is not a file)")
    try:
        return load_records(path, "text", "text", split=cfg.split)
    except ConfigError as err:
        message = str(err).removeprefix("data.file: ")
        if "data.format" in message:
            message += "; data.format applies to data.file: rename data.text_file to data.file"
        raise ConfigError(f"data.text_file: {message}") from None


def _read_text_file(cfg: LMDataConfig) -> list[str]:
    return [record["text"] for record in _text_file_records(cfg).records]


def _corpus_records(cfg: LMDataConfig) -> LMRecords:
    """A built-in corpus as ``text`` records; its fingerprint hashes the texts joined by
    newlines (``path``: ``corpus:<name>``)."""
    texts = load_texts(cfg)
    joined = "\n".join(texts).encode("utf-8")
    fingerprint = DataFingerprint(
        path=f"corpus:{cfg.corpus}",
        format="corpus",
        shape="text",
        records=len(texts),
        bytes=len(joined),
        sha256=hashlib.sha256(joined).hexdigest(),
        hashed_bytes=len(joined),
    )

    def locate(i: int) -> str:
        return f"corpus {cfg.corpus}, text {i + 1}"

    return LMRecords([{"text": t} for t in texts], "text", fingerprint, [(locate, 0, len(texts))])


def load_data_records(cfg: LMDataConfig) -> LMRecords:
    """The records of ``data`` with the fingerprint of what was read
    (:func:`kdistill.lm.data.load_records`): ``data.file`` (its ``format`` and ``shape``),
    ``data.text_file`` (``text`` records) or a built-in ``corpus``."""
    if cfg.file is not None:
        return load_records(cfg.file, cfg.format, cfg.shape, split=cfg.split, hf_split=cfg.hf_split)
    if cfg.text_file is not None:
        return _text_file_records(cfg)
    return _corpus_records(cfg)


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never download at run time
    try:
        import transformers
    except ImportError as err:
        raise ImportError(
            "language-model distillation needs Hugging Face transformers: "
            "pip install 'kdistill[lm]'"
        ) from err
    return transformers


def _padded(tokenizer: Any) -> Any:
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers have none: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _tokenizer_from(name: str) -> Any:
    if name == "byte":
        return ByteTokenizer()
    return _padded(_transformers().AutoTokenizer.from_pretrained(name))


def _tokenizer_at(name: str, key: str) -> Any:
    """:func:`_tokenizer_from`, a folder that holds no tokenizer an error naming ``key``."""
    try:
        return _tokenizer_from(name)
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{key}: cannot load a tokenizer from {name!r} ({str(err).splitlines()[0]}); give a "
            "folder written by save_pretrained (tokenizer.json) or 'byte'"
        ) from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


def _teacher_tokenizer_name(cfg: LMExperimentConfig) -> tuple[str, str] | None:
    """``(name, key)`` of the teacher's own tokenizer: ``teacher.tokenizer``, else its
    ``path`` when that folder holds a tokenizer (or when ``data.tokenizer`` is unset)."""
    teacher = cfg.teacher
    if teacher is None:
        return None
    if teacher.tokenizer is not None:
        return teacher.tokenizer, "teacher.tokenizer"
    if teacher.path is not None:
        folder = Path(teacher.path).expanduser()
        held = not folder.is_dir() or any((folder / f).is_file() for f in _TOKENIZER_FILES)
        if held or cfg.data.tokenizer is None:
            return teacher.path, "teacher.path"
    return None


@dataclass(frozen=True)
class Tokenizers:
    """The student's tokenizer and the teacher's (the same object when one serves both),
    each with the config key it came from (for error messages)."""

    student: Any
    teacher: Any
    student_source: str
    teacher_source: str

    @property
    def shared(self) -> bool:
        return self.student is self.teacher


def same_tokenizer(a: Any, b: Any) -> bool:
    """Two tokenizers cut text alike: both the byte tokenizer, or the same vocabulary
    (token → id, added tokens included)."""
    if a is b:
        return True
    if isinstance(a, ByteTokenizer) or isinstance(b, ByteTokenizer):
        return isinstance(a, ByteTokenizer) and isinstance(b, ByteTokenizer)
    return bool(a.get_vocab() == b.get_vocab())


def tokenizer_label(tokenizer: Any) -> str:
    """How errors and summaries name a tokenizer: ``byte`` or its path, and its size."""
    if isinstance(tokenizer, ByteTokenizer):
        return f"byte ({tokenizer.vocab_size} ids)"
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    return f"{name} ({type(tokenizer).__name__}, {len(tokenizer)} ids)"


def _load_tokenizers(cfg: LMExperimentConfig, pretrained_tokenizer: Any = None) -> Tokenizers:
    """The student's tokenizer (``data.tokenizer``, default the teacher's) and the teacher's
    (``teacher.tokenizer``, the shipped teacher's own, its ``path``; default the student's)."""
    teacher, t_source = None, "data.tokenizer"
    named = _teacher_tokenizer_name(cfg)
    if named is not None:
        teacher, t_source = _tokenizer_from(named[0]), named[1]
    elif pretrained_tokenizer is not None:
        teacher, t_source = _padded(pretrained_tokenizer), "teacher.pretrained"
    if cfg.data.tokenizer is not None:
        student, s_source = _tokenizer_from(cfg.data.tokenizer), "data.tokenizer"
    elif teacher is not None:
        student, s_source = teacher, t_source
    else:
        path = cfg.student.path
        student, s_source = _tokenizer_from(path or "byte"), "student.path" if path else "byte"
    if teacher is None or same_tokenizer(student, teacher):
        teacher = student
    return Tokenizers(student, teacher, s_source, t_source)


def _check_tokenizers(cfg: LMExperimentConfig, tokenizers: Tokenizers) -> None:
    """Different tokenizers need ``distill.cross_tokenizer``; the error names both."""
    if cfg.teacher is None or tokenizers.shared or cfg.distill.cross_tokenizer is not None:
        return
    raise ConfigError(
        f"distill.cross_tokenizer: the teacher's tokenizer "
        f"({tokenizers.teacher_source}: {tokenizer_label(tokenizers.teacher)}) is not the "
        f"student's ({tokenizers.student_source}: {tokenizer_label(tokenizers.student)}); set "
        "distill.cross_tokenizer: uld or hybrid (objective token_kd) to distil across "
        "tokenizers, or give both models one tokenizer (data.tokenizer / teacher.tokenizer)"
    )


def _vocab_size(tokenizer: Any) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else len(tokenizer)


def _decode(tokenizer: Any, ids: Sequence[int], keep_special: bool = False) -> str:
    """The text of token ids: special tokens left out (held-out texts of a generated file),
    or spelt out (``<|endoftext|>``, ``keep_special``) for a server that tokenises text
    itself and reads special tokens in it (llama.cpp's)."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.decode(ids)
    return str(
        tokenizer.decode(
            ids, skip_special_tokens=not keep_special, clean_up_tokenization_spaces=False
        )
    )


# --------------------------------------------------------------------------- models

PRETRAINED = ("smollm2", "minilm")
"""``teacher.pretrained`` names: real teachers that ship inside PyPI packages
(:mod:`kdistill.lm.pretrained`)."""


def _load_pretrained(name: str, key: str) -> tuple[nn.Module, Any]:
    """A shipped pre-trained model and its tokenizer (``teacher.pretrained``)."""
    from kdistill.lm import pretrained

    try:
        if name == "smollm2":
            return pretrained.load_smollm2()
        return pretrained.load_minilm()
    except pretrained.TeacherNotInstalledError as err:
        raise ConfigError(f"{key}.pretrained: {err}") from None


def _build_model(
    cfg: LMModelConfig, key: str, causal: bool, tokenizer: Any, teacher: nn.Module | None
) -> nn.Module:
    transformers = _transformers()
    if cfg.init_from_teacher:
        from kdistill.lm.student_init import init_student_from_teacher

        assert teacher is not None  # the config validation guarantees it
        try:
            return init_student_from_teacher(teacher, cfg.num_layers, cfg.layer_map)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{key}.init_from_teacher: {err}") from None
    if cfg.path is not None:
        auto = transformers.AutoModelForCausalLM if causal else transformers.AutoModelForMaskedLM
        return auto.from_pretrained(cfg.path)
    kwargs: dict[str, Any] = {
        "vocab_size": _vocab_size(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        **cfg.config,
    }
    if cfg.arch == "llama":
        kwargs.setdefault("bos_token_id", getattr(tokenizer, "bos_token_id", None))
        kwargs.setdefault("eos_token_id", getattr(tokenizer, "eos_token_id", None))
        config_cls, model_cls = transformers.LlamaConfig, transformers.LlamaForCausalLM
    else:
        config_cls, model_cls = transformers.BertConfig, transformers.BertForMaskedLM
    try:
        config = config_cls(**kwargs)
        return model_cls(config)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{key}.config: {err}") from None


def _save_pretrained(
    model: nn.Module,
    tokenizer: Any,
    folder: Path,
    state_dict: dict[str, Tensor] | None = None,
    weights_path: Path | None = None,
) -> SavedStudent | None:
    """``save_pretrained`` of the model (and an HF tokenizer) without a progress bar.

    ``state_dict``: the weights to write instead of the model's own (the full tensors of an
    FSDP-sharded model). Otherwise :func:`kdistill.lm.lora.save_student`: a LoRA student is
    written merged, with its adapter in ``folder/adapter`` and its merged weights (Hugging
    Face key names) in ``weights_path``.
    """
    hf_logging = _transformers().utils.logging
    had_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        if state_dict is None:
            merged_weights = weights_path if is_lora(model) else None  # else the Trainer's
            return save_student(model, tokenizer, folder, weights_path=merged_weights)
        model.save_pretrained(str(folder), state_dict=state_dict)  # type: ignore[operator]
        if not isinstance(tokenizer, ByteTokenizer):
            tokenizer.save_pretrained(str(folder))
        return None
    finally:
        if had_bar:
            hf_logging.enable_progress_bar()


def _lora_summary(cfg: LMModelConfig, saved: SavedStudent | None) -> dict[str, Any]:
    """``student.lora`` and where its adapter was written (nothing for a plain student)."""
    if cfg.lora is None:
        return {}
    out: dict[str, Any] = {"lora": dataclasses.asdict(cfg.lora)}
    if saved is not None and saved.adapter is not None:
        out["adapter_folder"] = str(saved.adapter)
    return out


# --------------------------------------------------------------------------- the run


@dataclass
class LMRun:
    """Everything :func:`run_lm` trains: models, objective and data."""

    teacher: nn.Module | None
    student: nn.Module
    tokenizer: Any
    distiller: Distiller | FusedTokenKD  # FusedTokenKD: distill.fused
    train_loader: Any
    eval_loader: ExampleLoader
    info: dict[str, Any] = field(default_factory=dict)
    teacher_tokenizer: Any = None  # the teacher's own (None: ``tokenizer``)
    teacher_eval_loader: ExampleLoader | None = None  # its tokens of the held-out texts
    eval_texts: list[str] = field(default_factory=list)  # held-out texts (bits per byte)


@dataclass
class LMResult:
    summary: dict[str, Any]
    fit: FitResult
    output_dir: Path


def _settings(cfg: LMExperimentConfig) -> GenerationSettings:
    s = cfg.seqkd
    return GenerationSettings(
        s.strategy, s.max_new_tokens, s.num_beams, s.temperature, s.top_k, s.top_p
    )


def _seqkd_examples(
    cfg: LMExperimentConfig,
    teacher: nn.Module,
    tokenizer: Any,
    prompted: list[dict[str, Any]],
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The teacher's completions for the prompts (the first ``prompt_length`` ids of each
    ``prompted`` example, :meth:`LMSetup.prompted`), cached in ``seqkd_examples.jsonl``."""
    cache = Path(cfg.output_dir) / "seqkd_examples.jsonl"
    settings = _settings(cfg)
    own = any("prompt_tokens" not in x for x in prompted)  # records with their own prompt
    key = {
        "settings": settings.__dict__,
        "prompt_tokens": "record" if own else cfg.data.prompt_tokens,
        "n": len(prompted),
    }
    if cache.is_file():
        lines = cache.read_text().splitlines()
        if lines and json.loads(lines[0]) == key:
            return [json.loads(line) for line in lines[1:]], {"cached": True}
    prompts = [x["input_ids"][: x["prompt_length"]] for x in prompted]
    began = time.perf_counter()
    teacher.to(device)
    examples = build_seqkd_examples(
        teacher,
        prompts,
        settings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        batch_size=cfg.seqkd.generate_batch_size,
        seed=cfg.seed,
    )
    seconds = time.perf_counter() - began
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, "".join(json.dumps(x) + "\n" for x in [key, *examples]))
    new_tokens = sum(len(x["input_ids"]) - x["prompt_length"] for x in examples)
    return examples, {"prompts": len(prompts), "generated_tokens": new_tokens, "seconds": seconds}


def _token_kd(cfg: LMExperimentConfig) -> TokenKDLoss:
    d = cfg.distill
    return TokenKDLoss(
        d.divergence,
        beta=d.beta,
        skew_alpha=d.skew_alpha,
        temperature=d.resolved_temperature,
        chunk_size=d.chunk_size,
        chunk_bytes=d.chunk_bytes,
    )


# --------------------------------------------------------------------------- fused head


def _fused_unsupported(run: LMSetup, kd_weight: float) -> str | None:
    """Why this run's KD + CE objective cannot go through :class:`FusedTokenKD`, or ``None``.

    The fused head needs a Hugging Face causal-LM student (``get_decoder`` /
    ``get_output_embeddings``), a teacher term (``kd_weight > 0``), a teacher that is a
    same-tokenizer causal LM (live) or the top-k cache. DDP and FSDP2 (``train.parallel``)
    both work: the student's forward gathers its sharded parameters and ``lm_head`` is in the
    root unit, which stays unsharded until the backward.
    """
    d = run.cfg.distill
    if d.objective == "distilbert":
        return "objective distilbert is a masked-LM triple loss (no causal head to fuse)"
    if d.cross_tokenizer is not None:
        return "distill.cross_tokenizer compares byte-aligned positions of two vocabularies"
    if run.generated is not None:
        return "data.generated_file runs train on the file's covered top-k (plain path only)"
    if kd_weight <= 0:
        return "distill.alpha: 0 trains on cross-entropy alone (no teacher term to fuse)"
    models = [("student", run.student)]
    if d.cache_dir is None:
        models.append(("teacher", run.teacher))
    for who, model in models:
        inner = getattr(model, "get_output_embeddings", None)
        head = inner() if callable(inner) else None
        decoder = getattr(model, "get_decoder", None)
        if not callable(decoder) or not isinstance(getattr(head, "weight", None), Tensor):
            name = type(model).__name__
            return f"the {who} ({name}) is not a Hugging Face causal LM with an lm_head"
    return None


def _fused_model(run: LMSetup, kd_weight: float, cached: bool) -> FusedTokenKD | None:
    """The fused objective model when ``distill.fused`` asks for it and the run allows it
    (``auto``: wherever it applies; ``true``: a :class:`ConfigError` naming why not)."""
    d = run.cfg.distill
    if d.fused is False:
        return None
    reason = _fused_unsupported(run, kd_weight)
    if reason is not None:
        if d.fused is True:
            raise ConfigError(f"distill.fused: true cannot apply here — {reason}; use auto/false")
        return None
    return FusedTokenKD(
        run.student,
        None if cached else run.teacher,
        kind=d.divergence,
        beta=d.beta,
        skew_alpha=d.skew_alpha,
        temperature=d.resolved_temperature,
        alpha=kd_weight,
        chunk_size=d.chunk_size,
        chunk_bytes=d.chunk_bytes,
    )


# --------------------------------------------------------------------------- top-k teacher cache


@dataclass
class _TopKCollator:
    """Collate examples (``row`` = their row in the cache) and attach the cached teacher."""

    collate: CausalLMCollator
    cache: TeacherCache

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        rows = torch.tensor([x["row"] for x in examples])
        width = batch["inputs"]["input_ids"].shape[1]  # <= the cached rows' width
        batch[TEACHER_PREFIX + TOPK] = pack_topk(
            self.cache[TOPK_VALUES][rows][:, :width],
            self.cache[TOPK_INDICES][rows][:, :width],
            self.cache[REST_LOG_MASS][rows][:, :width],
        )
        return batch


def _teacher_topk_cache(
    cfg: LMExperimentConfig,
    teacher: nn.Module,
    train_ids: list[list[int]],
    pad_token_id: int,
    device: torch.device,
    tokenizer: Any = None,
) -> tuple[TeacherCache, dict[str, Any]]:
    """Open or build the top-k cache ``distill.cache_dir`` of the teacher on the training texts.

    The texts are right-padded to the longest one, ``(N, T)`` with an attention mask (a
    causal teacher's logits at real positions do not depend on right padding). Under torchrun
    rank 0 builds while the others wait, then they open and check it. The manifest records
    the teacher ``tokenizer``'s identity (:func:`~kdistill.lm.alignment.tokenizer_identity`);
    a cache built with another teacher tokenizer is refused.
    """
    d = cfg.distill
    assert d.cache_dir is not None
    path = Path(d.cache_dir).expanduser()
    inputs, mask = pad_right(train_ids, pad_token_id)
    build = {
        **_cache_data_names(cfg, pad_token_id),
        "k": d.cache_topk,
        "attention_mask": mask,
        "batch_size": cfg.data.eval_batch_size,
        "device": device,
        "values_dtype": getattr(torch, d.cache_dtype),
        "tokenizer": None if tokenizer is None else tokenizer_identity(tokenizer),
    }
    built = False
    try:
        if distributed.is_main():
            teacher.to(device)
            cache, built = load_or_build(path, teacher, inputs, rebuild=d.cache_rebuild, **build)
        distributed.barrier()
        if not distributed.is_main():
            cache, _ = load_or_build(path, teacher, inputs, rebuild=False, **build)
    except CacheError as err:
        raise ConfigError(f"distill.cache_dir: {err}") from err
    except ValueError as err:  # k larger than the vocabulary
        raise ConfigError(f"distill.cache_topk: {err}") from err
    info = {
        "path": str(path),
        "built": built,
        "k": cache.k,
        "rows": cache.num_rows,
        "bytes_per_token": cache.bytes_per_row() / inputs.shape[1],
    }
    return cache, info


def _cache_data_names(cfg: LMExperimentConfig, pad_token_id: int) -> dict[str, str]:
    """``data_name`` and ``transform`` of the training texts' cache fingerprint (the same
    for a local and a served teacher: the same texts give the same fingerprint)."""
    source = cfg.data.text_file or cfg.data.corpus
    return {
        "data_name": f"lm:{source}:train",
        "transform": f"tokens(max_length={cfg.data.max_length}, pad={pad_token_id})",
    }


def _served_rows(
    served: ServedTeacherConfig, train_ids: list[list[int]], width: int, k: int, tokenizer: Any
) -> TopKRows:
    """Teacher-forced top-k of every training text, scored by the server ``distill.teacher``.

    The texts go out as token ids (rows then line up with them exactly) — or, to a server
    that rejects token-id prompts (llama.cpp's), as their decoded text, which it tokenises
    itself: every echoed token is then checked against the ids. Row ``t`` predicts token
    ``t + 1``; the last row of a text and its padding are placeholders (their labels are
    ignored). Returns ``values (N, width, k)``, ``indices (N, width, k)``,
    ``rest_log_mass (N, width)``.
    """
    from kdistill.serve.client import EndpointError
    from kdistill.serve.scoring import placeholder_rows, score_texts_sync, topk_rows

    strings = [_decode(tokenizer, ids, keep_special=True) for ids in train_ids]
    try:
        scored = score_texts_sync(
            served.client, served.model, train_ids, k, on_shift=served.on_shift, strings=strings
        )
    except (EndpointError, ConfigError) as err:  # ScoringUnsupported, MisalignedServerError
        raise ConfigError(f"distill.teacher: {err}") from None
    token_map = token_map_for(tokenizer)
    values, indices, rest = placeholder_rows(len(train_ids) * width, k)
    values, indices = values.view(-1, width, k), indices.view(-1, width, k)  # (N, T, k)
    rest = rest.view(-1, width)  # (N, T)
    for i, (ids, text) in enumerate(zip(train_ids, scored, strict=True)):
        v, idx, r, got = topk_rows(text, k, token_map, ids)  # (T_i, k), (T_i, k), (T_i,)
        if got != list(ids):
            raise ConfigError(
                f"distill.teacher: the server scored training text {i} as other tokens than "
                f"the student's tokenizer gives ({_first_difference(got, list(ids))}); the "
                "teacher's and the student's tokenizers differ (use the teacher's tokenizer: "
                "data.tokenizer), or the server re-tokenised the text differently"
            )
        values[i, : len(ids)], indices[i, : len(ids)], rest[i, : len(ids)] = v, idx, r
    return values, indices, rest


def _first_difference(got: list[int], want: list[int]) -> str:
    """Where two id lists part: ``token 3: 28 vs 30`` or their lengths."""
    for t, (a, b) in enumerate(zip(got, want, strict=False)):
        if a != b:
            return f"token {t}: id {a} from the server vs {b}"
    return f"{len(got)} tokens from the server vs {len(want)}"


def _served_topk_cache(
    cfg: LMExperimentConfig, train_ids: list[list[int]], pad_token_id: int, tokenizer: Any
) -> tuple[TeacherCache, dict[str, Any]]:
    """Open or fill the top-k cache ``distill.cache_dir`` from the served teacher
    ``distill.teacher`` (:func:`_served_rows`); the server is only asked when the cache is
    missing or ``cache_rebuild``. Under torchrun rank 0 fills it while the others wait."""
    d = cfg.distill
    assert d.cache_dir is not None and d.teacher is not None
    path = Path(d.cache_dir).expanduser()
    inputs, mask = pad_right(train_ids, pad_token_id)  # (N, T)
    vocab = _vocab_size(tokenizer)
    if d.cache_topk > vocab:
        raise ConfigError(
            f"distill.cache_topk: {d.cache_topk} exceeds the vocabulary of {vocab} ids"
        )
    served, k, width = d.teacher, d.cache_topk, inputs.shape[1]
    build = {
        **_cache_data_names(cfg, pad_token_id),
        "identity": served.identity(),
        "k": k,
        "vocab_size": vocab,
        "attention_mask": mask,
        "values_dtype": getattr(torch, d.cache_dtype),
    }

    def rows() -> list[TopKRows]:
        return [_served_rows(served, train_ids, width, k, tokenizer)]

    built = False
    try:
        if distributed.is_main():
            cache, built = load_or_build_topk(path, rows, inputs, rebuild=d.cache_rebuild, **build)
        distributed.barrier()
        if not distributed.is_main():
            cache, _ = load_or_build_topk(path, rows, inputs, rebuild=False, **build)
    except CacheError as err:
        raise ConfigError(f"distill.cache_dir: {err}") from err
    info = {
        "path": str(path),
        "built": built,
        "k": cache.k,
        "rows": cache.num_rows,
        "bytes_per_token": cache.bytes_per_row() / width,
        "teacher": {"endpoint": served.endpoint, "model": served.model},
    }
    return cache, info


# --------------------------------------------------------------------------- several processes


class RankShareLoader:
    """This rank's contiguous share of every global batch of ``loader`` (DDP data split).

    Every rank draws the same global batches (same seed and epoch) and keeps rows
    ``[r·B/N, (r+1)·B/N)`` of each tensor (nested ``inputs`` included), as
    :func:`kdistill.distributed.rank_share`. ``set_epoch`` / ``set_start_step`` / ``len``
    are the wrapped loader's.
    """

    def __init__(self, loader: ExampleLoader) -> None:
        self.loader = loader

    def __len__(self) -> int:
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def set_start_step(self, step: int) -> None:
        self.loader.set_start_step(step)

    def __iter__(self) -> Any:
        for batch in self.loader:
            yield _share(batch)


def _share(value: Any) -> Any:
    if isinstance(value, Tensor):
        return distributed.rank_share(value)
    if isinstance(value, dict):
        return {k: _share(v) for k, v in value.items()}
    return value


class _GlobalTokenMean(nn.Module):
    """A per-token mean loss rescaled so that DDP's gradient average is the global token mean.

    Each rank's mean over its ``n_r`` counted tokens (labels not ignored) is multiplied by
    ``N · n_r / Σ_r n_r``; DDP averages the gradients over the ``N`` ranks, which gives the
    gradient of the mean over all counted tokens of the global batch — what one process
    computes on the whole batch — however the padding falls on the ranks.
    """

    requires_target = True

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss
        self.requires_mask = getattr(loss, "requires_mask", False)
        self._takes_target = getattr(loss, "requires_target", False)

    def forward(self, student: Tensor, reference: Tensor, labels: Tensor, **kwargs: Any) -> Tensor:
        args = (student, reference, labels) if self._takes_target else (student, reference)
        value = self.loss(*args, **kwargs)
        counted = (labels != IGNORE_INDEX).sum().to(torch.float64)
        total = distributed.all_sum(counted)
        scale = counted * distributed.world_size() / total.clamp_min(1.0)
        return value * scale.to(value.dtype)


# --------------------------------------------------------------------------- objectives


@dataclass
class LMSetup:
    """What every objective builder gets: the config, tokenizer, models and tokenised texts."""

    cfg: LMExperimentConfig
    tokenizer: Any
    teacher: nn.Module | None
    student: nn.Module
    train_ids: list[list[int]]
    eval_ids: list[list[int]]
    device: torch.device
    generated: GeneratedData | None = None  # data.generated_file: its examples and top-k
    teacher_tokenizer: Any = None  # the teacher's own tokenizer (None: ``tokenizer``)
    train_texts: list[str] = field(default_factory=list)  # the texts of train_ids
    eval_texts: list[str] = field(default_factory=list)  # the texts of eval_ids
    # the examples of train_ids / eval_ids with their prompt_length / loss_mask (None: ids)
    train_examples: list[dict[str, Any]] | None = None
    eval_examples: list[dict[str, Any]] | None = None

    @property
    def pad(self) -> int:
        return self.tokenizer.pad_token_id

    def causal_collate(self) -> CausalLMCollator:
        return CausalLMCollator(self.pad, self.cfg.data.max_length)

    def train_set(self) -> list[dict[str, Any]]:
        """The training examples: targets only where the record shape puts them (the
        completion, the assistant turns; :mod:`kdistill.lm.data`)."""
        if self.train_examples is not None:
            return list(self.train_examples)
        return [{"input_ids": x} for x in self.train_ids]

    def prompted(self) -> list[dict[str, Any]]:
        """Training examples split into a prompt and its continuation (``seqkd``, ``gkd``):
        a prompt + completion record's own prompt, else the first ``data.prompt_tokens``
        ids (marked ``prompt_tokens``); examples with no continuation are left out."""
        out = []
        for x in self.train_set():
            ids = x["input_ids"]
            if "prompt_length" in x:
                out.append({"input_ids": ids, "prompt_length": x["prompt_length"]})
            else:
                n = self.cfg.data.prompt_tokens
                out.append({"input_ids": ids, "prompt_length": n, "prompt_tokens": n})
        return [x for x in out if len(x["input_ids"]) > x["prompt_length"]]

    def causal_eval_loader(self) -> ExampleLoader:
        examples = self.eval_examples
        if examples is None:
            examples = [{"input_ids": x} for x in self.eval_ids]
        return ExampleLoader(examples, self.causal_collate(), self.cfg.data.eval_batch_size)

    def shuffled(self, examples: list[dict[str, Any]], collate: Any) -> ExampleLoader:
        """The training loader: shuffled per epoch with the run's seed; under torchrun the
        last short batch is dropped (every rank needs an equal share of every batch)."""
        return ExampleLoader(
            examples,
            collate,
            self.cfg.data.batch_size,
            shuffle=True,
            drop_last=distributed.world_size() > 1,
            seed=self.cfg.seed,
        )


@dataclass
class LMObjective:
    """What an objective builder hands back: loss terms, loaders and facts for the summary."""

    terms: list[LossTerm]
    train_loader: Any
    eval_loader: ExampleLoader
    info: dict[str, Any] = field(default_factory=dict)
    teacher_eval_loader: ExampleLoader | None = None  # the teacher's own tokens, if not shared
    # what the Trainer trains instead of a Distiller of ``terms`` (distill.fused: the head)
    model: FusedTokenKD | None = None


def _kd_and_ce(cfg: LMExperimentConfig, kd: LossTerm) -> list[LossTerm]:
    """``alpha · KD + (1 − alpha) · CE``, dropping a term of weight 0."""
    alpha = cfg.distill.alpha
    terms = [kd] if alpha > 0 else []
    if alpha < 1:
        terms.append(LossTerm("ce", TokenCrossEntropy(), weight=1 - alpha, teacher=None))
    return terms


def _build_token_kd(run: LMSetup) -> LMObjective:
    """Token-level KD (Hinton et al. 2015 per token): every next-token distribution, from
    the live teacher or from its on-disk top-k cache (``distill.cache_dir``)."""
    if run.cfg.distill.cross_tokenizer is not None:  # a teacher with another tokenizer
        return _build_cross_tokenizer_kd(run)
    cfg, d = run.cfg, run.cfg.distill
    examples = run.train_set()
    collate: Any = run.causal_collate()
    kd = LossTerm("kd", _token_kd(cfg), weight=d.alpha)
    info: dict[str, Any] = {}
    if d.cache_dir is not None:  # alpha > 0 (config validation)
        if d.teacher is not None:  # a served teacher scores the texts (distill.teacher)
            cache, info["teacher_cache"] = _served_topk_cache(
                cfg, run.train_ids, run.pad, run.tokenizer
            )
        else:
            assert run.teacher is not None
            cache, info["teacher_cache"] = _teacher_topk_cache(
                cfg, run.teacher, run.train_ids, run.pad, run.device, run.tokenizer
            )
        examples = [{**x, "row": i} for i, x in enumerate(examples)]
        collate = _TopKCollator(collate, cache)
        topk = TopKTokenKDLoss(
            d.divergence, beta=d.beta, skew_alpha=d.skew_alpha, temperature=d.resolved_temperature
        )
        kd = LossTerm("kd", topk, weight=d.alpha, teacher=TOPK)
    loader = run.shuffled(examples, collate)
    fused = _fused_model(run, d.alpha, cached=d.cache_dir is not None)
    terms = [] if fused is not None else _kd_and_ce(cfg, kd)
    return LMObjective(terms, loader, run.causal_eval_loader(), info, model=fused)


# --------------------------------------------------------------------------- cross-tokenizer


def _build_cross_tokenizer_kd(run: LMSetup) -> LMObjective:
    """Token-level KD from a teacher with another tokenizer (``distill.cross_tokenizer``).

    Both tokenizers cut every raw training text; :class:`CrossTokenizerCollator` aligns the
    two token sequences by their UTF-8 byte spans and the live teacher reads its own tokens
    (the batch's ``teacher_inputs``). The KD term compares the next-token distributions
    where both models have read the same bytes (the batch's ``alignment``): ULD (Boizard et
    al. 2024), or the hybrid (``divergence`` on the tokens both vocabularies spell alike,
    ULD on the rest; :mod:`kdistill.lm.uld`). The student's batches are those of plain
    ``token_kd`` (same ids, labels and EOS), so ``alpha: 0`` is the same CE-only baseline.
    """
    cfg, d = run.cfg, run.cfg.distill
    if distributed.world_size() > 1:
        raise ConfigError(
            "distill.cross_tokenizer: cross-tokenizer KD runs in one process (the teacher "
            "reads its own tokens of every text); run kdistill lm without torchrun"
        )
    if d.teacher is not None:  # a served teacher: its top_logprobs, mapped by their bytes
        return _build_served_cross_tokenizer_kd(run)
    teacher_tokenizer = run.teacher_tokenizer or run.tokenizer
    vocab = _cross_vocab(run)
    collate = CrossTokenizerCollator(
        run.tokenizer,
        teacher_tokenizer,
        max_length=cfg.data.max_length,
        teacher_max_length=cfg.data.teacher_max_length,
        append_eos=True,
        trim_teacher=True,  # the teacher reads only the bytes the student kept
    )
    loss = _cross_tokenizer_loss(d, vocab)
    kd = LossTerm("kd", loss, weight=d.alpha)
    info: dict[str, Any] = {
        "cross_tokenizer": {
            "loss": d.cross_tokenizer,
            "student_tokenizer": tokenizer_label(run.tokenizer),
            "teacher_tokenizer": tokenizer_label(teacher_tokenizer),
            "matched_tokens": vocab.size,
        }
    }
    examples: list[dict[str, Any]] = [{"text": t} for t in run.train_texts]
    batches: Any = collate
    if d.cache_dir is not None:  # the teacher's top-k over its own tokens, from disk
        assert run.teacher is not None  # alpha > 0: the config validation guarantees it
        teacher_ids = [collate.tokens(t)[1].input_ids for t in run.train_texts]
        cache, info["teacher_cache"] = _teacher_topk_cache(
            cfg,
            run.teacher,
            teacher_ids,
            teacher_tokenizer.pad_token_id,
            run.device,
            teacher_tokenizer,
        )
        examples = [{"text": t, "row": i} for i, t in enumerate(run.train_texts)]
        batches = _CrossTopKCollator(collate, cache)
        cached = _CachedTeacherLoss(loss, vocab.teacher_vocab)
        kd = LossTerm("kd", cached, weight=d.alpha, teacher=TOPK)
    loader = run.shuffled(examples, batches)
    teacher_eval = None if teacher_tokenizer is run.tokenizer else _teacher_eval_loader(run)
    return LMObjective(_kd_and_ce(cfg, kd), loader, run.causal_eval_loader(), info, teacher_eval)


def _cross_tokenizer_loss(d: LMDistillConfig, vocab: VocabMap) -> nn.Module:
    """ULD, or the hybrid over ``vocab``'s matched tokens (``distill.cross_tokenizer``)."""
    if d.cross_tokenizer == "uld":
        return ULDLoss(d.resolved_temperature, d.chunk_size)
    return HybridULDLoss(
        vocab,
        d.divergence,
        beta=d.beta,
        skew_alpha=d.skew_alpha,
        temperature=d.resolved_temperature,
        matched_weight=d.matched_weight,
        unmatched_weight=d.unmatched_weight,
        chunk_size=d.chunk_size,
    )


def _build_served_cross_tokenizer_kd(run: LMSetup) -> LMObjective:
    """Cross-tokenizer KD from a served teacher (``distill.teacher``): the server scores every
    training text once (its rows kept in ``distill.cache_dir``, :mod:`kdistill.lm.served_cross`);
    each alternative of its ``top_logprobs`` becomes the student id spelling the same bytes, or
    an extra id past the student's vocabulary, so ULD and the hybrid (its matched set: every
    student token) read it as a local teacher's top-k. Student batches are plain ``token_kd``'s."""
    cfg, d = run.cfg, run.cfg.distill
    assert d.teacher is not None and d.cache_dir is not None  # config validation
    side = SpanTokenizer(run.tokenizer, "student tokenizer")
    student = [
        tokenize_spans(side, t, cfg.data.max_length, append_eos=True) for t in run.train_texts
    ]
    served, k = d.teacher, d.cache_topk
    assert served.tokenizer is not None  # config validation
    teacher_tokenizer = _tokenizer_at(served.tokenizer, "distill.teacher.tokenizer")
    teacher_side = SpanTokenizer(teacher_tokenizer, "teacher tokenizer")

    def score() -> ServedTeacherRows:
        from kdistill.serve.client import EndpointError
        from kdistill.serve.scoring import score_texts_sync

        try:
            spans = [teacher_side.tokenize(t) for t in run.train_texts]  # whole texts
            scored = score_texts_sync(
                served.client,
                served.model,
                [s.input_ids for s in spans],
                k,
                on_shift=served.on_shift,
                strings=run.train_texts,  # for a server that takes no token ids (llama.cpp)
            )
            token_map = token_map_for(teacher_tokenizer)  # for tokens named by text only
            records = [
                teacher_records(x.tokens, s, t, teacher_side, i, k, token_map)
                for i, (x, s, t) in enumerate(zip(scored, spans, run.train_texts, strict=True))
            ]
            return ServedTeacherRows.from_records(student, records, run.tokenizer, run.train_texts)
        except (EndpointError, ConfigError, AlignmentError, ValueError) as err:
            raise ConfigError(f"distill.teacher: {err}") from None

    metadata = rows_metadata(served.identity(), teacher_tokenizer, run.tokenizer, student, k)
    try:
        rows, built = load_or_score(d.cache_dir, score, metadata, rebuild=d.cache_rebuild)
    except ServedCacheError as err:
        raise ConfigError(f"distill.cache_dir: {err}") from None
    v_s = _logits_size(run.student, run.tokenizer, "student")
    vocab = served_vocab_map(run.tokenizer, v_s, rows.vocab_size)
    loss = _CachedTeacherLoss(_cross_tokenizer_loss(d, vocab), rows.vocab_size)
    kd = LossTerm("kd", loss, weight=d.alpha, teacher=TOPK)
    examples = [{"text": t, "row": i} for i, t in enumerate(run.train_texts)]
    collate = ServedCrossTokenizerCollator(student, rows, run.pad)
    info: dict[str, Any] = {
        "cross_tokenizer": {
            "loss": d.cross_tokenizer,
            "student_tokenizer": tokenizer_label(run.tokenizer),
            "teacher_tokenizer": f"{tokenizer_label(teacher_tokenizer)}, served as "
            f"{served.model} at {served.endpoint}",
            "teacher_only_texts": rows.vocab_size - side.vocab_size,
            "matched_tokens": vocab.size,
        },
        "teacher_cache": {
            "path": str(Path(d.cache_dir).expanduser() / ROWS_FILE),
            "built": built,
            "k": k,
            "rows": int(rows.ids.shape[0]),
            "teacher": {"endpoint": served.endpoint, "model": served.model},
        },
    }
    loader = run.shuffled(examples, collate)
    return LMObjective(_kd_and_ce(cfg, kd), loader, run.causal_eval_loader(), info)


@dataclass
class _CrossTopKCollator:
    """Cross-tokenizer batches with the cached teacher rows of their texts (``row``) attached
    as ``teacher.topk``, cut to the batch's teacher positions."""

    collate: CrossTokenizerCollator
    cache: TeacherCache

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        rows = torch.tensor([x["row"] for x in examples])
        width = batch["teacher_inputs"]["input_ids"].shape[1]  # <= the cached rows' width
        batch[TEACHER_PREFIX + TOPK] = pack_topk(
            self.cache[TOPK_VALUES][rows][:, :width],
            self.cache[TOPK_INDICES][rows][:, :width],
            self.cache[REST_LOG_MASS][rows][:, :width],
        )
        return batch


class _CachedTeacherLoss(nn.Module):
    """A cross-tokenizer loss (:class:`ULDLoss`, :class:`HybridULDLoss`) against a cached
    top-k teacher: the batch's packed rows ``(B, T_t, 2k + 1)`` (:func:`pack_topk`) read as a
    :class:`~kdistill.lm.cross_tokenizer.TopKTeacher` over the teacher's ``vocab_size`` ids,
    i.e. the top-k distribution renormalised (the rest mass is not used)."""

    batch_keys = ("alignment",)

    def __init__(self, loss: nn.Module, vocab_size: int) -> None:
        super().__init__()
        self.loss = loss
        self.vocab_size = vocab_size

    def forward(self, student_logits: Tensor, packed: Tensor, alignment: Any) -> Tensor:
        values, ids, _ = unpack_topk(packed)  # (B, T_t, k), (B, T_t, k)
        return self.loss(student_logits, TopKTeacher(values, ids, self.vocab_size), alignment)


def _logits_size(model: nn.Module | None, tokenizer: Any, key: str) -> int:
    """Rows of ``model``'s output layer, checked to cover every id of its ``tokenizer``."""
    size = _vocab_size(tokenizer)
    if model is None:
        return size
    hf: Any = model  # a Hugging Face model (or a wrapper of one)
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    weight = getattr(head, "weight", None)
    rows = int(weight.shape[0]) if weight is not None else int(hf.config.vocab_size)
    if rows < size:
        raise ConfigError(
            f"{key}: the model predicts {rows} ids but its tokenizer "
            f"({tokenizer_label(tokenizer)}) has {size}; build it for that tokenizer (a "
            "student initialised from a teacher with another tokenizer cannot read its own)"
        )
    return rows


def _cross_vocab(run: LMSetup) -> VocabMap:
    """The tokens both vocabularies spell alike (:func:`vocab_map`, the hybrid's matched
    set), widened to the models' logits (ids a model pads its output layer with match none)."""
    teacher_tokenizer = run.teacher_tokenizer or run.tokenizer
    v_s = _logits_size(run.student, run.tokenizer, "student")
    v_t = _logits_size(run.teacher, teacher_tokenizer, "teacher")
    if teacher_tokenizer is run.tokenizer:  # one tokenizer: id v is id v
        ids = torch.arange(_vocab_size(run.tokenizer))
        return VocabMap(ids, ids.clone(), v_s, v_t)
    matched = vocab_map(run.tokenizer, teacher_tokenizer)
    return VocabMap(matched.student_ids, matched.teacher_ids, v_s, v_t)


def _teacher_eval_loader(run: LMSetup) -> ExampleLoader:
    """The held-out texts in the teacher's own tokens (its per-token figures), cut at
    ``data.teacher_max_length`` (default ``max_length``) tokens, EOS appended."""
    tokenizer, data = run.teacher_tokenizer, run.cfg.data
    length = data.teacher_max_length or data.max_length
    eos = tokenizer.eos_token_id
    examples = []
    for text in run.eval_texts:
        ids = list(tokenizer.encode(text))
        if eos is not None and ids[-1:] != [eos]:
            ids.append(eos)
        examples.append({"input_ids": ids[:length]})
    collate = CausalLMCollator(tokenizer.pad_token_id, length)
    return ExampleLoader(examples, collate, data.eval_batch_size)


def _build_seqkd(run: LMSetup) -> LMObjective:
    """Sequence-level KD (Kim & Rush 2016): train on the teacher's own completions of the
    prompts (``alpha`` > 0 adds token KD on them)."""
    if run.generated is not None:
        return _build_seqkd_from_file(run)
    assert run.teacher is not None
    info: dict[str, Any] = {}
    examples, info["seqkd"] = _seqkd_examples(
        run.cfg, run.teacher, run.tokenizer, run.prompted(), run.device
    )
    kd = LossTerm("kd", _token_kd(run.cfg), weight=run.cfg.distill.alpha)
    loader = run.shuffled(examples, run.causal_collate())
    fused = _fused_model(run, run.cfg.distill.alpha, cached=False)
    terms = [] if fused is not None else _kd_and_ce(run.cfg, kd)
    return LMObjective(terms, loader, run.causal_eval_loader(), info, model=fused)


def _build_seqkd_from_file(run: LMSetup) -> LMObjective:
    """Sequence-level KD on a served teacher's completions (``data.generated_file``, no local
    teacher); ``alpha`` > 0 adds token KD on the file's top-k (:mod:`kdistill.lm.generated`)."""
    cfg, d, data = run.cfg, run.cfg.distill, run.generated
    assert data is not None
    _fused_model(run, d.alpha, cached=True)  # distill.fused: true is an error here
    collate: Any = run.causal_collate()
    if data.k is not None:  # alpha > 0: the rows ride along as teacher.topk
        collate = GeneratedTopKCollator(collate, data.k)
    loss = CoveredTopKTokenKDLoss(
        d.divergence, beta=d.beta, skew_alpha=d.skew_alpha, temperature=d.resolved_temperature
    )
    kd = LossTerm("kd", loss, weight=d.alpha, teacher=TOPK)
    loader = run.shuffled(data.train, collate)
    eval_loader = ExampleLoader(data.eval, run.causal_collate(), cfg.data.eval_batch_size)
    return LMObjective(_kd_and_ce(cfg, kd), loader, eval_loader, {"generated": data.info})


def _build_gkd(run: LMSetup) -> LMObjective:
    """GKD (Agarwal et al. 2024): a share ``lam`` of the batches continued by the student
    itself (on-policy), all scored by the teacher with the configured divergence."""
    cfg, teacher = run.cfg, run.teacher
    assert teacher is not None
    info: dict[str, Any] = {}
    if cfg.seqkd.teacher_completions:
        examples, info["seqkd"] = _seqkd_examples(
            cfg, teacher, run.tokenizer, run.prompted(), run.device
        )
    else:
        examples = [
            {"input_ids": x["input_ids"], "prompt_length": x["prompt_length"]}
            for x in run.prompted()
        ]
    loader = OnPolicyLoader(
        examples,
        run.student,
        cfg.seqkd.lam,
        run.causal_collate(),
        cfg.data.batch_size,
        pad_token_id=run.pad,
        eos_token_id=run.tokenizer.eos_token_id,
        student_settings=GenerationSettings(
            "sample", cfg.seqkd.max_new_tokens, temperature=cfg.seqkd.student_temperature
        ),
        seed=cfg.seed,
    )
    fused = _fused_model(run, 1.0, cached=False)
    terms = [] if fused is not None else [LossTerm("kd", _token_kd(cfg), weight=1.0)]
    return LMObjective(terms, loader, run.causal_eval_loader(), info, model=fused)


def _build_distilbert(run: LMSetup) -> LMObjective:
    """DistilBERT (Sanh et al. 2019): soft-target KD + masked-LM + hidden-state cosine."""
    cfg, d, tokenizer, teacher = run.cfg, run.cfg.distill, run.tokenizer, run.teacher
    assert teacher is not None
    _fused_model(run, 1.0, cached=False)  # distill.fused: true is an error here
    collate = MLMCollator(
        pad_token_id=run.pad,
        mask_token_id=tokenizer.mask_token_id,
        vocab_size=_vocab_size(tokenizer),
        special_token_ids=list(tokenizer.all_special_ids),
        max_length=cfg.data.max_length,
        probability=d.mlm_probability,
    )
    weights = {**DISTILBERT_WEIGHTS, **d.weights}
    terms = distilbert_terms(
        peft_layer_name(run.student, d.student_layer or last_layer_name(run.student)),
        d.teacher_layer or last_layer_name(teacher),
        temperature=d.resolved_temperature,
        weights=weights,
        restrict_to_masked=d.restrict_to_masked,
        chunk_size=d.chunk_size,
    )
    train = [{"input_ids": x} for x in run.train_ids]
    loader = ExampleLoader(
        train, collate, cfg.data.batch_size, shuffle=True, seed=cfg.seed, takes_generator=True
    )
    eval_loader = ExampleLoader(
        [{"input_ids": x} for x in run.eval_ids],
        collate,
        cfg.data.eval_batch_size,
        seed=cfg.seed + 1,
        takes_generator=True,
    )
    return LMObjective(terms, loader, eval_loader, {"weights": weights})


OBJECTIVES: dict[str, Callable[[LMSetup], LMObjective]] = {
    "token_kd": _build_token_kd,
    "seqkd": _build_seqkd,
    "gkd": _build_gkd,
    "distilbert": _build_distilbert,
}
"""``distill.objective`` → its builder. A new objective is one more small builder here."""


DDP_OBJECTIVES = ("token_kd",)
"""Objectives that run under torchrun: the others generate or mask per process."""


def _for_several_processes(objective: LMObjective) -> None:
    """Global token means and rank shares of every batch (torchrun, DDP or FSDP)."""
    for term in objective.terms:
        term.loss = _GlobalTokenMean(term.loss)
    objective.train_loader = RankShareLoader(objective.train_loader)


TextExample = tuple[str, dict[str, Any]]
"""A record's text (a ``text`` record's own; else its tokens decoded) and its example
(``input_ids`` and, for prompt + completion or chat records, ``prompt_length`` /
``loss_mask``: :func:`kdistill.lm.data.tokenize_record`)."""


def _split_texts(
    cfg: LMExperimentConfig, tokenizer: Any, causal: bool
) -> tuple[list[TextExample], list[TextExample], dict[str, Any]]:
    """The data's records, shuffled with the seed, tokenised (targets per record shape,
    :mod:`kdistill.lm.data`), split into train / held-out; and the data actually used for
    ``summary.json`` (the fingerprint of what was read, the tokenisation counts)."""
    records = load_data_records(cfg.data)
    order = list(range(len(records)))
    random.Random(cfg.seed).shuffle(order)
    if cfg.data.max_examples is not None:
        order = order[: cfg.data.max_examples]
    chosen = LMRecords(
        [records.records[i] for i in order],
        records.shape,
        records.fingerprint,
        [(lambda j: records.where(order[j]), 0, len(order))],
    )
    _check_shape(cfg, chosen.shape)
    tokenized = tokenize_records(
        chosen,
        tokenizer,
        max_length=cfg.data.max_length,
        min_tokens=cfg.data.min_tokens,
        causal=causal,
        chat_mask=cfg.data.chat_mask,
    )
    kept = [
        (chosen.records[i].get("text") or _decode(tokenizer, x["input_ids"]), x)
        for i, x in zip(tokenized.indices, tokenized.examples, strict=True)
    ]
    n_eval = max(1, round(len(kept) * cfg.data.eval_fraction))
    if len(kept) - n_eval < 1:
        raise ConfigError(
            f"data: only {len(kept)} examples have >= {cfg.data.min_tokens} tokens and a "
            "target; need at least 2"
        )
    stats = dict(tokenized.stats)
    stats["records_used"] = stats.pop("records")  # after max_examples; "records": in the file
    info = {
        **records.fingerprint.to_dict(),
        **stats,
        "train_examples": len(kept) - n_eval,
        "eval_examples": n_eval,
    }
    return kept[n_eval:], kept[:n_eval], info


def _check_shape(cfg: LMExperimentConfig, shape: str) -> None:
    """Record shapes an objective cannot train on (a ``data.shape: auto`` file's, found on
    reading; an explicit ``data.shape`` is checked by the config)."""
    objective = cfg.distill.objective
    if objective in ("seqkd", "gkd") and shape == "messages":
        raise ConfigError(
            f"data.file: holds chat messages records; objective {objective} continues one "
            "prompt per record and does not support them yet: use prompt_completion records "
            "or objective: token_kd"
        )
    if cfg.distill.cross_tokenizer is not None and shape != "text":
        raise ConfigError(
            f"data.file: holds {shape} records; distill.cross_tokenizer aligns plain texts "
            "only (no prompt / assistant masks yet): use text records or one tokenizer"
        )


def _generated(cfg: LMExperimentConfig, tokenizer: Any) -> GeneratedData:
    """The examples of ``data.generated_file`` (its top-k when ``distill.alpha`` > 0)."""
    data = cfg.data
    assert data.generated_file is not None
    return load_generated(
        data.generated_file,
        tokenizer,
        use_topk=cfg.distill.alpha > 0,  # generated_topk vs alpha: checked by the config
        max_length=data.max_length,
        eval_fraction=data.eval_fraction,
        seed=cfg.seed,
        max_prompts=data.max_examples,
    )


def _prepare_student(cfg: LMModelConfig, student: nn.Module) -> nn.Module:
    """LoRA adapters (``student.lora``, :func:`kdistill.lm.lora.apply_lora`: the student's
    own weights frozen) and gradient checkpointing (``student.gradient_checkpointing``)."""
    if cfg.lora is not None:
        with warnings.catch_warnings():  # peft asks transformers 5's deprecated property
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing`", FutureWarning)
            student = apply_lora(student, cfg.lora)
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(student)
    return student


def _teacher_precision(cfg: LMModelConfig, teacher: nn.Module) -> nn.Module:
    """The frozen teacher in ``teacher.dtype`` (its outputs are upcast by the losses, which
    compute in at least float32: :func:`kdistill.losses._reduce._compute_dtype`); ``auto``
    keeps the dtype it was loaded or built in."""
    if cfg.dtype == "auto":
        return teacher
    dtype = getattr(torch, cfg.dtype)
    if any(p.dtype != dtype for p in teacher.parameters() if p.is_floating_point()):
        teacher.to(dtype)
    return teacher


def _shard_teacher(teacher: nn.Module, model: nn.Module) -> None:
    """``teacher.parallel: fsdp``: shard the frozen teacher over the torchrun ranks
    (:func:`kdistill.distributed.shard_teacher`) and free its gathered root parameters after
    every forward of the trained ``model`` (the fused loss reads the gathered ``lm_head``
    weight within that forward; its gradients are complete when the forward returns)."""
    distributed.shard_teacher(teacher)
    model.register_forward_hook(lambda module, args, output: distributed.reshard(teacher))


def build_lm_run(cfg: LMExperimentConfig, device: torch.device | str = "cpu") -> LMRun:
    """Tokenise the data, build the models and the objective; nothing is trained yet."""
    device = torch.device(device)
    d = cfg.distill
    causal = d.objective != "distilbert"
    world = distributed.world_size()
    if cfg.teacher is not None and cfg.teacher.parallel == "fsdp" and world == 1:
        raise ConfigError(
            "teacher.parallel: fsdp shards the teacher across the processes of a torchrun "
            "launch, and this is one process; launch with torchrun --nproc_per_node N -m "
            "kdistill lm ... (N >= 2) or set teacher.parallel: none"
        )
    if world > 1 and d.objective not in DDP_OBJECTIVES:
        raise ConfigError(
            f"distill.objective: {d.objective} runs in one process only; under torchrun "
            f"(several processes) kdistill lm supports objective {', '.join(DDP_OBJECTIVES)}"
        )
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size: the global batch of {cfg.data.batch_size} texts does not split "
            f"into {world} equal shares (one per process); make it a multiple of {world}"
        )
    pretrained = None
    if cfg.teacher is not None and cfg.teacher.pretrained is not None:
        pretrained = _load_pretrained(cfg.teacher.pretrained, "teacher")
    tokenizers = _load_tokenizers(cfg, None if pretrained is None else pretrained[1])
    _check_tokenizers(cfg, tokenizers)
    tokenizer = tokenizers.student
    generated = None
    data_info: dict[str, Any] = {}
    train_examples: list[dict[str, Any]] | None = None
    eval_examples: list[dict[str, Any]] | None = None
    if cfg.data.generated_file is not None:  # prompts + a served teacher's completions
        generated = _generated(cfg, tokenizer)
        train_ids = [x["input_ids"] for x in generated.train]
        eval_ids = [x["input_ids"] for x in generated.eval]
        train_texts = [_decode(tokenizer, x) for x in train_ids]
        eval_texts = [_decode(tokenizer, x) for x in eval_ids]
    else:
        train, held_out, data_info = _split_texts(cfg, tokenizer, causal)
        train_texts, train_examples = [t for t, _ in train], [x for _, x in train]
        eval_texts, eval_examples = [t for t, _ in held_out], [x for _, x in held_out]
        train_ids = [x["input_ids"] for x in train_examples]
        eval_ids = [x["input_ids"] for x in eval_examples]

    torch.manual_seed(cfg.seed)  # random models depend only on the seed
    teacher: nn.Module | None = None
    if pretrained is not None:
        teacher = pretrained[0]
    elif cfg.teacher is not None:
        teacher = _build_model(cfg.teacher, "teacher", causal, tokenizers.teacher, None)
    student = _build_model(cfg.student, "student", causal, tokenizer, teacher)
    student = _prepare_student(cfg.student, student)
    student.to(device)
    if teacher is not None and cfg.teacher is not None:  # after init_from_teacher copied it
        teacher = _teacher_precision(cfg.teacher, teacher)

    setup = LMSetup(
        cfg,
        tokenizer,
        teacher,
        student,
        train_ids,
        eval_ids,
        device,
        generated,
        teacher_tokenizer=tokenizers.teacher,
        train_texts=train_texts,
        eval_texts=eval_texts,
        train_examples=train_examples,
        eval_examples=eval_examples,
    )
    objective = OBJECTIVES[d.objective](setup)
    if world > 1:
        _for_several_processes(objective)
    if len(objective.train_loader) == 0:
        raise ConfigError("data: no training batch (too few texts for data.batch_size)")
    distiller: Distiller | FusedTokenKD
    if objective.model is not None:  # distill.fused: the student's logits are never formed
        distiller = objective.model
    else:
        live = any(t.uses_teacher and t.teacher != TOPK for t in objective.terms)
        distiller = Distiller(student, objective.terms, teacher=teacher if live else None)
    if cfg.teacher is not None and cfg.teacher.parallel == "fsdp" and teacher is not None:
        _shard_teacher(teacher, distiller)
    info = {"train_texts": len(train_ids), "eval_texts": len(eval_ids), **objective.info}
    info["fused"] = objective.model is not None
    if data_info:
        info["data"] = data_info  # what was read: fingerprint, records, tokenisation counts
    return LMRun(
        teacher,
        student,
        tokenizer,
        distiller,
        objective.train_loader,
        objective.eval_loader,
        info,
        teacher_tokenizer=tokenizers.teacher,
        teacher_eval_loader=objective.teacher_eval_loader,
        # bits per byte score whole texts: not prompt + completion or chat records, whose
        # loss counts the completion / assistant tokens only
        eval_texts=eval_texts if causal and data_info.get("shape", "text") == "text" else [],
    )


def _evaluate_sharded(model: nn.Module, loader: Any, device: torch.device) -> dict[str, float]:
    """:func:`~kdistill.lm.batches.evaluate_lm` under ``no_grad`` instead of ``inference_mode``.

    FSDP2 keeps the buffers it all-gathers a sharded model's parameters into from one forward
    to the next; made under ``inference_mode`` they would be inference tensors, which training
    may not write to afterwards. Every rank evaluates the whole held-out set.
    """
    with torch.no_grad():
        return evaluate_lm.__wrapped__(model, loader, device)  # type: ignore[attr-defined]


def _bits_per_byte(
    run: LMRun,
    model: nn.Module,
    tokenizer: Any,
    data: LMDataConfig,
    device: torch.device,
    sharded: bool = False,
) -> dict[str, float]:
    """``{"bits_per_byte"}`` of ``model`` on the held-out texts
    (:func:`~kdistill.lm.bpb.evaluate_bits_per_byte`, windows of ``data.max_length`` tokens),
    the figure comparable across tokenizers; ``{}`` for masked LMs (no next-token model)."""
    if not run.eval_texts:
        return {}
    score: Any = evaluate_bits_per_byte
    if sharded:  # no inference tensors in FSDP2's buffers (see _evaluate_sharded)
        score = evaluate_bits_per_byte.__wrapped__  # type: ignore[attr-defined]
    with torch.no_grad():
        out = score(
            model,
            tokenizer,
            run.eval_texts,
            max_length=data.max_length,
            batch_size=data.eval_batch_size,
            device=device,
        )
    return {"bits_per_byte": out["bits_per_byte"]}


def run_lm(cfg: LMExperimentConfig, resume: bool = False, progress: bool | None = None) -> LMResult:
    """Train the configured student and write the run folder; returns its summary.

    ``summary.json`` holds the teacher's and the student's held-out per-token metrics (the
    student before and after training) with the held-out bits per byte next to them (the
    teacher's per-token figures on its own tokens when its tokenizer is not the student's),
    parameter counts and timings.
    """
    device = start_run(cfg.seed, cfg.train).device
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = build_lm_run(cfg, device)
    sharded = cfg.train.parallel == "fsdp" and distributed.is_distributed()
    evaluate: Any = evaluate_lm
    if sharded:  # before the Trainer builds the optimizer over the (now DTensor) parameters
        distributed.shard_student(run.student)
        evaluate = _evaluate_sharded
    teacher_metrics = None
    if run.teacher is not None:
        teacher_sharded = distributed.is_sharded(run.teacher)  # teacher.parallel: fsdp
        if not teacher_sharded:  # a sharded teacher's shards already sit on the device
            run.teacher.to(device)
        own = run.eval_loader if run.teacher_eval_loader is None else run.teacher_eval_loader
        teacher_evaluate = _evaluate_sharded if teacher_sharded else evaluate
        teacher_metrics = teacher_evaluate(run.teacher, own, device)
        teacher_tokenizer = run.teacher_tokenizer or run.tokenizer
        teacher_metrics.update(
            _bits_per_byte(
                run, run.teacher, teacher_tokenizer, cfg.data, device, sharded or teacher_sharded
            )
        )
        distributed.reshard(run.teacher)
    initial = evaluate(run.student, run.eval_loader, device)
    initial.update(_bits_per_byte(run, run.student, run.tokenizer, cfg.data, device, sharded))
    trainer = build_trainer(
        run.distiller,
        run.train_loader,
        run.eval_loader,
        optim=cfg.optim,
        train=cfg.train,
        output_dir=output_dir,
        config=cfg.to_dict(),
        device=device,
        evaluate_fn=evaluate,
        progress=progress,
    )
    began = time.perf_counter()
    fit = trainer.fit(resume=resume)
    train_seconds = time.perf_counter() - began
    final = evaluate(run.student, run.eval_loader, device)
    final.update(_bits_per_byte(run, run.student, run.tokenizer, cfg.data, device, sharded))
    hf_dir = output_dir / "student"
    full = distributed.full_state_dict(run.student) if sharded else None  # every rank gathers
    saved = None
    if distributed.is_main():
        saved = _save_pretrained(
            run.student, run.tokenizer, hf_dir, full, weights_path=fit.student_path
        )
    summary: dict[str, Any] = {
        "objective": cfg.distill.objective,
        "teacher": None
        if run.teacher is None
        else {"parameters": count_parameters(run.teacher), "eval": teacher_metrics},
        "student": {
            "parameters": count_parameters(run.student),
            "initial": initial,
            "final": final,
            "trainable_parameters": trainable_parameter_count(run.student),
            "weights": str(fit.student_path),
            "hf_folder": str(hf_dir),
            **_lora_summary(cfg.student, saved),
        },
        "train_seconds": train_seconds,
        "epochs": cfg.train.epochs,
        **run.info,
    }
    if isinstance(run.train_loader, OnPolicyLoader):
        summary["on_policy_batches"] = run.train_loader.on_policy_batches
    summary["processes"] = distributed.world_size()
    summary["parallel"] = cfg.train.parallel if distributed.is_distributed() else "none"
    summary["config"] = cfg.to_dict()  # kdistill report / export read the run's config
    if distributed.is_main():
        atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    distributed.barrier()  # no rank returns before rank 0 has written the run folder
    return LMResult(summary, fit, output_dir)
