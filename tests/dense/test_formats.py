"""Dense data on disk: COCO JSON, YOLO txt and image + mask folders round-trip exactly, the
Fashion-MNIST canvases have exact labels, and malformed files fail naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from kdistill.config import ConfigError
from kdistill.data.fashion_mnist import SYSTEM_DATA_DIR
from kdistill.dense.boxes import PAD, pad_boxes, unpad_boxes
from kdistill.dense.formats import (
    IGNORE,
    DenseDataError,
    read_coco,
    read_mask_folder,
    read_yolo,
    write_coco,
    write_image,
    write_mask_folder,
    write_yolo,
)
from kdistill.dense.synthetic import SyntheticSpec, make_canvas, make_split, write_dataset

NAMES = ["cat", "dog", "bird"]
BOXES = [torch.tensor([[1.0, 2.0, 11.0, 9.0], [20.0, 3.5, 31.0, 30.25]]), torch.zeros(0, 4)]
LABELS = [torch.tensor([2, 0]), torch.zeros(0, dtype=torch.int64)]


def _images(folder: Path, n: int = 2, size: int = 32) -> list[np.ndarray]:
    arrays = [np.full((size, size), 40 * (i + 1), np.uint8) for i in range(n)]
    for i, a in enumerate(arrays):
        write_image(folder / f"{i:03d}.png", a)
    return arrays


def test_coco_write_then_read_gives_the_same_boxes_labels_and_pixels(tmp_path: Path) -> None:
    arrays = _images(tmp_path / "images")
    write_coco(tmp_path / "ann.json", ["000.png", "001.png"], [(32, 32)] * 2, BOXES, LABELS, NAMES)
    data = read_coco(tmp_path / "ann.json", tmp_path / "images")
    assert data.names == NAMES
    for got, want in zip(data.boxes, BOXES, strict=True):
        assert torch.equal(got, want)
    for got, want in zip(data.labels, LABELS, strict=True):
        assert torch.equal(got, want)
    assert data.images.shape == (2, 1, 32, 32)
    assert torch.equal(
        (data.images * 255).round().to(torch.uint8)[:, 0], torch.from_numpy(np.stack(arrays))
    )
    ann = json.loads((tmp_path / "ann.json").read_text())["annotations"][0]
    assert ann["bbox"] == [1.0, 2.0, 10.0, 7.0] and ann["category_id"] == 3


def test_yolo_write_then_read_gives_the_same_boxes(tmp_path: Path) -> None:
    _images(tmp_path / "images")
    write_yolo(tmp_path / "labels", ["000", "001"], [(32, 32)] * 2, BOXES, LABELS, NAMES)
    data = read_yolo(tmp_path / "labels", tmp_path / "images")
    assert data.names == NAMES
    assert (tmp_path / "labels" / "001.txt").read_text() == ""
    for got, want in zip(data.boxes, BOXES, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert [c.tolist() for c in data.labels] == [[2, 0], []]


def test_mask_folder_write_then_read_maps_255_to_ignore(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (2, 16, 16), dtype=np.uint8)
    masks = np.random.default_rng(1).integers(0, 4, (2, 16, 16), dtype=np.uint8)
    masks[0, :3] = 255
    write_mask_folder(tmp_path / "img", tmp_path / "mask", ["a", "b"], images, masks)
    data = read_mask_folder(tmp_path / "img", tmp_path / "mask", num_classes=4)
    expected = torch.from_numpy(masks).long()
    expected[expected == 255] = IGNORE
    assert torch.equal(data.masks, expected)
    assert torch.equal((data.images[:, 0] * 255).round().to(torch.uint8), torch.from_numpy(images))


def test_padded_box_targets_round_trip() -> None:
    target = pad_boxes(BOXES, LABELS)
    assert target.shape == (2, 2, 5) and bool((target[1] == PAD).all())
    back = unpad_boxes(target)
    assert torch.equal(back[0][0], BOXES[0]) and back[0][1].tolist() == [2, 0]
    assert back[1][0].shape == (0, 4)


# -- malformed input -----------------------------------------------------------------------


def _coco(tmp_path: Path, **change: object) -> Path:
    _images(tmp_path / "images", n=1)
    data = {
        "images": [{"id": 1, "file_name": "000.png"}],
        "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, 4, 4]}],
        "categories": [{"id": 1, "name": "a"}],
    }
    data.update(change)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"annotations": [{"id": 1, "image_id": 9, "category_id": 1, "bbox": [0, 0, 4, 4]}]},
            "image_id 9",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 1, "category_id": 7, "bbox": [0, 0, 4, 4]}]},
            "category_id 7",
        ),
        (
            {"annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [0, 0, -4, 4]}]},
            "bbox",
        ),
        ({"images": [{"id": 1, "file_name": "missing.png"}]}, "missing.png"),
        ({"categories": None}, "'categories'"),
    ],
)
def test_malformed_coco_names_the_file_and_the_problem(
    tmp_path: Path, change: dict, message: str
) -> None:
    path = _coco(tmp_path, **change)
    with pytest.raises(DenseDataError, match=message) as info:
        read_coco(path, tmp_path / "images")
    assert "bad.json" in str(info.value) or "missing.png" in str(info.value)
    assert isinstance(info.value, ConfigError)  # the CLI turns it into one line, exit code 2


def test_coco_that_is_not_json_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(DenseDataError, match=r"x\.json: not valid JSON"):
        read_coco(tmp_path / "x.json", tmp_path)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("0 0.5 0.5 0.2", "expected 5 fields"),
        ("1 0.5 1.5 0.2 0.2", "normalised"),
        ("x 0 0 1 1", "invalid literal"),
    ],
)
def test_malformed_yolo_names_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    _images(tmp_path / "images", n=1)
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "000.txt").write_text(f"0 0.5 0.5 0.2 0.2\n{line}\n")
    with pytest.raises(DenseDataError, match=rf"000\.txt:2: .*{message}"):
        read_yolo(tmp_path / "labels", tmp_path / "images")


def test_yolo_class_outside_the_names_is_an_error(tmp_path: Path) -> None:
    _images(tmp_path / "images", n=1)
    write_yolo(tmp_path / "labels", ["000"], [(32, 32)], [BOXES[0]], [LABELS[0]], ["only", "two"])
    with pytest.raises(DenseDataError, match=r"000\.txt:1: class 2 is not in 0..1"):
        read_yolo(tmp_path / "labels", tmp_path / "images")


def test_mask_folder_errors_name_the_file(tmp_path: Path) -> None:
    _images(tmp_path / "img", n=1, size=8)
    with pytest.raises(DenseDataError, match=r"no mask .*000\.png"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask")
    write_image(tmp_path / "mask" / "000.png", np.full((8, 8), 7, np.uint8))
    with pytest.raises(DenseDataError, match=r"000\.png: values \[7\] are not classes 0..3"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask", num_classes=4)
    write_image(tmp_path / "img" / "001.png", np.zeros((9, 9), np.uint8))
    write_image(tmp_path / "mask" / "001.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(DenseDataError, match=r"001\.png: image of shape \(9, 9\)"):
        read_mask_folder(tmp_path / "img", tmp_path / "mask")


# -- the synthetic task --------------------------------------------------------------------


def test_canvas_boxes_and_masks_are_exact() -> None:
    item = np.zeros((28, 28), np.uint8)
    item[5:20, 8:12] = 200  # a bright bar: its mask is exactly these pixels at scale 1
    item[4, 8:12] = 20  # a faint rim below the threshold
    spec = SyntheticSpec(canvas=48, min_scale=1.0, max_scale=1.0)
    canvas = make_canvas(item[None], np.array([3]), spec, np.random.default_rng(0))
    (x1, y1, x2, y2) = canvas.boxes[0].astype(int)
    assert (x2 - x1, y2 - y1) == (4, 15)
    assert bool((canvas.mask[y1:y2, x1:x2] == 4).all())  # 1 + class
    assert (canvas.mask == 4).sum() == 60
    assert bool((canvas.mask[y1 - 1, x1:x2] == 255).all())  # the faint rim is ignored
    assert bool((canvas.image[canvas.mask == 4] == 200).all())


@pytest.mark.skipif(not SYSTEM_DATA_DIR.is_dir(), reason="dataset-fashion-mnist not installed")
def test_synthetic_set_is_written_in_every_format_and_reads_back_exactly(tmp_path: Path) -> None:
    spec = SyntheticSpec(canvas=48, train=6, val=3, test=3, seed=5)
    root = write_dataset(tmp_path, spec)
    canvases = make_split("val", spec)
    coco = read_coco(root / "annotations" / "val.json", root / "images" / "val")
    yolo = read_yolo(root / "labels" / "val", root / "images" / "val")
    masks = read_mask_folder(root / "images" / "val", root / "masks" / "val", num_classes=11)
    for i, c in enumerate(canvases):
        assert torch.equal(coco.boxes[i], torch.from_numpy(c.boxes).float())
        assert coco.labels[i].tolist() == c.labels.tolist()
        torch.testing.assert_close(yolo.boxes[i], coco.boxes[i], atol=1e-4, rtol=0)
        expected = torch.from_numpy(c.mask).long()
        expected[expected == 255] = IGNORE
        assert torch.equal(masks.masks[i], expected)
        assert 1 <= len(c.labels) <= spec.max_items
    assert write_dataset(tmp_path, spec) == root  # same settings: nothing rewritten
    assert json.loads((root / "dataset.json").read_text())["seed"] == 5
