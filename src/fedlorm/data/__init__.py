"""Datasets: in-memory labelled images, offline-first loaders, and class-incremental helpers."""

from .errors import DatasetNotFoundError
from .images import LabeledImages, class_incremental_union, per_class_subsample, to_model_input
from .loaders import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    MNIST5K_TEST_EVERY,
    data_cache_dir,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
)

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "MNIST5K_TEST_EVERY",
    "DatasetNotFoundError",
    "LabeledImages",
    "class_incremental_union",
    "data_cache_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "per_class_subsample",
    "to_model_input",
]
