"""ImageNet-R (200 ImageNet classes as art, cartoons, sketches, ...) with the mammoth split files.

The split is the one the paper's code uses: ``imagenet-r_train.yaml`` / ``imagenet-r_test.yaml`` from
github.com/aimagelab/mammoth (``datasets/imagenet_r_utils/``), each a YAML mapping with ``data`` (a list
of image paths such as ``data/imagenet-r/n01443537/art_0.jpg``) and ``targets`` (a list of class ids,
0..199, same length). Paths are resolved by what follows their ``imagenet-r/`` component, under
``<data.root>/imagenet-r/``; class names are the WordNet ids of the images' folders.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import Any

import torch
import yaml

from .common import Split, check_split, dataset_root, missing_dataset, require_files
from .decode import DEFAULT_STORAGE_SIZE, decode_images
from .images import LabeledImages

__all__ = ["IMAGENET_R_CLASSES", "IMAGENET_R_FOLDER", "load_imagenet_r", "read_split_file"]

IMAGENET_R_FOLDER = "imagenet-r"
IMAGENET_R_CLASSES = 200

_HOW = (
    "download https://people.eecs.berkeley.edu/~hendrycks/imagenet-r.tar and extract it into data.root "
    "(giving imagenet-r/<wnid>/*.jpg), and put imagenet-r_train.yaml and imagenet-r_test.yaml from "
    "github.com/aimagelab/mammoth (datasets/imagenet_r_utils/) into that imagenet-r folder"
)


def read_split_file(path: Path) -> tuple[list[PurePosixPath], list[int]]:
    """Image paths (relative to the ``imagenet-r`` folder) and class ids of a mammoth split file."""
    loader: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        entry = yaml.load(f, Loader=loader)
    if not isinstance(entry, dict) or not isinstance(entry.get("data"), list) or not isinstance(
        entry.get("targets"), list
    ):
        raise ValueError(f"{path}: expected a YAML mapping with lists 'data' and 'targets'")
    data, targets = entry["data"], entry["targets"]
    if len(data) != len(targets):
        raise ValueError(f"{path}: {len(data)} 'data' entries but {len(targets)} 'targets'")
    rel = []
    for item in data:
        parts = PurePosixPath(str(item)).parts
        cut = max((i for i, p in enumerate(parts) if p == IMAGENET_R_FOLDER), default=-1)
        rel.append(PurePosixPath(*parts[cut + 1 :]))
    return rel, [int(t) for t in targets]


def _class_names(rel: list[PurePosixPath], targets: list[int], path: Path) -> list[str]:
    """WordNet id of each class id, checked to be one folder per id and one id per folder."""
    wnid_of: dict[int, str] = {}
    for p, t in zip(rel, targets, strict=True):
        if not 0 <= t < IMAGENET_R_CLASSES:
            raise ValueError(f"{path}: class id {t} outside 0..{IMAGENET_R_CLASSES - 1}")
        if wnid_of.setdefault(t, p.parent.name) != p.parent.name:
            raise ValueError(f"{path}: class {t} has images in {wnid_of[t]} and {p.parent.name}")
    if len(set(wnid_of.values())) != len(wnid_of):
        raise ValueError(f"{path}: one folder is listed under two class ids")
    return [wnid_of.get(t, f"class_{t}") for t in range(IMAGENET_R_CLASSES)]


def load_imagenet_r(
    split: Split,
    root: str | Path | None = None,
    download: bool = False,
    size: int = DEFAULT_STORAGE_SIZE,
    photo_resize: str = "crop",
) -> LabeledImages:
    """ImageNet-R's mammoth split (24,000 train / 6,000 test), stored as uint8 ``size`` × ``size``.

    Looks for ``<root>/imagenet-r/`` with the images and both split files; there is no download
    (``download`` is accepted for a uniform loader signature: the split files' old link is dead).
    """
    check_split(split)
    folder = dataset_root(root) / IMAGENET_R_FOLDER
    split_file = folder / f"imagenet-r_{split}.yaml"
    if not split_file.is_file():
        raise missing_dataset("ImageNet-R", split_file, _HOW)
    rel, targets = read_split_file(split_file)
    names = _class_names(rel, targets, split_file)
    paths = [folder / p for p in rel]
    require_files("ImageNet-R", paths, folder, _HOW)
    images = decode_images(paths, size, photo_resize=photo_resize)
    return LabeledImages(images, torch.tensor(targets, dtype=torch.int64), names, "imagenet_r")
