from __future__ import annotations

import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.data import DatasetNotFoundError
from kdistill.data import cifar as cf
from kdistill.data.cifar import (
    CIFAR10_MEAN,
    CIFAR100_MEAN,
    CIFAR100_STD,
    cifar_class_names,
    cifar_dataset,
    find_cifar,
    load_cifar,
    random_crop_flip,
)

N_PER_FILE = 10  # images in every fake pickle: CIFAR-10 train has 5 files, so 50 images


def fake_images(n: int, seed: int) -> np.ndarray:
    """``(n, 3072)`` uint8 rows; image 0 is pure red-ish, image 1 encodes row/column."""
    data = np.random.default_rng(seed).integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    data[0, 0], data[0, 1], data[0, 2] = 255, 0, 128  # R = 255, G = 0, B = 128
    data[1, 0] = np.arange(32, dtype=np.uint8)[:, None]  # R = row index
    data[1, 1] = np.arange(32, dtype=np.uint8)[None, :]  # G = column index
    return data.reshape(n, 3072)  # planes R, G, B, each row-major, as in the real files


def fake_files(name: str) -> dict[str, bytes]:
    """File name -> pickle bytes for a tiny data set laid out like the official one."""
    layout = cf._LAYOUTS[name]
    files: dict[str, bytes] = {}
    for i, fname in enumerate(f for split in ("train", "test") for f in layout.splits[split]):
        batch = {
            b"batch_label": b"fake",
            b"data": fake_images(N_PER_FILE, seed=i),
            layout.label_key: [(j + i) % 10 for j in range(N_PER_FILE)],
        }
        if name == "cifar100":
            batch[b"coarse_labels"] = [0] * N_PER_FILE
        files[fname] = pickle.dumps(batch, protocol=2)  # the official files use protocol 2
    names = [f"class_{k}".encode() for k in range(layout.num_classes)]
    files[layout.meta] = pickle.dumps({layout.names_key: names}, protocol=2)
    return files


def make_folder(parent: Path, name: str) -> Path:
    """Write ``parent/cifar-100-python/`` (or ``cifar-10-batches-py/``); return that folder."""
    folder = parent / cf._LAYOUTS[name].folder
    folder.mkdir(parents=True, exist_ok=True)
    for fname, raw in fake_files(name).items():
        (folder / fname).write_bytes(raw)
    return folder


def make_archive(parent: Path, name: str) -> Path:
    """Write ``parent/cifar-100-python.tar.gz`` holding the folder; return the archive."""
    layout = cf._LAYOUTS[name]
    parent.mkdir(parents=True, exist_ok=True)
    path = parent / layout.archive
    with tarfile.open(path, "w:gz") as archive:
        folder = tarfile.TarInfo(layout.folder)
        folder.type = tarfile.DIRTYPE
        archive.addfile(folder)
        for fname, raw in fake_files(name).items():
            info = tarfile.TarInfo(f"{layout.folder}/{fname}")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
    return path


@pytest.fixture(autouse=True)
def isolated_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No real data visible unless a test puts it there: empty HOME, no $KDISTILL_DATA."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("KDISTILL_DATA", raising=False)


# -- loading ------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["folder", "archive"])
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_load_shapes_and_values(tmp_path: Path, name: str, kind: str) -> None:
    make = make_folder if kind == "folder" else make_archive
    root = make(tmp_path / "d", name)
    n_train = N_PER_FILE * len(cf._LAYOUTS[name].splits["train"])
    images, labels = load_cifar(name, "train", root)
    assert images.shape == (n_train, 3, 32, 32) and images.dtype == torch.float32
    assert labels.shape == (n_train,) and labels.dtype == torch.int64
    assert images.min() >= 0.0 and images.max() <= 1.0
    # Files are concatenated in order: the last file's first image sits at n_train - 10.
    last = n_train // N_PER_FILE - 1
    expected = torch.from_numpy(fake_images(N_PER_FILE, seed=last)).float() / 255
    torch.testing.assert_close(images[-N_PER_FILE:].reshape(N_PER_FILE, -1), expected)
    assert labels[-N_PER_FILE:].tolist() == [(j + last) % 10 for j in range(N_PER_FILE)]

    test_images, test_labels = load_cifar(name, "test", root)
    assert test_images.shape == (N_PER_FILE, 3, 32, 32) and len(test_labels) == N_PER_FILE


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_channel_order_and_row_major(tmp_path: Path, name: str) -> None:
    images, _ = load_cifar(name, "test", make_folder(tmp_path, name))
    assert torch.all(images[0, 0] == 1.0)  # R plane is constant 255
    assert torch.all(images[0, 1] == 0.0)
    torch.testing.assert_close(images[0, 2], torch.full((32, 32), 128 / 255))
    rows = torch.arange(32, dtype=torch.float32) / 255
    torch.testing.assert_close(images[1, 0], rows[:, None].expand(32, 32))  # image[c, row, col]
    torch.testing.assert_close(images[1, 1], rows[None, :].expand(32, 32))


