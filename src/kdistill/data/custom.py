"""Your own image data from the command line: an image folder, ``.npz``/``.npy`` arrays, or a
factory function — each read into the same in-memory tensors as the built-in data sets.

Three sources (``data.name`` in a config):

- ``image_folder``: ``root/<class>/<image>`` with any image Pillow reads (PNG, JPEG, BMP, …).
  Class ids follow the sorted folder names. With ``root/train/<class>`` and
  ``root/test/<class>`` those are the splits; otherwise ``test_fraction`` of every class is
  held out, drawn with the run's seed (the same seed, the same split). Images are converted to
  ``channels`` (1: grayscale, 3: RGB; default: the first image's) and resized to
  ``image_size`` (default: the first image's size; other sizes are then an error).
- ``npz``: one ``.npz`` file, or a folder of ``.npy`` files, holding :data:`NPZ_KEYS`:
  ``x_train``/``y_train`` (and ``x_test``/``y_test``; without them ``test_fraction`` is held
  out), or ``images``/``labels``; optionally ``classes`` (an array of class-name strings).
  Images are ``(N, H, W)``, ``(N, H, W, C)`` or ``(N, C, H, W)`` (``C`` of 1, 3 or 4) or
  feature vectors ``(N, D)``.
- ``factory``: ``data.factory: package.module:function`` called with ``data.kwargs``;
  it returns ``(train, test)`` or ``{"train": …, "test": …, "classes": [...]}``, each split
  an ``(inputs, labels)`` pair of tensors/arrays or a ``torch.utils.data.Dataset`` of
  ``(input, label)`` items.

Then for every source: ``uint8`` pixels are scaled to [0, 1] (floats are kept as given), and
with ``normalize`` the inputs are standardised per channel by ``mean``/``std`` (computed on the
training split when not given). :class:`VisionData` keeps the statistics, the raw value range
(what ``kdistill predict`` accepts) and a record of the data actually used (path, files and
their sizes, a sha256 fingerprint, sample counts) for ``summary.json``.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdistill.config import ConfigError
from kdistill.data.fashion_mnist import DatasetNotFoundError, stratified_indices

__all__ = [
    "NPZ_KEYS",
    "VisionData",
    "factory_data",
    "file_record",
    "finalize",
    "image_folder_data",
    "npz_data",
    "resolve_root",
    "tensor_fingerprint",
]

NPZ_KEYS = {
    "split": ("x_train", "y_train", "x_test", "y_test"),
    "single": ("images", "labels"),
    "names": ("classes",),
}
"""Array names of a ``data.name: npz`` source: ``x_train``/``y_train`` (+ ``x_test``/``y_test``),
or ``images``/``labels`` split by ``data.test_fraction``; optional ``classes``."""

_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P")


@dataclass
class VisionData:
    """A run's data in memory, and what it is.

    ``train`` / ``test`` are ``(inputs (N, ...) float32, labels (N,) int64)``, standardised
    when ``mean``/``std`` are given; ``input_range`` is the raw range the inputs had before that
    standardisation (``(0, 1)`` for pixels); ``info`` goes to ``summary.json``.
    """

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]
    classes: list[str] | None = None
    mean: list[float] = field(default_factory=list)
    std: list[float] = field(default_factory=list)
    input_range: tuple[float, float] = (0.0, 1.0)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        if self.classes:
            return len(self.classes)
        labels = torch.cat([self.train[1], self.test[1]])
        return int(labels.max()) + 1 if labels.numel() else 0


# -- where -----------------------------------------------------------------------------------


def resolve_root(root: str | None, config_dir: Path | None, key: str = "data.root") -> Path:
    """The path ``root`` names: as given (absolute, or relative to the working directory), else
    relative to the config file's folder; an error listing both places when it is in neither."""
    if not root:
        raise ConfigError(f"{key}: required for this data source; give the folder or file")
    path = Path(root).expanduser()
    places = [path] if path.is_absolute() else [Path.cwd() / path]
    if not path.is_absolute() and config_dir is not None:
        places.append(config_dir / path)
    for place in places:
        if place.exists():
            return place.resolve()
    looked = " and ".join(str(p) for p in dict.fromkeys(places))
    raise DatasetNotFoundError(f"{key}: {root} not found (looked at {looked}); fix the path")


def file_record(paths: Sequence[Path]) -> list[dict[str, Any]]:
    """``[{"path", "bytes"}]`` of the files a data set was read from."""
    return [{"path": str(p), "bytes": p.stat().st_size} for p in paths]


