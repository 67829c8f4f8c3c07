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

Python::

    from kdistill.lm.config import load_lm_config
    from kdistill.lm.train import run_lm
    result = run_lm(load_lm_config("examples/lm/tiny_token_kd.yaml"))
    result.summary["student"]["final"]["perplexity"]
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdistill.checkpoint import atomic_write_text
from kdistill.config import ConfigError
from kdistill.distiller import Distiller, LossTerm
from kdistill.lm.batches import (
    ByteTokenizer,
    CausalLMCollator,
    ExampleLoader,
    TokenCrossEntropy,
    TokenKDLoss,
    evaluate_lm,
)
from kdistill.lm.config import LMDataConfig, LMExperimentConfig, LMModelConfig
from kdistill.lm.distilbert import (
    DISTILBERT_WEIGHTS,
    MLMCollator,
    distilbert_terms,
    last_layer_name,
)
from kdistill.lm.seqkd import GenerationSettings, OnPolicyLoader, build_seqkd_examples
from kdistill.trainer import FitResult, Trainer, resolve_device, seed_everything

__all__ = ["LMResult", "LMRun", "build_lm_run", "load_texts", "run_lm"]


# --------------------------------------------------------------------------- text


def load_texts(cfg: LMDataConfig) -> list[str]:
    """The raw texts of ``data``: a file's lines / paragraphs, or a built-in corpus."""
    if cfg.text_file is not None:
        path = Path(cfg.text_file).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"data.text_file: {path} does not exist")
        text = path.read_text(encoding="utf-8")
        if cfg.split == "paragraphs":
            parts = [" ".join(p.split()) for p in text.split("\n\n")]
        else:
            parts = [line.strip() for line in text.splitlines()]
        return [p for p in parts if p]
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


def _load_tokenizer(cfg: LMExperimentConfig) -> Any:
    name = cfg.data.tokenizer
    if name is None:
        paths = [m.path for m in (cfg.teacher, cfg.student) if m is not None and m.path]
        name = paths[0] if paths else "byte"
    if name == "byte":
        return ByteTokenizer()
    tokenizer = _transformers().AutoTokenizer.from_pretrained(name)
    if tokenizer.pad_token_id is None:  # Llama-style tokenizers have none: pad with EOS
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _vocab_size(tokenizer: Any) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, ByteTokenizer) else len(tokenizer)


def _tokenize(
    texts: Sequence[str], tokenizer: Any, cfg: LMDataConfig, causal: bool
) -> list[list[int]]:
    eos = tokenizer.eos_token_id
    out = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if causal and eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)  # the student learns where a text ends
        ids = ids[: cfg.max_length]
        if len(ids) >= max(cfg.min_tokens, 2):
            out.append(ids)
    return out


# --------------------------------------------------------------------------- models


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


def _save_pretrained(model: nn.Module, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of the model (and an HF tokenizer) without a progress bar."""
    hf_logging = _transformers().utils.logging
    had_bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(str(folder))  # type: ignore[operator]
        if not isinstance(tokenizer, ByteTokenizer):
            tokenizer.save_pretrained(str(folder))
    finally:
        if had_bar:
            hf_logging.enable_progress_bar()


def count_parameters(model: nn.Module) -> int:
    """Parameters of ``model``, each shared (tied) tensor counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


# --------------------------------------------------------------------------- the run


@dataclass
class LMRun:
    """Everything :func:`run_lm` trains: models, objective and data."""

    teacher: nn.Module | None
    student: nn.Module
    tokenizer: Any
    distiller: Distiller
    train_loader: Any
    eval_loader: ExampleLoader
    info: dict[str, Any] = field(default_factory=dict)


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
    texts: list[list[int]],
    device: torch.device,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The teacher's completions for the prompts, cached in ``seqkd_examples.jsonl``."""
    cache = Path(cfg.output_dir) / "seqkd_examples.jsonl"
    settings = _settings(cfg)
    key = {"settings": settings.__dict__, "prompt_tokens": cfg.data.prompt_tokens, "n": len(texts)}
    if cache.is_file():
        lines = cache.read_text().splitlines()
        if lines and json.loads(lines[0]) == key:
            return [json.loads(line) for line in lines[1:]], {"cached": True}
    prompts = [ids[: cfg.data.prompt_tokens] for ids in texts if len(ids) > cfg.data.prompt_tokens]
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
    )


