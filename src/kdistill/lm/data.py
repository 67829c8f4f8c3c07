"""Language-model data from files: text, prompt/completion and chat records.

Two steps, each usable alone::

    data = load_records("chat.jsonl")            # format and shape detected
    tokenized = tokenize_records(data, tokenizer, max_length=512)
    CausalLMCollator(tokenizer.pad_token_id)(tokenized.examples[:8])

**File formats** (:data:`FORMATS`, ``auto`` = by extension): ``text`` (one example per
non-empty line, or per blank-line separated paragraph), ``jsonl``, ``json`` (an array of
records, or JSON Lines), ``csv`` (a header row; every cell read as a string), ``parquet``,
and ``hf_disk`` (a folder written by ``datasets.Dataset.save_to_disk``). The structured
formats are read with Hugging Face ``datasets``; a folder of ``.jsonl`` / ``.json`` /
``.csv`` / ``.parquet`` shards is read file by file, so an error names the shard.

**Record shapes** (:data:`SHAPES`, ``auto`` = from the first record)::

    {"text": "..."}                                   # text: every token is a target
    {"prompt": "...", "completion": "..."}            # prompt_completion: completion only
    {"messages": [{"role": "system"|"user"|"assistant"|..., "content": "..."}, ...]}

Other keys (``id``, ``source``, ...) are ignored. Every record must have the detected shape;
one that does not is a :class:`~kdistill.config.ConfigError` naming the file and its line
(JSON Lines, text), record (JSON array) or row (CSV, Parquet, ``hf_disk``). So are invalid
UTF-8 (file and byte offset), JSON-looking lines in a ``text`` file (use ``data.format:
jsonl``), and a chat without an assistant turn.

**Targets** (tokens that carry a label, :data:`kdistill.lm.batches.Example`):

- ``text``: all tokens; ``eos`` appended so the student learns where a text ends.
- ``prompt_completion``: ``ids = encode(prompt) + encode(completion, no specials) + [eos]``,
  ``prompt_length = len(encode(prompt))``. The two parts are tokenised apart (as a model
  generating the completion after the prompt sees them), so no token straddles the border.
- ``messages``: the conversation rendered by the tokenizer's chat template
  (``apply_chat_template``); a per-token ``loss_mask`` is 1 on the tokens of *every*
  assistant turn and 0 on system, user and tool turns and on the template's headers
  (``<|im_start|>assistant\\n``). The mask comes from one of two methods
  (:data:`CHAT_MASK_METHODS`, ``auto`` picks the first that applies):

  * ``generation`` — the template marks assistant text with ``{% generation %}`` …
    ``{% endgeneration %}``; ``apply_chat_template(..., return_assistant_tokens_mask=True)``
    returns the mask (needs a fast tokenizer). Exactly what the template author marked.
  * ``incremental`` — any template: for each assistant turn ``k`` the conversation is
    rendered up to turn ``k`` with the generation prompt (``add_generation_prompt=True``:
    what the model is shown before it answers) and up to and including turn ``k``; the
    tokens between the two renderings are turn ``k``'s targets. Both renderings must be
    token prefixes of the whole conversation's tokens, else the template rewrites earlier
    turns (e.g. drops past reasoning) and the error says to use ``generation`` markers.
    It counts everything the template writes for the turn up to the next message
    (ChatML: ``content<|im_end|>\\n``), so the student learns to close its turn.

  :class:`~kdistill.lm.batches.ByteTokenizer` (offline tiny runs) has no template; chat is
  rendered with :data:`BYTE_CHAT_TEMPLATE` (ChatML as plain bytes) between ``bos`` and
  ``eos``. A byte-level student is trained from scratch, so any fixed format is right for it;
  a Hugging Face tokenizer without a chat template is an error instead, because an invented
  format would not be the one the pretrained model knows.

:func:`load_records` also returns a :class:`DataFingerprint` (path, format, shape, files and
sizes, sha256, number of records) for ``summary.json``.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kdistill.config import ConfigError
from kdistill.lm.batches import ByteTokenizer

__all__ = [
    "BYTE_CHAT_TEMPLATE",
    "CHAT_MASK_METHODS",
    "FORMATS",
    "SHAPES",
    "DataFingerprint",
    "LMRecords",
    "TokenizedRecords",
    "chat_example",
    "detect_format",
    "load_records",
    "read_text_file",
    "tokenize_record",
    "tokenize_records",
]

FORMATS = ("auto", "text", "jsonl", "json", "csv", "parquet", "hf_disk")
SHAPES = ("auto", "text", "prompt_completion", "messages")
CHAT_MASK_METHODS = ("auto", "generation", "incremental")

EXPECTED_SHAPES = (
    '{"text": str} | {"prompt": str, "completion": str} | '
    '{"messages": [{"role": str, "content": str}, ...]}'
)
_REQUIRED = {"text": ("text",), "prompt_completion": ("prompt", "completion")}

BYTE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML, rendered as UTF-8 bytes for :class:`~kdistill.lm.batches.ByteTokenizer`."""

