"""CUB-200-2011 (11,788 bird photos, 200 species) with its official train/test split.

The release's text files, all under ``<data.root>/CUB_200_2011/``: ``images.txt`` (``<image id>
<path under images/>``), ``image_class_labels.txt`` (``<image id> <class id, 1-based>``),
``train_test_split.txt`` (``<image id> <1 = train, 0 = test>``: 5,994 / 5,794) and ``classes.txt``
(``<class id> <name>``, e.g. ``1 001.Black_footed_Albatross``). Whole images are used (no bounding-box
crop); they are stored as uint8 ``size`` × ``size``; label = class id − 1.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .common import Split, check_split, dataset_root, missing_dataset, require_files
from .decode import DEFAULT_STORAGE_SIZE, decode_images
from .images import LabeledImages

__all__ = ["CUB_FILES", "CUB_FOLDER", "load_cub200"]

CUB_FOLDER = "CUB_200_2011"
CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "classes.txt")

_HOW = (
    "download CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/cub_200_2011/ and extract "
    "it into data.root"
)


def _read_pairs(path: Path) -> dict[int, str]:
    """``<int id> <rest of line>`` per non-empty line."""
    out: dict[int, str] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        key, sep, value = line.strip().partition(" ")
        if not sep or not key.isdigit():
            raise ValueError(f"{path}:{n}: expected '<id> <value>', got {line!r}")
        out[int(key)] = value.strip()
    return out


def load_cub200(
    split: Split,
    root: str | Path | None = None,
    download: bool = False,
    size: int = DEFAULT_STORAGE_SIZE,
    photo_resize: str = "crop",
) -> LabeledImages:
    """CUB-200-2011's official ``split``, 200 classes in class-id order.

    No download (``download`` is accepted for a uniform loader signature).
    """
    check_split(split)
    folder = dataset_root(root) / CUB_FOLDER
    missing = [f for f in CUB_FILES if not (folder / f).is_file()]
    if missing:
        raise missing_dataset("CUB-200-2011", folder / missing[0], _HOW)
    images_txt, labels_txt, split_txt, classes_txt = (_read_pairs(folder / f) for f in CUB_FILES)
    class_ids = sorted(int(k) for k in classes_txt)
    if class_ids != list(range(1, len(class_ids) + 1)):
        raise ValueError(f"{folder / 'classes.txt'}: class ids must be 1..N")
    want = "1" if split == "train" else "0"
    ids = sorted(i for i, flag in split_txt.items() if flag == want)
    lost = [i for i in ids if i not in images_txt or i not in labels_txt]
    if lost:
        raise ValueError(f"{folder}: image id {lost[0]} is in train_test_split.txt only")
    paths = [folder / "images" / images_txt[i] for i in ids]
    require_files("CUB-200-2011", paths, folder / "images", _HOW)
    labels = torch.tensor([int(labels_txt[i]) - 1 for i in ids], dtype=torch.int64)
    names = [classes_txt[c] for c in class_ids]
    return LabeledImages(decode_images(paths, size, photo_resize=photo_resize), labels, names, "cub200")