def tensor_fingerprint(*tensors: Tensor | np.ndarray) -> str:
    """sha256 of the tensors' dtypes, shapes and bytes (the data actually used)."""
    digest = hashlib.sha256()
    for t in tensors:
        array = t.detach().cpu().contiguous().numpy() if isinstance(t, Tensor) else np.asarray(t)
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def files_fingerprint(paths: Sequence[Path]) -> str:
    """sha256 over the files' contents, in order."""
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


# -- image folder ----------------------------------------------------------------------------


def _image_extensions() -> set[str]:
    from PIL import Image

    return {ext.lower() for ext in Image.registered_extensions()}


def _class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan(
    folder: Path, classes: list[str], extensions: set[str]
) -> tuple[list[Path], list[int], int]:
    """Image files of ``folder/<class>/`` in a fixed order, their labels, and skipped files."""
    files: list[Path] = []
    labels: list[int] = []
    skipped = 0
    for label, name in enumerate(classes):
        sub = folder / name
        if not sub.is_dir():
            continue
        found = 0
        for path in sorted(sub.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            if path.suffix.lower() not in extensions:
                skipped += 1
                continue
            files.append(path)
            labels.append(label)
            found += 1
        if not found:
            raise ConfigError(
                f"data.root: class folder {sub} holds no image Pillow can read "
                f"(extensions such as .png, .jpg); add images or remove the folder"
            )
    return files, labels, skipped


def _read_images(
    files: Sequence[Path], channels: int | None, size: tuple[int, int] | None
) -> tuple[np.ndarray, int, tuple[int, int]]:
    """``(N, C, H, W)`` uint8 from image files; converts to ``channels``, resizes to ``size``."""
    from PIL import Image, UnidentifiedImageError

    out: list[np.ndarray] = []
    resize = size is not None
    for path in files:
        try:
            with Image.open(path) as opened:
                if channels is None:
                    channels = 1 if opened.mode in _GRAY_MODES else 3
                image = opened.convert("L" if channels == 1 else "RGB")
            if size is None:
                size = (image.height, image.width)
            if (image.height, image.width) != size:
                if not resize:
                    raise ConfigError(
                        f"data.root: {path} is {image.width}x{image.height} pixels but "
                        f"{files[0]} is {size[1]}x{size[0]}; set data.image_size: "
                        f"[{size[0]}, {size[1]}] to resize every image"
                    )
                image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(image)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(
                f"data.root: cannot read image {path} ({err}); fix or remove the file"
            ) from None
        out.append(array[None] if array.ndim == 2 else array.transpose(2, 0, 1))
    assert channels is not None and size is not None
    return np.stack(out), channels, size


def _resize_target(image_size: Sequence[int] | None) -> tuple[int, int] | None:
    if image_size is None:
        return None
    return (image_size[0], image_size[-1])


def image_folder_data(
    root: Path,
    *,
    image_size: Sequence[int] | None = None,
    channels: int | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str], dict[str, Any]]:
    """Read ``root/<class>/*`` (or ``root/train/<class>``, ``root/test/<class>``).

    Returns ``(train, test, classes, info)``: uint8 ``(N, C, H, W)`` image tensors with int64
    labels, the sorted class-folder names, and a description of what was read.
    """
    if not root.is_dir():
        raise ConfigError(
            f"data.root: {root} is not a folder; data.name: image_folder needs a folder with "
            "one sub-folder of images per class"
        )
    extensions = _image_extensions()
    split = (root / "train").is_dir() and (root / "test").is_dir()
    train_dir = root / "train" if split else root
    classes = [p.name for p in _class_folders(train_dir)]
    if not classes:
        raise ConfigError(
            f"data.root: {train_dir} has no class sub-folders; put the images of each class "
            f"in their own folder, e.g. {train_dir}/cat/001.png"
        )
    if split:
        unknown = sorted({p.name for p in _class_folders(root / "test")} - set(classes))
        if unknown:
            raise ConfigError(
                f"data.root: {root / 'test'} has class folders {unknown} that "
                f"{root / 'train'} lacks; the two splits need the same classes"
            )
    size = _resize_target(image_size)
    files, labels, skipped = _scan(train_dir, classes, extensions)
    images, channels, size = _read_images(files, channels, size)
    y = torch.tensor(labels, dtype=torch.int64)
    x = torch.from_numpy(images)
    if split:
        test_files, test_labels, skipped_test = _scan(root / "test", classes, extensions)
        skipped += skipped_test
        test_images, _, _ = _read_images(test_files, channels, size)
        train = (x, y)
        test = (torch.from_numpy(test_images), torch.tensor(test_labels, dtype=torch.int64))
        all_files = files + test_files
    else:
        train_idx, test_idx = split_indices(y, test_fraction, seed, f"{root}")
        train, test = (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx])
        all_files = files
    info = {
        "path": str(root),
        "layout": "train/ and test/ folders" if split else f"test_fraction {test_fraction}",
        "image_files": len(all_files),
        "bytes": sum(p.stat().st_size for p in all_files),
        "skipped_files": skipped,
        "image_size": list(size),
        "channels": channels,
    }
    return train, test, classes, info