_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSED = (".gz", ".bz2", ".xz", ".zst", ".zip", ".lz4")
_HF_DISK_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")
_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")
_CHUNK = 1 << 20


# --------------------------------------------------------------------------- fingerprint


@dataclass(frozen=True)
class DataFingerprint:
    """What data a run used, for ``summary.json``.

    ``sha256``: of the file's bytes for one file (equal to ``sha256sum FILE``); for several
    files (shards, an ``hf_disk`` folder), of their ``sha256sum``-style manifest
    (``"<sha256>  <relative path>\\n"`` per file, sorted). ``hashed_bytes`` < ``bytes`` when
    only the first ``hash_limit_mb`` of each file were hashed.
    """

    path: str
    format: str
    shape: str
    records: int
    bytes: int
    sha256: str
    hashed_bytes: int
    files: list[dict[str, Any]] = field(default_factory=list)  # {"path": rel, "bytes": n}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _scan_file(path: Path, *, utf8: bool, hash_limit: int | None) -> tuple[str, int, int]:
    """One pass: sha256 of the first ``hash_limit`` bytes and (``utf8``) a UTF-8 check.

    Returns ``(sha256 hex, size, hashed bytes)``. Raises :class:`ConfigError` naming the
    byte offset of the first invalid UTF-8 sequence.
    """
    digest = hashlib.sha256()
    decoder = codecs.getincrementaldecoder("utf-8")(errors="strict")
    offset = hashed = 0
    with path.open("rb") as handle:
        while True:
            if not utf8 and hash_limit is not None and hashed >= hash_limit:
                break
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            if hash_limit is None or hashed < hash_limit:
                part = chunk if hash_limit is None else chunk[: hash_limit - hashed]
                digest.update(part)
                hashed += len(part)
            if utf8:
                try:
                    decoder.decode(chunk)
                except UnicodeDecodeError as err:
                    _raise_utf8(path, offset, chunk, err)
            offset += len(chunk)
        if utf8:
            try:
                decoder.decode(b"", final=True)
            except UnicodeDecodeError as err:
                _raise_utf8(path, offset, b"", err)
    return digest.hexdigest(), path.stat().st_size, hashed


def _raise_utf8(path: Path, chunk_start: int, chunk: bytes, err: UnicodeDecodeError) -> None:
    # err.start counts from the start of the bytes the decoder held (a chunk plus at most 3
    # pending bytes of a split sequence carried from the previous chunk).
    pending = len(err.object) - len(chunk)
    at = chunk_start - pending + err.start
    with path.open("rb") as handle:
        data = handle.read(at + 1)
    line = data[:at].count(b"\n") + 1
    raise ConfigError(
        f"{path}: invalid UTF-8 at byte offset {at} (line {line}, byte "
        f"0x{data[at]:02x}: {err.reason}); save the file as UTF-8 "
        f"(e.g. iconv -f latin1 -t utf-8)"
    ) from None


