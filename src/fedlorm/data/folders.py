"""Class-per-folder image collections and the seeded per-class hold-out split used where a dataset has
no official train/test split."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import Split
from .decode import IMAGE_SUFFIXES

__all__ = ["HOLDOUT_SEED", "HOLDOUT_TEST_FRACTION", "holdout_split", "list_class_folders"]

HOLDOUT_TEST_FRACTION = 0.2
"""Share of each class that :func:`holdout_split` puts in the test split (80/20)."""

HOLDOUT_SEED = 0
"""Fixed seed of :func:`holdout_split`: the split is part of the dataset, not of a run's seed."""


def list_class_folders(
    folder: Path, classes: list[str] | None = None
) -> tuple[list[str], list[Path], np.ndarray]:
    """Class names (sub-folder names, sorted), image files (sorted within each class) and int64 labels.

    ``classes`` fixes the class list (another split's), so label ids agree across splits; a folder not
    in it is an error, a class without a folder has no images. Hidden entries and files whose suffix
    is not an image's are skipped.
    """
    found = sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes is None:
        classes = found
    elif extra := sorted(set(found) - set(classes)):
        raise ValueError(f"{folder} has class folders {extra[:5]} that the other split lacks")
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        sub = folder / name
        files = sorted(
            f for f in (sub.iterdir() if sub.is_dir() else ())
            if f.is_file() and not f.name.startswith(".") and f.suffix.lower() in IMAGE_SUFFIXES
        )
        paths.extend(files)
        labels.extend([label] * len(files))
    return list(classes), paths, np.asarray(labels, dtype=np.int64)


def holdout_split(
    labels: np.ndarray,
    split: Split,
    test_fraction: float = HOLDOUT_TEST_FRACTION,
    seed: int = HOLDOUT_SEED,
) -> np.ndarray:
    """Sorted indices of ``split``: in each class c, ``round(test_fraction · n_c)`` samples drawn with
    ``numpy.random.default_rng([seed, c])`` are test, the rest train.

    Seeding per class keeps a class's split unchanged when other classes gain or lose files.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must lie in (0, 1), got {test_fraction}")
    is_test = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(np.floor(test_fraction * idx.size + 0.5))
        chosen = np.random.default_rng([seed, int(c)]).permutation(idx.size)[:n_test]
        is_test[idx[chosen]] = True
    return np.flatnonzero(is_test if split == "test" else ~is_test)
