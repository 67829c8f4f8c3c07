"""On-disk teacher-output cache: run a frozen teacher once, train from memory-mapped shards.

In offline KD the teacher is frozen, so a loop that runs it every step recomputes the same
outputs every epoch. :func:`build_cache` runs the teacher once over a data set (under
``torch.inference_mode``) and writes its outputs to a folder; :func:`open_cache` maps them
back without reading them into memory; :func:`load_or_build` does whichever is needed and is
what ``distill.cache_dir`` in a run config uses. :func:`build_topk_cache` /
:func:`load_or_build_topk` write top-k rows computed elsewhere (a teacher behind a server,
``distill.teacher``) into the same layout, under a teacher identity the caller gives.

Layouts (``manifest["layout"]``):

* ``"dense"`` — the full logits ``(N, C)`` and any tapped teacher feature ``(N, ...)`` per
  row, for small class counts (vision). Logits are stored **raw** (float32, no temperature),
  maps in ``map_dtype`` — exactly what the in-memory cache
  (:func:`kdistill.experiment.cache_teacher_outputs`) holds, so training from either gives
  bit-identical students.
* ``"topk"`` — for large vocabularies (LM tokens), per token: the ``k`` largest teacher
  log-probabilities ``topk_values`` ``(N, T, k)`` (float16 or bfloat16; float32 for an
  exact cache), their token ids
  ``topk_indices`` ``(N, T, k)`` (int16 when ``V ≤ 32,768``, uint16 when ``V ≤ 65,536``,
  else int32) and ``rest_log_mass`` ``(N, T)`` (float32), the log of the probability mass on
  the ``V − k`` other ids, computed exactly as ``logsumexp`` of the teacher's other
  log-probabilities (not as ``log(1 − Σ top-k)``, which cancels catastrophically). The
  values are log-probabilities at ``T = 1``: the raw logits minus their per-token
  ``logsumexp``, a shift every softmax ignores, so they are temperature-free; storing them
  rather than the logits themselves puts the precision of a 16-bit float where the mass is
  (the top entry is ~0, not ~20). Bytes per token: ``k·(2 + index bytes) + 4``, e.g.
  132 B at ``k = 32`` and 260 B at ``k = 64`` for a 49,152-token vocabulary.

How the losses use a top-k teacher — :func:`kdistill.lm.topk.topk_divergence` (the maths
live with the other LM losses; this module only stores and verifies the data): the teacher's distribution is
the top-k probabilities plus the residual mass **lumped** into one extra bucket "every other
id", and the student's distribution is coarsened the same way (its top-k-id probabilities and
the sum of the rest). Any divergence of :mod:`kdistill.lm` is then computed between these two
``(k + 1)``-bucket distributions. With ``k = V`` this *is* the dense divergence (the residual
is empty). With ``k < V`` it is the divergence between coarsenings, which by the
data-processing inequality never exceeds the dense one; for forward KL the gap is exactly
``Σ_tokens R · KL(p_rest/R ‖ q_rest/Q)`` (chain rule; ``R``, ``Q`` = teacher / student mass
outside the top-k), which the tests check. The gradient only asks the student to put mass
``R`` outside the top-k ids, without imposing a shape on it — unlike
:func:`kdistill.lm.topk.densify_topk`, which spreads the residual uniformly over the other ids (a full
``(…, V)`` teacher for losses that need one; its forward KL exceeds the lumped one by
``R · KL(uniform ‖ q_rest/Q)``). Temperature: exact at ``T = 1``; for ``T ≠ 1`` the teacher's
tempered residual mass needs the individual residual logits, which are not stored, so it is
computed as if the residual were spread uniformly (exact when it is).

Files: ``manifest.json`` plus one ``.npy`` file per tensor and shard (rows
``[start, stop)``), memory-mapped on read (``np.load(mmap_mode="r")``). NumPy's ``.npy`` was
chosen over safetensors because a shard can be created at its final size and filled batch by
batch through :func:`numpy.lib.format.open_memmap` — the teacher pass never holds more than
one batch of outputs — and read back with fancy indexing per batch; safetensors needs every
tensor in memory at write time. bfloat16 (which NumPy lacks) is stored as its raw ``uint16``
bits and viewed back. The manifest records the format version, the teacher's identity (class
and sha256 of its state dict), the data fingerprint (sha256 of the inputs, data set name and
transform), the layout, ``k``, vocabulary size, the name, per-row shape and dtype of each
tensor, the size and sha256 of every shard file, and (``teacher_tokenizer``, when the caller
gives it as plain data) the identity of the tokenizer that made the teacher's token ids — a
cache recorded with another teacher tokenizer is refused, since its ids and row positions
mean other text (the LM code computes the record; this module stores and compares it).

Safety: shards are written to a temporary name, fsynced and ``os.replace`` d into place; the
manifest is written last (atomically), so a folder without one is an interrupted build. On
open, a different teacher or data fingerprint raises :class:`StaleCacheError` and a missing,
truncated or corrupted shard :class:`CorruptCacheError`, each naming the file and the fix
(delete the folder, or rebuild with ``rebuild=True`` / ``distill.cache_rebuild: true``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from kdistill.checkpoint import _fsync_dir, atomic_write_text, file_digest
from kdistill.distiller import output_logits
from kdistill.taps import FeatureTaps

__all__ = [
    "FORMAT",
    "MANIFEST",
    "VERSION",
    "CacheError",
    "CorruptCacheError",
    "ShardedTensor",
    "StaleCacheError",
    "TeacherCache",
    "build_cache",
    "build_topk_cache",
    "bytes_per_row",
    "data_fingerprint",
    "index_dtype_for",
    "load_or_build",
    "load_or_build_topk",
    "open_cache",
    "teacher_identity",
    "topk_log_probs",
]

FORMAT = "kdistill-teacher-cache"
VERSION = 1
MANIFEST = "manifest.json"
LOGITS = "logits"
TOPK_VALUES, TOPK_INDICES, REST_LOG_MASS = "topk_values", "topk_indices", "rest_log_mass"
DEFAULT_SHARD_BYTES = 256 << 20
"""Rows per shard are chosen so that one shard of all tensors holds about this many bytes."""

_DTYPES: dict[str, tuple[torch.dtype, np.dtype]] = {
    # name in the manifest -> (torch dtype, numpy storage dtype)
    "float32": (torch.float32, np.dtype(np.float32)),
    "float16": (torch.float16, np.dtype(np.float16)),
    "bfloat16": (torch.bfloat16, np.dtype(np.uint16)),  # raw bits; numpy has no bfloat16
    "int32": (torch.int32, np.dtype(np.int32)),
    "int16": (torch.int16, np.dtype(np.int16)),
    "uint16": (torch.uint16, np.dtype(np.uint16)),
}
_DTYPE_NAMES = {torch_dtype: name for name, (torch_dtype, _) in _DTYPES.items()}


class CacheError(ValueError):
    """A teacher-output cache cannot be used; the message names the file and the fix."""


class StaleCacheError(CacheError):
    """The cache was built from another teacher or other data than this run's."""


