"""Datasets for kdistill, read from local files (kdistill never downloads data)."""

from __future__ import annotations

from kdistill.data.fashion_mnist import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    DatasetNotFoundError,
    fashion_mnist_dataset,
    find_fashion_mnist,
    load_fashion_mnist,
    read_idx,
    stratified_indices,
)

__all__ = [
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DatasetNotFoundError",
    "fashion_mnist_dataset",
    "find_fashion_mnist",
    "load_fashion_mnist",
    "read_idx",
    "stratified_indices",
]
