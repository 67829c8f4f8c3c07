"""Dense-prediction data in the formats users have: COCO JSON, YOLO txt, image + mask folders.

Read and written with Pillow and numpy only (no torchvision). Readers return tensors:

- :func:`read_coco` / :func:`read_yolo` → :class:`DetectionData`: images ``(N, ch, H, W)``
  float in ``[0, 1]``, per-image boxes ``(m, 4)`` ``(x1, y1, x2, y2)`` in pixels and labels
  ``(m,)`` int64 in ``0 … K−1`` (COCO category ids in ascending order; YOLO class ids as
  they are);
- :func:`read_mask_folder` → :class:`SegmentationData`: images as above and masks
  ``(N, H, W)`` int64 class ids, the mask files' ``ignore_value`` (255, as in Pascal VOC)
  turned into :data:`IGNORE` (-100, what kdistill's losses and Trainer skip).

Images of one data set must share one size and mode (``L`` → 1 channel, ``RGB`` → 3; other
modes are converted to RGB): a model batch is one tensor. Every malformed input raises
:class:`DenseDataError` naming the file (and line, for YOLO) and what to fix.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from kdistill.config import ConfigError

__all__ = [
    "IGNORE",
    "IMAGE_SUFFIXES",
    "DenseDataError",
    "DetectionData",
    "SegmentationData",
    "read_coco",
    "read_image",
    "read_mask_folder",
    "read_yolo",
    "write_coco",
    "write_image",
    "write_mask_folder",
    "write_yolo",
]

IGNORE = -100
"""Label of pixels that do not count (``kdistill.trainer.IGNORE_INDEX``)."""

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


class DenseDataError(ConfigError):
    """A data file is missing or malformed; the message names the file and the fix."""


def _pil() -> object:
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow comes with matplotlib
        raise DenseDataError(
            "reading and writing images needs Pillow: pip install 'kdistill[dense]'"
        ) from err
    return Image


@dataclass
class DetectionData:
    """Images with boxes: ``images`` ``(N, ch, H, W)``; ``boxes[i]`` ``(m_i, 4)``; ``labels[i]``
    ``(m_i,)``; ``names`` the class names (index = label); ``files`` the image paths."""

    images: Tensor
    boxes: list[Tensor]
    labels: list[Tensor]
    names: list[str]
    files: list[Path]


@dataclass
class SegmentationData:
    """Images ``(N, ch, H, W)`` and masks ``(N, H, W)`` (:data:`IGNORE` where not labelled)."""

    images: Tensor
    masks: Tensor
    files: list[Path]


# -- images --------------------------------------------------------------------------------


def read_image(path: Path, mask: bool = False) -> np.ndarray:
    """``(H, W)`` uint8 for a grayscale file, ``(H, W, 3)`` for anything else.

    With ``mask=True`` the file must be single-channel (mode ``L``, or ``P`` whose palette
    indices are the class ids, as Pascal VOC stores them): ``(H, W)`` raw values.
    """
    image_cls = _pil()
    try:
        with image_cls.open(path) as img:  # type: ignore[attr-defined]
            if mask and img.mode not in ("L", "P"):
                raise DenseDataError(
                    f"{path}: a mask must be a single-channel image (mode L or P), got mode "
                    f"{img.mode}"
                )
            if not mask and img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise DenseDataError(f"image file not found: {path}") from None
    except OSError as err:
        raise DenseDataError(f"{path}: not a readable image ({err})") from None


def write_image(path: Path, array: np.ndarray) -> None:
    """Write a ``(H, W)`` or ``(H, W, 3)`` uint8 array as an image (format from the suffix)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _pil().fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(path)  # type: ignore[attr-defined]


def _stack_images(arrays: Sequence[np.ndarray], files: Sequence[Path]) -> Tensor:
    """``(N, ch, H, W)`` float in [0, 1]; every image must have the first one's shape."""
    if not arrays:
        return torch.zeros(0, 1, 0, 0)
    first = arrays[0].shape
    for array, path in zip(arrays, files, strict=True):
        if array.shape != first:
            raise DenseDataError(
                f"{path}: image of shape {array.shape}, but {files[0]} has {first}; all images "
                "of a data set must share one size and mode (resize or pad them first)"
            )
    stacked = torch.from_numpy(np.stack(arrays))  # (N, H, W) or (N, H, W, 3)
    stacked = stacked[:, None] if stacked.dim() == 3 else stacked.permute(0, 3, 1, 2)
    return stacked.float().div_(255.0)


# -- COCO ----------------------------------------------------------------------------------


