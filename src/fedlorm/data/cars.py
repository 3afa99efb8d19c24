"""Stanford Cars (16,185 photos, 196 car models) with its official split, in torchvision's layout.

Under ``<data.root>/stanford_cars/`` (torchvision 0.29's ``StanfordCars``): ``devkit/cars_meta.mat``
(``class_names``), ``devkit/cars_train_annos.mat`` and ``cars_test_annos_withlabels.mat``
(``annotations`` with fields ``fname`` and ``class``, 1-based), images in ``cars_train/`` and
``cars_test/`` (8,144 / 8,041). Whole images (no bounding-box crop), stored as uint8 ``size`` × ``size``;
label = class − 1. Reading the ``.mat`` files needs scipy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from .common import Split, check_split, dataset_root, missing_dataset, require_files
from .decode import DEFAULT_STORAGE_SIZE, decode_images
from .images import LabeledImages

__all__ = ["CARS_FOLDER", "load_cars196"]

CARS_FOLDER = "stanford_cars"

_FILES = {
    "train": ("devkit/cars_train_annos.mat", "cars_train"),
    "test": ("cars_test_annos_withlabels.mat", "cars_test"),
}
_META = "devkit/cars_meta.mat"
_HOW = (
    "the original site is gone: get a copy in torchvision's StanfordCars layout (devkit/, cars_train/, "
    "cars_test/, cars_test_annos_withlabels.mat; e.g. from Kaggle) and put it in data.root"
)


def _loadmat(path: Path) -> dict[str, Any]:
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ValueError(f"reading {path.name} needs scipy: pip install 'fedlorm[paper]'") from None
    return loadmat(str(path), squeeze_me=True)


def load_cars196(
    split: Split,
    root: str | Path | None = None,
    download: bool = False,
    size: int = DEFAULT_STORAGE_SIZE,
    photo_resize: str = "crop",
) -> LabeledImages:
    """Stanford Cars' official ``split``, 196 classes in class-id order.

    No download (``download`` is accepted for a uniform loader signature; the original URL is dead).
    """
    check_split(split)
    folder = dataset_root(root) / CARS_FOLDER
    annos_rel, images_rel = _FILES[split]
    for rel in (_META, annos_rel, images_rel):
        if not (folder / rel).exists():
            raise missing_dataset("Stanford Cars", folder / rel, _HOW)
    names = [str(n) for n in np.atleast_1d(_loadmat(folder / _META)["class_names"])]
    annos = np.atleast_1d(_loadmat(folder / annos_rel)["annotations"])
    paths = [folder / images_rel / str(a["fname"]) for a in annos]
    labels = torch.tensor([int(a["class"]) - 1 for a in annos], dtype=torch.int64)
    require_files("Stanford Cars", paths, folder / images_rel, _HOW)
    return LabeledImages(decode_images(paths, size, photo_resize=photo_resize), labels, names, "cars196")