class CorruptCacheError(CacheError):
    """A cache file is missing, truncated, corrupted, or the manifest is unreadable."""


# --------------------------------------------------------------------------- fingerprints


def _update_with_tensor(digest: Any, tensor: Tensor) -> None:
    """Feed a tensor's dtype, shape and raw bytes (any dtype, bf16 included) to ``digest``."""
    t = tensor.detach().to("cpu").contiguous()
    digest.update(f"{t.dtype}{tuple(t.shape)}".encode())
    if t.numel():
        digest.update(t.reshape(-1).view(torch.uint8).numpy().data)


def teacher_identity(model: nn.Module) -> dict[str, str]:
    """``{"class", "sha256"}``: the model's class and a sha256 over its state dict.

    The digest covers every state-dict entry (name, dtype, shape and bytes, in name order),
    buffers such as BatchNorm running statistics included.
    """
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode())
        if isinstance(value, Tensor):
            _update_with_tensor(digest, value)
        else:  # pragma: no cover - extra state of custom modules
            digest.update(repr(value).encode())
    cls = type(model)
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "sha256": digest.hexdigest()}


def data_fingerprint(
    inputs: Tensor,
    name: str,
    transform: str = "none",
    attention_mask: Tensor | None = None,
) -> dict[str, Any]:
    """``{"name", "transform", "rows", "sha256"}`` of the inputs the teacher is run on.

    Args:
        inputs: ``(N, ...)``, the exact tensor fed to the teacher (images after
            normalisation, or token ids ``(N, T)``), in dataset order.
        name: what the data is, e.g. ``"fashion_mnist:train"``.
        transform: the deterministic preprocessing applied before ``inputs`` (part of the
            identity: the same images under another transform give other teacher outputs).
        attention_mask: for token inputs, hashed with them.
    """
    digest = hashlib.sha256()
    digest.update(f"{name}\0{transform}\0".encode())
    _update_with_tensor(digest, inputs)
    if attention_mask is not None:
        _update_with_tensor(digest, attention_mask)
    return {
        "name": name,
        "transform": transform,
        "rows": int(inputs.shape[0]),
        "sha256": digest.hexdigest(),
    }


def index_dtype_for(vocab_size: int) -> torch.dtype:
    """The narrowest integer dtype that holds token ids ``0 … vocab_size − 1``."""
    if vocab_size <= 1 << 15:
        return torch.int16
    if vocab_size <= 1 << 16:
        return torch.uint16
    return torch.int32


