"""What every loader shares: split names, the data folder, the one-line missing-dataset error."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from .errors import DatasetNotFoundError

__all__ = [
    "SPLITS",
    "Split",
    "check_data_root",
    "check_split",
    "data_cache_dir",
    "dataset_root",
    "missing_dataset",
    "require_files",
]

Split = Literal["train", "test"]
SPLITS: tuple[Split, ...] = ("train", "test")


def check_split(split: str) -> None:
    """Reject anything but ``"train"`` / ``"test"`` before touching the disk."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")


def check_data_root(root: str | Path | None, download: bool = False) -> None:
    """Raise a one-line ValueError naming ``root`` (``data.root``) if it cannot be read as a folder.

    A folder that does not exist is left to the loaders, whose messages say where to get each
    dataset, unless a file stands where one of its parents should be, or a download could not
    create it.
    """
    if root is None:
        return
    path = Path(root).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(f"data.root {str(root)!r} is not a directory")
        if not os.access(path, os.R_OK | os.X_OK):
            raise ValueError(f"data.root {str(root)!r} is not readable")
        return
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"data.root {str(root)!r} cannot be read: {str(parent)!r} is not a directory")
    if download and parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"data.root {str(root)!r} cannot be created: {str(parent)!r} is not writable")


def data_cache_dir() -> Path:
    """Folder for downloads and decompressed copies: ``$FEDLORM_DATA`` or ``~/.cache/fedlorm``."""
    env = os.environ.get("FEDLORM_DATA")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fedlorm"


def dataset_root(root: str | Path | None) -> Path:
    """The folder that holds the datasets' own folders: ``root`` (``data.root``) or the cache folder."""
    return Path(root).expanduser() if root is not None else data_cache_dir()


def missing_dataset(name: str, expected: Path, how: str) -> DatasetNotFoundError:
    """The one-line error for a dataset that is not where it should be (``how``: where to get it)."""
    return DatasetNotFoundError(f"{name} not found: expected {expected}; {how}")


def require_files(name: str, paths: Sequence[Path], folder: Path, how: str) -> None:
    """Raise :func:`missing_dataset` if any listed image file is absent (how many, and the first)."""
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise missing_dataset(
            name, folder, f"{len(absent)} of the {len(paths)} listed images are missing "
            f"(first: {absent[0]}); {how}"
        )
