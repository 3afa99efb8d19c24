"""The paper's datasets: loaders read tiny copies in the real on-disk layouts (split sizes, class counts,
labels traced back to files through each image's colour), store uint8 at the requested size, and say
where a missing dataset should go. Also: uint8 model input gives the float path's logits bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from paper_fixtures import (
    EUROSAT_CLASSES,
    TEST_BLUE,
    TRAIN_BLUE,
    wnid,
    write_cars196,
    write_cifar100,
    write_cub200,
    write_eurosat,
    write_imagenet_a,
    write_imagenet_r,
)
from PIL import Image

from fedlorm.data import (
    DATASETS,
    DatasetNotFoundError,
    LabeledImages,
    decode_images,
    fit_square,
    holdout_split,
    load_cars196,
    load_cifar100,
    load_cub200,
    load_dataset,
    load_eurosat,
    load_imagenet_a,
    load_imagenet_r,
    takes_size,
    to_model_input,
)

PAPER = ("cifar100", "imagenet_r", "imagenet_a", "cub200", "cars196", "eurosat")


@pytest.fixture(autouse=True)
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORM_DATA", str(tmp_path / "cache"))


def _channel(data: LabeledImages, c: int) -> np.ndarray:
    """Each image's mean value of channel ``c`` (the fixtures' images are solid colours)."""
    return data.images[:, c].double().mean(dim=(1, 2)).round().long().numpy()


def _check_colours(data: LabeledImages, blue: int) -> None:
    """Red = label and blue = split marker, to JPEG's rounding."""
    assert np.abs(_channel(data, 0) - data.labels.numpy() % 256).max() <= 2
    assert np.abs(_channel(data, 2) - blue).max() <= 2


def test_registry_and_size_forwarding(tmp_path: Path) -> None:
    assert set(PAPER) <= set(DATASETS)
    assert {n for n in DATASETS if takes_size(n)} == {"imagenet_r", "imagenet_a", "cub200", "cars196"}
    write_cub200(tmp_path, train=1, test=1, classes=2)
    write_cifar100(tmp_path, train=1, test=1, classes=3)
    assert load_dataset("cub200", "train", root=tmp_path, size=8).images.shape == (2, 3, 8, 8)
    # CIFAR keeps its 32 px whatever the size: the backbone resizes per batch.
    assert load_dataset("cifar100", "test", root=tmp_path, size=8).images.shape == (3, 3, 32, 32)


def test_cifar100(tmp_path: Path) -> None:
    write_cifar100(tmp_path, train=5, test=2)
    train, test = load_cifar100("train", root=tmp_path), load_cifar100("test", root=str(tmp_path))
    assert train.images.shape == (500, 3, 32, 32) and test.images.shape == (200, 3, 32, 32)
    assert train.images.dtype == torch.uint8 and train.labels.dtype == torch.int64
    assert torch.bincount(train.labels).tolist() == [5] * 100
    assert torch.bincount(test.labels).tolist() == [2] * 100
    assert train.num_classes == 100 and train.class_names[:2] == ["fine_0", "fine_1"]
    assert train.name == "cifar100"
    # Pickles are lossless: every pixel is exact; rows are (R plane, G plane, B plane).
    assert torch.equal(train.images[:, 0], train.labels.view(-1, 1, 1).expand(-1, 32, 32).byte())
    assert set(train.images[:, 2].unique().tolist()) == {TRAIN_BLUE}
    assert set(test.images[:, 2].unique().tolist()) == {TEST_BLUE}
    assert train.images[7, 1, 0, 0].item() == 5 * 2  # 8th image = class 1, index 2 in its class


def test_cifar100_downloads_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.datasets as tvd

    calls: list[tuple[str, bool]] = []

    class FakeCIFAR100:
        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append((root, download))
            write_cifar100(Path(root), train=1, test=1, classes=4)

    monkeypatch.setattr(tvd, "CIFAR100", FakeCIFAR100)
    with pytest.raises(DatasetNotFoundError):
        load_cifar100("train", root=tmp_path)
    assert calls == []
    assert len(load_cifar100("train", root=tmp_path, download=True)) == 4
    assert calls == [(str(tmp_path), True)]
    load_cifar100("test", root=tmp_path, download=True)  # now on disk: no second download
    assert len(calls) == 1


def test_imagenet_r_split_files(tmp_path: Path) -> None:
    write_imagenet_r(tmp_path, train=3, test=2, classes=5)
    train = load_imagenet_r("train", root=tmp_path, size=16)
    test = load_imagenet_r("test", root=tmp_path, size=16)
    assert train.images.shape == (15, 3, 16, 16) and test.images.shape == (10, 3, 16, 16)
    assert train.images.dtype == torch.uint8
    assert train.num_classes == 200 and train.class_names[:5] == [wnid(c) for c in range(5)]
    assert torch.bincount(train.labels).tolist() == [3] * 5
    # Order and labels are the split file's (the fixture shuffles it), not the folder order.
    doc = yaml.safe_load((tmp_path / "imagenet-r" / "imagenet-r_train.yaml").read_text())
    assert train.labels.tolist() == doc["targets"] != sorted(doc["targets"])
    _check_colours(train, TRAIN_BLUE)
    _check_colours(test, TEST_BLUE)
    assert load_imagenet_r("test", root=tmp_path).images.shape == (10, 3, 224, 224)  # default size