def write_coco(
    path: Path,
    files: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    names: Sequence[str],
) -> None:
    """Write a COCO instances file (boxes as ``[x, y, w, h]``, category ids ``label + 1``).

    Args:
        path: the ``.json`` file.
        files: image file names, relative to the image folder.
        sizes: ``(height, width)`` per image.
        boxes / labels: per image ``(m, 4)`` ``(x1, y1, x2, y2)`` and ``(m,)``.
        names: class names; label ``k`` is category id ``k + 1``.
    """
    images, annotations = [], []
    for image_id, (name, (h, w), b, c) in enumerate(
        zip(files, sizes, boxes, labels, strict=True), 1
    ):
        images.append({"id": image_id, "file_name": name, "height": int(h), "width": int(w)})
        for (x1, y1, x2, y2), label in zip(b.tolist(), c.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                    "segmentation": [[x1, y1, x2, y1, x2, y2, x1, y2]],
                }
            )
    categories = [{"id": k + 1, "name": n} for k, n in enumerate(names)]
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"images": images, "annotations": annotations, "categories": categories}
    path.write_text(json.dumps(data))


def read_coco(path: Path, image_dir: Path) -> DetectionData:
    """Read a COCO instances file and its images (``image_dir / file_name``).

    Category ids become labels ``0 … K−1`` in ascending id order. ``iscrowd`` boxes are
    skipped (COCO evaluation ignores them too).
    """
    path, image_dir = Path(path), Path(image_dir)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DenseDataError(f"COCO annotation file not found: {path}") from None
    except json.JSONDecodeError as err:
        raise DenseDataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DenseDataError(f"{path}: a COCO file is a JSON object, got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DenseDataError(f"{path}: needs a list under {key!r} (a COCO instances file)")
    try:
        category_ids = sorted(int(c["id"]) for c in data["categories"])
        names_by_id = {int(c["id"]): str(c.get("name", c["id"])) for c in data["categories"]}
        images = [(int(i["id"]), str(i["file_name"])) for i in data["images"]]
    except (KeyError, TypeError, ValueError) as err:
        raise DenseDataError(
            f"{path}: every category and image needs an id (and file_name): {err}"
        ) from None
    label_of = {cid: k for k, cid in enumerate(category_ids)}
    per_image: dict[int, list[tuple[list[float], int]]] = {image_id: [] for image_id, _ in images}
    for n, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{n}]"
        if not isinstance(ann, dict):
            raise DenseDataError(f"{where} is not an object")
        if ann.get("image_id") not in per_image:
            raise DenseDataError(f"{where} has image_id {ann.get('image_id')!r}, not in 'images'")
        if ann.get("category_id") not in label_of:
            raise DenseDataError(
                f"{where} has category_id {ann.get('category_id')!r}, not in 'categories' "
                f"(ids {category_ids})"
            )
        bbox = ann.get("bbox")
        if (
            not isinstance(bbox, list)
            or len(bbox) != 4
            or not all(isinstance(v, (int, float)) for v in bbox)
            or bbox[2] <= 0
            or bbox[3] <= 0
        ):
            raise DenseDataError(
                f"{where}: bbox must be [x, y, width, height] with width, height > 0, got {bbox!r}"
            )
        if ann.get("iscrowd", 0):
            continue
        x, y, w, h = (float(v) for v in bbox)
        per_image[ann["image_id"]].append(([x, y, x + w, y + h], label_of[ann["category_id"]]))
    files = [image_dir / name for _, name in images]
    arrays = [read_image(f) for f in files]
    boxes, labels = _box_lists([per_image[image_id] for image_id, _ in images])
    names = [names_by_id[cid] for cid in category_ids]
    return DetectionData(_stack_images(arrays, files), boxes, labels, names, files)


def _box_lists(
    rows: Sequence[Sequence[tuple[list[float], int]]],
) -> tuple[list[Tensor], list[Tensor]]:
    boxes = [torch.tensor([b for b, _ in r], dtype=torch.float32).reshape(-1, 4) for r in rows]
    labels = [torch.tensor([c for _, c in r], dtype=torch.int64) for r in rows]
    return boxes, labels


# -- YOLO ----------------------------------------------------------------------------------


def write_yolo(
    label_dir: Path,
    stems: Sequence[str],
    sizes: Sequence[tuple[int, int]],
    boxes: Sequence[Tensor],
    labels: Sequence[Tensor],
    names: Sequence[str] | None = None,
) -> None:
    """One ``<stem>.txt`` per image: ``class cx cy w h`` per box, normalised to ``[0, 1]``.

    With ``names``, also ``classes.txt`` (one name per line, as YOLO tools write it).
    """
    label_dir.mkdir(parents=True, exist_ok=True)
    for stem, (h, w), b, c in zip(stems, sizes, boxes, labels, strict=True):
        lines = []
        for (x1, y1, x2, y2), label in zip(b.tolist(), c.tolist(), strict=True):
            cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
            lines.append(
                f"{int(label)} {cx:.8f} {cy:.8f} {(x2 - x1) / w:.8f} {(y2 - y1) / h:.8f}\n"
            )
        (label_dir / f"{stem}.txt").write_text("".join(lines))
    if names is not None:
        (label_dir / "classes.txt").write_text("".join(f"{n}\n" for n in names))


