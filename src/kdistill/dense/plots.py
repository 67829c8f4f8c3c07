"""The side-by-side picture of a dense run: the same test images, ground truth and each model.

One row per image, one column per source (``ground truth``, ``teacher``, ``student``,
``student_kd``): boxes with their class and score drawn on the image (detection), or the
class map painted over it (segmentation; ignored pixels grey).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from kdistill.dense.formats import IGNORE
from kdistill.plots import _save, pyplot

__all__ = ["prediction_grid"]

MIN_SCORE = 0.3
"""Detections drawn: those scoring at least this (mAP uses them all)."""


def prediction_grid(
    images: Tensor,
    truth: Any,
    predictions: Mapping[str, Any],
    names: Sequence[str],
    path: str | Path,
    task: str,
) -> Path:
    """Write the grid to ``path``.

    Args:
        images: ``(N, ch, H, W)`` in ``[0, 1]``.
        truth: per image ``(boxes, labels)`` (detection) or masks ``(N, H, W)``.
        predictions: model name → per image ``(boxes, scores, labels)`` or ``(N, H, W)`` maps.
        names: class names (index = label).
        task: ``"detection"`` or ``"segmentation"``.
    """
    plt = pyplot()
    columns = {"ground truth": truth, **predictions}
    n = images.shape[0]
    fig, axes = plt.subplots(n, len(columns), figsize=(2.4 * len(columns), 2.4 * n), squeeze=False)
    cmap = plt.get_cmap("tab20")
    for row in range(n):
        image = images[row].permute(1, 2, 0).squeeze(-1).cpu().numpy()
        for col, (title, value) in enumerate(columns.items()):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=9)
            if task == "detection":
                _draw_boxes(ax, value[row], names, cmap, scored=title != "ground truth")
            else:
                _paint_mask(ax, value[row], cmap)
    fig.tight_layout()
    return _save(fig, path)


def _draw_boxes(
    ax: Any, item: tuple[Tensor, ...], names: Sequence[str], cmap: Any, scored: bool
) -> None:
    from matplotlib.patches import Rectangle

    boxes, labels = item[0], item[-1]
    scores = item[1] if scored else None
    for k, ((x1, y1, x2, y2), label) in enumerate(
        zip(boxes.tolist(), labels.tolist(), strict=True)
    ):
        if scores is not None and float(scores[k]) < MIN_SCORE:
            continue
        color = cmap(int(label) % 20)
        ax.add_patch(
            Rectangle((x1 - 0.5, y1 - 0.5), x2 - x1, y2 - y1, fill=False, lw=1.2, ec=color)
        )
        text = names[int(label)] if int(label) < len(names) else str(label)
        if scores is not None:
            text += f" {float(scores[k]):.2f}"
        ax.text(
            x1,
            y1 - 1,
            text,
            fontsize=5,
            color="white",
            va="bottom",
            bbox={"fc": color, "pad": 0.5, "lw": 0},
        )


def _paint_mask(ax: Any, mask: Tensor, cmap: Any) -> None:
    import numpy as np

    m = mask.cpu().numpy()
    rgba = np.zeros((*m.shape, 4))
    for label in np.unique(m):
        if label == 0:
            continue
        color = (0.5, 0.5, 0.5, 1.0) if label == IGNORE else cmap(int(label) % 20)
        rgba[m == label] = (*color[:3], 0.55)
    ax.imshow(rgba)