def _fingerprint(
    path: Path,
    files: Sequence[Path],
    fmt: str,
    shape: str,
    records: int,
    hash_limit_mb: float | None,
) -> DataFingerprint:
    limit = None if hash_limit_mb is None else int(hash_limit_mb * (1 << 20))
    utf8 = fmt in ("text", "jsonl", "json", "csv")
    root = path if path.is_dir() else path.parent
    entries, manifest, total, hashed = [], [], 0, 0
    for file in files:
        sha, size, done = _scan_file(file, utf8=utf8, hash_limit=limit)
        rel = file.relative_to(root).as_posix()
        entries.append({"path": rel, "bytes": size})
        manifest.append(f"{sha}  {rel}\n")
        total += size
        hashed += done
    if len(files) == 1 and not path.is_dir():
        sha256 = manifest[0].split()[0]
    else:
        sha256 = hashlib.sha256("".join(manifest).encode()).hexdigest()
    return DataFingerprint(str(path), fmt, shape, records, total, sha256, hashed, entries)


# --------------------------------------------------------------------------- formats


def detect_format(path: str | os.PathLike[str]) -> str:
    """The :data:`FORMATS` name for ``path``: by extension, ``hf_disk`` for a folder written
    by ``save_to_disk``, the shards' format for a folder of data files, else ``text``."""
    path = Path(path)
    if path.is_dir():
        if any((path / marker).is_file() for marker in _HF_DISK_MARKERS):
            return "hf_disk"
        kinds = {_EXTENSIONS[f.suffix.lower()] for f in _shard_candidates(path)}
        if len(kinds) == 1:
            return kinds.pop()
        found = ", ".join(sorted(kinds)) or "none"
        raise ConfigError(
            f"data.file: {path} is a folder but neither a datasets save_to_disk folder (no "
            f"{' / '.join(_HF_DISK_MARKERS)}) nor a folder of data files of one format "
            f"(found: {found}); point data.file at one file or set data.format"
        )
    suffix = path.suffix.lower()
    if suffix in _COMPRESSED:
        raise ConfigError(
            f"data.file: {path} is compressed ({suffix}); decompress it first "
            f"(kdistill reads {', '.join(sorted(set(_EXTENSIONS)))} and plain text)"
        )
    return _EXTENSIONS.get(suffix, "text")


def _shard_candidates(folder: Path) -> list[Path]:
    return sorted(f for f in folder.rglob("*") if f.is_file() and f.suffix.lower() in _EXTENSIONS)