def build_lm_run(cfg: LMExperimentConfig, device: torch.device | str = "cpu") -> LMRun:
    """Tokenise the data, build the models and the objective; nothing is trained yet."""
    device = torch.device(device)
    d = cfg.distill
    causal = d.objective != "distilbert"
    tokenizer = _load_tokenizer(cfg)
    texts = load_texts(cfg.data)
    random.Random(cfg.seed).shuffle(texts)
    if cfg.data.max_examples is not None:
        texts = texts[: cfg.data.max_examples]
    ids = _tokenize(texts, tokenizer, cfg.data, causal)
    n_eval = max(1, round(len(ids) * cfg.data.eval_fraction))
    if len(ids) - n_eval < 1:
        raise ConfigError(
            f"data: only {len(ids)} texts have >= {cfg.data.min_tokens} tokens; need at least 2"
        )
    train_ids, eval_ids = ids[n_eval:], ids[:n_eval]

    torch.manual_seed(cfg.seed)  # random models depend only on the seed
    teacher = _build_model(cfg.teacher, "teacher", causal, tokenizer, None) if cfg.teacher else None
    student = _build_model(cfg.student, "student", causal, tokenizer, teacher)
    student.to(device)
    info: dict[str, Any] = {"train_texts": len(train_ids), "eval_texts": len(eval_ids)}

    pad = tokenizer.pad_token_id
    train_examples: list[dict[str, Any]] = [{"input_ids": x} for x in train_ids]
    eval_examples = [{"input_ids": x} for x in eval_ids]
    batch = cfg.data.batch_size
    train_loader: Any
    if d.objective == "distilbert":
        mlm_collate = MLMCollator(
            pad_token_id=pad,
            mask_token_id=tokenizer.mask_token_id,
            vocab_size=_vocab_size(tokenizer),
            special_token_ids=list(tokenizer.all_special_ids),
            max_length=cfg.data.max_length,
            probability=d.mlm_probability,
        )
        assert teacher is not None
        weights = {**DISTILBERT_WEIGHTS, **d.weights}
        terms = distilbert_terms(
            d.student_layer or last_layer_name(student),
            d.teacher_layer or last_layer_name(teacher),
            temperature=d.resolved_temperature,
            weights=weights,
            restrict_to_masked=d.restrict_to_masked,
            chunk_size=d.chunk_size,
        )
        distiller = Distiller(student, terms, teacher=teacher)
        train_loader = ExampleLoader(
            train_examples, mlm_collate, batch, shuffle=True, seed=cfg.seed, takes_generator=True
        )
        eval_loader = ExampleLoader(
            eval_examples,
            mlm_collate,
            cfg.data.eval_batch_size,
            seed=cfg.seed + 1,
            takes_generator=True,
        )
        info["weights"] = weights
    else:
        collate = CausalLMCollator(pad, cfg.data.max_length)
        eval_loader = ExampleLoader(eval_examples, collate, cfg.data.eval_batch_size)
        if d.objective == "gkd":
            assert teacher is not None
            prompt = cfg.data.prompt_tokens
            if cfg.seqkd.teacher_completions:
                examples, info["seqkd"] = _seqkd_examples(
                    cfg, teacher, tokenizer, train_ids, device
                )
            else:
                examples = [
                    {"input_ids": x, "prompt_length": prompt} for x in train_ids if len(x) > prompt
                ]
            train_loader = OnPolicyLoader(
                examples,
                student,
                cfg.seqkd.lam,
                collate,
                batch,
                pad_token_id=pad,
                eos_token_id=tokenizer.eos_token_id,
                student_settings=GenerationSettings(
                    "sample",
                    cfg.seqkd.max_new_tokens,
                    temperature=cfg.seqkd.student_temperature,
                ),
                seed=cfg.seed,
            )
            terms = [LossTerm("kd", _token_kd(cfg), weight=1.0)]
        else:
            if d.objective == "seqkd":
                assert teacher is not None
                train_examples, info["seqkd"] = _seqkd_examples(
                    cfg, teacher, tokenizer, train_ids, device
                )
            train_loader = ExampleLoader(
                train_examples, collate, batch, shuffle=True, seed=cfg.seed
            )
            terms = []
            if d.alpha > 0:
                terms.append(LossTerm("kd", _token_kd(cfg), weight=d.alpha))
            if d.alpha < 1:
                terms.append(LossTerm("ce", TokenCrossEntropy(), weight=1 - d.alpha, teacher=None))
        uses_teacher = any(t.uses_teacher for t in terms)
        distiller = Distiller(student, terms, teacher=teacher if uses_teacher else None)
    if len(train_loader) == 0:
        raise ConfigError("data: no training batch (too few texts for data.batch_size)")
    return LMRun(teacher, student, tokenizer, distiller, train_loader, eval_loader, info)


def run_lm(cfg: LMExperimentConfig, resume: bool = False, progress: bool | None = None) -> LMResult:
    """Train the configured student and write the run folder; returns its summary.

    ``summary.json`` holds the teacher's and the student's held-out per-token metrics (the
    student before and after training), parameter counts and timings.
    """
    seed_everything(cfg.seed, cfg.train.deterministic)
    if cfg.train.threads is not None:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg.train.device)
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    run = build_lm_run(cfg, device)
    evaluate = evaluate_lm
    teacher_metrics = None
    if run.teacher is not None:
        run.teacher.to(device)
        teacher_metrics = evaluate(run.teacher, run.eval_loader, device)
    initial = evaluate(run.student, run.eval_loader, device)
    trainer = Trainer(
        run.distiller,
        run.train_loader,
        run.eval_loader,
        cfg.optim,
        cfg.train.epochs,
        output_dir,
        device=device,
        progress=cfg.train.progress if progress is None else progress,
        config=cfg.to_dict(),
        checkpoint_every=cfg.train.checkpoint_every,
        skip_nonfinite=cfg.train.skip_nonfinite,
        amp=cfg.train.amp,
        tensorboard=cfg.train.tensorboard,
        evaluate_fn=evaluate,
    )
    began = time.perf_counter()
    fit = trainer.fit(resume=resume)
    train_seconds = time.perf_counter() - began
    final = evaluate(run.student, run.eval_loader, device)
    hf_dir = output_dir / "student"
    _save_pretrained(run.student, run.tokenizer, hf_dir)
    summary: dict[str, Any] = {
        "objective": cfg.distill.objective,
        "teacher": None
        if run.teacher is None
        else {"parameters": count_parameters(run.teacher), "eval": teacher_metrics},
        "student": {
            "parameters": count_parameters(run.student),
            "initial": initial,
            "final": final,
            "weights": str(fit.student_path),
            "hf_folder": str(hf_dir),
        },
        "train_seconds": train_seconds,
        "epochs": cfg.train.epochs,
        **run.info,
    }
    if isinstance(run.train_loader, OnPolicyLoader):
        summary["on_policy_batches"] = run.train_loader.on_policy_batches
    atomic_write_text(output_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
    return LMResult(summary, fit, output_dir)
