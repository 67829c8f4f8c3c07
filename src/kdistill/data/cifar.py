"""CIFAR-10 and CIFAR-100 from the official "python version" files, with no download step.

Like Fashion-MNIST (:mod:`kdistill.data.fashion_mnist`), kdistill never fetches CIFAR over
the network: it looks in a few places (see :func:`find_cifar`) and otherwise raises an
error saying where to get the data. Both the extracted folder (``cifar-100-python/``,
``cifar-10-batches-py/``) and the downloaded ``.tar.gz`` archive itself are accepted; an
archive is read in memory, never extracted to disk.

File format (https://www.cs.toronto.edu/~kriz/cifar.html): each file is a pickled dict
whose ``b"data"`` is an ``(N, 3072)`` uint8 array, one row per image: 1024 red, then
1024 green, then 1024 blue values, each plane row-major 32×32 — so a plain reshape gives
``(N, 3, 32, 32)``. CIFAR-100 has ``train``, ``test`` and ``meta`` with ``b"fine_labels"``
(100 classes, used here) and ``b"coarse_labels"`` (20 superclasses); CIFAR-10 has
``data_batch_1`` … ``data_batch_5``, ``test_batch`` and ``batches.meta`` with
``b"labels"``.

Pickles can run arbitrary code when loaded, so they are read with an unpickler that only
accepts the few globals these files need (numpy array reconstruction).

:func:`random_crop_flip` is the standard CIFAR training augmentation (4-pixel padded
random 32×32 crop + horizontal flip, as in RepDistiller's ``dataset/cifar100.py``),
applied to a whole batch tensor at once.
"""

from __future__ import annotations

import functools
import io
import os
import pickle
import tarfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import TensorDataset

from kdistill.data.fashion_mnist import DatasetNotFoundError, stratified_indices

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_STATS",
    "CifarName",
    "DatasetNotFoundError",
    "cifar_class_names",
    "cifar_dataset",
    "find_cifar",
    "load_cifar",
    "random_crop_flip",
]

CifarName = Literal["cifar10", "cifar100"]

# Per-channel statistics of the training images scaled to [0, 1] (over all pixels).
# RepDistiller normalises CIFAR-100 with (0.5071, 0.4867, 0.4408) / (0.2675, 0.2565, 0.2761):
# the same numbers to within 3e-4.
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN: tuple[float, float, float] = (0.5071, 0.4865, 0.4409)
CIFAR100_STD: tuple[float, float, float] = (0.2673, 0.2564, 0.2762)
CIFAR_STATS: dict[str, tuple[tuple[float, float, float], tuple[float, float, float]]] = {
    "cifar10": (CIFAR10_MEAN, CIFAR10_STD),
    "cifar100": (CIFAR100_MEAN, CIFAR100_STD),
}

ENV_VAR = "KDISTILL_DATA"
DOWNLOAD_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"


@dataclass(frozen=True)
class _Layout:
    """Where one CIFAR variant keeps what, in its official archive."""

    title: str
    folder: str  # the folder inside the archive
    archive: str  # the file name on the download page
    splits: dict[str, tuple[str, ...]]  # split -> pickle files, concatenated in this order
    meta: str
    label_key: bytes
    names_key: bytes
    num_classes: int

    @property
    def files(self) -> tuple[str, ...]:
        return (*(f for files in self.splits.values() for f in files), self.meta)


_LAYOUTS: dict[str, _Layout] = {
    "cifar10": _Layout(
        title="CIFAR-10",
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        splits={
            "train": tuple(f"data_batch_{i}" for i in range(1, 6)),
            "test": ("test_batch",),
        },
        meta="batches.meta",
        label_key=b"labels",
        names_key=b"label_names",
        num_classes=10,
    ),
    "cifar100": _Layout(
        title="CIFAR-100",
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        splits={"train": ("train",), "test": ("test",)},
        meta="meta",
        label_key=b"fine_labels",
        names_key=b"fine_label_names",
        num_classes=100,
    ),
}

_IMAGE_SHAPE = (3, 32, 32)
_ROW_LENGTH = 3 * 32 * 32


def _layout(name: str) -> _Layout:
    if name not in _LAYOUTS:
        raise ValueError(f"unknown CIFAR data set {name!r}; use one of {sorted(_LAYOUTS)}")
    return _LAYOUTS[name]


# -- safe unpickling ----------------------------------------------------------