def _data_files(path: Path, fmt: str) -> list[Path]:
    if fmt == "hf_disk":
        return sorted(f for f in path.rglob("*") if f.is_file())
    if not path.is_dir():
        return [path]
    files = [f for f in _shard_candidates(path) if _EXTENSIONS[f.suffix.lower()] == fmt]
    if not files:
        raise ConfigError(f"data.file: the folder {path} holds no {fmt} file")
    return files


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[Any]:
    """Import ``datasets`` offline, without progress bars or logged errors (we raise ours)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
    except ImportError as err:
        raise ImportError(
            "reading jsonl / json / csv / parquet / hf_disk data needs Hugging Face datasets: "
            "pip install 'kdistill[lm]'"
        ) from err
    dlog = datasets.utils.logging
    had_bar, level = dlog.is_progress_bar_enabled(), dlog.get_verbosity()
    dlog.disable_progress_bar()
    dlog.set_verbosity(logging.CRITICAL)
    try:
        yield datasets
    finally:
        dlog.set_verbosity(level)
        if had_bar:
            dlog.enable_progress_bar()


def _read_table(file: Path, fmt: str, cache_dir: str | None, hf_split: str | None) -> list[dict]:
    """Records of one file (or an ``hf_disk`` folder) through ``datasets``."""
    with _quiet_datasets() as datasets:
        try:
            if fmt == "hf_disk":
                loaded = datasets.load_from_disk(str(file))
                return _pick_split(loaded, file, hf_split).to_list()
            builder, kwargs = fmt, {}
            if fmt == "jsonl":
                builder = "json"
            elif fmt == "csv":  # every cell a string ("007" stays "007"), "" stays ""
                kwargs = {
                    "converters": dict.fromkeys(_csv_header(file), str),
                    "keep_default_na": False,
                }
            table = datasets.load_dataset(
                builder, data_files=[str(file)], split="train", cache_dir=cache_dir, **kwargs
            )
            return table.to_list()
        except ConfigError:
            raise
        except Exception as err:
            raise _ReadFailed(_explain_read_error(file, fmt, err)) from None


class _ReadFailed(ConfigError):
    """``datasets`` could not read a file; :func:`load_records` may name the record at fault."""


def _pick_split(loaded: Any, folder: Path, hf_split: str | None) -> Any:
    if not hasattr(loaded, "keys"):  # a Dataset
        if hf_split not in (None, "train"):
            raise ConfigError(
                f"data.hf_split: {folder} holds one dataset, not a DatasetDict; remove hf_split"
            )
        return loaded
    splits = list(loaded.keys())
    name = hf_split or ("train" if "train" in splits else splits[0] if len(splits) == 1 else None)
    if name not in splits:
        raise ConfigError(
            f"data.hf_split: {folder} is a DatasetDict with splits {splits}; "
            f"set data.hf_split to one of them"
        )
    return loaded[name]


def _csv_header(file: Path) -> list[str]:
    with file.open(encoding="utf-8", newline="") as handle:
        header = next(csv.reader(handle), None)
    if not header:
        raise ConfigError(f"{file}: empty CSV; the first row must name the columns (text, ...)")
    return header


def _explain_read_error(file: Path, fmt: str, err: Exception) -> str:
    cause = err
    while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__  # type: ignore[assignment]
    if fmt in ("jsonl", "json"):
        bad = _first_bad_json_line(file)
        if bad is not None:
            return bad
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    return f"{file}: cannot read it as {fmt} ({detail}); check data.format"


def _first_bad_json_line(file: Path) -> str | None:
    text = file.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            json.loads(text)
        except json.JSONDecodeError as err:
            return f"{file}: line {err.lineno}: invalid JSON ({err.msg})"
        return None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            return (
                f"{file}: line {number}: invalid JSON ({err.msg}); each line of a JSON Lines "
                f"file must be one record {EXPECTED_SHAPES}"
            )
        if not isinstance(value, dict):
            return f"{file}: line {number}: a {type(value).__name__}, not a record {{...}}"
    return None


def _locator(file: Path, fmt: str) -> Callable[[int], str]:
    """Row index (0-based, as ``datasets`` numbers them) → ``"FILE: line L"`` etc."""
    if fmt in ("jsonl", "json"):
        head = file.read_text(encoding="utf-8").lstrip()[:1]
        if head != "[":
            return lambda row: f"{file}: line {_nonblank_line(file, row)}"
        return lambda row: f"{file}: record {row + 1} of the JSON array"
    if fmt == "csv":
        return lambda row: f"{file}: row {row + 1} after the header"
    return lambda row: f"{file}: row {row} (0-based)"


def _nonblank_line(file: Path, row: int) -> int:
    """1-based line number of the ``row``-th non-blank line (``datasets`` skips blank lines)."""
    seen = -1
    with file.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                seen += 1
                if seen == row:
                    return number
    return -1


def read_text_file(path: str | os.PathLike[str], split: str = "lines") -> list[str]:
    """Non-empty lines (``split="lines"``) or paragraphs (``"paragraphs"``, blank-line
    separated, whitespace collapsed) of a UTF-8 text file.

    Raises :class:`ConfigError` on invalid UTF-8 (file, byte offset) and when the lines look
    like JSON records (suggesting ``data.format: jsonl`` / ``json``): training on raw JSON
    would teach the braces and the prompt.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"data.file: {path} does not exist (or is not a file)")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        _scan_file(path, utf8=True, hash_limit=0)  # raises with the offset
        raise  # pragma: no cover - _scan_file always raises here
    _reject_json_text(path, text)
    if split == "paragraphs":
        parts = [" ".join(p.split()) for p in text.split("\n\n")]
    elif split == "lines":
        parts = [line.strip() for line in text.splitlines()]
    else:
        raise ConfigError(f"data.split: must be 'lines' or 'paragraphs', got {split!r}")
    return [p for p in parts if p]