def bytes_per_row(manifest: Mapping[str, Any]) -> int:
    """Bytes one row (a sample, or a sequence) takes across all tensors of a cache."""
    total = 0
    for spec in manifest["tensors"].values():
        itemsize = _DTYPES[spec["dtype"]][1].itemsize
        total += itemsize * math.prod(spec["row_shape"])
    return total


# --------------------------------------------------------------------------- reading


class ShardedTensor:
    """A read-only ``(N, ...)`` tensor backed by memory-mapped ``.npy`` shards.

    Supports what a batch loader needs: ``shape``, ``dtype``, ``len()`` and indexing the
    first dimension with an int, a slice or an integer tensor of row indices, which reads
    only those rows and returns a torch tensor (a copy, in the stored dtype).
    """

    def __init__(
        self, arrays: Sequence[np.ndarray], starts: Sequence[int], dtype: torch.dtype
    ) -> None:
        if not arrays:
            raise ValueError("a ShardedTensor needs at least one shard")
        self._arrays = list(arrays)
        self._starts = torch.tensor(list(starts), dtype=torch.long)
        rows = sum(a.shape[0] for a in arrays)
        self.shape = torch.Size((rows, *arrays[0].shape[1:]))
        self.dtype = dtype

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"ShardedTensor(shape={tuple(self.shape)}, dtype={self.dtype}, shards={len(self._arrays)})"

    def _wrap(self, array: np.ndarray) -> Tensor:
        tensor = torch.from_numpy(np.ascontiguousarray(array))
        return tensor.view(self.dtype) if tensor.dtype != self.dtype else tensor

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Tensor:
        if isinstance(index, int):
            return self[torch.tensor([index])][0]
        if isinstance(index, slice):
            index = torch.arange(self.shape[0])[index]
        idx = torch.as_tensor(index).reshape(-1)
        if idx.dtype == torch.bool or idx.dtype.is_floating_point:
            raise TypeError(f"index rows with integers, got dtype {idx.dtype}")
        idx = idx.long()
        n = self.shape[0]
        if idx.numel() and (int(idx.min()) < -n or int(idx.max()) >= n):
            raise IndexError(f"row index out of range for {n} rows")
        idx = torch.where(idx < 0, idx + n, idx)
        if len(self._arrays) == 1:
            return self._wrap(self._arrays[0][idx.numpy()])
        shard = torch.searchsorted(self._starts, idx, right=True) - 1
        out = np.empty((idx.numel(), *self.shape[1:]), dtype=self._arrays[0].dtype)
        for s in shard.unique().tolist():
            sel = (shard == s).nonzero().squeeze(1)
            local = (idx[sel] - self._starts[s]).numpy()
            out[sel.numpy()] = self._arrays[s][local]
        return self._wrap(out)

    def to_tensor(self) -> Tensor:
        """The whole tensor, read into memory."""
        return self._wrap(np.concatenate([np.asarray(a) for a in self._arrays]))


@dataclass
class TeacherCache:
    """An opened cache: its folder, manifest and one :class:`ShardedTensor` per stored tensor."""

    path: Path
    manifest: dict[str, Any]
    tensors: dict[str, ShardedTensor]

    @property
    def layout(self) -> str:
        return str(self.manifest["layout"])

    @property
    def k(self) -> int | None:
        return self.manifest.get("k")

    @property
    def num_rows(self) -> int:
        return int(self.manifest["data"]["rows"])

    def __getitem__(self, name: str) -> ShardedTensor:
        if name not in self.tensors:
            raise KeyError(
                f"{self.path / MANIFEST}: the cache holds {sorted(self.tensors)}, not {name!r}"
            )
        return self.tensors[name]

    def bytes_per_row(self) -> int:
        return bytes_per_row(self.manifest)


def _read_manifest(path: Path) -> dict[str, Any]:
    file = path / MANIFEST
    if not file.is_file():
        debris = sorted(p.name for p in path.glob("shard-*")) if path.is_dir() else []
        what = (
            f"holds shard files {debris[:3]} but no {MANIFEST}: an interrupted build"
            if debris
            else f"has no {MANIFEST}"
        )
        raise CorruptCacheError(
            f"teacher cache {path} {what}; delete the folder or rebuild it "
            "(rebuild=True, or distill.cache_rebuild: true)"
        )
    try:
        manifest = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CorruptCacheError(
            f"{file} is not readable JSON ({err}); delete {path} or rebuild it "
            "(rebuild=True, or distill.cache_rebuild: true)"
        ) from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CorruptCacheError(
            f"{file}: format {manifest.get('format')!r} version {manifest.get('version')!r}, "
            f"this kdistill reads {FORMAT!r} version {VERSION}; delete {path} or rebuild it "
            "(rebuild=True, or distill.cache_rebuild: true)"
        )
    return manifest


