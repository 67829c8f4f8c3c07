from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data import (
    FASHION_MNIST_CLASSES,
    DatasetNotFoundError,
    fashion_mnist_dataset,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    stratified_indices,
)
from kdistill.data import fashion_mnist as fm

REAL_DIR = Path("/usr/share/datasets/fashion-mnist")


def write_idx(path: Path, array: np.ndarray) -> Path:
    """Write a uint8 array as IDX, gzipped when ``path`` ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def make_fake_dataset(folder: Path, gz: bool = True, per_class: int = 4) -> Path:
    """Four tiny IDX files: train has ``per_class`` images per class, test has 2."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    suffix = ".gz" if gz else ""
    for split, n_per_class in (("train", per_class), ("test", 2)):
        images_name, labels_name = fm.FASHION_MNIST_FILES[split]
        labels = np.repeat(np.arange(10), n_per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28))
        write_idx(folder / f"{images_name}{suffix}", images)
        write_idx(folder / f"{labels_name}{suffix}", labels)
    return folder


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real data visible unless a test puts it there: empty HOME, no env, no system dir."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)
    monkeypatch.setattr(fm, "SYSTEM_DATA_DIR", tmp_path / "system" / "fashion-mnist")


# -- read_idx -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["a.idx.gz", "a.idx"])
def test_read_idx_round_trips(tmp_path: Path, name: str) -> None:
    array = np.arange(20 * 3 * 5, dtype=np.uint8).reshape(20, 3, 5)
    out = read_idx(write_idx(tmp_path / name, array))
    np.testing.assert_array_equal(out, array)
    assert out.flags.writeable


def test_read_idx_big_endian_int32(tmp_path: Path) -> None:
    values = np.array([1, -2, 70000], dtype=">i4")
    path = tmp_path / "ints.idx"
    path.write_bytes(bytes([0, 0, 0x0C, 1]) + struct.pack(">I", 3) + values.tobytes())
    np.testing.assert_array_equal(read_idx(path), [1, -2, 70000])


def test_read_idx_truncated_names_file(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "cut.idx", np.zeros((20, 3, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ValueError, match=r"cut\.idx is truncated.*180 data bytes, found 170"):
        read_idx(path)


def test_read_idx_rejects_non_idx(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_bytes(b"hello world")
    with pytest.raises(ValueError, match=r"notes\.txt is not an IDX file"):
        read_idx(path)


def test_read_idx_broken_gzip(tmp_path: Path) -> None:
    path = write_idx(tmp_path / "x.idx.gz", np.zeros((20, 3, 3), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(ValueError, match=r"x\.idx\.gz"):
        read_idx(path)


# -- lookup -------------------------------------------------------------------


def test_lookup_prefers_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = make_fake_dataset(tmp_path / "root")
    env = make_fake_dataset(tmp_path / "env")
    monkeypatch.setenv("KDISTILL_DATA", str(env))
    assert find_fashion_mnist(root) == root


def test_lookup_env_then_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_fake_dataset(tmp_path / "home" / ".cache" / "kdistill" / "fashion-mnist")
    assert find_fashion_mnist() == cache
    env = make_fake_dataset(tmp_path / "env" / "fashion-mnist")
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))  # parent of fashion-mnist/
    assert find_fashion_mnist() == env
    # A root lacking the files is an error, never a fall-back to another copy.
    with pytest.raises(DatasetNotFoundError, match="root argument") as info:
        find_fashion_mnist(tmp_path / "empty")
    assert str(env) not in str(info.value)


def test_lookup_system_dir_last(tmp_path: Path) -> None:
    system = make_fake_dataset(fm.SYSTEM_DATA_DIR)
    assert find_fashion_mnist() == system


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_idx(root / "train-images-idx3-ubyte.gz", np.zeros((1, 28, 28), dtype=np.uint8))
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError) as info:
        find_fashion_mnist(root)
    assert isinstance(info.value, DatasetNotFoundError)
    message = str(info.value)
    assert "apt-get install dataset-fashion-mnist" in message
    assert "github.com/zalandoresearch/fashion-mnist" in message
    assert str(root) in message and str(tmp_path / "envdir") not in message  # root only
    with pytest.raises(DatasetNotFoundError) as everywhere:
        find_fashion_mnist()
    for searched in (tmp_path / "envdir", fm.default_cache_dir(), fm.SYSTEM_DATA_DIR):
        assert str(searched) in str(everywhere.value)
    root_line = next(line for line in message.splitlines() if line.startswith(f"  - {root} "))
    assert "missing train-labels-idx1-ubyte" in root_line
    assert "train-images" not in root_line


# -- loading ------------------------------------------------------------------


@pytest.mark.parametrize("gz", [True, False])
def test_load_shapes_and_ranges(tmp_path: Path, gz: bool) -> None:
    root = make_fake_dataset(tmp_path / "d", gz=gz)
    images, labels = load_fashion_mnist("test", root)
    assert images.shape == (20, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (20,) and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    raw = read_idx(root / ("t10k-images-idx3-ubyte" + (".gz" if gz else "")))
    torch.testing.assert_close(images[:, 0], torch.from_numpy(raw).float() / 255)


def test_load_returns_fresh_tensors(tmp_path: Path) -> None:
    root = make_fake_dataset(tmp_path / "d")
    images, labels = load_fashion_mnist("train", root)
    images.zero_()
    labels.zero_()
    again_images, again_labels = load_fashion_mnist("train", root)
    assert again_images.max() > 0 and again_labels.max() > 0


def test_bad_split(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'valid'.*\['test', 'train'\]"):
        load_fashion_mnist("valid", make_fake_dataset(tmp_path / "d"))


def test_dataset_normalized(tmp_path: Path) -> None:
    root = make_fake_dataset(tmp_path / "d")
    raw = fashion_mnist_dataset("test", root, normalize=False)
    norm = fashion_mnist_dataset("test", root)
    image, label = norm[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64
    expected = (raw.tensors[0] - fm.FASHION_MNIST_MEAN) / fm.FASHION_MNIST_STD
    torch.testing.assert_close(norm.tensors[0], expected)


def test_subset_stratified_and_deterministic(tmp_path: Path) -> None:
    root = make_fake_dataset(tmp_path / "d", per_class=4)
    first = fashion_mnist_dataset("train", root, subset=20, seed=1)
    second = fashion_mnist_dataset("train", root, subset=20, seed=1)
    other = fashion_mnist_dataset("train", root, subset=20, seed=2)
    assert len(first) == 20
    assert torch.bincount(first.tensors[1], minlength=10).tolist() == [2] * 10
    assert torch.equal(first.tensors[0], second.tensors[0])
    assert not torch.equal(first.tensors[0], other.tensors[0])


def test_stratified_indices_uneven() -> None:
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    picked = stratified_indices(labels, 5, seed=0)
    assert torch.bincount(labels[picked], minlength=3).tolist() == [3, 2, 0]
    assert len(set(picked.tolist())) == 5
    with pytest.raises(ValueError, match="between 1 and 10"):
        stratified_indices(labels, 11)


@pytest.mark.skipif(not REAL_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_test_split() -> None:
    images, labels = load_fashion_mnist("test", REAL_DIR)
    assert images.shape == (10000, 1, 28, 28)
    assert torch.bincount(labels).tolist() == [1000] * len(FASHION_MNIST_CLASSES)
