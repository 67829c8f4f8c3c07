"""A real detection / segmentation task built here: Fashion-MNIST items on canvases.

No detection data set installs on these machines, so the task is made from real images:
each canvas (``canvas × canvas`` pixels, grayscale) holds 1 … ``max_items`` Fashion-MNIST
items, each rescaled by a random factor in ``[min_scale, max_scale]`` (bilinear, Pillow) and
pasted at a random position fully inside the canvas. A placement whose box overlaps an
earlier box by IoU above ``max_iou`` is redrawn (up to 50 times, then the item is dropped),
so the objects stay separable.

Labels are exact:

- **mask** of an item: its pixels brighter than ``threshold`` (in ``[0, 1]``);
- **box**: the tight box of that mask, ``(x1, y1, x2, y2)`` with ``x2``/``y2`` exclusive
  (integer pixels), the item's full extent even where a later item covers part of it;
- **semantic mask**: ``1 + class`` where an item's mask is, later items on top, 0
  (background) elsewhere, and 255 (*ignore*, Pascal VOC's convention) on the faint rim of
  items (``0 < value ≤ threshold``) that no mask covers.

Splits are fixed by the seed and never share an item: ``train`` and ``val`` canvases draw
from disjoint halves of a seeded permutation of the Fashion-MNIST training images (val from
the last 10,000), ``test`` canvases from the t10k images.

:func:`write_dataset` writes everything in the on-disk formats of :mod:`kdistill.dense.formats`::

    root/images/<split>/<id>.png         grayscale canvases
    root/masks/<split>/<id>.png          semantic masks (0 background, 1..10, 255 ignore)
    root/annotations/<split>.json        COCO instances (category id = class + 1)
    root/labels/<split>/<id>.txt         YOLO txt (+ classes.txt)
    root/dataset.json                    the settings; a folder written with others is rebuilt
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from kdistill.checkpoint import atomic_write_text
from kdistill.data.fashion_mnist import FASHION_MNIST_CLASSES, load_fashion_mnist
from kdistill.dense.formats import write_coco, write_image, write_yolo

__all__ = [
    "SEGMENTATION_CLASSES",
    "SPLITS",
    "Canvas",
    "SyntheticSpec",
    "make_canvas",
    "make_split",
    "write_dataset",
]

SPLITS = ("train", "val", "test")
SEGMENTATION_CLASSES = ("background", *FASHION_MNIST_CLASSES)
"""Class ``k`` of the semantic masks (``0`` background, ``1 + c`` Fashion-MNIST class ``c``)."""
VERSION = 1
_VAL_POOL = 10_000  # Fashion-MNIST training images reserved for validation canvases


@dataclass(frozen=True)
class SyntheticSpec:
    """How the canvases are drawn; saved as ``dataset.json`` next to the files."""

    canvas: int = 64
    max_items: int = 4
    min_scale: float = 0.6
    max_scale: float = 1.4
    max_iou: float = 0.2
    threshold: float = 0.2
    train: int = 2000
    val: int = 300
    test: int = 300
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_scale * 28 > self.canvas:
            raise ValueError(
                f"max_scale {self.max_scale} makes items of {round(self.max_scale * 28)} px, "
                f"larger than the {self.canvas} px canvas"
            )
        if not 0 < self.min_scale <= self.max_scale:
            raise ValueError(
                f"need 0 < min_scale <= max_scale, got {self.min_scale}, {self.max_scale}"
            )
        if self.max_items < 1:
            raise ValueError(f"max_items must be >= 1, got {self.max_items}")


@dataclass
class Canvas:
    """One canvas: ``image`` ``(S, S)`` uint8, ``boxes`` ``(m, 4)``, ``labels`` ``(m,)``,
    ``mask`` ``(S, S)`` uint8 (0 background, ``1 + class``, 255 ignore)."""

    image: np.ndarray
    boxes: np.ndarray
    labels: np.ndarray
    mask: np.ndarray


def _resize(item: np.ndarray, side: int) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(item).resize((side, side), Image.BILINEAR), dtype=np.uint8)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def make_canvas(
    items: np.ndarray, labels: np.ndarray, spec: SyntheticSpec, rng: np.random.Generator
) -> Canvas:
    """Paste ``items`` ``(k, 28, 28)`` uint8 (classes ``labels`` ``(k,)``) on one canvas."""
    s, cut = spec.canvas, round(spec.threshold * 255)
    image = np.zeros((s, s), np.uint8)
    mask = np.zeros((s, s), np.uint8)
    faint = np.zeros((s, s), bool)
    boxes, kept = [], []
    for item, label in zip(items, labels, strict=True):
        side = round(28 * rng.uniform(spec.min_scale, spec.max_scale))
        patch = _resize(item, side)
        on = patch > cut
        if not on.any():
            continue
        rows, cols = np.nonzero(on)
        for _ in range(50):
            y0, x0 = (int(v) for v in rng.integers(0, s - side + 1, size=2))
            box = np.array(
                [x0 + cols.min(), y0 + rows.min(), x0 + cols.max() + 1, y0 + rows.max() + 1], float
            )
            if all(_iou(box, other) <= spec.max_iou for other in boxes):
                break
        else:
            continue
        window = (slice(y0, y0 + side), slice(x0, x0 + side))
        image[window] = np.where(on, patch, np.maximum(image[window], patch))
        mask[window] = np.where(on, 1 + int(label), mask[window])
        faint[window] |= patch > 0
        boxes.append(box)
        kept.append(int(label))
    mask[faint & (mask == 0)] = 255
    return Canvas(image, np.array(boxes, float).reshape(-1, 4), np.array(kept, np.int64), mask)


def make_split(split: str, spec: SyntheticSpec, fashion_root: str | None = None) -> list[Canvas]:
    """The canvases of one split (see the module docstring for which items each may use)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    source = "test" if split == "test" else "train"
    images, labels = load_fashion_mnist(source, root=fashion_root)  # (N, 1, 28, 28) in [0, 1]
    items = (images[:, 0] * 255).round().to(torch.uint8).numpy()
    classes = labels.numpy()
    pool = np.arange(len(items))
    if split != "test":
        order = np.random.default_rng(spec.seed).permutation(len(items))
        pool = order[-_VAL_POOL:] if split == "val" else order[:-_VAL_POOL]
    rng = np.random.default_rng([spec.seed, SPLITS.index(split)])
    count = getattr(spec, split)
    canvases = []
    for _ in range(count):
        k = int(rng.integers(1, spec.max_items + 1))
        pick = rng.choice(pool, size=k, replace=False)
        canvases.append(make_canvas(items[pick], classes[pick], spec, rng))
    return canvases