def _check_fresh(
    path: Path,
    manifest: Mapping[str, Any],
    teacher: Mapping[str, str] | None,
    data: Mapping[str, Any] | None,
) -> None:
    fix = f"delete {path} or rebuild it (rebuild=True, or distill.cache_rebuild: true)"
    if teacher is not None and dict(manifest["teacher"]) != dict(teacher):
        raise StaleCacheError(
            f"teacher cache {path} is stale: it was built from teacher "
            f"{manifest['teacher']['class']} sha256 {manifest['teacher']['sha256'][:16]}…, this "
            f"run's teacher is {teacher['class']} sha256 {teacher['sha256'][:16]}…; {fix}"
        )
    if data is not None and dict(manifest["data"]) != dict(data):
        cached = manifest["data"]
        raise StaleCacheError(
            f"teacher cache {path} is stale: it was built on data {cached['name']!r} "
            f"(transform {cached['transform']!r}, {cached['rows']} rows, sha256 "
            f"{cached['sha256'][:16]}…), this run's data is {data['name']!r} (transform "
            f"{data['transform']!r}, {data['rows']} rows, sha256 {data['sha256'][:16]}…); {fix}"
        )


def _tokenizer_name(record: Mapping[str, Any]) -> str:
    name = record.get("name_or_path") or record.get("class") or "a tokenizer"
    return f"{name} (fingerprint {str(record.get('fingerprint'))[:16]}…)"


def _check_tokenizer(
    path: Path, manifest: Mapping[str, Any], tokenizer: Mapping[str, Any] | None
) -> None:
    """Refuse a cache whose recorded teacher tokenizer is not ``tokenizer`` (by fingerprint):
    its token ids, and the positions of its rows, mean other text."""
    cached = manifest.get("teacher_tokenizer")
    if tokenizer is None or not cached:
        return
    if cached.get("fingerprint") != tokenizer.get("fingerprint"):
        raise StaleCacheError(
            f"teacher cache {path} is stale: it was built with the teacher tokenizer "
            f"{_tokenizer_name(cached)}, this run's teacher tokenizer is "
            f"{_tokenizer_name(tokenizer)}; delete {path} or rebuild it (rebuild=True, or "
            "distill.cache_rebuild: true)"
        )


