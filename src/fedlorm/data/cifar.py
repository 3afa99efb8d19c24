"""CIFAR-100 (50,000 train / 10,000 test, 32×32 RGB, 100 classes) from torchvision's on-disk layout."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torchvision.datasets as tvd

from .common import Split, check_split, dataset_root, missing_dataset
from .images import LabeledImages

__all__ = ["CIFAR100_FOLDER", "load_cifar100"]

log = logging.getLogger(__name__)

CIFAR100_FOLDER = "cifar-100-python"
"""Folder (under ``data.root``) of the python version's pickles ``train``, ``test`` and ``meta``."""

_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"


def _read_pickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        return pickle.load(f, encoding="latin1")


def load_cifar100(split: Split, root: str | Path | None = None, download: bool = False) -> LabeledImages:
    """CIFAR-100 with its official split; labels are the 100 fine labels (natural order = the ids).

    Reads ``<root>/cifar-100-python/{train,test,meta}`` (``root`` = ``data.root``, default the cache
    folder); ``download=True`` lets torchvision fetch and checksum the archive there when it is missing.
    Images stay at 32×32: the backbone resizes each batch to its input size.
    """
    check_split(split)
    base = dataset_root(root)
    folder = base / CIFAR100_FOLDER
    files = (folder / split, folder / "meta")
    if not all(f.is_file() for f in files):
        if not download:
            raise missing_dataset(
                "CIFAR-100", folder,
                f"set data.download=true when online, or extract {_URL} into {base} (data.root=PATH)",
            )
        log.info("downloading CIFAR-100 to %s", base)
        tvd.CIFAR100(str(base), train=split == "train", download=True)
    entry = _read_pickle(files[0])
    names = list(_read_pickle(files[1])["fine_label_names"])
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.shape[0] != labels.shape[0]:
        raise ValueError(
            f"{files[0]}: expected 'data' of shape (N, 3072) and N 'fine_labels', "
            f"got {data.shape} and {labels.shape[0]}"
        )
    images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
    return LabeledImages(images, torch.from_numpy(labels), names, "cifar100")
