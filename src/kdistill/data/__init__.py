"""Datasets for kdistill, read from local files (kdistill never downloads data)."""

from __future__ import annotations

from kdistill.data.cifar import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    CIFAR_STATS,
    cifar_class_names,
    cifar_dataset,
    find_cifar,
    load_cifar,
    random_crop_flip,
)
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
    train_val_indices,
)

__all__ = [
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "CIFAR_STATS",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "DatasetNotFoundError",
    "cifar_class_names",
    "cifar_dataset",
    "fashion_mnist_dataset",
    "find_cifar",
    "find_fashion_mnist",
    "load_cifar",
    "load_fashion_mnist",
    "random_crop_flip",
    "read_idx",
    "stratified_indices",
    "train_val_indices",
]
