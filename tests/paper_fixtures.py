"""Tiny copies of the paper's datasets in their real on-disk layouts, written for tests.

Every image is one solid colour that encodes where it came from: red = class id, green = 5 × its index
within the class (mod 256), blue = 200 in the test split and 40 in the train split (where a dataset
ships one pool of images and the loader splits it, blue is 40). Loaded images can so be traced back to
their files and labels checked against them.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

TRAIN_BLUE, TEST_BLUE = 40, 200

EUROSAT_CLASSES = [
    "AnnualCrop", "Forest", "HerbaceousVegetation", "Highway", "Industrial",
    "Pasture", "PermanentCrop", "Residential", "River", "SeaLake",
]


def colour(label: int, index: int, test: bool) -> tuple[int, int, int]:
    """The solid colour of image ``index`` of class ``label``."""
    return label % 256, (5 * index) % 256, TEST_BLUE if test else TRAIN_BLUE


def _image(path: Path, rgb: tuple[int, int, int], size: tuple[int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, quality=95)  # format from the suffix (.jpg → JPEG)


def wnid(label: int) -> str:
    """A made-up WordNet id; sorted order = label order."""
    return f"n{1440000 + 37 * label:08d}"


def write_cifar100(root: Path, train: int, test: int, classes: int = 100) -> None:
    """``cifar-100-python/{train,test,meta}`` pickles with the real keys, ``train``/``test`` per class."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for split, per_class in (("train", train), ("test", test)):
        labels = np.repeat(np.arange(classes), per_class)
        index = np.tile(np.arange(per_class), classes)
        data = np.zeros((labels.size, 3, 1024), dtype=np.uint8)
        for c in range(3):
            data[:, c] = np.array([colour(int(y), int(i), split == "test")[c] for y, i in zip(
                labels, index, strict=True)], dtype=np.uint8)[:, None]
        entry = {
            "filenames": [f"img_{k}.png" for k in range(labels.size)],
            "batch_label": f"{split}ing batch 1 of 1",
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data.reshape(labels.size, 3072),
        }
        (folder / split).write_bytes(pickle.dumps(entry))
    meta = {"fine_label_names": [f"fine_{c}" for c in range(classes)],
            "coarse_label_names": [f"coarse_{c}" for c in range((classes + 4) // 5)]}
    (folder / "meta").write_bytes(pickle.dumps(meta))


def write_imagenet_r(root: Path, train: int, test: int, classes: int = 200,
                     size: tuple[int, int] = (14, 10)) -> None:
    """``imagenet-r/<wnid>/<style>_<k>.jpg`` plus mammoth's two YAML split files (shuffled order)."""
    folder = root / "imagenet-r"
    rng = np.random.default_rng(0)
    for split, per_class in (("train", train), ("test", test)):
        entries = []
        for c in range(classes):
            for i in range(per_class):
                name = f"{'sketch' if split == 'train' else 'cartoon'}_{i}.jpg"
                _image(folder / wnid(c) / name, colour(c, i, split == "test"), size)
                entries.append((f"data/imagenet-r/{wnid(c)}/{name}", c))
        order = rng.permutation(len(entries))
        doc = {"data": [entries[k][0] for k in order], "targets": [entries[k][1] for k in order]}
        (folder / f"imagenet-r_{split}.yaml").write_text(yaml.safe_dump(doc))


def write_imagenet_a(root: Path, per_class: int, classes: int = 200, presplit: bool = False,
                     size: tuple[int, int] = (10, 14)) -> None:
    """``imagenet-a/<wnid>/*.jpg`` (the release), or ``imagenet-a/{train,test}/<wnid>/*.jpg``
    (pre-split: ``per_class`` train images and half as many test images per class)."""
    folder = root / "imagenet-a"
    for c in range(classes):
        if presplit:
            for i in range(per_class):
                _image(folder / "train" / wnid(c) / f"{i:04d}.jpg", colour(c, i, False), size)
            for i in range(max(1, per_class // 2)):
                _image(folder / "test" / wnid(c) / f"{i:04d}.jpg", colour(c, i, True), size)
        else:
            for i in range(per_class):
                _image(folder / wnid(c) / f"{i:04d}.jpg", colour(c, i, False), size)


def write_cub200(root: Path, train: int, test: int, classes: int = 200,
                 size: tuple[int, int] = (16, 12)) -> None:
    """``CUB_200_2011/`` with ``images/``, ``images.txt``, ``image_class_labels.txt``,
    ``train_test_split.txt`` and ``classes.txt``; train and test images mix in id order."""
    folder = root / "CUB_200_2011"
    images, labels, split_flags, class_lines = [], [], [], []
    rng = np.random.default_rng(1)
    image_id = 0
    for c in range(classes):
        species = f"{c + 1:03d}.Species_{c + 1}"
        class_lines.append(f"{c + 1} {species}")
        seen = {False: 0, True: 0}
        for is_test in rng.permutation([False] * train + [True] * test).tolist():
            index = seen[is_test]
            seen[is_test] += 1
            image_id += 1
            rel = f"{species}/Species_{c + 1}_{image_id:05d}.jpg"
            _image(folder / "images" / rel, colour(c, index, is_test), size)
            images.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split_flags.append(f"{image_id} {0 if is_test else 1}")
    for name, lines in (("images.txt", images), ("image_class_labels.txt", labels),
                        ("train_test_split.txt", split_flags), ("classes.txt", class_lines)):
        (folder / name).write_text("\n".join(lines) + "\n")


def _savemat(path: Path, key: str, value: np.ndarray) -> None:
    from scipy.io import savemat

    path.parent.mkdir(parents=True, exist_ok=True)
    savemat(str(path), {key: value})


def write_cars196(root: Path, train: int, test: int, classes: int = 196,
                  size: tuple[int, int] = (18, 11)) -> None:
    """torchvision's ``stanford_cars/`` layout: ``devkit/cars_meta.mat``, ``devkit/cars_train_annos.mat``,
    ``cars_test_annos_withlabels.mat`` (1×N structs, 1-based ``class``) and the two image folders."""
    folder = root / "stanford_cars"
    names = np.empty((1, classes), dtype=object)
    names[0, :] = [f"Make{c} Model {2000 + c % 13}" for c in range(classes)]
    _savemat(folder / "devkit" / "cars_meta.mat", "class_names", names)
    fields = [(f, "O") for f in ("bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "fname")]
    for split, per_class, annos_rel, images_rel in (
        ("train", train, "devkit/cars_train_annos.mat", "cars_train"),
        ("test", test, "cars_test_annos_withlabels.mat", "cars_test"),
    ):
        rows = []
        for i in range(per_class):  # class-interleaved, as in the real files
            for c in range(classes):
                fname = f"{len(rows) + 1:05d}.jpg"
                _image(folder / images_rel / fname, colour(c, i, split == "test"), size)
                rows.append((1, 1, size[0] - 1, size[1] - 1, c + 1, fname))
        annos = np.zeros((1, len(rows)), dtype=fields)
        for k, row in enumerate(rows):
            annos[0, k] = row
        _savemat(folder / annos_rel, "annotations", annos)


def write_eurosat(root: Path, per_class: int, layout: str = "torchvision", split_json: bool = False,
                  side: int = 64) -> Path:
    """EuroSAT RGB's class folders (``eurosat/2750/`` or ``EuroSAT_RGB/``) of ``side``² JPEGs; with
    ``split_json`` a CoOp-style ``split.json`` (first half of each class train, next quarter val, last
    quarter test; train blue, the others test blue). Returns the image folder."""
    folder = root / ("eurosat/2750" if layout == "torchvision" else "EuroSAT_RGB")
    split: dict[str, list[list[object]]] = {"train": [], "val": [], "test": []}
    for c, name in enumerate(EUROSAT_CLASSES):
        for i in range(per_class):
            part = "train" if i < per_class // 2 else "val" if i < 3 * per_class // 4 else "test"
            rel = f"{name}/{name}_{i + 1}.jpg"
            test_blue = split_json and part != "train"
            _image(folder / rel, colour(c, i, test_blue), (side, side))
            split[part].append([rel, c, name])
    if split_json:
        (folder / "split.json").write_text(json.dumps(split))
    return folder


PRESET_FIXTURES: dict[str, Callable[[Path], None]] = {
    "cifar100": lambda root: write_cifar100(root, train=16, test=2),
    "imagenet_r": lambda root: write_imagenet_r(root, train=8, test=2),
    "imagenet_a": lambda root: write_imagenet_a(root, per_class=8),
    "cub200": lambda root: write_cub200(root, train=6, test=2),
    "cars196": lambda root: write_cars196(root, train=6, test=2),
    "eurosat": lambda root: write_eurosat(root, per_class=250, side=16),
}
"""Per dataset, a copy with every real class and just enough images for the paper presets'
partitions (10 clients, >= 6 samples each, smallest beta) to be drawn."""
