"""Write a small image folder and a ``.npz`` file from Fashion-MNIST, to try the examples.

    python examples/own_data/make_data.py --per-class 100

writes ``examples/own_data/images/<class>/<n>.png`` (PNG files, one folder per class) and
``examples/own_data/arrays.npz`` (``x_train``/``y_train``/``x_test``/``y_test`` uint8 arrays
and the ``classes`` names). Replace either with your own data in the same layout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from kdistill.data import FASHION_MNIST_CLASSES, load_fashion_mnist, stratified_indices

HERE = Path(__file__).resolve().parent


def folder_name(label: int) -> str:
    """``03_Dress``: class ids follow the sorted folder names, so the number keeps them equal
    to Fashion-MNIST's labels (and to the ``.npz`` file's)."""
    return f"{label:02d}_" + FASHION_MNIST_CLASSES[label].replace("/", "-").replace(" ", "_")


def make_image_folder(root: Path, per_class: int, seed: int = 0) -> Path:
    """``root/<class>/<n>.png``: ``per_class`` Fashion-MNIST training images per class."""
    images, labels = load_fashion_mnist("train")
    keep = stratified_indices(labels, per_class * len(FASHION_MNIST_CLASSES), seed)
    pixels = (images[keep, 0] * 255).round().byte().numpy()  # (N, 28, 28) uint8
    for n, (image, label) in enumerate(zip(pixels, labels[keep].tolist(), strict=True)):
        folder = root / folder_name(label)
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, mode="L").save(folder / f"{n:05d}.png")
    return root


def make_npz(path: Path, per_class: int, seed: int = 0) -> Path:
    """``x_train``/``y_train`` (``per_class`` per class) and ``x_test``/``y_test`` (a fifth)."""
    arrays = {}
    for split, n in (("train", per_class), ("test", max(1, per_class // 5))):
        images, labels = load_fashion_mnist(split)
        keep = stratified_indices(labels, n * len(FASHION_MNIST_CLASSES), seed)
        arrays[f"x_{split}"] = (images[keep, 0] * 255).round().byte().numpy()  # (N, 28, 28)
        arrays[f"y_{split}"] = labels[keep].numpy()  # (N,) int64
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays, classes=np.array(FASHION_MNIST_CLASSES))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--out", type=Path, default=HERE, help="folder to write into")
    args = parser.parse_args()
    print(make_image_folder(args.out / "images", args.per_class))
    print(make_npz(args.out / "arrays.npz", args.per_class))


if __name__ == "__main__":
    main()