def split_indices(
    labels: Tensor, test_fraction: float, seed: int, where: str
) -> tuple[Tensor, Tensor]:
    """A class-stratified held-out split: ``(train indices, test indices)``, fixed by ``seed``."""
    n_test = round(test_fraction * labels.numel())
    if not 0 < n_test < labels.numel():
        raise ConfigError(
            f"data.test_fraction: {test_fraction} of the {labels.numel()} samples in {where} "
            "leaves no training or no test sample; add data or change data.test_fraction"
        )
    test = stratified_indices(labels, n_test, seed)
    mask = torch.ones(labels.numel(), dtype=torch.bool)
    mask[test] = False
    return mask.nonzero().flatten(), test


# -- arrays ----------------------------------------------------------------------------------


def _read_arrays(root: Path) -> tuple[dict[str, np.ndarray], list[Path]]:
    wanted = {k for keys in NPZ_KEYS.values() for k in keys}
    if root.is_dir():
        files = sorted(p for p in root.glob("*.npy") if p.stem in wanted)
        arrays = {}
        for p in files:
            try:
                arrays[p.stem] = np.load(p, allow_pickle=False)
            except (ValueError, OSError) as err:
                raise ConfigError(f"data.root: cannot read {p} as a .npy array ({err})") from None
        return arrays, files
    try:
        with np.load(root, allow_pickle=False) as archive:
            if not isinstance(archive, np.lib.npyio.NpzFile):  # pragma: no cover - a .npy file
                raise ConfigError(f"data.root: {root} is one array; name a .npz file or folder")
            arrays = {k: archive[k] for k in archive.files if k in wanted}
            extra = sorted(set(archive.files) - wanted)
    except (ValueError, OSError, EOFError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"data.root: cannot read {root} as a .npz archive ({err})") from None
    if extra and not arrays:
        raise ConfigError(
            f"data.root: {root} holds arrays {extra} but none of the names kdistill reads: "
            "x_train, y_train (x_test, y_test), or images, labels (optional classes)"
        )
    return arrays, [root]


def _as_images(array: np.ndarray, where: str) -> Tensor:
    """``(N, C, H, W)`` (or ``(N, D)`` features) from the layouts :data:`NPZ_KEYS` accept."""
    if array.dtype.kind not in "biuf":
        raise ConfigError(f"data.root: {where} has dtype {array.dtype}; use uint8 or floats")
    x = torch.from_numpy(np.ascontiguousarray(array))
    if x.dim() == 3:
        x = x.unsqueeze(1)
    elif x.dim() == 4 and x.shape[1] not in (1, 3) and x.shape[-1] in (1, 3, 4):
        x = x.permute(0, 3, 1, 2).contiguous()  # channels-last -> (N, C, H, W)
    elif x.dim() not in (2, 4):
        raise ConfigError(
            f"data.root: {where} has shape {tuple(array.shape)}; expected images (N, H, W), "
            "(N, H, W, C) or (N, C, H, W), or features (N, D)"
        )
    if x.dtype == torch.bool:
        x = x.to(torch.uint8)
    if x.is_floating_point() and not torch.isfinite(x).all():
        row = int((~torch.isfinite(x)).flatten(1).any(1).nonzero()[0])
        raise ConfigError(f"data.root: {where}[{row}] holds NaN or inf; clean the data")
    return x


def _as_labels(array: np.ndarray | Tensor, n: int, where: str) -> Tensor:
    y = torch.as_tensor(np.asarray(array)) if not isinstance(array, Tensor) else array
    if y.dim() == 2 and y.shape[1] == 1:
        y = y.flatten()
    if y.dim() != 1 or y.numel() != n:
        raise ConfigError(
            f"{where}: labels of shape {tuple(y.shape)} for {n} inputs; give one integer "
            "class id per input, shape (N,)"
        )
    if y.is_floating_point():
        if not torch.equal(y, y.round()):
            odd = y[y != y.round()][0].item()
            raise ConfigError(f"{where}: labels must be integer class ids, found {odd}")
    elif y.dtype == torch.bool or y.is_complex():
        raise ConfigError(f"{where}: labels must be integer class ids, got dtype {y.dtype}")
    y = y.to(torch.int64)
    if y.numel() and int(y.min()) < 0:
        raise ConfigError(f"{where}: negative label {int(y.min())}; class ids are 0, 1, 2, …")
    return y


