"""PNG figures for reports and sweeps (matplotlib, headless ``Agg`` backend).

matplotlib is an optional dependency (``pip install 'kdistill[plots]'``); every function
here imports it lazily and raises :class:`PlotsUnavailable` with the install command when it
is missing. Each function takes plain data (lists, tensors, dicts) and writes one PNG, so
the figures can be redrawn from the CSV/JSON files a run leaves behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

# Colours used consistently: teacher, student without KD, student with KD.
COLORS = {"teacher": "#4c72b0", "no_kd": "#8c8c8c", "kd": "#dd8452"}
DPI = 110


class PlotsUnavailable(ImportError):
    """matplotlib is not installed."""


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the ``Agg`` backend (no display needed)."""
    try:
        import matplotlib
    except ImportError as err:
        raise PlotsUnavailable(
            "plots need matplotlib: pip install 'kdistill[plots]' (or pip install matplotlib)"
        ) from err
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    pyplot().close(fig)
    return path


def training_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | Path,
    colors: Mapping[str, str] | None = None,
) -> Path:
    """Test accuracy, training loss and test loss per epoch, one line per run.

    ``runs`` maps a label to its ``metrics.csv`` rows (``epoch``, ``test_accuracy``,
    ``train_loss``, ``test_loss``; ``train_ce_loss`` when present is drawn dashed — it is the
    hard-label part of the objective, comparable between runs with and without KD, while
    ``train_loss`` is the whole weighted objective).
    """
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for label, rows in runs.items():
        color = (colors or {}).get(label)
        epochs = [int(r["epoch"]) for r in rows]
        tested = [r for r in rows if r.get("test_accuracy") not in ("", None)]  # eval_every
        tested_epochs = [int(r["epoch"]) for r in tested]
        acc = [100 * float(r["test_accuracy"]) for r in tested]
        (line,) = axes[0].plot(tested_epochs, acc, marker="o", ms=3, label=label, color=color)
        color = line.get_color()
        axes[1].plot(
            epochs,
            [float(r["train_loss"]) for r in rows],
            marker="o",
            ms=3,
            color=color,
            label=label,
        )
        if any("train_ce_loss" in r and r["train_ce_loss"] not in ("", None) for r in rows):
            ce = [float(r.get("train_ce_loss") or "nan") for r in rows]
            if ce != [float(r["train_loss"]) for r in rows]:
                axes[1].plot(epochs, ce, ls="--", color=color, label=f"{label}: CE term")
        axes[2].plot(
            tested_epochs,
            [float(r["test_loss"]) for r in tested],
            marker="o",
            ms=3,
            color=color,
            label=label,
        )
    axes[0].set(title="test accuracy", xlabel="epoch", ylabel="%")
    axes[1].set(title="training objective (dashed: hard-label CE)", xlabel="epoch", ylabel="loss")
    axes[1].set_yscale("log")
    axes[2].set(title="test cross-entropy", xlabel="epoch", ylabel="loss")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def accuracy_vs(
    rows: Sequence[Mapping[str, Any]],
    x_key: str,
    path: str | Path,
    x_label: str,
    log_x: bool = False,
) -> Path:
    """Scatter of test accuracy against ``x_key`` (``parameters``, ``latency_ms``) per model."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for row in rows:
        x, y = float(row[x_key]), 100 * float(row["test_accuracy"])
        color = _row_color(str(row["name"]))
        ax.scatter([x], [y], s=60, color=color, zorder=3)
        below = "without" in str(row["name"])  # keeps the two students' labels apart
        ax.annotate(
            str(row["name"]),
            (x, y),
            textcoords="offset points",
            xytext=(6, -12 if below else 4),
            fontsize=9,
        )
    if log_x:
        ax.set_xscale("log")
    else:
        ax.set_xlim(left=0, right=1.25 * max(float(r[x_key]) for r in rows))
    ax.set(
        xlabel=x_label, ylabel="test accuracy (%)", title=f"accuracy vs {x_label.split(' (')[0]}"
    )
    ax.grid(alpha=0.3, which="both")
    ax.margins(y=0.15)
    if log_x:
        ax.margins(x=0.25)
    fig.tight_layout()
    return _save(fig, path)


def _row_color(name: str) -> str:
    if name == "teacher":
        return COLORS["teacher"]
    if "without" in name or "no KD" in name:
        return COLORS["no_kd"]
    return COLORS["kd"]


def confusion_matrix(
    matrix: Tensor, class_names: Sequence[str], path: str | Path, title: str = ""
) -> Path:
    """A confusion matrix (rows: true class, columns: predicted), normalised per row."""
    plt = pyplot()
    counts = matrix.to(torch.float64)
    rates = counts / counts.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    size = max(5.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rates.numpy(), cmap="Blues", vmin=0, vmax=1)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                value = rates[i, j].item()
                if value >= 0.005:
                    ax.text(
                        j,
                        i,
                        f"{100 * value:.0f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if value > 0.6 else "black",
                    )
        ax.set_xticks(range(n), class_names, rotation=45, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    ax.set(xlabel="predicted", ylabel="true", title=title or "confusion matrix (% of true class)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    fig.tight_layout()
    return _save(fig, path)


def dark_knowledge(
    images: Tensor,
    labels: Sequence[int],
    teacher_logits: Tensor,
    student_logits: Tensor,
    temperatures: Sequence[float],
    class_names: Sequence[str],
    path: str | Path,
) -> Path:
    """For each sample: the image, then teacher vs student ``softmax(z / T)`` at each ``T``.

    Raising ``T`` lifts the small probabilities the teacher gives to wrong classes — which
    classes it thinks an image resembles — and these are what the KD term trains on.
    """
    plt = pyplot()
    n, k = images.shape[0], len(temperatures)
    fig, axes = plt.subplots(
        n,
        k + 1,
        figsize=(2.3 + 3.1 * k, 2.3 * n),
        gridspec_kw={"width_ratios": [0.7] + [1.0] * k},
        squeeze=False,
    )
    x = torch.arange(len(class_names))
    short = [c.split("/")[0][:10] for c in class_names]
    for i in range(n):
        axes[i][0].imshow(_displayable(images[i]), cmap="gray")
        axes[i][0].set_title(f"true: {class_names[labels[i]]}", fontsize=9)
        axes[i][0].axis("off")
        for j, t in enumerate(temperatures):
            ax = axes[i][j + 1]
            p_t = torch.softmax(teacher_logits[i].float() / t, -1)
            p_s = torch.softmax(student_logits[i].float() / t, -1)
            ax.bar(x - 0.2, p_t.numpy(), width=0.4, color=COLORS["teacher"], label="teacher")
            ax.bar(x + 0.2, p_s.numpy(), width=0.4, color=COLORS["kd"], label="KD student")
            ax.set_ylim(0, 1)
            ax.grid(axis="y", alpha=0.3)
            if i == 0:
                ax.set_title(f"T = {t:g}", fontsize=10)
            if i == n - 1 and len(class_names) <= 20:
                ax.set_xticks(x.tolist(), short, rotation=60, fontsize=7)
            else:
                ax.set_xticks(x.tolist(), [""] * len(class_names))
            if j == 0:
                ax.set_ylabel("probability", fontsize=8)
            if i == 0 and j == k - 1:
                ax.legend(fontsize=7, loc="upper right")
    fig.suptitle("dark knowledge: softened distributions softmax(z / T)", fontsize=11)
    fig.tight_layout()
    return _save(fig, path)


def _displayable(image: Tensor) -> Any:
    """(C, H, W) standardised tensor -> (H, W) or (H, W, 3) array scaled to [0, 1]."""
    image = image.detach().float()
    image = (image - image.min()) / (image.max() - image.min()).clamp_min(1e-8)
    if image.shape[0] == 1:
        return image[0].numpy()
    return image.permute(1, 2, 0).numpy()


def heatmap(
    values: Sequence[Sequence[float]],
    row_labels: Sequence[str],
    col_labels: Sequence[str],
    path: str | Path,
    title: str,
    row_name: str,
    col_name: str,
    fmt: str = "{:.2f}",
) -> Path:
    """A values grid (rows × columns) with each cell annotated; the best cell is outlined."""
    plt = pyplot()
    grid = torch.tensor(values, dtype=torch.float64)
    fig, ax = plt.subplots(figsize=(1.3 * len(col_labels) + 2.5, 0.7 * len(row_labels) + 1.8))
    image = ax.imshow(grid.numpy(), cmap="viridis", aspect="auto")
    best = int(torch.nan_to_num(grid, nan=-float("inf")).argmax())
    bi, bj = divmod(best, grid.shape[1])
    span = float(torch.nan_to_num(grid).max() - torch.nan_to_num(grid).min()) or 1.0
    low = float(torch.nan_to_num(grid).min())
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            value = grid[i, j].item()
            dark = (value - low) / span < 0.5
            ax.text(
                j,
                i,
                "–" if value != value else fmt.format(value),
                ha="center",
                va="center",
                fontsize=9,
                color="white" if dark else "black",
                fontweight="bold" if (i, j) == (bi, bj) else "normal",
            )
    ax.add_patch(
        plt.Rectangle((bj - 0.5, bi - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2)
    )
    ax.set_xticks(range(len(col_labels)), col_labels)
    ax.set_yticks(range(len(row_labels)), row_labels)
    ax.set(xlabel=col_name, ylabel=row_name, title=title)
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return _save(fig, path)