# (module, name) pairs the official files (pickled by Python 2 + numpy 1.x) and files
# re-pickled by Python 3 + numpy 1.x/2.x may reference. Anything else is refused.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),  # how Python 3 protocol-2 pickles store bytes
    }
)


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds only numpy arrays and builtin containers."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(
                f"refusing to load global {module}.{name}: CIFAR files only hold numpy "
                "arrays, lists, bytes and ints"
            )
        return super().find_class(module, name)


def _unpickle(raw: bytes, where: str) -> dict[bytes, Any]:
    """Decode one CIFAR pickle; ``where`` names the file in error messages."""
    try:
        # encoding="bytes": the files come from Python 2, where keys were byte strings.
        obj = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(
            f"cannot read {where}: {err}. The file is not an official CIFAR pickle or is "
            "incomplete; re-download it."
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where} holds a {type(obj).__name__}, not the dict CIFAR files hold")
    return obj


# -- locating the data --------------------------------------------------------

Kind = Literal["folder", "archive"]


def default_cache_dir() -> Path:
    """Per-user data folder, ``~/.cache/kdistill``: extract (or drop) the archive here."""
    return Path.home() / ".cache" / "kdistill"


def _expand(place: Path, layout: _Layout) -> list[tuple[Path, Kind]]:
    """A place may be the archive, the extracted folder, or a folder holding either."""
    if place.is_file():
        return [(place, "archive")]
    return [
        (place, "folder"),
        (place / layout.folder, "folder"),
        (place / layout.archive, "archive"),
    ]


def _candidates(
    layout: _Layout, root: str | os.PathLike[str] | None
) -> list[tuple[Path, Kind, str]]:
    """Places to search, in priority order, each with its kind and where it came from."""
    candidates: list[tuple[Path, Kind, str]] = []
    if root is not None:  # a given root is the only place: never another copy silently
        return [(p, k, "root argument") for p, k in _expand(Path(root).expanduser(), layout)]
    env = os.environ.get(ENV_VAR)
    if env:
        candidates += [(p, k, f"${ENV_VAR}") for p, k in _expand(Path(env).expanduser(), layout)]
    cache = default_cache_dir()
    candidates.append((cache / layout.folder, "folder", "user cache"))
    candidates.append((cache / layout.archive, "archive", "user cache"))
    return candidates


def _missing_files(folder: Path, layout: _Layout) -> list[str]:
    return [f for f in layout.files if not (folder / f).is_file()]


def _usable(path: Path, kind: Kind, layout: _Layout) -> bool:
    if kind == "archive":
        return path.is_file()
    return path.is_dir() and not _missing_files(path, layout)


def find_cifar(name: CifarName, root: str | os.PathLike[str] | None = None) -> Path:
    """Return the extracted folder or ``.tar.gz`` archive holding CIFAR-10 or CIFAR-100.

    With ``root``, only ``root`` is searched (a given place that lacks the data is an error,
    never a fall-back). Otherwise ``$KDISTILL_DATA``, then ``~/.cache/kdistill``. Each
    of these may be the extracted folder itself (``cifar-100-python/``), a folder holding
    it, or a folder holding the archive (``cifar-100-python.tar.gz``); ``root`` and
    ``$KDISTILL_DATA`` may also name the archive file. A folder counts only if it holds
    every file of the data set; an archive's contents are checked when it is read.

    Raises:
        DatasetNotFoundError: listing every place searched, what each lacks, and how to
            get the data.
    """
    layout = _layout(name)
    candidates = _candidates(layout, root)
    for path, kind, _ in candidates:
        if _usable(path, kind, layout):
            return path
    raise DatasetNotFoundError(_not_found_message(layout, candidates))


def _not_found_message(layout: _Layout, candidates: list[tuple[Path, Kind, str]]) -> str:
    lines = [
        f"{layout.title} not found. Need the folder {layout.folder}/ (files "
        + ", ".join(layout.files)
        + f") or the archive {layout.archive}. Searched:"
    ]
    for path, kind, origin in candidates:
        if kind == "archive":
            status = "no such file"
        elif not path.is_dir():
            status = "folder does not exist"
        else:
            status = "missing " + ", ".join(_missing_files(path, layout))
        lines.append(f"  - {path} ({origin}): {status}")
    cache = default_cache_dir()
    lines += [
        "To get the data:",
        f"  - download {layout.archive} (python version) from {DOWNLOAD_URL}",
        f"  - extract it into {cache} (mkdir -p {cache} && tar -xzf {layout.archive} -C "
        f"{cache}), or just move the archive there;",
        f"    or put either in any folder and set {ENV_VAR}=/that/folder "
        "(or pass root=/that/folder).",
    ]
    return "\n".join(lines)


# -- reading ------------------------------------------------------------------