def write_dataset(root: str | Path, spec: SyntheticSpec, fashion_root: str | None = None) -> Path:
    """Write every split in every format under ``root`` (skipped when ``root/dataset.json``
    already records the same settings); returns ``root``."""
    root = Path(root)
    stamp = {"version": VERSION, **asdict(spec)}
    marker = root / "dataset.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return root
    names = list(FASHION_MNIST_CLASSES)
    for split in SPLITS:
        canvases = make_split(split, spec, fashion_root)
        stems = [f"{i:06d}" for i in range(len(canvases))]
        for stem, c in zip(stems, canvases, strict=True):
            write_image(root / "images" / split / f"{stem}.png", c.image)
            write_image(root / "masks" / split / f"{stem}.png", c.mask)
        sizes = [(spec.canvas, spec.canvas)] * len(canvases)
        boxes = [torch.from_numpy(c.boxes).float() for c in canvases]
        labels = [torch.from_numpy(c.labels) for c in canvases]
        files = [f"{stem}.png" for stem in stems]
        write_coco(root / "annotations" / f"{split}.json", files, sizes, boxes, labels, names)
        write_yolo(root / "labels" / split, stems, sizes, boxes, labels, names)
    atomic_write_text(marker, json.dumps(stamp, indent=2) + "\n")
    return root
