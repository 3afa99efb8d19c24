"""Datasets: in-memory labelled images, offline-first loaders, and class-incremental helpers."""

from .cars import load_cars196
from .cifar import load_cifar100
from .common import check_data_root
from .cub import load_cub200
from .decode import DEFAULT_STORAGE_SIZE, PHOTO_RESIZES, decode_images, fit_square, open_rgb, squash_square
from .errors import DatasetNotFoundError
from .eurosat import load_eurosat
from .folders import holdout_split, list_class_folders
from .imagenet_a import load_imagenet_a
from .imagenet_r import load_imagenet_r
from .images import (
    LabeledImages,
    class_incremental_union,
    per_class_split,
    per_class_subsample,
    to_model_input,
)
from .loaders import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    MNIST5K_TEST_EVERY,
    data_cache_dir,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    takes_size,
)
from .transforms import AUGMENTATIONS, Preprocessing

__all__ = [
    "AUGMENTATIONS",
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "DEFAULT_STORAGE_SIZE",
    "MNIST5K_TEST_EVERY",
    "PHOTO_RESIZES",
    "DatasetNotFoundError",
    "LabeledImages",
    "Preprocessing",
    "check_data_root",
    "class_incremental_union",
    "data_cache_dir",
    "decode_images",
    "fit_square",
    "holdout_split",
    "list_class_folders",
    "load_cars196",
    "load_cifar100",
    "load_cub200",
    "load_dataset",
    "load_eurosat",
    "load_fashion_mnist",
    "load_imagenet_a",
    "load_imagenet_r",
    "load_mnist",
    "open_rgb",
    "per_class_split",
    "per_class_subsample",
    "squash_square",
    "takes_size",
    "to_model_input",
]
