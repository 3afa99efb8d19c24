"""EuroSAT RGB (27,000 Sentinel-2 patches, 64×64, 10 land-use classes).

Folders, under ``data.root``: torchvision's ``eurosat/2750/<Class>/*.jpg`` (what ``download=True``
fetches) or the Zenodo zip's ``EuroSAT_RGB/<Class>/*.jpg`` (the reference's). Classes are the folder
names in sorted order (AnnualCrop, Forest, ..., SeaLake). Split, by precedence:

- a ``split.json`` beside the class folders in CoOp's format (``{"train": [[path, label, name], ...],
  "val": [...], "test": [...]}``, paths relative to that folder), as the reference uses: its
  ``train`` and ``test`` lists (``val`` is unused);
- otherwise :func:`fedlorm.data.folders.holdout_split`: a seeded random 20 % of each class is test
  (21,600 train / 5,400 test).

Images stay at their 64×64: the backbone resizes each batch to its input size.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path, PurePosixPath

import numpy as np
import torch
import torchvision.datasets as tvd

from .common import Split, check_split, dataset_root, missing_dataset, require_files
from .decode import decode_images
from .folders import holdout_split, list_class_folders
from .images import LabeledImages

__all__ = ["EUROSAT_FOLDERS", "load_eurosat"]

log = logging.getLogger(__name__)

EUROSAT_FOLDERS = ("eurosat/2750", "EuroSAT_RGB")
"""Image folders looked for under ``data.root``, in this order."""

_HOW = (
    "set data.download=true when online (torchvision's copy), or extract EuroSAT_RGB.zip from "
    "https://zenodo.org/records/7711810 into data.root"
)


def _from_split_file(path: Path, split: Split, classes: list[str]) -> tuple[list[Path], np.ndarray]:
    entries = json.loads(path.read_text()).get(split)
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected a list under {split!r}")
    index = {name: i for i, name in enumerate(classes)}
    paths, labels = [], []
    for entry in entries:
        rel = PurePosixPath(str(entry[0] if isinstance(entry, list | tuple) else entry))
        if rel.parts[0] not in index:
            raise ValueError(f"{path}: {rel} is not in one of the class folders {classes}")
        paths.append(path.parent / rel)
        labels.append(index[rel.parts[0]])
    return paths, np.asarray(labels, dtype=np.int64)


def load_eurosat(split: Split, root: str | Path | None = None, download: bool = False) -> LabeledImages:
    """EuroSAT RGB's ``split`` (``split.json`` if present, else the seeded 80/20 hold-out), 10 classes."""
    check_split(split)
    base = dataset_root(root)
    folder = next((base / f for f in EUROSAT_FOLDERS if (base / f).is_dir()), None)
    if folder is None and download:
        log.info("downloading EuroSAT to %s", base / "eurosat")
        tvd.EuroSAT(str(base), download=True)
        folder = base / EUROSAT_FOLDERS[0]
    if folder is None:
        raise missing_dataset("EuroSAT", base / EUROSAT_FOLDERS[0], _HOW)
    classes, paths, labels = list_class_folders(folder)
    if not paths:
        raise missing_dataset("EuroSAT", folder, f"it holds no images; {_HOW}")
    split_file = folder / "split.json"
    if split_file.is_file():
        chosen, labels = _from_split_file(split_file, split, classes)
        require_files("EuroSAT", chosen, folder, f"fix or remove {split_file}")
    else:
        keep = holdout_split(labels, split)
        chosen, labels = [paths[i] for i in keep], labels[keep]
    return LabeledImages(decode_images(chosen, None), torch.from_numpy(labels), classes, "eurosat")