def npz_data(
    root: Path, *, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str] | None, dict[str, Any]]:
    """Arrays from a ``.npz`` file or a folder of ``.npy`` files (keys: :data:`NPZ_KEYS`)."""
    arrays, files = _read_arrays(root)
    if "x_train" in arrays or "y_train" in arrays:
        for key in ("x_train", "y_train"):
            if key not in arrays:
                raise ConfigError(
                    f"data.root: {root} has no {key!r} array (found {sorted(arrays)})"
                )
        x = _as_images(arrays["x_train"], f"{root}:x_train")
        train = (x, _as_labels(arrays["y_train"], x.shape[0], f"data.root: {root}:y_train"))
        if ("x_test" in arrays) != ("y_test" in arrays):
            raise ConfigError(f"data.root: {root} needs both x_test and y_test, or neither")
        if "x_test" in arrays:
            xt = _as_images(arrays["x_test"], f"{root}:x_test")
            test = (xt, _as_labels(arrays["y_test"], xt.shape[0], f"data.root: {root}:y_test"))
            layout = "x_train/y_train, x_test/y_test"
        else:
            tr, te = split_indices(train[1], test_fraction, seed, str(root))
            train, test = (train[0][tr], train[1][tr]), (train[0][te], train[1][te])
            layout = f"x_train/y_train, test_fraction {test_fraction}"
    elif "images" in arrays and "labels" in arrays:
        x = _as_images(arrays["images"], f"{root}:images")
        y = _as_labels(arrays["labels"], x.shape[0], f"data.root: {root}:labels")
        tr, te = split_indices(y, test_fraction, seed, str(root))
        train, test = (x[tr], y[tr]), (x[te], y[te])
        layout = f"images/labels, test_fraction {test_fraction}"
    else:
        raise ConfigError(
            f"data.root: {root} has arrays {sorted(arrays) or 'none'}; kdistill reads x_train, "
            "y_train (and x_test, y_test) or images, labels — rename the arrays"
        )
    classes = None
    if "classes" in arrays:
        classes = [str(c) for c in arrays["classes"].tolist()]
    return train, test, classes, {"path": str(root), "layout": layout, "files": file_record(files)}


# -- factory ---------------------------------------------------------------------------------