def _read_files(path: Path, layout: _Layout, files: Sequence[str]) -> dict[str, bytes]:
    """Raw bytes of ``files`` from an extracted folder or, in one pass, from the archive."""
    if path.is_dir():
        return {f: (path / f).read_bytes() for f in files}
    wanted = set(files)
    found: dict[str, bytes] = {}
    try:
        # Stream mode ("r|*"): one sequential pass, no seeking back through the gzip stream.
        with tarfile.open(path, mode="r|*") as archive:
            for member in archive:
                base = member.name.rsplit("/", 1)[-1]
                if member.isfile() and base in wanted and base not in found:
                    extracted = archive.extractfile(member)
                    assert extracted is not None  # regular files always extract
                    found[base] = extracted.read()
                    if len(found) == len(wanted):
                        break
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise ValueError(
            f"cannot read the archive {path}: {err}. The download is probably incomplete; "
            f"re-download {layout.archive} from {DOWNLOAD_URL}."
        ) from err
    missing = [f for f in files if f not in found]
    if missing:
        raise ValueError(
            f"the archive {path} lacks {', '.join(missing)}; is it {layout.archive} "
            f"(python version) from {DOWNLOAD_URL}?"
        )
    return found


def _decode_batch(raw: bytes, where: str, layout: _Layout) -> tuple[np.ndarray, np.ndarray]:
    """One pickle -> (images (N, 3, 32, 32) uint8, labels (N,) int64), validated."""
    batch = _unpickle(raw, where)
    if b"data" not in batch or layout.label_key not in batch:
        raise ValueError(
            f"{where} has keys {sorted(batch)}; a {layout.title} data file needs b'data' "
            f"and {layout.label_key!r}. Check that this is {layout.title}, not the other one."
        )
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[layout.label_key], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _ROW_LENGTH:
        raise ValueError(
            f"{where} holds data of shape {data.shape} and dtype {data.dtype}; "
            f"{layout.title} rows are (N, {_ROW_LENGTH}) uint8."
        )
    if labels.shape != (len(data),):
        raise ValueError(f"{where} has {len(data)} images but {labels.size} labels")
    if labels.size and not (labels.min() >= 0 and labels.max() < layout.num_classes):
        raise ValueError(
            f"{where} has labels in [{labels.min()}, {labels.max()}]; {layout.title} labels "
            f"are 0..{layout.num_classes - 1}."
        )
    return data.reshape(-1, *_IMAGE_SHAPE), labels  # (N, 3, 32, 32): planes R, G, B


