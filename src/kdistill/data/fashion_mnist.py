"""Fashion-MNIST from the four standard IDX files, with no download step.

kdistill never fetches data over the network: training machines are often
offline, and a silent download hides where the data came from. Instead we
look in a few well-known places (see :func:`find_fashion_mnist`) and, if the
files are nowhere, raise an error that says exactly how to get them.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_FILES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "SYSTEM_DATA_DIR",
    "DatasetNotFoundError",
    "fashion_mnist_dataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "stratified_indices",
    "train_val_indices",
]

FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
# Per-pixel statistics of the training images scaled to [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

# split -> (images file, labels file); each may also be present with a ".gz" suffix.
FASHION_MNIST_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_FILES: tuple[str, ...] = tuple(f for pair in FASHION_MNIST_FILES.values() for f in pair)

# Where the Debian/Ubuntu package ``dataset-fashion-mnist`` installs the files.
# A module-level constant so tests (and unusual systems) can override it.
SYSTEM_DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "KDISTILL_DATA"
DOWNLOAD_URL = "https://github.com/zalandoresearch/fashion-mnist"

_IMAGE_SIZE = 28
_NUM_CLASSES = len(FASHION_MNIST_CLASSES)

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DatasetNotFoundError(FileNotFoundError):
    """The dataset files are in none of the searched places; the message says how to get them."""


# -- IDX decoding -------------------------------------------------------------


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Decode an IDX file (gzip-compressed if its name ends in ``.gz``).

    Layout: two zero bytes, a type code (0x08 = uint8, ...), the number of
    dimensions ``d``, ``d`` big-endian uint32 sizes, then the raw values.

    Returns:
        A writable array in native byte order with the shape from the header.

    Raises:
        ValueError: naming the file, if it is not IDX, is truncated, or has
            trailing bytes.
    """
    path = Path(path)
    raw = _read_bytes(path)
    dtype, shape, offset = _parse_idx_header(path, raw)
    expected = math.prod(shape) * dtype.itemsize
    actual = len(raw) - offset
    if actual != expected:
        problem = "is truncated" if actual < expected else "has trailing bytes"
        raise ValueError(
            f"IDX file {path} {problem}: header says shape {shape} of {dtype.name} "
            f"= {expected} data bytes, found {actual}. Re-download the file."
        )
    array = np.frombuffer(raw, dtype=dtype, count=math.prod(shape), offset=offset)
    return array.reshape(shape).astype(dtype.newbyteorder("="), copy=True)