def test_load_returns_fresh_tensors(tmp_path: Path) -> None:
    root = make_folder(tmp_path, "cifar100")
    images, labels = load_cifar("cifar100", "test", root)
    images.zero_()
    labels.zero_()
    again_images, again_labels = load_cifar("cifar100", "test", root)
    assert again_images.max() > 0 and again_labels.max() > 0


def test_class_names(tmp_path: Path) -> None:
    names = cifar_class_names("cifar100", make_archive(tmp_path, "cifar100"))
    assert len(names) == 100 and names[:2] == ("class_0", "class_1")
    assert len(cifar_class_names("cifar10", make_folder(tmp_path, "cifar10"))) == 10


def test_bad_split_and_name(tmp_path: Path) -> None:
    root = make_folder(tmp_path, "cifar100")
    with pytest.raises(ValueError, match=r"'valid'.*\['test', 'train'\]"):
        load_cifar("cifar100", "valid", root)
    with pytest.raises(ValueError, match=r"'cifar20'.*\['cifar10', 'cifar100'\]"):
        load_cifar("cifar20", "train", root)  # type: ignore[arg-type]


def test_refuses_code_in_pickles(tmp_path: Path) -> None:
    folder = make_folder(tmp_path, "cifar100")

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, ("echo hacked",))

    (folder / "test").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(ValueError, match=r"cifar-100-python/test.*refusing to load global"):
        load_cifar("cifar100", "test", folder)


def test_archive_errors(tmp_path: Path) -> None:
    wrong = make_archive(tmp_path / "b", "cifar100")  # CIFAR-100's archive, read as CIFAR-10
    with pytest.raises(ValueError, match=r"lacks data_batch_1.*cifar-10-python\.tar\.gz"):
        load_cifar("cifar10", "train", wrong)
    archive = make_archive(tmp_path / "a", "cifar10")
    archive.write_bytes(archive.read_bytes()[:200])  # a cut-off download
    with pytest.raises(ValueError, match=r"cannot read the archive .*re-download"):
        load_cifar("cifar10", "train", archive)


# -- lookup -------------------------------------------------------------------


def test_lookup_root_env_cache_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = make_folder(tmp_path / "home" / ".cache" / "kdistill", "cifar100")
    assert cf.default_cache_dir() == tmp_path / "home" / ".cache" / "kdistill"
    assert find_cifar("cifar100") == cache
    env = make_archive(tmp_path / "env", "cifar100")
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "env"))  # folder holding the archive
    assert find_cifar("cifar100") == env
    root = make_folder(tmp_path / "root", "cifar100")
    assert find_cifar("cifar100", tmp_path / "root") == root  # folder holding the folder
    assert find_cifar("cifar100", root) == root  # the extracted folder itself
    with pytest.raises(DatasetNotFoundError, match="root argument"):  # a bad root: no fall-back
        find_cifar("cifar100", tmp_path / "empty")


def test_lookup_archive_file_and_folder_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archive = make_archive(tmp_path / "dl", "cifar10")
    monkeypatch.setenv("KDISTILL_DATA", str(archive))  # the archive file itself
    assert find_cifar("cifar10") == archive
    assert find_cifar("cifar10", archive) == archive
    folder = make_folder(tmp_path / "dl", "cifar10")  # extracted next to the archive
    assert find_cifar("cifar10", tmp_path / "dl") == folder


def test_lookup_cache_archive(tmp_path: Path) -> None:
    archive = make_archive(tmp_path / "home" / ".cache" / "kdistill", "cifar10")
    assert find_cifar("cifar10") == archive
    assert load_cifar("cifar10", "test")[0].shape == (N_PER_FILE, 3, 32, 32)