def open_cache(
    path: str | os.PathLike[str],
    *,
    teacher: nn.Module | Mapping[str, str] | None = None,
    data: Mapping[str, Any] | None = None,
    verify: Literal["sha256", "size"] = "sha256",
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Open a cache folder, refusing it when stale or damaged.

    Args:
        path: the folder :func:`build_cache` wrote.
        teacher: the teacher (or its :func:`teacher_identity`) the cache must come from;
            ``None`` skips the check.
        data: the :func:`data_fingerprint` the cache must match; ``None`` skips the check.
        verify: ``"sha256"`` hashes every shard file (reads the whole cache once);
            ``"size"`` only checks sizes and headers (for very large caches).
        tokenizer: the teacher tokenizer's identity (a dict with a ``"fingerprint"``, e.g.
            :func:`kdistill.lm.alignment.tokenizer_identity`) the cache must have been built
            with; ``None`` skips the check, as does a cache that recorded none.

    Raises:
        StaleCacheError: other teacher, other data or another teacher tokenizer.
        CorruptCacheError: no or unreadable manifest, a missing, truncated or corrupted
            shard, or a shard whose header disagrees with the manifest.
    """
    path = Path(path)
    manifest = _read_manifest(path)
    identity = teacher_identity(teacher) if isinstance(teacher, nn.Module) else teacher
    _check_fresh(path, manifest, identity, data)
    _check_tokenizer(path, manifest, tokenizer)
    fix = f"delete {path} or rebuild it (rebuild=True, or distill.cache_rebuild: true)"
    arrays: dict[str, list[np.ndarray]] = {name: [] for name in manifest["tensors"]}
    starts: list[int] = []
    for shard in manifest["shards"]:
        starts.append(int(shard["start"]))
        rows = int(shard["stop"]) - int(shard["start"])
        for name, entry in shard["files"].items():
            file = path / entry["file"]
            if not file.is_file():
                raise CorruptCacheError(f"teacher cache file {file} is missing; {fix}")
            size = file.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "longer than recorded"
                raise CorruptCacheError(
                    f"teacher cache file {file} is {what} ({size} bytes, the manifest says "
                    f"{entry['bytes']}); {fix}"
                )
            if verify == "sha256" and file_digest(file) != entry["sha256"]:
                raise CorruptCacheError(
                    f"teacher cache file {file} is corrupted (sha256 differs from the "
                    f"manifest's); {fix}"
                )
            spec = manifest["tensors"][name]
            expected_shape = (rows, *spec["row_shape"])
            storage = _DTYPES[spec["dtype"]][1]
            try:
                array = np.load(file, mmap_mode="r")
            except ValueError as err:
                raise CorruptCacheError(f"teacher cache file {file}: {err}; {fix}") from None
            if array.shape != expected_shape or array.dtype != storage:
                raise CorruptCacheError(
                    f"teacher cache file {file} holds {array.dtype}{array.shape}, the manifest "
                    f"says {storage}{expected_shape}; {fix}"
                )
            arrays[name].append(array)
    tensors = {
        name: ShardedTensor(arrays[name], starts, _DTYPES[spec["dtype"]][0])
        for name, spec in manifest["tensors"].items()
    }
    return TeacherCache(path, manifest, tensors)


# --------------------------------------------------------------------------- writing


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class _ShardWriter:
    """Writes rows in order into ``.npy`` shards created at their final size (memmapped)."""

    def __init__(self, path: Path, total_rows: int, shard_bytes: int) -> None:
        self.path = path
        self.total = total_rows
        self.shard_bytes = shard_bytes
        self.specs: dict[str, dict[str, Any]] = {}
        self.shards: list[dict[str, Any]] = []
        self.rows_per_shard = 0
        self.written = 0
        self._open: dict[str, tuple[np.memmap, Path, Path]] = {}  # name: (array, tmp, final)
        self._shard_start = 0
        self._shard_stop = 0

    def _start_shard(self) -> None:
        self._shard_start = self.written
        self._shard_stop = min(self.total, self.written + self.rows_per_shard)
        index = len(self.shards)
        rows = self._shard_stop - self._shard_start
        for i, (name, spec) in enumerate(self.specs.items()):
            final = self.path / f"shard-{index:05d}-{i}-{_safe(name)}.npy"
            tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
            storage = _DTYPES[spec["dtype"]][1]
            array = np.lib.format.open_memmap(
                tmp, mode="w+", dtype=storage, shape=(rows, *spec["row_shape"])
            )
            self._open[name] = (array, tmp, final)

    def _finish_shard(self) -> None:
        files = {}
        for name, (array, tmp, final) in self._open.items():
            array.flush()
            with open(tmp, "rb+") as handle:
                os.fsync(handle.fileno())
            os.replace(tmp, final)
            files[name] = {
                "file": final.name,
                "bytes": final.stat().st_size,
                "sha256": file_digest(final),
            }
        self._open = {}
        self.shards.append({"start": self._shard_start, "stop": self._shard_stop, "files": files})

    def write(self, batch: Mapping[str, Tensor]) -> None:
        """Append ``{name: (b, ...)}`` rows (CPU tensors, final dtypes)."""
        if not self.specs:
            self.specs = {
                name: {"row_shape": list(t.shape[1:]), "dtype": _DTYPE_NAMES[t.dtype]}
                for name, t in batch.items()
            }
            row = sum(t[:1].numel() * t.element_size() for t in batch.values())
            self.rows_per_shard = max(1, self.shard_bytes // max(row, 1))
        n = next(iter(batch.values())).shape[0]
        done = 0
        while done < n:
            if not self._open:
                self._start_shard()
            take = min(n - done, self._shard_stop - self.written)
            lo = self.written - self._shard_start
            for name, (array, _, _) in self._open.items():
                part = batch[name][done : done + take]
                if part.dtype == torch.bfloat16:
                    part = part.view(torch.uint16)
                array[lo : lo + take] = part.numpy()
            done += take
            self.written += take
            if self.written == self._shard_stop:
                self._finish_shard()

    def abort(self) -> None:
        for _, tmp, _ in self._open.values():
            tmp.unlink(missing_ok=True)
        self._open = {}


def teacher_outputs(
    teacher: nn.Module,
    inputs: Tensor,
    keys: Sequence[str],
    batch_size: int,
    device: torch.device | str = "cpu",
    attention_mask: Tensor | None = None,
) -> Iterator[dict[str, Tensor]]:
    """One frozen-teacher pass over ``inputs`` ``(N, ...)`` in batches of ``batch_size``.

    Yields, per batch, ``{key: tensor}`` for ``keys`` (``"logits"`` and/or layer names read
    through :class:`~kdistill.taps.FeatureTaps`), on ``device``, computed in eval mode under
    ``torch.inference_mode``; the teacher's train/eval mode is restored when the generator
    ends or is closed. The one teacher pass behind both the in-memory cache
    (:func:`kdistill.experiment.cache_teacher_outputs`) and :func:`build_cache`.
    """
    layers = [key for key in keys if key != LOGITS]
    was_training = teacher.training
    teacher.eval()
    try:
        with torch.inference_mode(), FeatureTaps(teacher, layers) as taps:
            for start in range(0, inputs.shape[0], batch_size):
                rows = slice(start, start + batch_size)
                kwargs = {}
                if attention_mask is not None:
                    kwargs["attention_mask"] = attention_mask[rows].to(device)
                logits = output_logits(teacher(inputs[rows].to(device), **kwargs))
                outputs = {**taps.pop(), LOGITS: logits}
                yield {key: outputs[key] for key in keys}
    finally:
        teacher.train(was_training)


def dense_outputs(
    outputs: Mapping[str, Tensor], keys: Sequence[str], map_dtype: torch.dtype
) -> dict[str, Tensor]:
    """Teacher outputs as cached densely, on CPU: feature maps (more than 2 dims) in
    ``map_dtype`` (float16 halves a cache that would dwarf the data set), logits and vectors
    in float32."""
    dense = {}
    for key in keys:
        value = outputs[key].float()
        dense[key] = value.to("cpu", map_dtype if value.dim() > 2 else torch.float32)
    return dense


@torch.no_grad()
def topk_log_probs(logits: Tensor, k: int) -> tuple[Tensor, Tensor, Tensor]:
    """The ``k`` largest log-probabilities, their ids and the log of the mass on the rest.

    Args:
        logits: raw logits ``(..., V)``.
        k: ``1 ≤ k ≤ V``.

    Returns:
        ``values`` ``(..., k)`` float32 (float64 for float64 logits) log-probabilities ``log softmax(z)`` at ``T = 1``,
        in decreasing order; ``indices`` ``(..., k)`` int64; ``rest_log_mass`` ``(...)``
        float32 ``log Σ_{v ∉ top-k} p_v``, taken as a ``logsumexp`` over those ids (exact
        even when it is ``−50``), ``−inf`` when ``k = V``.
    """
    vocab = logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V = {vocab}], got {k}")
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = torch.log_softmax(logits.to(dtype), dim=-1)  # (..., V)
    values, indices = log_p.topk(k, dim=-1)  # (..., k)
    if k == vocab:
        rest = log_p.new_full(log_p.shape[:-1], -math.inf)
    else:
        rest = log_p.scatter(-1, indices, -math.inf).logsumexp(dim=-1)  # (...)
    return values, indices, rest


def _layout_of(keys: Sequence[str], k: int | None) -> Literal["dense", "topk"]:
    if k is None:
        return "dense"
    if list(keys) != [LOGITS]:
        raise ValueError(
            f"the top-k layout stores logits only; got keys {list(keys)} (cache tapped features "
            "with the dense layout, k=None)"
        )
    return "topk"


def build_cache(
    path: str | os.PathLike[str],
    teacher: nn.Module,
    inputs: Tensor,
    *,
    data_name: str,
    transform: str = "none",
    keys: Sequence[str] = (LOGITS,),
    k: int | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    map_dtype: torch.dtype = torch.float32,
    values_dtype: torch.dtype = torch.float16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    rebuild: bool = False,
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Run ``teacher`` once over ``inputs`` and write its outputs to the folder ``path``.

    Args:
        path: the cache folder (created). If it already holds a cache, that cache is kept
            when it matches this teacher and data (and returned), refused with
            :class:`StaleCacheError` / :class:`CorruptCacheError` when it does not —
            unless ``rebuild``, which deletes it first.
        teacher: the frozen teacher; run in eval mode under ``torch.inference_mode``.
        inputs: ``(N, ...)`` images or token ids ``(N, T)``, in dataset order.
        data_name / transform: recorded in the data fingerprint (:func:`data_fingerprint`).
        keys: ``"logits"`` and/or teacher layer names (dense layout only).
        k: ``None`` for the dense layout; an int for the top-k layout (logits only).
        attention_mask: ``(N, T)``, passed to the teacher as ``attention_mask=``.
        batch_size: rows per teacher forward.
        map_dtype: dtype of cached feature maps (tensors of more than 2 dims) in the dense
            layout; logits and vectors are float32 (as in the in-memory cache).
        values_dtype: ``torch.float16`` or ``torch.bfloat16`` for top-k log-probabilities
            (``torch.float32``: twice the bytes, no rounding — exact with ``k = V``).
        shard_bytes: target size of one shard (all tensors together).
        tokenizer: the identity of the tokenizer that made ``inputs`` (plain data with a
            ``"fingerprint"``), recorded as ``manifest["teacher_tokenizer"]``; a cache
            recorded with another one is refused (:func:`open_cache`).

    Returns:
        the opened cache.
    """
    path = Path(path)
    layout = _layout_of(keys, k)
    if inputs.shape[0] == 0:
        raise ValueError("build_cache got no inputs (0 rows); nothing to cache")
    _check_values_dtype(values_dtype)
    identity = teacher_identity(teacher)
    fingerprint = data_fingerprint(inputs, data_name, transform, attention_mask)
    existing = _prepare_folder(path, identity, fingerprint, rebuild, tokenizer)
    if existing is not None:
        return existing

    writer = _ShardWriter(path, int(inputs.shape[0]), shard_bytes)
    vocab: int | None = None
    passes = teacher_outputs(teacher, inputs, keys, batch_size, device, attention_mask)
    try:
        for outputs in passes:
            batch: dict[str, Tensor] = {}
            if layout == "dense":
                batch = dense_outputs(outputs, keys, map_dtype)
            else:
                assert k is not None
                logits = outputs[LOGITS]
                vocab = logits.shape[-1]
                values, indices, rest = topk_log_probs(logits, k)
                batch[TOPK_VALUES] = values.to("cpu", values_dtype)
                batch[TOPK_INDICES] = indices.to("cpu", index_dtype_for(vocab))
                batch[REST_LOG_MASS] = rest.to("cpu", torch.float32)
            writer.write(batch)
    except BaseException:
        writer.abort()
        raise
    finally:
        passes.close()  # leaves inference mode, removes the taps, restores the train mode
    return _finish(path, writer, layout, identity, fingerprint, k, vocab, tokenizer)