def test_imagenet_r_errors(tmp_path: Path) -> None:
    write_imagenet_r(tmp_path, train=2, test=1, classes=3)
    folder = tmp_path / "imagenet-r"
    (folder / wnid(1) / "sketch_0.jpg").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"1 of the 6 listed images are missing") as e:
        load_imagenet_r("train", root=tmp_path, size=8)
    assert "\n" not in str(e.value)
    (folder / "imagenet-r_test.yaml").write_text(yaml.safe_dump(
        {"data": [f"data/imagenet-r/{wnid(0)}/cartoon_0.jpg", f"data/imagenet-r/{wnid(1)}/cartoon_0.jpg"],
         "targets": [0, 0]}))
    with pytest.raises(ValueError, match="class 0 has images in"):
        load_imagenet_r("test", root=tmp_path, size=8)


def test_imagenet_a_release_layout_holdout(tmp_path: Path) -> None:
    write_imagenet_a(tmp_path, per_class=10, classes=4)
    train = load_imagenet_a("train", root=tmp_path, size=12)
    test = load_imagenet_a("test", root=tmp_path, size=12)
    assert train.images.shape == (32, 3, 12, 12) and test.images.shape == (8, 3, 12, 12)
    assert train.class_names == [wnid(c) for c in range(4)] and train.num_classes == 4
    assert torch.bincount(train.labels).tolist() == [8] * 4
    assert torch.bincount(test.labels).tolist() == [2] * 4
    _check_colours(train, TRAIN_BLUE)
    # Each class's 10 images (green = 5 × index) are split, disjoint and complete.
    for c in range(4):
        tr = set((_channel(train, 1)[train.labels.numpy() == c] / 5).round().astype(int).tolist())
        te = set((_channel(test, 1)[test.labels.numpy() == c] / 5).round().astype(int).tolist())
        assert not tr & te and tr | te == set(range(10))
    assert torch.equal(load_imagenet_a("test", root=tmp_path, size=12).images, test.images)


def test_imagenet_a_presplit_layout(tmp_path: Path) -> None:
    write_imagenet_a(tmp_path, per_class=4, classes=3, presplit=True)
    train = load_imagenet_a("train", root=tmp_path, size=8)
    test = load_imagenet_a("test", root=tmp_path, size=8)
    assert len(train) == 12 and len(test) == 6
    assert torch.bincount(test.labels).tolist() == [2, 2, 2]
    _check_colours(train, TRAIN_BLUE)
    _check_colours(test, TEST_BLUE)


def test_holdout_split_rule() -> None:
    labels = np.repeat(np.arange(3), [10, 7, 1])
    test = holdout_split(labels, "test")
    train = holdout_split(labels, "train")
    assert np.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]  # round(0.2 n)
    assert sorted(np.concatenate([test, train]).tolist()) == list(range(18))
    assert np.array_equal(holdout_split(labels, "test"), test)
    # Per-class seeding: adding a class leaves the others' split as it was.
    more = np.concatenate([labels, np.full(5, 3)])
    assert np.array_equal(holdout_split(more, "test")[:3], test)


