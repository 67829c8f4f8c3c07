"""Dense metrics: COCO mAP (pycocotools) on hand-made cases, mIoU against a slow reference,
and the decoding / NMS that turn detector outputs into boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdistill.dense.boxes import box_iou, nms, render_targets
from kdistill.dense.metrics import coco_map, confusion_matrix, iou_per_class, mean_iou
from kdistill.dense.models import decode_detections

pytest.importorskip("pycocotools")

GT = [torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 40.0, 36.0]])]
GT_LABELS = [torch.tensor([0, 1])]


def test_perfect_detections_score_one() -> None:
    dets = [(GT[0], torch.tensor([0.9, 0.8]), GT_LABELS[0])]
    m = coco_map(GT, GT_LABELS, dets, num_classes=2)
    assert m["map"] == pytest.approx(1.0) and m["map50"] == pytest.approx(1.0)


def test_a_box_at_iou_062_counts_at_thresholds_050_055_060_only() -> None:
    gt, labels = [GT[0][:1]], [GT_LABELS[0][:1]]
    det = torch.tensor([[0.0, 0.0, 10.0, 6.2]])  # IoU 62/100 with the ground truth
    m = coco_map(gt, labels, [(det, torch.tensor([0.9]), torch.tensor([0]))], num_classes=1)
    assert m["map50"] == pytest.approx(1.0)
    assert m["map75"] == pytest.approx(0.0)
    assert m["map"] == pytest.approx(3 / 10)  # AP 1 at 3 of the 10 IoU thresholds


def test_a_higher_scoring_false_positive_halves_the_precision() -> None:
    gt, labels = [GT[0][:1]], [GT_LABELS[0][:1]]
    dets = torch.tensor([[50.0, 50.0, 60.0, 60.0], [0.0, 0.0, 10.0, 10.0]])
    m = coco_map(
        gt, labels, [(dets, torch.tensor([0.9, 0.8]), torch.tensor([0, 0]))], num_classes=1
    )
    assert m["map"] == pytest.approx(0.5)  # precision 1/2 at recall 1, every threshold


def test_a_wrong_class_and_no_detections_score_zero() -> None:
    wrong = [(GT[0], torch.tensor([0.9, 0.8]), torch.tensor([1, 0]))]
    assert coco_map(GT, GT_LABELS, wrong, num_classes=2)["map"] == 0.0
    empty = [(torch.zeros(0, 4), torch.zeros(0), torch.zeros(0, dtype=torch.long))]
    assert coco_map(GT, GT_LABELS, empty, num_classes=2)["map"] == 0.0


def _slow_miou(pred: np.ndarray, target: np.ndarray, k: int, ignore: int) -> float:
    ious = []
    for c in range(k):
        tp = fp = fn = 0
        for p, t in zip(pred.ravel().tolist(), target.ravel().tolist(), strict=True):
            if t == ignore:
                continue
            tp += p == c and t == c
            fp += p == c and t != c
            fn += p != c and t == c
        if tp + fp + fn:
            ious.append(tp / (tp + fp + fn))
    return sum(ious) / len(ious)


def test_miou_on_a_hand_made_case() -> None:
    target = torch.tensor([[0, 0, 1, 1], [0, 0, 1, -100]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 0, 2, 2]])
    matrix = confusion_matrix(pred, target, 3)
    # class 0: TP 3, FN 1 -> 3/4; class 1: TP 2, FP 1, FN 1 -> 2/4; class 2: FP 1 -> 0
    assert iou_per_class(matrix).tolist() == [0.75, 0.5, 0.0]
    assert mean_iou(matrix) == pytest.approx((0.75 + 0.5 + 0.0) / 3)
    assert matrix.sum() == 7  # the ignored pixel is not counted


def test_miou_matches_a_slow_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (3, 7, 6), generator=gen)
    target[target == 4] = -100
    pred = torch.randint(0, 4, (3, 7, 6), generator=gen)
    expected = _slow_miou(pred.numpy(), target.numpy(), 4, -100)
    assert mean_iou(confusion_matrix(pred, target, 4)) == pytest.approx(expected, rel=1e-12)


def test_nms_keeps_the_best_of_overlapping_boxes() -> None:
    boxes = torch.tensor([[0.0, 0, 10, 10], [1, 1, 11, 11], [20, 20, 30, 30], [0, 0, 10, 9]])
    scores = torch.tensor([0.5, 0.9, 0.7, 0.6])
    keep = nms(boxes, scores, iou_threshold=0.5)
    assert keep.tolist() == [1, 2]  # 0 and 3 overlap box 1 by IoU > 0.5
    assert box_iou(boxes[:1], boxes[1:2]).item() == pytest.approx(81 / 119)


def test_decoding_perfect_centernet_outputs_recovers_the_boxes() -> None:
    target = torch.tensor([[[4.0, 8.0, 28.0, 24.0, 1.0], [36.0, 40.0, 60.0, 60.0, 0.0]]])
    heat, boxes, weight = render_targets(target, num_classes=2, size=(16, 16), stride=4.0)
    ys, xs = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    cx, cy = (xs + 0.5) * 4, (ys + 0.5) * 4
    ltrb = torch.stack(
        [cx - boxes[0, ..., 0], cy - boxes[0, ..., 1], boxes[0, ..., 2] - cx, boxes[0, ..., 3] - cy]
    )
    logits = torch.logit(heat.clamp(1e-4, 1 - 1e-4))  # the target heatmap as logits
    output = torch.cat([logits, ltrb[None]], dim=1)  # (1, 2 + 4, 16, 16)
    ((got_boxes, scores, labels),) = decode_detections(output, 2, 4.0, score_threshold=0.5)
    order = labels.argsort(descending=True)
    assert labels[order].tolist() == [1, 0]
    torch.testing.assert_close(got_boxes[order], target[0, :, :4])
    assert bool((scores > 0.99).all())
    assert heat.amax().item() == 1.0 and math.isclose(float(weight.max()), 1.0)
    m = coco_map([target[0, :, :4]], [torch.tensor([1, 0])], [(got_boxes, scores, labels)], 2)
    assert m["map"] == pytest.approx(1.0)