def _check_values_dtype(values_dtype: torch.dtype) -> None:
    if values_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(
            f"values_dtype must be torch.float16, torch.bfloat16 or torch.float32, got "
            f"{values_dtype}"
        )


def _prepare_folder(
    path: Path,
    identity: Mapping[str, str],
    fingerprint: Mapping[str, Any],
    rebuild: bool,
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache | None:
    """The existing cache of this teacher and data (``None``: write one into an empty folder).

    With ``rebuild`` the manifest goes first, so a crash from there on leaves no manifest.
    """
    if (path / MANIFEST).exists():
        if not rebuild:
            return open_cache(path, teacher=identity, data=fingerprint, tokenizer=tokenizer)
        (path / MANIFEST).unlink()
        _fsync_dir(path)
    path.mkdir(parents=True, exist_ok=True)
    for debris in [*path.glob("shard-*.npy"), *path.glob(".shard-*.tmp-*")]:
        debris.unlink()
    return None


def _finish(
    path: Path,
    writer: _ShardWriter,
    layout: str,
    identity: Mapping[str, str],
    fingerprint: Mapping[str, Any],
    k: int | None,
    vocab: int | None,
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Write the manifest (last, atomically) and open the finished cache."""
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        "layout": layout,
        "teacher": dict(identity),
        "data": dict(fingerprint),
        "logits": "raw, temperature-free"
        if layout == "dense"
        else "top-k log_softmax(logits) at T=1 (raw logits minus their logsumexp); "
        "rest_log_mass = log of the teacher's probability on every other id",
        "k": k,
        "vocab_size": vocab,
        "tensors": writer.specs,
        "shards": writer.shards,
        "teacher_tokenizer": None if tokenizer is None else dict(tokenizer),
    }
    atomic_write_text(path / MANIFEST, json.dumps(manifest, indent=1) + "\n")
    return open_cache(path, teacher=identity, data=fingerprint, verify="size", tokenizer=tokenizer)


TopKRows = tuple[Tensor, Tensor, Tensor]
"""``(values (b, T, k), indices (b, T, k), rest_log_mass (b, T))`` of ``b`` rows of a cache."""


def build_topk_cache(
    path: str | os.PathLike[str],
    rows: Iterable[TopKRows],
    inputs: Tensor,
    *,
    identity: Mapping[str, str],
    data_name: str,
    k: int,
    vocab_size: int,
    transform: str = "none",
    attention_mask: Tensor | None = None,
    values_dtype: torch.dtype = torch.float16,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    rebuild: bool = False,
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Write precomputed top-k teacher rows (e.g. scored by a server) as a top-k cache.

    The same folder, manifest and checks as :func:`build_cache` with ``k``: only the source
    of the rows differs, so :func:`open_cache` / :func:`load_or_build_topk` verify it alike.

    Args:
        path: the cache folder (an existing cache of this teacher and data is returned
            unless ``rebuild``; another one is refused, as in :func:`build_cache`).
        rows: batches ``(values (b, T, k), indices (b, T, k), rest_log_mass (b, T))`` in
            the order of ``inputs`` — log-probabilities at ``T = 1``, token ids in
            ``[0, vocab_size)``, the log of the mass on the other ids — ``N`` rows in all.
        inputs: ``(N, T)`` token ids the rows belong to (their data fingerprint).
        identity: ``{"class", "sha256"}`` of the teacher (a module's
            :func:`teacher_identity`, or e.g. ``{"class": "server", ...}``).
        data_name / transform / attention_mask: the data fingerprint, as for
            :func:`build_cache` (the same values give the same fingerprint).
        k / vocab_size: top-k width and the teacher's vocabulary (the index dtype).
        values_dtype / shard_bytes / tokenizer: as for :func:`build_cache`.
    """
    path = Path(path)
    total = int(inputs.shape[0])
    if total == 0:
        raise ValueError("build_topk_cache got no inputs (0 rows); nothing to cache")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab_size = {vocab_size}], got {k}")
    _check_values_dtype(values_dtype)
    fingerprint = data_fingerprint(inputs, data_name, transform, attention_mask)
    existing = _prepare_folder(path, identity, fingerprint, rebuild, tokenizer)
    if existing is not None:
        return existing
    writer = _ShardWriter(path, total, shard_bytes)
    width = int(inputs.shape[1])
    try:
        for values, indices, rest in rows:
            b = values.shape[0]
            if values.shape != (b, width, k) or indices.shape != values.shape:
                raise ValueError(
                    f"top-k rows must be values and indices (b, T = {width}, k = {k}); got "
                    f"{tuple(values.shape)} and {tuple(indices.shape)}"
                )
            if rest.shape != (b, width):
                raise ValueError(f"rest_log_mass must be (b, {width}), got {tuple(rest.shape)}")
            if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= vocab_size):
                raise ValueError(f"top-k token ids must lie in [0, {vocab_size})")
            if writer.written + b > total:
                raise ValueError(f"more top-k rows than the {total} inputs")
            writer.write(
                {
                    TOPK_VALUES: values.to("cpu", values_dtype),
                    TOPK_INDICES: indices.to("cpu", index_dtype_for(vocab_size)),
                    REST_LOG_MASS: rest.to("cpu", torch.float32),
                }
            )
        if writer.written != total:
            raise ValueError(f"{writer.written} top-k rows for {total} inputs")
    except BaseException:
        writer.abort()
        raise
    return _finish(path, writer, "topk", identity, fingerprint, k, vocab_size, tokenizer)