def _images_in(image_dir: Path) -> list[Path]:
    if not image_dir.is_dir():
        raise DenseDataError(f"image folder not found: {image_dir}")
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DenseDataError(f"{image_dir}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_yolo(
    label_dir: Path, image_dir: Path, names: Sequence[str] | None = None
) -> DetectionData:
    """Read YOLO txt labels for every image of ``image_dir`` (``<stem>.txt`` in ``label_dir``).

    An image without a label file has no boxes (YOLO's convention for background images).
    Class names come from ``names``, else ``label_dir/classes.txt``, else ``"0"``, ``"1"``, ….
    """
    label_dir, image_dir = Path(label_dir), Path(image_dir)
    files = _images_in(image_dir)
    if names is None and (label_dir / "classes.txt").is_file():
        names = [
            n.strip() for n in (label_dir / "classes.txt").read_text().splitlines() if n.strip()
        ]
    arrays = [read_image(f) for f in files]
    rows = []
    for file, array in zip(files, arrays, strict=True):
        h, w = array.shape[:2]
        txt = label_dir / f"{file.stem}.txt"
        rows.append(_read_yolo_file(txt, w, h, names) if txt.is_file() else [])
    boxes, labels = _box_lists(rows)
    most = max((int(c.max()) + 1 for c in labels if c.numel()), default=0)
    return DetectionData(
        _stack_images(arrays, files), boxes, labels, list(names or map(str, range(most))), files
    )


def _read_yolo_file(
    txt: Path, width: int, height: int, names: Sequence[str] | None
) -> list[tuple[list[float], int]]:
    rows = []
    for number, line in enumerate(txt.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        try:
            if len(fields) != 5:
                raise ValueError(f"expected 5 fields 'class cx cy w h', got {len(fields)}")
            label = int(fields[0])
            cx, cy, bw, bh = (float(v) for v in fields[1:])
        except ValueError as err:
            raise DenseDataError(f"{txt}:{number}: {err}") from None
        if names is not None and not 0 <= label < len(names):
            raise DenseDataError(f"{txt}:{number}: class {label} is not in 0..{len(names) - 1}")
        if label < 0 or not (0 <= cx <= 1 and 0 <= cy <= 1 and 0 < bw <= 1 and 0 < bh <= 1):
            raise DenseDataError(
                f"{txt}:{number}: class must be >= 0 and cx, cy, w, h normalised to [0, 1] "
                f"(w, h > 0); got {line.strip()!r}"
            )
        x1, y1 = (cx - bw / 2) * width, (cy - bh / 2) * height
        rows.append(([x1, y1, x1 + bw * width, y1 + bh * height], label))
    return rows


# -- image + mask folders ------------------------------------------------------------------


def write_mask_folder(
    image_dir: Path, mask_dir: Path, stems: Sequence[str], images: np.ndarray, masks: np.ndarray
) -> None:
    """``<stem>.png`` images and same-named ``uint8`` masks (class ids, 255 = ignore).

    Args:
        images: ``(N, H, W)`` or ``(N, H, W, 3)`` uint8.
        masks: ``(N, H, W)`` uint8.
    """
    for stem, image, mask in zip(stems, images, masks, strict=True):
        write_image(image_dir / f"{stem}.png", image)
        write_image(mask_dir / f"{stem}.png", mask)


def read_mask_folder(
    image_dir: Path, mask_dir: Path, num_classes: int | None = None, ignore_value: int = 255
) -> SegmentationData:
    """Read every image of ``image_dir`` and the same-stem ``.png`` mask in ``mask_dir``.

    Mask pixels equal to ``ignore_value`` become :data:`IGNORE`; with ``num_classes``, any
    other value outside ``0 … num_classes−1`` is an error naming the file.
    """
    image_dir, mask_dir = Path(image_dir), Path(mask_dir)
    files = _images_in(image_dir)
    arrays, masks = [], []
    for file in files:
        mask_file = mask_dir / f"{file.stem}.png"
        if not mask_file.is_file():
            raise DenseDataError(f"{file}: no mask {mask_file} (masks are same-stem .png files)")
        image, mask = read_image(file), read_image(mask_file, mask=True)
        if mask.shape != image.shape[:2]:
            raise DenseDataError(
                f"{mask_file}: mask {mask.shape} vs image {image.shape[:2]} of {file}"
            )
        if num_classes is not None:
            bad = np.unique(mask[(mask != ignore_value) & (mask >= num_classes)])
            if bad.size:
                raise DenseDataError(
                    f"{mask_file}: values {bad.tolist()} are not classes 0..{num_classes - 1} "
                    f"nor the ignore value {ignore_value}"
                )
        arrays.append(image)
        masks.append(mask)
    images = _stack_images(arrays, files)  # checks that every image has one size
    stacked = torch.from_numpy(np.stack(masks)).long()  # (N, H, W)
    stacked[stacked == ignore_value] = IGNORE
    return SegmentationData(images, stacked, files)