def _reject_json_text(path: Path, text: str, sample: int = 20) -> None:
    stripped = text.lstrip()
    if stripped.startswith("["):
        with contextlib.suppress(json.JSONDecodeError):
            if isinstance(json.loads(stripped), list):
                raise ConfigError(
                    f"{path}: the text file is one JSON array; set data.format: json to read "
                    f"its records ({EXPECTED_SHAPES})"
                )
    lines = [line.strip() for line in text.splitlines() if line.strip()][:sample]
    records = 0
    for line in lines:
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):
                records += isinstance(json.loads(line), dict)
    if lines and records * 2 > len(lines):
        raise ConfigError(
            f"{path}: {records} of the first {len(lines)} lines are JSON records; set "
            f"data.format: jsonl to read them as records ({EXPECTED_SHAPES}) instead of "
            f"training on the raw JSON text"
        )


# --------------------------------------------------------------------------- records


@dataclass
class LMRecords:
    """Validated records of one shape, where each came from, and the data's fingerprint.

    ``records``: ``{"text"}``, ``{"prompt", "completion"}`` or ``{"messages": [...]}``
    dicts (other keys dropped). ``where(i)`` names record ``i``'s file and line/row.
    """

    records: list[dict[str, Any]]
    shape: str
    fingerprint: DataFingerprint
    locations: list[tuple[Callable[[int], str], int, int]]  # (locate, first index, count)

    def __len__(self) -> int:
        return len(self.records)

    def where(self, index: int) -> str:
        for locate, start, count in self.locations:
            if start <= index < start + count:
                return locate(index - start)
        raise IndexError(index)


def load_records(
    path: str | os.PathLike[str],
    format: str = "auto",
    shape: str = "auto",
    *,
    split: str = "lines",
    hf_split: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    hash_limit_mb: float | None = None,
) -> LMRecords:
    """Read and validate the records of a data file or folder.

    Args:
        path: a file, a folder of shards, or a ``save_to_disk`` folder.
        format: one of :data:`FORMATS`; ``auto`` by :func:`detect_format`.
        shape: one of :data:`SHAPES`; ``auto`` from the first record (``messages`` before
            ``prompt``/``completion`` before ``text``). Every record must have it.
        split: ``lines`` / ``paragraphs`` for ``text`` files.
        hf_split: the split of a ``DatasetDict`` folder (default ``train``, or its only one).
        cache_dir: ``datasets``' Arrow cache (default its own, ``~/.cache/huggingface``).
        hash_limit_mb: hash only the first MiB of each file (``None``: whole files).

    Raises:
        ConfigError: missing path, unknown format/shape, unreadable file, invalid UTF-8,
            JSON-looking text, or a record not of the shape (file + line/row named).
    """
    path = Path(path).expanduser().absolute()
    if format not in FORMATS:
        raise ConfigError(f"data.format: must be one of {', '.join(FORMATS)}; got {format!r}")
    if shape not in SHAPES:
        raise ConfigError(f"data.shape: must be one of {', '.join(SHAPES)}; got {shape!r}")
    if not path.exists():
        raise ConfigError(f"data.file: {path} does not exist")
    fmt = detect_format(path) if format == "auto" else format
    if fmt == "hf_disk" and not path.is_dir():
        raise ConfigError(f"data.format: hf_disk needs a save_to_disk folder; {path} is a file")
    files = _data_files(path, fmt)
    # The fingerprint pass also rejects invalid UTF-8 with its offset, before any parser.
    fingerprint = _fingerprint(path, files, fmt, shape, 0, hash_limit_mb)
    records: list[dict[str, Any]] = []
    locations: list[tuple[Callable[[int], str], int, int]] = []
    sources = [path] if fmt == "hf_disk" else files
    for source in sources:
        if fmt == "text":
            rows: list[dict] = [{"text": t} for t in read_text_file(source, split)]
            locate = _text_locator(source, split)
        else:
            cache = None if cache_dir is None else str(cache_dir)
            try:
                rows = _read_table(source, fmt, cache, hf_split)
            except _ReadFailed:
                if fmt in ("jsonl", "json"):  # pyarrow says "changed from string to number"
                    _check_json_records(source, fmt, shape)  # raises naming the line
                raise
            locate = _locator(source, fmt)
        locations.append((locate, len(records), len(rows)))
        records.extend(rows)
    if not records:
        raise ConfigError(f"data.file: {path} holds no record")
    data = LMRecords(records, shape, fingerprint, locations)
    resolved = _detect_shape(records[0], data.where(0)) if shape == "auto" else shape
    data.records = [_normalise(r, resolved, data.where, i) for i, r in enumerate(records)]
    data.shape = resolved
    data.fingerprint = DataFingerprint(
        **{**fingerprint.to_dict(), "shape": resolved, "records": len(records)}
    )
    return data