def load_or_build(
    path: str | os.PathLike[str],
    teacher: nn.Module,
    inputs: Tensor,
    *,
    data_name: str,
    rebuild: bool = False,
    **build_kwargs: Any,
) -> tuple[TeacherCache, bool]:
    """Open the cache at ``path`` if it exists (checking it), otherwise build it.

    Returns ``(cache, built)``. A stale or damaged cache raises unless ``rebuild``; a folder
    with shard files but no manifest (an interrupted build) is rebuilt.
    """
    path = Path(path)
    if (path / MANIFEST).exists() and not rebuild:
        transform = build_kwargs.get("transform", "none")
        fingerprint = data_fingerprint(
            inputs, data_name, transform, build_kwargs.get("attention_mask")
        )
        keys = list(build_kwargs.get("keys", (LOGITS,)))
        k, tokenizer = build_kwargs.get("k"), build_kwargs.get("tokenizer")
        return _open_matching(path, teacher, fingerprint, keys, k, tokenizer), False
    cache = build_cache(path, teacher, inputs, data_name=data_name, rebuild=True, **build_kwargs)
    return cache, True


def _open_matching(
    path: Path,
    teacher: nn.Module | Mapping[str, str],
    fingerprint: Mapping[str, Any],
    keys: list[str],
    k: int | None,
    tokenizer: Mapping[str, Any] | None = None,
) -> TeacherCache:
    """Open an existing cache and check it holds what this run needs (layout, k, keys)."""
    cache = open_cache(path, teacher=teacher, data=fingerprint, tokenizer=tokenizer)
    if (
        cache.manifest["layout"] != _layout_of(keys, k)
        or cache.manifest.get("k") != k
        or (k is None and sorted(cache.tensors) != sorted(keys))
    ):
        raise StaleCacheError(
            f"teacher cache {path} holds {cache.manifest['layout']} {sorted(cache.tensors)} "
            f"(k={cache.manifest.get('k')}), this run needs {keys} (k={k}); delete {path} "
            "or rebuild it (rebuild=True, or distill.cache_rebuild: true)"
        )
    return cache


