"""One entry for every ``data.name``: the tensors of a split, and a record of what was read.

:func:`load_split` gives ``(x, y)`` of ``"train"`` or ``"test"`` for the built-in sets
(Fashion-MNIST, CIFAR; unchanged tensors) and for your own data (:mod:`kdistill.data.custom`,
read once per process and kept). :func:`data_record` describes the data a run used — where it
was found, its files and their sizes, a sha256 fingerprint, the sample counts, the input shape,
the class names and the standardisation — for ``summary.json`` and ``kdistill export``.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kdistill.config import BUILTIN_DATA, DataConfig
from kdistill.data.cifar import CIFAR_STATS, _layout, cifar_class_names, cifar_dataset, find_cifar
from kdistill.data.custom import (
    VisionData,
    factory_data,
    file_record,
    files_fingerprint,
    finalize,
    image_folder_data,
    npz_data,
    resolve_root,
)
from kdistill.data.fashion_mnist import (
    _ALL_FILES,
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    _file_in,
    fashion_mnist_dataset,
    find_fashion_mnist,
    stratified_indices,
)

__all__ = ["builtin_root", "custom_data", "data_record", "load_split"]


def builtin_root(data: DataConfig, config_dir: Path | None) -> str | None:
    """``data.root`` of a built-in set as a path that exists (the working directory first, then
    the config's folder); ``None`` when unset (the standard lookup)."""
    if data.root is None:
        return None
    return str(resolve_root(data.root, config_dir))


def load_split(
    data: DataConfig,
    split: str,
    subset: int | None,
    seed: int,
    config_dir: Path | None = None,
) -> tuple[Tensor, Tensor]:
    """Inputs ``(N, ...)`` float32 and labels ``(N,)`` int64 of ``split``, as the run uses them
    (standardised when ``data.normalize``), with a class-stratified ``subset`` drawn by
    ``seed``."""
    if data.name == "fashion_mnist":
        root = builtin_root(data, config_dir)
        ds = fashion_mnist_dataset(split, root, subset, seed, normalize=data.normalize)
        return ds.tensors[0], ds.tensors[1]
    if data.name in BUILTIN_DATA:
        root = builtin_root(data, config_dir)
        ds = cifar_dataset(data.name, split, root, subset, seed, normalize=data.normalize)  # type: ignore[arg-type]
        return ds.tensors[0], ds.tensors[1]
    loaded = custom_data(data, seed, config_dir)
    x, y = loaded.train if split == "train" else loaded.test
    if subset is not None:
        if subset > y.numel():
            from kdistill.config import ConfigError

            raise ConfigError(
                f"data.{split}_subset: {subset} is more than the {y.numel()} {split} samples"
            )
        keep = stratified_indices(y, subset, seed)
        x, y = x[keep], y[keep]
    return x, y


def custom_data(data: DataConfig, seed: int, config_dir: Path | None = None) -> VisionData:
    """Your own data (``image_folder``, ``npz``, ``factory``), read once per process."""
    return _custom_cached(_key(data), seed, str(config_dir) if config_dir else None)


def _key(data: DataConfig) -> tuple[Any, ...]:
    return (
        data.name,
        data.root,
        data.factory,
        json.dumps(data.kwargs, sort_keys=True, default=str),
        tuple(data.image_size or ()),
        data.channels,
        data.test_fraction,
        data.normalize,
        tuple(data.mean or ()),
        tuple(data.std or ()),
    )


@functools.lru_cache(maxsize=4)
def _custom_cached(key: tuple[Any, ...], seed: int, config_dir: str | None) -> VisionData:
    (name, root, factory, kwargs, image_size, channels, test_fraction, normalize, mean, std) = key
    folder = Path(config_dir) if config_dir else None
    classes: list[str] | None
    if name == "image_folder":
        path = resolve_root(root, folder)
        train, test, classes, info = image_folder_data(
            path,
            image_size=list(image_size) or None,
            channels=channels,
            test_fraction=test_fraction,
            seed=seed,
        )
    elif name == "npz":
        path = resolve_root(root, folder)
        train, test, classes, info = npz_data(path, test_fraction=test_fraction, seed=seed)
    else:
        train, test, classes, info = factory_data(factory, json.loads(kwargs))
    return finalize(
        train,
        test,
        classes=classes,
        info={"name": name, **info},
        normalize=normalize,
        mean=list(mean) or None,
        std=list(std) or None,
        where=f"data ({name}{'' if not root else f' at {root}'})",
    )


# -- what was used ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _fingerprint_files(paths: tuple[Path, ...], stamp: tuple[tuple[int, int], ...]) -> str:
    del stamp  # part of the cache key only: an edited file is hashed again
    return files_fingerprint(paths)


def _builtin_files(data: DataConfig, config_dir: Path | None) -> tuple[Path, list[Path]]:
    root = builtin_root(data, config_dir)
    if data.name == "fashion_mnist":
        folder = find_fashion_mnist(root)
        files = [_file_in(folder, name) for name in _ALL_FILES]
        return folder, [f for f in files if f is not None]
    place = find_cifar(data.name, root)  # type: ignore[arg-type]
    if place.is_file():
        return place, [place]
    return place, [place / f for f in _layout(data.name).files]


def data_record(
    data: DataConfig,
    seed: int,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    config_dir: Path | None = None,
) -> dict[str, Any]:
    """What a run read: ``{"name", "path", "files": [{"path", "bytes"}], "fingerprint",
    "train_samples", "test_samples", "input_shape", "num_classes", "classes", "mean", "std",
    "input_range", ...}`` (``input_range``: the raw values before standardisation)."""
    if data.name in BUILTIN_DATA:
        folder, files = _builtin_files(data, config_dir)
        stamp = tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if data.name == "fashion_mnist":
            mean, std = [FASHION_MNIST_MEAN], [FASHION_MNIST_STD]
            classes: list[str] | None = list(FASHION_MNIST_CLASSES)
        else:
            mean, std = list(CIFAR_STATS[data.name][0]), list(CIFAR_STATS[data.name][1])
            try:
                classes = list(cifar_class_names(data.name, str(folder)))  # type: ignore[arg-type]
            except (FileNotFoundError, ValueError):
                classes = None
        record: dict[str, Any] = {
            "name": data.name,
            "path": str(folder),
            "files": file_record(files),
            "fingerprint": {
                "sha256": _fingerprint_files(tuple(files), stamp),
                "of": "the files, in this order",
            },
            "classes": classes,
            "mean": mean if data.normalize else [],
            "std": std if data.normalize else [],
            "input_range": [0.0, 1.0],
        }
    else:
        loaded = custom_data(data, seed, config_dir)
        record = {**loaded.info, "classes": loaded.classes}
    labels = torch.cat([train[1], test[1]])
    record.update(
        {
            "train_samples": int(train[0].shape[0]),
            "test_samples": int(test[0].shape[0]),
            "train_subset": data.train_subset,
            "test_subset": data.test_subset,
            "input_shape": list(train[0].shape[1:]),
            "config_dir": str(config_dir) if config_dir else None,  # relative paths resolve here
            "num_classes": record.get("num_classes")
            or (len(record["classes"]) if record.get("classes") else int(labels.max()) + 1),
        }
    )
    return record