def _check_json_records(file: Path, fmt: str, shape: str) -> None:
    """Parse ``file`` with :mod:`json` and validate each record, raising at the first bad one."""
    text = file.read_text(encoding="utf-8")
    try:
        if text.lstrip().startswith("["):
            rows = json.loads(text)
        else:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    except json.JSONDecodeError:
        return  # the read error already names the line
    locate = _locator(file, fmt)
    if not rows or not all(isinstance(r, dict) for r in rows):
        return
    resolved = _detect_shape(rows[0], locate(0)) if shape == "auto" else shape
    for i, row in enumerate(rows):
        _normalise(row, resolved, locate, i)


def _text_locator(file: Path, split: str) -> Callable[[int], str]:
    if split != "lines":
        return lambda row: f"{file}: paragraph {row + 1}"
    return lambda row: f"{file}: line {_nonblank_line(file, row)}"


def _present(record: Mapping[str, Any]) -> list[str]:
    return [k for k, v in record.items() if v is not None]  # Arrow fills missing keys: None


def _detect_shape(record: Mapping[str, Any], where: str) -> str:
    keys = set(_present(record))
    if "messages" in keys:
        return "messages"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    raise ConfigError(
        f"{where}: a record with keys {sorted(keys)} has none of the shapes {EXPECTED_SHAPES}"
        f"{_rename_hint(keys)}"
    )


def _rename_hint(keys: set[str]) -> str:
    if "conversations" in keys:
        return '; rename "conversations" to "messages" (with "role"/"content" turns)'
    if "prompt" in keys or "completion" in keys:
        return '; "prompt" and "completion" go together'
    return ""


def _normalise(
    record: Mapping[str, Any], shape: str, where: Callable[[int], str], index: int
) -> dict[str, Any]:
    def fail(problem: str) -> ConfigError:
        return ConfigError(
            f"{where(index)}: {problem} (data.shape: {shape}; expected {EXPECTED_SHAPES})"
        )

    if shape == "messages":
        return {"messages": _messages(record.get("messages"), fail)}
    out = {}
    for key in _REQUIRED[shape]:
        value = record.get(key)
        if value is None:
            raise fail(f"the record has no {key!r} (its keys: {sorted(_present(record))})")
        if not isinstance(value, str):
            raise fail(f"{key!r} is a {type(value).__name__}, not a string")
        out[key] = value
    return out


def _messages(value: Any, fail: Callable[[str], ConfigError]) -> list[dict[str, Any]]:
    if isinstance(value, str):
        raise fail(
            '"messages" is a string; it must be a list of turns (CSV cannot hold one: '
            "use JSONL or Parquet)"
        )
    if not isinstance(value, list) or not value:
        raise fail('"messages" must be a non-empty list of {"role", "content"} turns')
    turns = []
    for k, turn in enumerate(value):
        if not isinstance(turn, Mapping):
            raise fail(f"message {k} is a {type(turn).__name__}, not a {{role, content}} dict")
        turn = {key: v for key, v in turn.items() if v is not None}
        if not isinstance(turn.get("role"), str):
            raise fail(f"message {k} has no string 'role' (its keys: {sorted(turn)})")
        if not isinstance(turn.get("content"), str):
            raise fail(f"message {k} ({turn['role']}) has no string 'content'")
        turns.append(turn)
    if not any(t["role"] == "assistant" for t in turns):
        roles = [t["role"] for t in turns]
        raise fail(f"no assistant turn (roles {roles}): nothing for the student to learn")
    return turns


# --------------------------------------------------------------------------- tokenising