def load_or_build_topk(
    path: str | os.PathLike[str],
    rows: Callable[[], Iterable[TopKRows]],
    inputs: Tensor,
    *,
    identity: Mapping[str, str],
    data_name: str,
    k: int,
    rebuild: bool = False,
    **build_kwargs: Any,
) -> tuple[TeacherCache, bool]:
    """:func:`load_or_build` for precomputed top-k rows: open the cache at ``path`` if it
    exists (same teacher ``identity``, data and ``k``), else call ``rows()`` and write them
    with :func:`build_topk_cache` (``build_kwargs``: its ``vocab_size``, ``transform``,
    ``attention_mask``, ``values_dtype``, ``shard_bytes``). ``rows`` is only called to build,
    so an expensive source (a server) is not asked when the cache is already there.
    Returns ``(cache, built)``.
    """
    path = Path(path)
    if (path / MANIFEST).exists() and not rebuild:
        fingerprint = data_fingerprint(
            inputs,
            data_name,
            build_kwargs.get("transform", "none"),
            build_kwargs.get("attention_mask"),
        )
        tokenizer = build_kwargs.get("tokenizer")
        return _open_matching(path, identity, fingerprint, [LOGITS], k, tokenizer), False
    cache = build_topk_cache(
        path,
        rows(),
        inputs,
        identity=identity,
        data_name=data_name,
        k=k,
        rebuild=True,
        **build_kwargs,
    )
    return cache, True
