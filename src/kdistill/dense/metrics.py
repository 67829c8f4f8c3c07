"""Dense-prediction metrics: COCO mAP with pycocotools, mIoU from a confusion matrix.

- :func:`coco_map` hands ground truth and detections to ``pycocotools.cocoeval.COCOeval``
  (the reference implementation of the COCO detection metric) and returns mAP@[.5:.95]
  and mAP@.5 (``stats[0]``, ``stats[1]``). Install it with ``pip install 'kdistill[dense]'``.
- :func:`confusion_matrix` / :func:`mean_iou`: per class ``IoU_c = TP / (TP + FP + FN)``
  from the pixel confusion matrix, averaged over the classes that occur in the ground truth
  or the prediction (as mmseg's ``nanmean`` over classes with a non-empty union); pixels
  labelled :data:`~kdistill.dense.formats.IGNORE` do not count.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Sequence

import numpy as np
from torch import Tensor

from kdistill.dense.formats import IGNORE, DenseDataError

__all__ = ["coco_map", "confusion_matrix", "iou_per_class", "mean_iou"]


def _cocoeval() -> tuple[type, type]:
    try:
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval
    except ImportError as err:
        raise DenseDataError(
            "COCO mAP needs pycocotools: pip install 'kdistill[dense]' (or pip install pycocotools)"
        ) from err
    return COCO, COCOeval


def coco_map(
    gt_boxes: Sequence[Tensor],
    gt_labels: Sequence[Tensor],
    detections: Sequence[tuple[Tensor, Tensor, Tensor]],
    num_classes: int,
    image_size: tuple[int, int] = (64, 64),
) -> dict[str, float]:
    """COCO box mAP of ``detections`` against the ground truth, by pycocotools.

    Args:
        gt_boxes / gt_labels: per image ``(m, 4)`` ``(x1, y1, x2, y2)`` and ``(m,)``.
        detections: per image ``(boxes (n, 4), scores (n,), labels (n,))``.
        num_classes: labels are ``0 … num_classes − 1``.
        image_size: ``(height, width)`` (recorded in the COCO image entries).

    Returns:
        ``{"map": mAP@[.5:.95], "map50": mAP@.5, "map75": mAP@.75}``; 0 where no class has
        a ground-truth box, and 0 for no detections at all.
    """
    if len(gt_boxes) != len(detections):
        raise ValueError(f"{len(gt_boxes)} ground-truth images but {len(detections)} detections")
    coco_cls, eval_cls = _cocoeval()
    h, w = image_size
    images, annotations, results = [], [], []
    for image_id, (boxes, labels, (d_boxes, d_scores, d_labels)) in enumerate(
        zip(gt_boxes, gt_labels, detections, strict=True), 1
    ):
        images.append({"id": image_id, "height": h, "width": w})
        for (x1, y1, x2, y2), label in zip(boxes.tolist(), labels.tolist(), strict=True):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for (x1, y1, x2, y2), score, label in zip(
            d_boxes.tolist(), d_scores.tolist(), d_labels.tolist(), strict=True
        ):
            results.append(
                {
                    "image_id": image_id,
                    "category_id": int(label) + 1,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(score),
                }
            )
    if not annotations or not results:
        return {"map": 0.0, "map50": 0.0, "map75": 0.0}
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress and tables
        gt = coco_cls()
        gt.dataset = {
            "images": images,
            "annotations": annotations,
            "categories": [{"id": k + 1} for k in range(num_classes)],
        }
        gt.createIndex()
        evaluator = eval_cls(gt, gt.loadRes(results), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    stats = [max(float(v), 0.0) for v in evaluator.stats[:3]]  # -1 means "no such boxes"
    return {"map": stats[0], "map50": stats[1], "map75": stats[2]}


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> np.ndarray:
    """``(K, K)`` int64 counts, rows the true class, columns the predicted one.

    Args:
        predicted: ``(...)`` class ids.
        target: ``(...)`` class ids; :data:`IGNORE` pixels are left out.
    """
    p = predicted.reshape(-1).cpu().numpy().astype(np.int64)
    t = target.reshape(-1).cpu().numpy().astype(np.int64)
    keep = t != IGNORE
    p, t = p[keep], t[keep]
    if t.size and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"target holds class ids outside 0..{num_classes - 1}: {np.unique(t)}")
    return np.bincount(t * num_classes + p, minlength=num_classes**2).reshape(
        num_classes, num_classes
    )


def iou_per_class(matrix: np.ndarray) -> np.ndarray:
    """``(K,)`` ``TP / (TP + FP + FN)``; NaN for a class absent from truth and prediction."""
    tp = np.diag(matrix).astype(np.float64)
    union = matrix.sum(0) + matrix.sum(1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def mean_iou(matrix: np.ndarray) -> float:
    """Mean IoU over the classes with a non-empty union (0 for an empty matrix)."""
    iou = iou_per_class(matrix)
    return float(np.nanmean(iou)) if np.isfinite(iou).any() else 0.0