def _encode(tokenizer: Any, text: str) -> list[int]:
    """Token ids of already-rendered text, adding no special token."""
    if isinstance(tokenizer, ByteTokenizer):
        return tokenizer.encode(text, add_special_tokens=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _byte_render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
    import jinja2.sandbox

    env = jinja2.sandbox.ImmutableSandboxedEnvironment()
    return env.from_string(BYTE_CHAT_TEMPLATE).render(
        messages=messages, add_generation_prompt=add_generation_prompt
    )


def _renderer(tokenizer: Any) -> Callable[[Sequence[Mapping[str, Any]], bool], str]:
    if isinstance(tokenizer, ByteTokenizer):
        return _byte_render
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ConfigError(
            f"data: the records are chat messages but the tokenizer {name!r} has no chat "
            "template; use an instruct/chat model's tokenizer (data.tokenizer), or write "
            "prompt/completion records instead"
        )

    def render(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> str:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )

    return render


def chat_example(
    messages: Sequence[Mapping[str, Any]], tokenizer: Any, method: str = "auto"
) -> dict[str, list[int]]:
    """``{"input_ids", "loss_mask"}`` of a conversation: 1 on every assistant turn's tokens.

    ``method``: ``generation`` (the template's ``{% generation %}`` markers, through
    ``return_assistant_tokens_mask``), ``incremental`` (render turn by turn and compare token
    prefixes) or ``auto`` (``generation`` when the template has the markers). See the module
    docstring. Raises :class:`ConfigError` when the method cannot apply.
    """
    if method not in CHAT_MASK_METHODS:
        raise ConfigError(f"data.chat_mask: must be one of {CHAT_MASK_METHODS}; got {method!r}")
    render = _renderer(tokenizer)
    template = getattr(tokenizer, "chat_template", None) or ""
    has_markers = isinstance(template, str) and bool(_GENERATION_TAG.search(template))
    if method == "generation" or (method == "auto" and has_markers):
        if not has_markers:
            raise ConfigError(
                "data.chat_mask: generation needs a chat template with {% generation %} … "
                "{% endgeneration %} around assistant text; this one has none (use "
                "incremental or auto)"
            )
        return _generation_mask(messages, tokenizer)
    example = _incremental_mask(messages, tokenizer, render)
    if isinstance(tokenizer, ByteTokenizer):  # bos … eos around the byte rendering
        last = int(messages[-1]["role"] == "assistant")
        example = {
            "input_ids": [tokenizer.bos_token_id, *example["input_ids"], tokenizer.eos_token_id],
            "loss_mask": [0, *example["loss_mask"], last],
        }
    return example


def _generation_mask(messages: Sequence[Mapping[str, Any]], tokenizer: Any) -> dict[str, list]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(
            "data.chat_mask: generation markers need a fast (Rust) tokenizer; use "
            "chat_mask: incremental with this one"
        )
    out = tokenizer.apply_chat_template(
        list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    ids, mask = list(out["input_ids"]), [int(m) for m in out["assistant_masks"]]
    if not any(mask):
        raise ConfigError(
            "data.chat_mask: the template's {% generation %} blocks marked no token of an "
            "assistant turn; fix the template or use chat_mask: incremental"
        )
    return {"input_ids": ids, "loss_mask": mask}


def _incremental_mask(
    messages: Sequence[Mapping[str, Any]],
    tokenizer: Any,
    render: Callable[[Sequence[Mapping[str, Any]], bool], str],
) -> dict[str, list[int]]:
    ids = _encode(tokenizer, render(messages, False))  # (T,)
    mask = [0] * len(ids)
    for k, turn in enumerate(messages):
        if turn["role"] != "assistant":
            continue
        before = _encode(tokenizer, render(messages[:k], True))  # shown before turn k
        after = _encode(tokenizer, render(messages[: k + 1], False))  # turn k included
        for name, prefix in (("before", before), ("after", after)):
            if ids[: len(prefix)] != prefix:
                raise ConfigError(
                    f"data.chat_mask: the chat template renders the conversation up to "
                    f"assistant turn {k} ({name} it) differently from the same turns inside "
                    "the whole conversation, so its tokens cannot be found by prefix; use a "
                    "template with {% generation %} markers (chat_mask: generation)"
                )
        for t in range(len(before), len(after)):
            mask[t] = 1
    return {"input_ids": ids, "loss_mask": mask}


def tokenize_record(
    record: Mapping[str, Any], tokenizer: Any, *, causal: bool = True, chat_mask: str = "auto"
) -> dict[str, Any]:
    """One normalised record → an :data:`~kdistill.lm.batches.Example` (see the module
    docstring for each shape's targets). ``causal=False`` (masked LM) takes text only."""
    if "messages" in record:
        return chat_example(record["messages"], tokenizer, chat_mask)
    eos = getattr(tokenizer, "eos_token_id", None)
    if "prompt" in record:
        prompt = list(tokenizer.encode(record["prompt"]))  # with the tokenizer's bos
        completion = list(tokenizer.encode(record["completion"], add_special_tokens=False))
        if eos is not None and (not completion or completion[-1] != eos):
            completion.append(eos)
        return {"input_ids": prompt + completion, "prompt_length": len(prompt)}
    ids = list(tokenizer.encode(record["text"]))
    if causal and eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)  # the student learns where a text ends
    return {"input_ids": ids}


@dataclass
class TokenizedRecords:
    """Examples for :class:`~kdistill.lm.batches.CausalLMCollator`, and what was dropped.

    ``stats``: ``records``, ``examples``, ``truncated`` (cut to ``max_length``),
    ``dropped_short`` (< ``min_tokens`` ids), ``dropped_no_target`` (no target token left
    after truncation, e.g. a prompt longer than ``max_length``), ``target_tokens``.
    ``indices``: the record each example came from (its index in ``data.records``).
    """

    examples: list[dict[str, Any]]
    stats: dict[str, int]
    indices: list[int] = field(default_factory=list)


def _targets(example: Mapping[str, Any]) -> int:
    """Tokens that carry a label: not the first, not in the prompt, loss_mask 1."""
    n = len(example["input_ids"])
    mask = example.get("loss_mask") or [1] * n
    start = max(1, int(example.get("prompt_length", 0)))
    return sum(mask[start:n])


def tokenize_records(
    data: LMRecords,
    tokenizer: Any,
    *,
    max_length: int | None = None,
    min_tokens: int = 2,
    causal: bool = True,
    chat_mask: str = "auto",
) -> TokenizedRecords:
    """Tokenise every record (:func:`tokenize_record`), truncate to ``max_length`` and drop
    examples with fewer than ``min_tokens`` ids or no target left; counts in ``stats``.

    Raises :class:`ConfigError` naming the record's file and line when it cannot be
    tokenised, and when no example is left.
    """
    if not causal and data.shape != "text":
        raise ConfigError(
            f"data.shape: a masked-LM objective (distilbert) trains on text records; "
            f"{data.fingerprint.path} holds {data.shape} records"
        )
    stats = dict.fromkeys(
        ("records", "examples", "truncated", "dropped_short", "dropped_no_target"), 0
    )
    stats["target_tokens"] = 0
    examples, indices = [], []
    for i, record in enumerate(data.records):
        try:
            example = tokenize_record(record, tokenizer, causal=causal, chat_mask=chat_mask)
        except ConfigError as err:
            raise ConfigError(f"{data.where(i)}: {err}") from None
        stats["records"] += 1
        if max_length is not None and len(example["input_ids"]) > max_length:
            stats["truncated"] += 1
            example = {
                k: (v[:max_length] if isinstance(v, list) else min(v, max_length))
                for k, v in example.items()
            }
        if len(example["input_ids"]) < max(min_tokens, 2):
            stats["dropped_short"] += 1
            continue
        targets = _targets(example)
        if causal and targets == 0:
            stats["dropped_no_target"] += 1
            continue
        stats["target_tokens"] += targets
        examples.append(example)
        indices.append(i)
    stats["examples"] = len(examples)
    if not examples:
        raise ConfigError(
            f"data.file: no usable example in {data.fingerprint.path} ({stats}); raise "
            "data.max_length or lower data.min_tokens"
        )
    return TokenizedRecords(examples, stats, indices)