def test_not_found_message(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_folder(tmp_path / "root", "cifar100")
    (folder / "meta").unlink()
    monkeypatch.setenv("KDISTILL_DATA", str(tmp_path / "envdir"))
    with pytest.raises(FileNotFoundError) as info:
        find_cifar("cifar100", tmp_path / "root")
    assert isinstance(info.value, DatasetNotFoundError)
    message = str(info.value)
    assert message.startswith("CIFAR-100 not found")
    assert "https://www.cs.toronto.edu/~kriz/cifar.html" in message
    assert "cifar-100-python.tar.gz" in message
    cache = cf.default_cache_dir()
    assert f"tar -xzf cifar-100-python.tar.gz -C {cache}" in message
    for searched in (tmp_path / "root", folder):  # a given root is the only place searched
        assert f"  - {searched} (" in message
    assert str(tmp_path / "envdir") not in message
    with pytest.raises(FileNotFoundError) as info:
        find_cifar("cifar100")
    for searched in (
        tmp_path / "envdir" / "cifar-100-python",
        cache / "cifar-100-python",
        cache / "cifar-100-python.tar.gz",
    ):
        assert f"  - {searched} (" in str(info.value)
    folder_line = next(line for line in message.splitlines() if line.startswith(f"  - {folder} "))
    assert folder_line.endswith("(root argument): missing meta")
    with pytest.raises(DatasetNotFoundError, match=r"CIFAR-10 not found.*data_batch_5"):
        load_cifar("cifar10", "test")


# -- dataset ------------------------------------------------------------------


def test_dataset_normalized(tmp_path: Path) -> None:
    root = make_folder(tmp_path, "cifar100")
    raw = cifar_dataset("cifar100", "test", root, normalize=False)
    norm = cifar_dataset("cifar100", "test", root)
    image, label = norm[0]
    assert image.shape == (3, 32, 32) and label.dtype == torch.int64
    mean = torch.tensor(CIFAR100_MEAN).view(3, 1, 1)
    std = torch.tensor(CIFAR100_STD).view(3, 1, 1)
    torch.testing.assert_close(norm.tensors[0], (raw.tensors[0] - mean) / std)
    cifar10 = cifar_dataset("cifar10", "test", make_folder(tmp_path, "cifar10"))
    assert cifar10.tensors[0][0, 0, 0, 0].item() == pytest.approx(
        (1.0 - CIFAR10_MEAN[0]) / cf.CIFAR10_STD[0]
    )


def test_subset_stratified_and_deterministic(tmp_path: Path) -> None:
    root = make_folder(tmp_path, "cifar10")  # 50 training images, 5 per class
    first = cifar_dataset("cifar10", "train", root, subset=20, seed=1)
    second = cifar_dataset("cifar10", "train", root, subset=20, seed=1)
    other = cifar_dataset("cifar10", "train", root, subset=20, seed=2)
    assert len(first) == 20
    assert torch.bincount(first.tensors[1], minlength=10).tolist() == [2] * 10
    assert torch.equal(first.tensors[0], second.tensors[0])
    assert not torch.equal(first.tensors[0], other.tensors[0])


# -- augmentation -------------------------------------------------------------


def _windows(image: torch.Tensor, padding: int) -> list[torch.Tensor]:
    """Every crop (and its mirror) of the zero-padded image: what the augmentation may give."""
    padded = torch.nn.functional.pad(image, (padding,) * 4)
    h, w = image.shape[-2:]
    crops = []
    for top in range(2 * padding + 1):
        for left in range(2 * padding + 1):
            crop = padded[:, top : top + h, left : left + w]
            crops += [crop, crop.flip(-1)]
    return crops


def test_random_crop_flip_is_a_padded_window() -> None:
    images = torch.rand(4, 3, 8, 8) + 1.0  # > 0, so padded zeros are recognisable
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=2)
    assert out.shape == images.shape and out.dtype == images.dtype
    for image, result in zip(images, out, strict=True):
        assert any(torch.equal(result, w) for w in _windows(image, 2))
    assert (out == 0).any()  # some window was shifted into the zero padding
    assert images.min() >= 1.0  # the input is untouched


def test_random_crop_flip_deterministic() -> None:
    images = torch.rand(6, 3, 32, 32)
    a = random_crop_flip(images, torch.Generator().manual_seed(3))
    b = random_crop_flip(images, torch.Generator().manual_seed(3))
    c = random_crop_flip(images, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_random_crop_flip_padding_zero_only_flips() -> None:
    images = torch.rand(8, 3, 4, 4)
    out = random_crop_flip(images, torch.Generator().manual_seed(0), padding=0)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images, strict=True)]
    kept = [torch.equal(o, i) for o, i in zip(out, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def test_random_crop_flip_fill_and_uint8() -> None:
    images = torch.full((2, 3, 4, 4), 9, dtype=torch.uint8)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(images, gen, padding=4, fill=(1, 2, 3))
    assert out.dtype == torch.uint8
    for channel, fill in enumerate((1, 2, 3)):
        assert set(out[:, channel].unique().tolist()) <= {9, fill}
    with pytest.raises(ValueError, match="one per channel"):
        random_crop_flip(images, gen, fill=(0.0, 0.0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        random_crop_flip(images[0], gen)