def test_cub200(tmp_path: Path) -> None:
    write_cub200(tmp_path, train=2, test=1)
    train = load_cub200("train", root=tmp_path, size=10)
    test = load_cub200("test", root=tmp_path, size=10)
    assert train.images.shape == (400, 3, 10, 10) and test.images.shape == (200, 3, 10, 10)
    assert train.num_classes == 200 and train.class_names[0] == "001.Species_1"
    assert torch.bincount(train.labels).tolist() == [2] * 200
    _check_colours(train, TRAIN_BLUE)
    _check_colours(test, TEST_BLUE)
    (tmp_path / "CUB_200_2011" / "train_test_split.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"train_test_split\.txt"):
        load_cub200("train", root=tmp_path)


def test_cars196(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    write_cars196(tmp_path, train=2, test=1)
    train = load_cars196("train", root=tmp_path, size=9)
    test = load_cars196("test", root=tmp_path, size=9)
    assert train.images.shape == (392, 3, 9, 9) and test.images.shape == (196, 3, 9, 9)
    assert train.num_classes == 196 and train.class_names[1] == "Make1 Model 2001"
    assert torch.bincount(test.labels).tolist() == [1] * 196
    assert train.labels[:3].tolist() == [0, 1, 2]  # annotation order (class-interleaved)
    _check_colours(train, TRAIN_BLUE)
    _check_colours(test, TEST_BLUE)


def test_eurosat_holdout(tmp_path: Path) -> None:
    write_eurosat(tmp_path, per_class=10)
    train, test = load_eurosat("train", root=tmp_path), load_eurosat("test", root=tmp_path)
    assert train.images.shape == (80, 3, 64, 64) and test.images.shape == (20, 3, 64, 64)
    assert train.class_names == EUROSAT_CLASSES and train.name == "eurosat"
    assert torch.bincount(test.labels).tolist() == [2] * 10
    _check_colours(train, TRAIN_BLUE)


def test_eurosat_split_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_eurosat(tmp_path, per_class=8, layout="zenodo", split_json=True, side=20)
    train, test = load_eurosat("train", root=tmp_path), load_eurosat("test", root=tmp_path)
    assert train.images.shape == (40, 3, 20, 20) and test.images.shape == (20, 3, 20, 20)
    assert torch.bincount(train.labels).tolist() == [4] * 10
    _check_colours(train, TRAIN_BLUE)
    _check_colours(test, TEST_BLUE)

    import torchvision.datasets as tvd

    fetched: list[str] = []

    def fake_eurosat(root: str, download: bool) -> None:
        fetched.append(root)
        write_eurosat(Path(root), per_class=5, side=8)

    monkeypatch.setattr(tvd, "EuroSAT", fake_eurosat)
    other = tmp_path / "other"
    assert len(load_eurosat("test", root=other, download=True)) == 10 and fetched == [str(other)]


@pytest.mark.parametrize(
    ("name", "expected", "how"),
    [
        ("cifar100", "cifar-100-python", "data.download=true"),
        ("imagenet_r", "imagenet-r/imagenet-r_train.yaml", "aimagelab/mammoth"),
        ("imagenet_a", "imagenet-a", "imagenet-a.tar"),
        ("cub200", "CUB_200_2011/images.txt", "CUB_200_2011.tgz"),
        ("cars196", "stanford_cars/devkit/cars_meta.mat", "torchvision's StanfordCars layout"),
        ("eurosat", "eurosat/2750", "zenodo.org"),
    ],
)
def test_missing_dataset_says_where(tmp_path: Path, name: str, expected: str, how: str) -> None:
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset(name, "train", root=tmp_path)
    message = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in message
    assert f"expected {tmp_path / expected}" in message and how in message


def test_fit_square_keeps_the_centre() -> None:
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, :10, 0] = wide[:, 10:20, 1] = wide[:, 20:, 2] = 255  # red | green | blue thirds
    out = np.asarray(fit_square(Image.fromarray(wide), 10))
    assert out.shape == (10, 10, 3) and (out[..., 1] == 255).all() and (out[..., [0, 2]] == 0).all()
    tall = np.asarray(fit_square(Image.fromarray(wide.transpose(1, 0, 2).copy()), 10))
    assert tall.shape == (10, 10, 3) and (tall[..., 1] == 255).all() and (tall[..., [0, 2]] == 0).all()
    small = np.asarray(fit_square(Image.fromarray(wide), 5)).astype(float)  # 30×10 → 15×5, crop
    assert small.shape == (5, 5, 3) and small[..., 1].mean() > 245 and small[..., [0, 2]].mean() < 10


def test_decode_images_errors(tmp_path: Path) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 9)).save(tmp_path / "b.png")
    (tmp_path / "c.jpg").write_text("not an image")
    gray = decode_images([tmp_path / "b.png"], None)
    assert gray.shape == (1, 3, 9, 8) and gray.dtype == torch.uint8  # gray → RGB
    with pytest.raises(ValueError, match="must all share one size"):
        decode_images([tmp_path / "a.png", tmp_path / "b.png"], None)
    with pytest.raises(ValueError, match=re.escape(f"cannot decode image {tmp_path / 'c.jpg'}")):
        decode_images([tmp_path / "a.png", tmp_path / "c.jpg"], 4)


def test_uint8_model_input_equals_float_path() -> None:
    """The default benchmark's path (EfficientNet-Lite0, 28 px gray images at 48 px): logits from uint8
    batches are bit-identical to those from the old float-up-front tensor."""
    from conftest import tiny_config

    from fedlorm.backbones import create_backbone
    from fedlorm.fcl import make_scenario
    from fedlorm.runtime.experiment import _to_client_data

    gen = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (20, 1, 28, 28), dtype=torch.uint8, generator=gen)
    digits = LabeledImages(pixels, torch.arange(20) % 10, [str(i) for i in range(10)])
    model = create_backbone("efficientnet_lite0", 10, img_size=48).eval()
    torch.nn.init.normal_(model.head.weight, std=0.1)
    everything = to_model_input(digits.images, 48)
    with torch.no_grad():
        old = torch.cat([model(everything[i : i + 8]) for i in range(0, 20, 8)])
        new = torch.cat([model(digits.images[i : i + 8]) for i in range(0, 20, 8)])
    assert torch.equal(old, new) and old.abs().max() > 0.1
    data = _to_client_data(digits, make_scenario(10, 2), tiny_config().data.image_size)
    assert data.images.dtype == torch.uint8 and data.images.data_ptr() == digits.images.data_ptr()
