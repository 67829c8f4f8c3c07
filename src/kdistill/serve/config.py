"""Typed configuration of ``kdistill generate`` and of a served teacher.

:class:`TeacherEndpointConfig` is the ``teacher:`` section of a generate config and the shape
proposed for ``distill.teacher`` of an LM run (teacher-forced scoring from a server). Every
value is checked in ``__post_init__``; an error names the dotted key and what is allowed.

Example (``kdistill generate CONFIG.yaml``)::

    teacher:
      endpoint: http://127.0.0.1:8000/v1
      model: smollm2
      api_key_env: OPENAI_API_KEY   # optional: the NAME of the variable, never the key
      api: chat                     # or completions
      concurrency: 8
    prompts:
      file: prompts.jsonl           # .jsonl (messages / prompt), .csv, .txt
    sampling:
      n: 2
      temperature: 0.7
      max_tokens: 256
      logprobs: 8                   # top-k of every completion token (0: none)
      system_prompt: You are a helpful assistant.
    output: runs/gen/completions.jsonl
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdistill.config import ConfigError, _build, read_config_file

__all__ = [
    "GenerateConfig",
    "PromptsConfig",
    "SamplingConfig",
    "TeacherEndpointConfig",
    "generate_config_from_dict",
    "load_generate_config",
]

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class TeacherEndpointConfig:
    """Where the teacher is served and how to talk to it."""

    endpoint: str = ""  # base URL ending in /v1, e.g. http://127.0.0.1:8000/v1
    model: str = ""
    api_key_env: str | None = None  # the name of an environment variable holding the key
    api: Literal["chat", "completions"] = "chat"
    timeout: float = 120.0  # seconds per attempt
    max_retries: int = 6
    backoff: float = 1.0  # first retry delay (s), doubled each time
    max_backoff: float = 60.0
    concurrency: int = 8

    def __post_init__(self) -> None:
        if not re.match(r"^https?://", self.endpoint):
            raise ConfigError(
                f"endpoint: must be an http(s) URL such as http://127.0.0.1:8000/v1, got "
                f"{self.endpoint!r}"
            )
        if not self.model:
            raise ConfigError("model: the served model's name is required (see GET /v1/models)")
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ConfigError(
                f"api_key_env: must be the NAME of an environment variable (letters, digits, "
                f"_), not the key itself; got a {len(self.api_key_env)}-character value"
            )
        if not self.timeout > 0:
            raise ConfigError(f"timeout: must be > 0 seconds, got {self.timeout}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries: must be >= 0, got {self.max_retries}")
        if not (self.backoff >= 0 and self.max_backoff >= self.backoff):
            raise ConfigError(
                f"backoff / max_backoff: need 0 <= backoff <= max_backoff, got {self.backoff} / "
                f"{self.max_backoff}"
            )
        if self.concurrency < 1:
            raise ConfigError(f"concurrency: must be >= 1, got {self.concurrency}")

    def api_key(self) -> str | None:
        """The key from the environment (``None`` when no variable is named)."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ConfigError(
                f"teacher.api_key_env: the environment variable {self.api_key_env} is not set "
                "or empty; export it, or remove api_key_env for a server without a key"
            )
        return key

    def client(self) -> Any:
        """An :class:`~kdistill.serve.client.OpenAIClient` for this endpoint."""
        from kdistill.serve.client import OpenAIClient

        return OpenAIClient(
            self.endpoint,
            api_key=self.api_key(),
            api_key_env=self.api_key_env,
            timeout=self.timeout,
            max_retries=self.max_retries,
            backoff=self.backoff,
            max_backoff=self.max_backoff,
            concurrency=self.concurrency,
        )


@dataclass
class PromptsConfig:
    file: str = ""
    format: Literal["auto", "jsonl", "csv", "txt"] = "auto"
    field: str = "prompt"  # the text key / column when a record has no "messages"
    limit: int | None = None  # the first N prompts only

    def __post_init__(self) -> None:
        if not self.file:
            raise ConfigError("file: the prompts file is required (.jsonl, .csv or .txt)")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit: must be >= 1 or null, got {self.limit}")


@dataclass
class SamplingConfig:
    n: int = 1  # samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int = 0  # top-k alternatives per completion token (0: no logprobs)
    system_prompt: str | None = None  # chat only: prepended unless a record has its own

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ConfigError(f"n: must be >= 1 sample per prompt, got {self.n}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        if not 0 <= self.logprobs <= 100:
            raise ConfigError(
                f"logprobs: must be in [0, 100] (top-k per token), got {self.logprobs}"
            )
        if any(not s for s in self.stop):
            raise ConfigError("stop: stop sequences must be non-empty strings")


@dataclass
class GenerateConfig:
    """``kdistill generate``: a teacher endpoint, a prompts file, sampling, an output file."""

    teacher: TeacherEndpointConfig = field(default_factory=TeacherEndpointConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    output: str = ""
    progress: Literal["auto", "on", "off"] = "auto"  # auto: only on a terminal

    def __post_init__(self) -> None:
        if not self.output:
            raise ConfigError("output: the completions file (JSONL) to write is required")
        if self.sampling.system_prompt is not None and self.teacher.api != "chat":
            raise ConfigError(
                "sampling.system_prompt: needs teacher.api: chat (a completions endpoint has "
                "no system role); put it in the prompt text instead"
            )

    def settings(self) -> dict[str, Any]:
        """What decides the outputs (recorded in the header, compared on resume)."""
        return {"api": self.teacher.api, "model": self.teacher.model, **asdict(self.sampling)}

    @property
    def output_path(self) -> Path:
        return Path(self.output).expanduser()


def generate_config_from_dict(data: dict[str, Any]) -> GenerateConfig:
    """Build a :class:`GenerateConfig` from plain data, validating every key."""
    for section in ("teacher", "prompts"):
        if section not in data:
            raise ConfigError(f"{section}: section missing; see kdistill.serve.config")
    return _build(GenerateConfig, data, "")


def load_generate_config(
    path: str | Path, overrides: list[str] | tuple[str, ...] = ()
) -> GenerateConfig:
    """Read a YAML file, apply ``key.sub=value`` overrides (``--set``) and validate."""
    return generate_config_from_dict(read_config_file(path, overrides))
