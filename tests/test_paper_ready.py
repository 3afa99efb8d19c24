"""GPU readiness of the paper's presets, proven on the CPU: the real model of each dataset's preset
(timm's ``vit_base_patch16_224``, random weights, 224 px, LoRA on qkv/proj/fc1/fc2 of all 12 blocks,
the preset's rank, head initialisation, normalisation and augmentation) takes one LoRM training step
and one statistics pass on two images of its dataset's stored size.

The three presets of a dataset differ only in β, rank and learning rates (tests/test_presets.py checks
all 18 configs), so one per dataset runs here, at float32. Under bf16 autocast the same step takes
6.5 minutes for ViT-B on this CPU, which has no bfloat16 matrix units; the autocast step runs on
ViT-Ti/16 (same family, 224 px, 12 blocks) instead, and ``benchmarks/paper_step.py`` times ViT-B at
every precision.
"""

from __future__ import annotations

import pytest
import torch

from fedlorm.methods import METHODS, ClientData, Instruction
from fedlorm.presets import PAPER_SETTINGS, preset_config
from fedlorm.runtime.experiment import build_model, preprocessing

STORED = {"cifar100": 32, "eurosat": 64}
"""Datasets kept at their native size; photo datasets are stored at the preprocessing's size."""

VIT_B_SHAPES = {"attn.qkv": (2304, 768), "attn.proj": (768, 768), "mlp.fc1": (3072, 768),
                "mlp.fc2": (768, 3072)}


def _step(name: str, precision: str, backbone: str = "vit_base_patch16_224") -> None:
    cfg = preset_config(name)
    cfg.model.backbone, cfg.model.weights = backbone, "none"
    cfg.train.device, cfg.train.precision = "cpu", precision
    cfg.train.local_epochs, cfg.train.batch_size, cfg.train.eval_batch_size = 1, 2, 2
    num_classes = 196 if cfg.data.datasets == ["cars196"] else {"cifar100": 100, "eurosat": 10}.get(
        cfg.data.datasets[0], 200)
    model, layers = build_model(cfg, num_classes, torch.device("cpu"))
    assert model.img_size == 224 and model.preprocessing == preprocessing(cfg)
    assert len(layers) == 48 and {lay.rank for lay in layers.values()} == {cfg.model.rank}
    width = model.feature_dim
    for layer_name, layer in layers.items():
        d_out, d_in = VIT_B_SHAPES[layer_name.split(".", 3)[3]]
        assert (layer.out_features, layer.in_features) == (d_out * width // 768, d_in * width // 768)
    assert float(model.head.weight.std()) == pytest.approx(0.02, rel=0.1)  # the reference's head

    method = METHODS["lorm"]
    server, client = method.build_server(cfg, model, layers), method.build_client(cfg, model, layers)
    classes = range(0, 10)
    server.start_task(0, classes, torch.Generator().manual_seed(0))
    side = STORED.get(cfg.data.datasets[0], model.preprocessing.storage_size)
    images = torch.randint(0, 256, (2, 3, side, side), dtype=torch.uint8)
    data = ClientData(images, torch.tensor([0, 1]))

    train = next(iter(server.instructions(0, classes)))
    assert (train.phase, train.factor) == ("train", "B")
    reply = client.update(server.arrays(train), train, data, torch.Generator().manual_seed(1))
    assert torch.isfinite(torch.tensor(reply.metrics["train_loss"]))
    spec = server.expected_reply(train)
    assert set(reply.summands) == set(spec)
    for key, summand in spec.items():
        value = reply.summands[key]
        assert tuple(value.shape) == summand.shape and value.dtype == summand.dtype == torch.float64, key
        assert bool(torch.isfinite(value).all()), key
    assert any(bool(reply.summands[f"{n}.M"].abs().sum() > 0) for n in layers)  # B was trained

    stats = Instruction(0, -1, "task_stats", "none", classes.start, classes.stop)
    grams = client.update(server.arrays(stats), stats, data, torch.Generator().manual_seed(2)).summands
    for layer_name, layer in layers.items():
        g = grams[f"{layer_name}.G"]
        assert g.dtype == torch.float64 and g.shape == (layer.in_features,)  # diagonal statistics
        assert bool(torch.isfinite(g).all()) and bool((g > 0).all())


@pytest.mark.parametrize("name", [s.name(s.betas[0]) for s in PAPER_SETTINGS])
def test_paper_preset_step_on_the_real_vit(name: str) -> None:
    _step(name, "32")


def test_paper_preset_step_under_bf16_autocast() -> None:
    _step("cifar100-b0.1", "bf16-mixed", backbone="vit_tiny_patch16_224")
