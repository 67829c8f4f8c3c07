"""The data sources behind ``data.name`` (image folder, ``.npy``/``.npz`` arrays, factory), the
config keys each accepts, and the small pieces of readable output — in-process, fast."""

from __future__ import annotations

import errno
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdistill.config import ConfigError, DataConfig, config_from_dict
from kdistill.data.custom import DatasetNotFoundError
from kdistill.data.sources import custom_data, load_split
from kdistill.demo import SMOKE_NOTE, _markdown
from kdistill.rundir import describe_os_error, prepare_output_dir


def _png(path: Path, size: tuple[int, int], value: int, mode: str = "RGB") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = 3 if mode == "RGB" else 1
    pixels = np.full((size[1], size[0], channels), value, dtype=np.uint8).squeeze(
        -1 if channels == 1 else ()
    )
    Image.fromarray(pixels, mode=mode).save(path)


def test_image_folder_with_train_and_test_folders_resizes_and_keeps_the_splits(
    tmp_path: Path,
) -> None:
    for split, n in (("train", 3), ("test", 2)):
        for label, name in enumerate(["cat", "dog"]):
            for i in range(n):  # sizes differ: image_size resizes them all
                _png(tmp_path / split / name / f"{i}.png", (10 + i, 8), 40 * (label + 1))
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    data = DataConfig(name="image_folder", root=str(tmp_path), image_size=[6, 5], normalize=False)
    loaded = custom_data(data, seed=0)
    (x, y), (xt, yt) = loaded.train, loaded.test
    assert x.shape == (6, 3, 6, 5) and xt.shape == (4, 3, 6, 5)  # RGB kept, (H, W) = (6, 5)
    assert y.tolist() == [0, 0, 0, 1, 1, 1] and yt.tolist() == [0, 0, 1, 1]
    assert loaded.classes == ["cat", "dog"] and loaded.info["skipped_files"] == 1
    assert torch.allclose(x[0], torch.full((3, 6, 5), 40 / 255)) and loaded.mean == []


def test_image_folder_sizes_must_agree_without_image_size(tmp_path: Path) -> None:
    _png(tmp_path / "a" / "1.png", (8, 8), 10, "L")
    _png(tmp_path / "a" / "2.png", (9, 8), 10, "L")
    _png(tmp_path / "b" / "1.png", (8, 8), 10, "L")
    with pytest.raises(ConfigError, match=r"2\.png is 9x8 pixels.*data\.image_size: \[8, 8\]"):
        custom_data(DataConfig(name="image_folder", root=str(tmp_path)), seed=0)


def test_held_out_split_is_stratified_fixed_by_the_seed_and_standardised(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    np.save(tmp_path / "images.npy", rng.integers(0, 256, (50, 4, 4, 3), dtype=np.uint8))
    np.save(tmp_path / "labels.npy", np.arange(50) % 5)
    data = DataConfig(name="npz", root=str(tmp_path), test_fraction=0.2)
    first, again = load_split(data, "test", None, 7), load_split(data, "test", None, 7)
    assert torch.equal(first[0], again[0]) and first[0].shape == (10, 3, 4, 4)  # NHWC -> NCHW
    assert torch.bincount(first[1]).tolist() == [2] * 5
    other = DataConfig(name="npz", root=str(tmp_path), test_fraction=0.3)  # another cache key
    assert load_split(other, "test", None, 7)[0].shape[0] == 15
    train_x, _ = load_split(data, "train", None, 7)
    per_channel = train_x.transpose(0, 1).flatten(1)  # standardised with the train statistics
    assert torch.allclose(per_channel.mean(1), torch.zeros(3), atol=1e-5)
    assert torch.allclose(per_channel.std(1), torch.ones(3), atol=1e-3)


def test_factory_gives_datasets_or_arrays(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "factory_for_test.py").write_text(
        "import torch\n"
        "from torch.utils.data import Dataset\n"
        "class Items(Dataset):\n"
        "    def __len__(self): return 8\n"
        "    def __getitem__(self, i): return torch.full((2,), float(i)), i % 2\n"
        "def make(scale=1.0):\n"
        "    return Items(), (torch.ones(4, 2) * scale, torch.tensor([0, 1, 0, 1]))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = DataConfig(factory="factory_for_test:make", kwargs={"scale": 3.0}, normalize=False)
    assert data.name == "factory"  # data.factory alone picks the source
    loaded = custom_data(data, seed=0)
    assert loaded.train[0].shape == (8, 2) and loaded.train[1].tolist() == [0, 1] * 4
    assert loaded.test[0].max() == 3.0 and loaded.input_range == (0.0, 7.0)
    sys.modules.pop("factory_for_test", None)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"image_size": [32, 32]}, "image_size: has no effect on the built-in"),
        (
            {"name": "npz", "root": "a.npz", "channels": 3},
            "channels: only for data.name: image_folder",
        ),
        ({"name": "image_folder"}, "root: data.name: image_folder needs root"),
        ({"name": "factory"}, "factory: data.name: factory needs"),
        (
            {"name": "npz", "root": "a.npz", "factory": "m:f"},
            "factory: only for data.name: factory",
        ),
        ({"name": "image_folder", "root": "x", "channels": 2}, "channels: must be 1"),
    ],
)
def test_data_keys_that_would_do_nothing_are_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict({"data": data})


def test_a_relative_root_is_looked_for_here_then_next_to_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError, match=r"looked at .*missing\.npz and .*cfg/missing"):
        custom_data(DataConfig(name="npz", root="missing.npz"), 0, tmp_path / "cfg")


def test_quick_demo_reports_a_smoke_run_not_a_kd_effect() -> None:
    report = {"kd_gain_points": None, "seed": 0, "epochs": 1, "temperature": 2.0}
    report |= {"alpha": 0.9, "threads": 1, "seconds": 3.0}
    text = _markdown("| table |\n", report)
    assert SMOKE_NOTE in text and "KD changed" not in text
    assert "KD changed the student's test accuracy by +1.00" in _markdown(
        "", {**report, "kd_gain_points": 1.0}
    )


def test_os_errors_name_the_path_and_what_to_do(tmp_path: Path) -> None:
    full = describe_os_error(OSError(errno.ENOSPC, "No space left on device", "/data/run/x"))
    assert full is not None and "/data/run/x" in full and "no space left" in full
    assert describe_os_error(OSError("no file involved")) is None  # a bug: show the stack
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "summary.json").write_text("{}")
    (tmp_path / "run" / "export").mkdir()
    with pytest.raises(ConfigError, match="choose one"):
        prepare_output_dir(tmp_path / "run", resume=True, overwrite=True)
    prepare_output_dir(tmp_path / "run", resume=False, overwrite=True)
    assert list((tmp_path / "run").iterdir()) == []
