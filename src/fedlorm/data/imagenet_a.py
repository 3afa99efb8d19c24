"""ImageNet-A (7,500 natural adversarial photos of 200 ImageNet classes), which has no official split.

Two layouts under ``<data.root>/imagenet-a/``:

- the reference's pre-split copy (fed-mammoth's download): ``train/<wnid>/*`` and ``test/<wnid>/*``,
  read as they are;
- the original release (``imagenet-a.tar``): ``<wnid>/*.jpg``, split by
  :func:`fedlorm.data.folders.holdout_split`: in each class a seeded random 20 % (rounded) is test, the
  rest train (seed 0, per class; fixed, so every run sees the same split). This is our rule, not the
  reference's file list, so numbers on it are comparable with the paper's only in distribution.

Classes are the WordNet-id folders in sorted order; images are stored as uint8 ``size`` × ``size``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .common import Split, check_split, dataset_root, missing_dataset
from .decode import DEFAULT_STORAGE_SIZE, decode_images
from .folders import holdout_split, list_class_folders
from .images import LabeledImages

__all__ = ["IMAGENET_A_FOLDER", "load_imagenet_a"]

IMAGENET_A_FOLDER = "imagenet-a"

_HOW = (
    "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-a.tar and extract it into data.root "
    "(giving imagenet-a/<wnid>/*.jpg; or put a pre-split copy as imagenet-a/train/<wnid>/ and "
    "imagenet-a/test/<wnid>/)"
)


def load_imagenet_a(
    split: Split,
    root: str | Path | None = None,
    download: bool = False,
    size: int = DEFAULT_STORAGE_SIZE,
    photo_resize: str = "crop",
) -> LabeledImages:
    """ImageNet-A's ``split`` (pre-split folders, else the seeded 80/20 per-class hold-out), 200 classes.

    No download (``download`` is accepted for a uniform loader signature).
    """
    check_split(split)
    folder = dataset_root(root) / IMAGENET_A_FOLDER
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        names, _, _ = list_class_folders(folder / "train")
        names, paths, labels = list_class_folders(folder / split, names)
        keep = np.arange(len(paths))
    elif folder.is_dir():
        names, paths, labels = list_class_folders(folder)
        keep = holdout_split(labels, split)
    else:
        raise missing_dataset("ImageNet-A", folder, _HOW)
    if not paths:
        raise missing_dataset("ImageNet-A", folder, f"it holds no images; {_HOW}")
    images = decode_images([paths[i] for i in keep], size, photo_resize=photo_resize)
    return LabeledImages(images, torch.from_numpy(labels[keep]), names, "imagenet_a")
