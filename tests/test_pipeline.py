"""The input pipeline: test-time crops, seeded augmentation, normalisation, head initialisation and
training precision, each checked against what torchvision or a hand computation gives."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torchvision.transforms import v2

from fedlorm.backbones import NORMALIZATIONS, create_backbone
from fedlorm.config import ConfigError
from fedlorm.data import Preprocessing, to_model_input
from fedlorm.methods.base import ClientData
from fedlorm.methods.common import collect_statistics, train_locally
from fedlorm.precision import autocast, check_precision, grad_scaler
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation


def images(n: int = 6, size: int = 20, channels: int = 3, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, size, size), dtype=torch.uint8, generator=g)


def test_default_test_transform_is_the_historical_resize_bit_for_bit() -> None:
    x = images(channels=1, size=28)
    assert torch.equal(Preprocessing(48).test_input(x), to_model_input(x, 48))


def test_center_crop_takes_the_middle_of_an_image_stored_at_the_resize_size() -> None:
    pre = Preprocessing(16, test_crop="center-crop", crop_pct=0.8)
    assert (pre.storage_size, pre.resize_size) == (20, 20)
    x = images(size=20)
    expected = x[:, :, 2:18, 2:18].float() / 255  # no resize at the stored size, then the centre
    torch.testing.assert_close(pre.test_input(x), expected, rtol=0, atol=0)


def test_center_crop_of_a_small_image_upsamples_then_crops_like_torchvision() -> None:
    pre = Preprocessing(28, test_crop="center-crop", crop_pct=0.875, interpolation="bicubic")
    x = images(size=8)
    resized = v2.functional.resize(x.float() / 255, [32], v2.InterpolationMode.BICUBIC, antialias=True)
    expected = v2.functional.center_crop(resized, [28, 28]).clamp(0, 1)
    torch.testing.assert_close(pre.test_input(x), expected)


def test_augmentation_is_seeded_and_leaves_other_random_streams_alone() -> None:
    pre = Preprocessing(16, augmentation="random-resized-crop", augment_scale=0.3)
    x = images(n=8)
    state = torch.get_rng_state()
    a = pre.augment(x, torch.Generator().manual_seed(1))
    b = pre.augment(x, torch.Generator().manual_seed(1))
    c = pre.augment(x, torch.Generator().manual_seed(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 3, 16, 16) and float(a.min()) >= 0 and float(a.max()) <= 1
    # Images of one batch get their own crops: two copies of one image come out different.
    twins = pre.augment(x[:1].expand(4, -1, -1, -1).contiguous(), torch.Generator().manual_seed(3))
    assert not torch.equal(twins[0], twins[1])


def test_without_augmentation_the_generator_is_not_drawn_from() -> None:
    generator = torch.Generator().manual_seed(5)
    before = generator.get_state()
    x = images()
    assert torch.equal(Preprocessing(16).augment(x, generator), Preprocessing(16).test_input(x))
    assert torch.equal(generator.get_state(), before)


def test_flip_policy_gives_each_image_or_its_mirror() -> None:
    pre = Preprocessing(20, augmentation="flip")
    x = images(n=64)
    out = pre.augment(x, torch.Generator().manual_seed(0))
    plain = x.float() / 255
    mirrored = [torch.equal(o, p.flip(-1)) for o, p in zip(out, plain, strict=True)]
    unchanged = [torch.equal(o, p) for o, p in zip(out, plain, strict=True)]
    assert all(m or u for m, u in zip(mirrored, unchanged, strict=True))
    assert 10 < sum(mirrored) < 54


def test_resize_random_crop_is_a_window_of_the_resized_image() -> None:
    pre = Preprocessing(16, crop_pct=0.8, augmentation="resize-random-crop", flip=False)
    x = images(n=5, size=40)
    resized = v2.functional.resize(x.float() / 255, [20], antialias=True).clamp(0, 1)
    out = pre.augment(x, torch.Generator().manual_seed(0))
    offsets = set()
    for o, r in zip(out, resized, strict=True):
        hits = [
            (i, j) for i in range(5) for j in range(5) if torch.allclose(o, r[:, i : i + 16, j : j + 16])
        ]
        assert len(hits) == 1
        offsets.add(hits[0])
    assert len(offsets) > 1


@pytest.mark.parametrize("name", ["half", "imagenet", "none"])
def test_normalization_choices(name: str) -> None:
    model = create_backbone("test_vit", 3, pretrained=False, img_size=32, normalization=name)
    mean, std = NORMALIZATIONS[name]
    assert model.mean.flatten().tolist() == pytest.approx(mean)
    assert model.std.flatten().tolist() == pytest.approx(std)


def test_model_normalization_is_timms_data_config() -> None:
    import timm

    model = create_backbone("test_vit", 3, pretrained=False, img_size=32)
    data_cfg = timm.data.resolve_model_data_config(model.encoder)
    assert model.mean.flatten().tolist() == pytest.approx(list(data_cfg["mean"]))
    assert model.std.flatten().tolist() == pytest.approx(list(data_cfg["std"]))


def test_head_initialisations() -> None:
    torch.manual_seed(0)
    zeros = create_backbone("test_vit", 200, pretrained=False, img_size=32)
    normal = create_backbone("test_vit", 200, pretrained=False, img_size=32, head_init="trunc-normal")
    assert not zeros.head.weight.any() and not zeros.head.bias.any()
    w = normal.head.weight.detach()
    # timm's trunc_normal_(std=0.02) truncates at ±2 (absolute), i.e. effectively a plain normal.
    assert float(w.std()) == pytest.approx(0.02, rel=0.05) and float(w.mean()) == pytest.approx(0, abs=1e-3)
    assert not normal.head.bias.any()


def test_lorm_server_starts_from_the_models_head() -> None:
    exp = build_experiment(tiny_config("model.head_init=trunc-normal", "train.device=cpu"))
    assert exp.model.head.weight.abs().sum() > 0
    torch.testing.assert_close(exp.server.deployed_arrays()["head.weight"], exp.model.head.weight)


def test_sixteen_bit_precision_on_cpu_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match=r"16-mixed.*needs a CUDA device.*bf16-mixed or 32"):
        check_precision("16-mixed", torch.device("cpu"))
    with pytest.raises(ConfigError, match="16-mixed"):
        build_experiment(tiny_config("train.precision=16-mixed", "train.device=cpu"))
    check_precision("bf16-mixed", torch.device("cpu"))
    assert grad_scaler(torch.device("cpu"), "32") is None
    assert grad_scaler(torch.device("cpu"), "bf16-mixed") is None


def test_statistics_stay_float64_under_autocast() -> None:
    exp = build_experiment(tiny_config("train.device=cpu"))
    first = "encoder.conv_head"  # its input is an activation: bfloat16 under autocast
    modules = {first: exp.layers[first]}
    data = ClientData(exp.train.images[:6], exp.train.labels[:6])
    inputs = []
    handle = modules[first].register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad(), autocast(exp.device, "bf16-mixed"):
        exp.model.eval()(data.images)
    handle.remove()
    assert inputs[0].dtype == torch.bfloat16
    x = inputs[0].double().permute(0, 2, 3, 1).reshape(-1, inputs[0].shape[1])
    grams = collect_statistics(exp.model, modules, data, modes={first: "diag"}, batch_size=6,
                               precision="bf16-mixed")
    assert grams[first].dtype == torch.float64
    torch.testing.assert_close(grams[first], (x * x).sum(0), rtol=1e-12, atol=0)


def test_bf16_training_step_trains_the_factor() -> None:
    exp = build_experiment(tiny_config("train.device=cpu"))
    data = ClientData(exp.train.images[:8], exp.train.labels[:8] % 5)
    before = {n: lay.lora_A.detach().clone() for n, lay in exp.layers.items()}
    for layer in exp.layers.values():
        torch.nn.init.normal_(layer.lora_B, std=0.01)
    loss = train_locally(exp.model, exp.layers, data, factor="A", classes=range(0, 5), epochs=1,
                         batch_size=4, lr_a=1e-2, lr_b=1e-2, lr_head=1e-2, weight_decay=0.0,
                         generator=torch.Generator().manual_seed(0), precision="bf16-mixed")
    assert torch.isfinite(torch.tensor(loss)) and loss > 0
    moved = [not torch.equal(before[n], lay.lora_A) for n, lay in exp.layers.items()]
    assert all(moved) and all(lay.lora_A.dtype == torch.float32 for lay in exp.layers.values())


def test_same_seed_same_numbers_with_augmentation_and_bf16() -> None:
    overrides = ("data.augment=random-resized-crop", "data.augment_scale=0.5", "data.augment_flip=false",
                 "train.precision=bf16-mixed", "train.device=cpu")
    first = run_simulation(tiny_config(*overrides))
    second = run_simulation(tiny_config(*overrides))
    plain = run_simulation(tiny_config("train.device=cpu"))
    assert first["accuracy_matrix"] == second["accuracy_matrix"]
    assert first["upload_bytes"] == second["upload_bytes"]
    losses = [[r["train_loss"] for r in run["rounds"]] for run in (first, second, plain)]
    assert losses[0] == losses[1] and losses[0] != losses[2]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("data.augment=mixup", "data.augment"),
        ("train.precision=64", "train.precision"),
        ("data.crop_pct=0", "data.crop_pct"),
        ("data.augment_scale=1.5", "data.augment_scale"),
        ("model.head_init=ones", "model.head_init"),
        ("data.normalize=imagenet21k", "data.normalize"),
    ],
)
def test_bad_pipeline_values_are_one_line_errors(override: str, message: str) -> None:
    from fedlorm.config import apply_overrides, validate_config

    with pytest.raises(ConfigError, match=message) as err:
        validate_config(apply_overrides(tiny_config(), [override]))
    assert "\n" not in str(err.value)


def test_flip_augmentation_without_flip_is_refused() -> None:
    from fedlorm.config import validate_config

    with pytest.raises(ConfigError, match=r"data\.augment_flip"):
        validate_config(tiny_config("data.augment=flip", "data.augment_flip=false"))


def _bicubic(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """The documented resize, written out with torch alone: bicubic, antialiased, clamped to [0, 1]."""
    return torch.nn.functional.interpolate(
        x.float() / 255, size=size, mode="bicubic", antialias=True, align_corners=False
    ).clamp(0, 1)


def _paper_preprocessing(name: str) -> Preprocessing:
    from fedlorm.presets import preset_config
    from fedlorm.runtime.experiment import preprocessing

    return preprocessing(preset_config(name))


def test_eurosat_presets_resize_the_whole_tile_and_never_crop() -> None:
    tile = images(n=3, size=64)
    for beta in ("1.0", "0.5", "0.2"):
        pre = _paper_preprocessing(f"eurosat-b{beta}")
        expected = _bicubic(tile, (224, 224))  # the full 64 px tile to 224 px, bicubic: no crop
        torch.testing.assert_close(pre.test_input(tile), expected, rtol=0, atol=2e-6)
        # Training is not augmented: the training input is the test input, and draws nothing.
        generator = torch.Generator().manual_seed(0)
        state = generator.get_state()
        assert torch.equal(pre.augment(tile, generator), pre.test_input(tile))
        assert torch.equal(generator.get_state(), state)


def test_paper_presets_test_crop_is_a_bicubic_256_resize_then_the_centre_224() -> None:
    stored = images(n=2, size=224)  # a photo as the squash storage keeps it
    for name in ("cifar100-b0.5", "imagenet-r-b0.5", "imagenet-a-b1.0", "cub200-b1.0"):
        pre = _paper_preprocessing(name)
        assert (pre.interpolation, pre.storage_size) == ("bicubic", 224)
        expected = _bicubic(stored, (256, 256))[:, :, 16:240, 16:240]
        torch.testing.assert_close(pre.test_input(stored), expected, rtol=0, atol=2e-6)


def test_cub_training_crop_is_a_random_224_window_of_the_bicubic_256_resize() -> None:
    pre = _paper_preprocessing("cub200-b1.0")
    stored = images(n=1, size=224)
    resized = _bicubic(stored, (256, 256))[0]
    out = pre.augment(stored, torch.Generator().manual_seed(4))[0]
    windows = [
        (top, left)
        for top in range(33)
        for left in range(33)
        if torch.allclose(out, resized[:, top : top + 224, left : left + 224], atol=2e-6)
        or torch.allclose(out, resized[:, top : top + 224, left : left + 224].flip(-1), atol=2e-6)
    ]
    assert len(windows) == 1


def test_squash_stores_the_whole_photo_and_crop_keeps_its_centre(tmp_path) -> None:
    from PIL import Image

    from fedlorm.data import decode_images

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    path = tmp_path / "photo.png"
    Image.fromarray(pixels).save(path)
    photo = Image.fromarray(pixels)
    squashed = decode_images([path], 16, photo_resize="squash")[0]
    whole = np.array(photo.resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(squashed, torch.from_numpy(whole).permute(2, 0, 1))
    cropped = decode_images([path], 16, photo_resize="crop")[0]
    centre = np.array(photo.resize((32, 16), Image.Resampling.BICUBIC))[:, 8:24]
    assert torch.equal(cropped, torch.from_numpy(centre).permute(2, 0, 1))
    with pytest.raises(ValueError, match="photo_resize 'stretch' is unknown"):
        decode_images([path], 16, photo_resize="stretch")


def test_squash_storage_costs_less_memory_than_the_crop_storage() -> None:
    squash = Preprocessing(224, test_crop="center-crop", photo_resize="squash")
    crop = Preprocessing(224, test_crop="center-crop", photo_resize="crop")
    assert (squash.storage_size, crop.storage_size) == (224, 256)  # 150.5 KB against 196.6 KB an image