def import_callable(spec: str, key: str) -> Callable[..., Any]:
    """``package.module:function`` imported (from ``sys.path``: the config's folder and the
    working directory are on it, see :func:`kdistill.models.add_import_dirs`)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{key}: {spec!r} must be 'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(
            f"{key}: cannot import {module_name!r} ({err}); put {module_name.replace('.', '/')}.py "
            "next to the config file or in the working directory"
        ) from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ConfigError(f"{key}: module {module_name!r} has no function {attr!r}")
    return fn


def _split_tensors(split: Any, where: str) -> tuple[Tensor, Tensor]:
    if isinstance(split, torch.utils.data.Dataset) and not isinstance(split, (tuple, list)):
        if isinstance(split, torch.utils.data.TensorDataset):
            x, y = split.tensors[0], split.tensors[1]
        else:
            try:
                items = [split[i] for i in range(len(split))]  # type: ignore[arg-type]
            except TypeError as err:
                raise ConfigError(
                    f"{where}: a Dataset needs __len__ and __getitem__ ({err})"
                ) from None
            if not items or not all(isinstance(it, (tuple, list)) and len(it) >= 2 for it in items):
                raise ConfigError(f"{where}: Dataset items must be (input, label) pairs")
            x = torch.stack([torch.as_tensor(np.asarray(it[0])) for it in items])
            y = torch.as_tensor([int(it[1]) for it in items])
    elif isinstance(split, (tuple, list)) and len(split) == 2:
        x, y = split
    else:
        raise ConfigError(
            f"{where}: expected an (inputs, labels) pair or a torch Dataset, got "
            f"{type(split).__name__}"
        )
    xt = _as_images(np.asarray(x) if not isinstance(x, Tensor) else x.numpy(), where)
    return xt, _as_labels(y, xt.shape[0], where)


def factory_data(
    spec: str, kwargs: Mapping[str, Any]
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], list[str] | None, dict[str, Any]]:
    """Call ``data.factory`` with ``data.kwargs``; its splits as tensors (see module doc)."""
    fn = import_callable(spec, "data.factory")
    try:
        out = fn(**kwargs)
    except TypeError as err:
        raise ConfigError(f"data.kwargs: {spec} does not take {dict(kwargs)}: {err}") from None
    classes = None
    if isinstance(out, Mapping):
        if "train" not in out or "test" not in out:
            raise ConfigError(f"data.factory: {spec} returned keys {sorted(out)}; need train, test")
        classes = list(out["classes"]) if out.get("classes") is not None else None
        train_raw, test_raw = out["train"], out["test"]
    elif isinstance(out, (tuple, list)) and len(out) == 2:
        train_raw, test_raw = out
    else:
        raise ConfigError(
            f"data.factory: {spec} returned {type(out).__name__}; return (train, test) or "
            "{'train': ..., 'test': ..., 'classes': [...]}"
        )
    train = _split_tensors(train_raw, f"data.factory: {spec} (train)")
    test = _split_tensors(test_raw, f"data.factory: {spec} (test)")
    module = importlib.import_module(spec.partition(":")[0])
    return train, test, classes, {"factory": spec, "path": getattr(module, "__file__", None)}


# -- common finish ---------------------------------------------------------------------------


def finalize(
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    *,
    classes: list[str] | None,
    info: dict[str, Any],
    normalize: bool,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    where: str,
) -> VisionData:
    """Scale, check and standardise both splits the same way; describe the result."""
    (x, y), (xt, yt) = train, test
    if x.shape[1:] != xt.shape[1:]:
        raise ConfigError(
            f"{where}: training inputs are {tuple(x.shape[1:])} but test inputs "
            f"{tuple(xt.shape[1:])}; both splits need the same shape"
        )
    fingerprint = tensor_fingerprint(x, y, xt, yt)
    pixels = x.dtype == torch.uint8
    x, xt = _to_float(x), _to_float(xt)
    for name, t in (("training", x), ("test", xt)):
        if not torch.isfinite(t).all():
            bad = (~torch.isfinite(t)).flatten(1).any(1).nonzero()[0].item()
            raise ConfigError(f"{where}: {name} input {bad} holds NaN or inf; clean the data")
    low_high = (0.0, 1.0) if pixels else (float(x.min()), float(x.max()))
    num_classes = len(classes) if classes else int(torch.cat([y, yt]).max()) + 1
    if classes and int(torch.cat([y, yt]).max()) >= len(classes):
        raise ConfigError(
            f"{where}: label {int(torch.cat([y, yt]).max())} but only {len(classes)} class "
            "names; the names must cover every label"
        )
    m: list[float] = []
    s: list[float] = []
    if normalize:
        m, s = _statistics(x, mean, std, where)
        shape = (1, -1) + (1,) * (x.dim() - 2) if len(m) > 1 else (1,)
        mt, st = torch.tensor(m).view(shape), torch.tensor(s).view(shape)
        x, xt = (x - mt) / st, (xt - mt) / st
    info = {
        **info,
        "train_samples": int(x.shape[0]),
        "test_samples": int(xt.shape[0]),
        "input_shape": list(x.shape[1:]),
        "num_classes": num_classes,
        "input_range": list(low_high),
        "mean": m,
        "std": s,
        "fingerprint": {"sha256": fingerprint, "of": "inputs and labels as read"},
    }
    return VisionData((x, y), (xt, yt), classes, m, s, low_high, info)


def _to_float(x: Tensor) -> Tensor:
    if x.dtype == torch.uint8:
        return x.to(torch.float32).div_(255.0)
    return x.to(torch.float32)


def _statistics(
    x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None, where: str
) -> tuple[list[float], list[float]]:
    """Per-channel mean/std (given, or of the training inputs ``(N, C, ...)``)."""
    channels = x.shape[1] if x.dim() == 4 else 1
    if mean is None:
        dims = [0, 2, 3] if x.dim() == 4 else list(range(x.dim()))
        mean = x.mean(dims).reshape(-1).tolist()
    if std is None:
        dims = [0, 2, 3] if x.dim() == 4 else list(range(x.dim()))
        std = [v if v > 1e-8 else 1.0 for v in x.std(dims).reshape(-1).tolist()]
    for key, values in (("data.mean", mean), ("data.std", std)):
        if len(values) not in (1, channels):
            raise ConfigError(
                f"{key}: {len(values)} values for inputs with {channels} channel(s); give 1 or "
                f"{channels}"
            )
    if any(not (v > 0 and math.isfinite(v)) for v in std):
        raise ConfigError(f"data.std: must be > 0, got {list(std)}")
    return [float(v) for v in mean], [float(v) for v in std]