def _read_bytes(path: Path) -> bytes:
    """Read the whole file, inflating gzip; a broken archive becomes a ValueError."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, gzip.BadGzipFile, zlib.error) as err:
        raise ValueError(
            f"cannot decompress {path}: {err}. The download is probably incomplete; "
            "re-download the file."
        ) from err


def _parse_idx_header(path: Path, raw: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Return (dtype, shape, data offset) from an IDX header, validating the magic."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: it must start with two zero bytes and a type code "
            f"in {sorted(hex(c) for c in _IDX_DTYPES)}, got {raw[:4]!r}. "
            "Check that the path points at an (optionally .gz) IDX file."
        )
    ndim = raw[3]
    offset = 4 + 4 * ndim
    if len(raw) < offset:
        raise ValueError(
            f"IDX file {path} is truncated: its header declares {ndim} dimensions "
            f"({offset} header bytes) but the file has only {len(raw)} bytes."
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    return _IDX_DTYPES[raw[2]], shape, offset


# -- locating the files -------------------------------------------------------


def _file_in(folder: Path, name: str) -> Path | None:
    """The ``.gz`` or uncompressed copy of ``name`` in ``folder``, if either exists."""
    for candidate in (folder / f"{name}.gz", folder / name):
        if candidate.is_file():
            return candidate
    return None


def _missing_files(folder: Path) -> list[str]:
    return [name for name in _ALL_FILES if _file_in(folder, name) is None]


def _expand(folder: Path) -> list[Path]:
    """A user-given folder may be the data folder itself or hold ``fashion-mnist/``."""
    return [folder, folder / "fashion-mnist"]


def default_cache_dir() -> Path:
    """Per-user data folder: ``~/.cache/kdistill/fashion-mnist``."""
    return Path.home() / ".cache" / "kdistill" / "fashion-mnist"


def _candidates(root: str | os.PathLike[str] | None) -> list[tuple[Path, str]]:
    """Folders to search, in priority order, each with where it came from."""
    candidates: list[tuple[Path, str]] = []
    if root is not None:  # a given root is the only place: never another copy silently
        return [(p, "root argument") for p in _expand(Path(root).expanduser())]
    env = os.environ.get(ENV_VAR)
    if env:
        candidates += [(p, f"${ENV_VAR}") for p in _expand(Path(env).expanduser())]
    candidates.append((default_cache_dir(), "user cache"))
    candidates.append((Path(SYSTEM_DATA_DIR), "Debian package dataset-fashion-mnist"))
    return candidates


def find_fashion_mnist(root: str | os.PathLike[str] | None = None) -> Path:
    """Return the first folder holding all four Fashion-MNIST files.

    With ``root``, only ``root`` (or ``root/fashion-mnist``) is searched: a given folder that
    lacks the files is an error, never a fall-back to another copy. Without it, in order:
    ``$KDISTILL_DATA`` (or ``$KDISTILL_DATA/fashion-mnist``),
    ``~/.cache/kdistill/fashion-mnist``, then :data:`SYSTEM_DATA_DIR`. Each file may be
    gzipped or not.

    Raises:
        DatasetNotFoundError: listing every folder searched, what each lacks,
            and how to install the data.
    """
    candidates = _candidates(root)
    for folder, _ in candidates:
        if folder.is_dir() and not _missing_files(folder):
            return folder
    raise DatasetNotFoundError(_not_found_message(candidates))


def _not_found_message(candidates: list[tuple[Path, str]]) -> str:
    lines = [
        "Fashion-MNIST not found. Need these four files (gzipped or not): "
        + ", ".join(f"{name}.gz" for name in _ALL_FILES)
        + ". Searched:"
    ]
    for folder, origin in candidates:
        if not folder.is_dir():
            status = "folder does not exist"
        else:
            status = "missing " + ", ".join(_missing_files(folder))
        lines.append(f"  - {folder} ({origin}): {status}")
    lines += [
        "To get the data, either:",
        "  - Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist",
        f"  - download the four files from {DOWNLOAD_URL} into {default_cache_dir()}, "
        f"or into any folder and set {ENV_VAR}=/that/folder (or pass root=/that/folder).",
    ]
    return "\n".join(lines)


# -- loading ------------------------------------------------------------------


def _check_split(split: str) -> tuple[str, str]:
    if split not in FASHION_MNIST_FILES:
        raise ValueError(
            f"unknown Fashion-MNIST split {split!r}; use one of {sorted(FASHION_MNIST_FILES)}"
        )
    return FASHION_MNIST_FILES[split]


@functools.lru_cache(maxsize=8)
def _load_split_cached(
    images_path: Path, labels_path: Path, _stamp: tuple[int, int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and validate one split; cached so repeated loads skip gzip + parsing.

    ``_stamp`` (file mtimes) is only part of the cache key, so an edited file
    is re-read. Returns uint8 tensors that callers must not modify.
    """
    images = read_idx(images_path)  # (N, 28, 28) uint8
    labels = read_idx(labels_path)  # (N,) uint8
    if images.ndim != 3 or images.shape[1:] != (_IMAGE_SIZE, _IMAGE_SIZE):
        raise ValueError(
            f"{images_path} holds shape {images.shape}; Fashion-MNIST images are "
            f"(N, {_IMAGE_SIZE}, {_IMAGE_SIZE}). Check that this is the images file."
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(
            f"{labels_path} holds shape {labels.shape} but {images_path} has "
            f"{len(images)} images; the two files must come from the same split."
        )
    if len(labels) and int(labels.max()) >= _NUM_CLASSES:
        raise ValueError(
            f"{labels_path} has label {int(labels.max())}; Fashion-MNIST labels are "
            f"0..{_NUM_CLASSES - 1}. Check that this is the labels file."
        )
    return torch.from_numpy(images), torch.from_numpy(labels)


def load_fashion_mnist(
    split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split as tensors.

    Returns:
        images: ``(N, 1, 28, 28)`` float32 in [0, 1] (not normalised).
        labels: ``(N,)`` int64 class indices into :data:`FASHION_MNIST_CLASSES`.

    Decoded files are cached in memory, so calling this again is cheap; each
    call returns fresh tensors that are safe to modify.
    """
    images_name, labels_name = _check_split(split)
    folder = find_fashion_mnist(root)
    images_path = _file_in(folder, images_name)
    labels_path = _file_in(folder, labels_name)
    assert images_path is not None and labels_path is not None  # guaranteed by find
    stamp = (images_path.stat().st_mtime_ns, labels_path.stat().st_mtime_ns)
    images_u8, labels_u8 = _load_split_cached(images_path.resolve(), labels_path.resolve(), stamp)
    images = images_u8.unsqueeze(1).to(torch.float32).div_(255.0)  # (N, 1, 28, 28)
    labels = labels_u8.to(torch.int64)  # (N,), a copy
    return images, labels


def stratified_indices(labels: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """Pick ``n`` indices keeping each class's share of ``labels``; same seed, same pick.

    Quotas are ``n * class_count / total`` rounded down, with the leftover
    samples going to the classes with the largest remainders, so a small
    quick-run subset still contains every class. Returned indices are sorted.
    """
    total = len(labels)
    if not 0 < n <= total:
        raise ValueError(f"subset must be between 1 and {total} (the split size), got {n}")
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / total
    quotas = exact.floor().long()
    leftover = n - int(quotas.sum())
    if leftover:
        # Stable sort: ties go to the lower class index, keeping the pick deterministic.
        order = torch.sort(exact - quotas, descending=True, stable=True).indices
        quotas[order[:leftover]] += 1
    generator = torch.Generator().manual_seed(seed)
    picked = []
    for cls, quota in zip(classes.tolist(), quotas.tolist(), strict=True):
        members = torch.nonzero(labels == cls).flatten()
        perm = torch.randperm(len(members), generator=generator)
        picked.append(members[perm[:quota]])
    return torch.cat(picked).sort().values


VAL_SEED = 0
"""Seed of the validation draw: the held-out images are the same whatever the run's seed."""


def train_val_indices(
    labels: torch.Tensor, val_size: int, seed: int = VAL_SEED
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a training set into ``(train, val)`` index tensors, both sorted.

    ``val`` is a class-stratified draw of ``val_size`` indices (:func:`stratified_indices`,
    fixed by ``seed``); ``train`` is every other index. Tuning reads the validation
    accuracy, so the test set never chooses a hyper-parameter.
    """
    total = len(labels)
    if not 0 < val_size < total:
        raise ValueError(
            f"validation size must be between 1 and {total - 1} (the training split has "
            f"{total} images and needs some left to train on), got {val_size}"
        )
    val = stratified_indices(labels, val_size, seed)
    keep = torch.ones(total, dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def fashion_mnist_dataset(
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    normalize: bool = True,
) -> TensorDataset:
    """Fashion-MNIST as a ``TensorDataset`` of ``(image (1, 28, 28), label ())`` pairs.

    Args:
        split: ``"train"`` or ``"test"``.
        root: folder to search first (see :func:`find_fashion_mnist`).
        subset: if given, keep only this many samples, class-stratified and
            chosen by ``seed`` (for tests and quick runs).
        seed: seed of the subset draw.
        normalize: standardise with :data:`FASHION_MNIST_MEAN` /
            :data:`FASHION_MNIST_STD`; otherwise pixels stay in [0, 1].
    """
    images, labels = load_fashion_mnist(split, root)
    if subset is not None:
        keep = stratified_indices(labels, subset, seed)
        images, labels = images[keep], labels[keep]
    if normalize:
        images = images.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
    return TensorDataset(images, labels)
