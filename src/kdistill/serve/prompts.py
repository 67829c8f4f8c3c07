"""Prompt files for ``kdistill generate``: JSON Lines, CSV or plain text, checked line by line.

A prompt is either a plain string (``prompt``) or a chat (``messages``: a list of
``{"role": ..., "content": ...}``). Accepted files:

* ``.jsonl`` — one JSON object per line with ``messages`` or a text field (``prompt`` by
  default; ``prompts.field`` names another, e.g. ``instruction`` or ``question``); blank lines
  are skipped.
* ``.csv`` — a header row and a column named ``prompts.field`` (default ``prompt``).
* ``.txt`` — one prompt per non-empty line.

Every malformed record raises :class:`~kdistill.config.ConfigError` naming the file, the line
number and what is wrong; an empty file (no prompts) is an error too.
"""

from __future__ import annotations

import csv
import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdistill.config import ConfigError

__all__ = ["FORMATS", "ROLES", "Prompt", "file_sha256", "read_prompts"]

FORMATS = ("auto", "jsonl", "csv", "txt")
ROLES = ("system", "user", "assistant", "tool", "developer")


@dataclass(frozen=True)
class Prompt:
    """One prompt: its position in the file, the line it came from, and its content."""

    index: int
    line: int
    prompt: str | None = None
    messages: tuple[dict[str, str], ...] | None = None

    def as_record(self) -> dict[str, Any]:
        if self.messages is not None:
            return {"messages": [dict(m) for m in self.messages]}
        return {"prompt": self.prompt}


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _format_of(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".txt"):
        return suffix[1:]
    raise ConfigError(
        f"prompts.file: cannot tell the format of {path} from its suffix {suffix!r}; name it "
        "*.jsonl, *.csv or *.txt, or set prompts.format to one of: jsonl, csv, txt"
    )


def _messages(value: Any, where: str) -> tuple[dict[str, str], ...]:
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise ConfigError(f"{where}: messages[{i}] is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigError(
                f"{where}: messages[{i}].role is {role!r}; allowed roles: {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise ConfigError(f"{where}: messages[{i}].content must be a string")
        out.append({"role": role, "content": content})
    return tuple(out)


def _text(value: Any, field: str, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: '{field}' must be a non-empty string, got {value!r}")
    return value


def _from_object(obj: Any, field: str, index: int, line: int, where: str) -> Prompt:
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "messages" in obj:
        return Prompt(index, line, messages=_messages(obj["messages"], where))
    if field in obj:
        return Prompt(index, line, prompt=_text(obj[field], field, where))
    raise ConfigError(
        f"{where}: no 'messages' and no '{field}' key (keys: {', '.join(map(str, obj))}); "
        "set prompts.field to the key that holds the prompt"
    )


def read_prompts(
    path: str | Path, fmt: str = "auto", field: str = "prompt", limit: int | None = None
) -> list[Prompt]:
    """Every prompt of ``path`` in file order (``index`` 0, 1, …), at most ``limit``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"prompts.file: {path} does not exist")
    kind = _format_of(path, fmt)
    prompts: list[Prompt] = []
    with open(path, encoding="utf-8", newline="") as handle:
        if kind == "jsonl":
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{line_no}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{where}: not valid JSON ({err.msg})") from None
                prompts.append(_from_object(obj, field, len(prompts), line_no, where))
                if limit is not None and len(prompts) >= limit:
                    break
        elif kind == "csv":
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise ConfigError(f"prompts.file: {path} is empty: no header row, no prompts")
            if field not in reader.fieldnames:
                raise ConfigError(
                    f"{path}:1: no column {field!r} in the header ({', '.join(reader.fieldnames)})"
                    "; set prompts.field to the column that holds the prompt"
                )
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise ConfigError(f"{where}: more fields than the header has")
                prompts.append(
                    Prompt(len(prompts), reader.line_num, prompt=_text(row[field], field, where))
                )
                if limit is not None and len(prompts) >= limit:
                    break
        elif kind == "txt":
            for line_no, line in enumerate(handle, start=1):
                if line.strip():
                    prompts.append(Prompt(len(prompts), line_no, prompt=line.rstrip("\r\n")))
                    if limit is not None and len(prompts) >= limit:
                        break
        else:
            raise ConfigError(f"prompts.format: {fmt!r} is not allowed; choose one of: {FORMATS}")
    if not prompts:
        raise ConfigError(f"prompts.file: {path} holds no prompts; nothing to generate")
    return prompts