@functools.lru_cache(maxsize=4)
def _load_split_cached(
    name: str, split: str, path: Path, _stamp: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split; cached (by path and mtime) so repeated loads skip unpickling.

    Returns uint8 images and int64 labels that callers must not modify.
    """
    layout = _LAYOUTS[name]
    files = layout.splits[split]
    raw = _read_files(path, layout, files)
    parts = [_decode_batch(raw[f], f"{path}/{f}", layout) for f in files]
    images = np.concatenate([p[0] for p in parts])  # (N, 3, 32, 32) uint8
    labels = np.concatenate([p[1] for p in parts])  # (N,) int64
    return torch.from_numpy(images), torch.from_numpy(labels)


def _check_split(split: str, layout: _Layout) -> None:
    if split not in layout.splits:
        raise ValueError(
            f"unknown {layout.title} split {split!r}; use one of {sorted(layout.splits)}"
        )


def load_cifar(
    name: CifarName, split: str = "train", root: str | os.PathLike[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of CIFAR-10 (``"cifar10"``) or CIFAR-100 (``"cifar100"``).

    Returns:
        images: ``(N, 3, 32, 32)`` float32 RGB in [0, 1] (not normalised).
        labels: ``(N,)`` int64 class indices (CIFAR-100: the 100 fine labels).

    Decoded splits are cached in memory, so calling this again is cheap; each call
    returns fresh tensors that are safe to modify.
    """
    layout = _layout(name)
    _check_split(split, layout)
    path = find_cifar(name, root)
    images_u8, labels = _load_split_cached(
        name, split, path.resolve(), _stamp(path, layout.splits[split])
    )
    return images_u8.to(torch.float32).div_(255.0), labels.clone()


def _stamp(path: Path, files: Sequence[str]) -> int:
    """Newest modification time of what a split reads: a changed file is re-read."""
    if path.is_dir():
        return max((path / f).stat().st_mtime_ns for f in files)
    return path.stat().st_mtime_ns


def cifar_class_names(
    name: CifarName, root: str | os.PathLike[str] | None = None
) -> tuple[str, ...]:
    """Class names in label order, read from the data set's meta file."""
    layout = _layout(name)
    path = find_cifar(name, root)
    raw = _read_files(path, layout, [layout.meta])[layout.meta]
    meta = _unpickle(raw, f"{path}/{layout.meta}")
    if layout.names_key not in meta:
        raise ValueError(
            f"{path}/{layout.meta} has keys {sorted(meta)}; expected {layout.names_key!r}"
        )
    return tuple(n.decode() if isinstance(n, bytes) else str(n) for n in meta[layout.names_key])


def cifar_dataset(
    name: CifarName,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    subset: int | None = None,
    seed: int = 0,
    normalize: bool = True,
) -> TensorDataset:
    """CIFAR as a ``TensorDataset`` of ``(image (3, 32, 32), label ())`` pairs.

    Args:
        name: ``"cifar10"`` or ``"cifar100"``.
        split: ``"train"`` or ``"test"``.
        root: place to search first (see :func:`find_cifar`).
        subset: if given, keep only this many samples, class-stratified and chosen by
            ``seed`` (for tests and quick runs).
        seed: seed of the subset draw.
        normalize: standardise each channel with :data:`CIFAR_STATS` ``[name]``; otherwise
            pixels stay in [0, 1].

    The whole split is held as float32 (CIFAR's 50 000 training images take 614 MB).
    """
    images, labels = load_cifar(name, split, root)
    if subset is not None:
        keep = stratified_indices(labels, subset, seed)
        images, labels = images[keep], labels[keep]
    if normalize:
        mean, std = CIFAR_STATS[name]
        images = images.sub_(torch.tensor(mean).view(3, 1, 1)).div_(torch.tensor(std).view(3, 1, 1))
    return TensorDataset(images, labels)


# -- augmentation -------------------------------------------------------------


def random_crop_flip(
    images: torch.Tensor,
    generator: torch.Generator,
    padding: int = 4,
    *,
    fill: float | Sequence[float] = 0.0,
) -> torch.Tensor:
    """Random crop after padding, then a random horizontal flip, for a whole batch.

    The batched equivalent of torchvision's ``RandomCrop(32, padding=4)`` followed by
    ``RandomHorizontalFlip()``, the CIFAR training augmentation of RepDistiller
    (``dataset/cifar100.py``) and most CIFAR papers: each image is padded by ``padding``
    pixels on every side, a window of its original size is cut at a uniformly random
    offset (``0 … 2·padding`` in each direction), and the window is mirrored left–right
    with probability 1/2. Each image draws its own offset and flip from ``generator``, so
    a seeded generator gives a reproducible batch.

    Args:
        images: ``(B, C, H, W)``, any dtype and device.
        generator: source of randomness; may live on another device than ``images``.
        padding: pixels added on each side; 0 leaves only the flip.
        fill: value of the padded pixels, one number or one per channel. torchvision pads
            with 0 (black) *before* normalising; on images already normalised with
            ``mean``/``std``, black is ``fill = [-m / s for m, s in zip(mean, std)]``.

    Returns:
        A new ``(B, C, H, W)`` tensor; ``images`` is not modified.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    batch, channels, height, width = images.shape
    # Draw on the generator's device (torch requires it), then move to the images'.
    offsets = torch.randint(
        0, 2 * padding + 1, (2, batch), generator=generator, device=generator.device
    ).to(images.device)
    top, left = offsets[0], offsets[1]  # (B,), (B,)
    flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5  # (B,)
    flip = flip.to(images.device)

    fill_values = torch.as_tensor(fill, dtype=images.dtype, device=images.device).flatten()
    if fill_values.numel() not in (1, channels):
        raise ValueError(
            f"fill must be one number or one per channel ({channels}), got {fill_values.numel()}"
        )
    padded = images.new_empty(batch, channels, height + 2 * padding, width + 2 * padding)
    padded.copy_(fill_values.reshape(1, -1, 1, 1).expand_as(padded))  # per-channel or scalar
    padded[:, :, padding : padding + height, padding : padding + width] = images

    rows = top[:, None] + torch.arange(height, device=images.device)  # (B, H)
    cols = left[:, None] + torch.arange(width, device=images.device)  # (B, W)
    cols = torch.where(flip[:, None], cols.flip(1), cols)  # mirrored window: columns reversed
    index = rows[:, None, :, None].expand(batch, channels, height, padded.shape[-1])
    out = padded.gather(2, index)  # (B, C, H, W + 2p)
    index = cols[:, None, None, :].expand(batch, channels, height, width)
    return out.gather(3, index)  # (B, C, H, W)
