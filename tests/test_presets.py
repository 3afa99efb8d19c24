"""The paper's 18 presets: each carries the settings of docs/paper-settings.md, is a valid config,
and builds (data, scenario, LoRA model, method; no training) on a tiny copy of its dataset in the
real layout (every real class, a few images each) with timm's random-weight ``test_vit`` (a 6-block
ViT) standing in for ViT-B/16."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from paper_fixtures import PRESET_FIXTURES

from fedlorm.config import config_to_dict, validate_config
from fedlorm.presets import PAPER_BACKBONE, PAPER_PRESETS, PRESETS, preset_config
from fedlorm.runtime.experiment import build_experiment

# docs/paper-settings.md's table, written out again (not read from presets.py) so a slip shows up:
# dataset prefix → registry name, task sizes, betas, rounds, ranks, lrs, lr_a, lr_b, alpha_head.
TABLE = {
    "cifar100": ("cifar100", [10] * 10, ["0.5", "0.1", "0.05"], 5, [1, 16, 16],
                 [3e-3, 3e-4, 5e-4], [None] * 3, [None] * 3, 0.5),
    "imagenet-r": ("imagenet_r", [20] * 10, ["0.5", "0.1", "0.05"], 5, [2, 32, 16],
                   [3e-3, 1e-3, 1e-3], [None] * 3, [None] * 3, 0.5),
    "eurosat": ("eurosat", [2] * 5, ["1.0", "0.5", "0.2"], 5, [1, 1, 1],
                [3e-3, 1e-3, 3e-3], [None] * 3, [None] * 3, 0.5),
    "cub200": ("cub200", [20] * 10, ["1.0", "0.5", "0.2"], 5, [1, 1, 1],
               [1e-2, 3e-2, 3e-2], [3e-3, 1e-3, 3e-3], [None] * 3, 0.3),
    "cars196": ("cars196", [20] * 9 + [16], ["1.0", "0.5", "0.2"], 10, [8, 8, 4],
                [1e-2] * 3, [1e-2] * 3, [1e-3] * 3, 0.5),
    "imagenet-a": ("imagenet_a", [20] * 10, ["1.0", "0.5", "0.2"], 10, [4, 4, 4],
                   [1e-2] * 3, [1e-2] * 3, [1e-3] * 3, 0.5),
}
ROWS = {f"{prefix}-b{beta}": (row, i) for prefix, row in TABLE.items() for i, beta in enumerate(row[2])}
VIT_TARGET = re.compile(r"^encoder\.blocks\.(\d+)\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)$")


def test_the_18_presets_exist_and_match_the_table() -> None:
    assert list(PAPER_PRESETS) == list(ROWS) and set(PAPER_PRESETS) <= set(PRESETS)
    for name, ((dataset, tasks, betas, rounds, ranks, lrs, lr_a, lr_b, alpha_head), i) in ROWS.items():
        cfg = preset_config(name)
        validate_config(cfg)
        assert cfg.data.datasets == [dataset] and cfg.data.image_size == 224
        assert cfg.data.train_per_class is None and cfg.data.test_per_class is None
        sc = cfg.scenario
        assert (sc.num_clients, sc.min_samples, sc.class_order) == (10, 6, "natural")
        assert sc.beta == float(betas[i])
        assert sc.tasks == (tasks if dataset == "cars196" else len(tasks))
        model = cfg.model
        assert (model.backbone, model.weights, model.rank) == (PAPER_BACKBONE, "pretrained", ranks[i])
        t = cfg.train
        assert (t.rounds, t.local_epochs, t.batch_size, t.weight_decay) == (rounds, 5, 16, 0.0)
        assert (t.lr, t.lr_a, t.lr_b, t.lr_head) == (lrs[i], lr_a[i], lr_b[i], None)
        lorm = cfg.lorm
        assert (lorm.alpha_backbone, lorm.alpha_head, lorm.head_merge, lorm.stats_model) == (
            0.0, alpha_head, "regmean", "reference")
        assert cfg.method == "lorm" and config_to_dict(cfg)["scenario"]["tasks"] == sc.tasks
    assert "86.95" in PRESETS["cifar100-b0.5"].description


# The reference's input pipeline per dataset, written out again: train augmentation (RandomResizedCrop
# minimum area or the policy), normalisation, test-time crop, interpolation, how photos are made square.
PIPELINE = {
    "cifar100": ("random-resized-crop", 0.08, "half", "center-crop", "bicubic", "squash"),
    "imagenet_r": ("random-resized-crop", 0.08, "half", "center-crop", "bicubic", "squash"),
    "imagenet_a": ("random-resized-crop", 0.05, "imagenet", "center-crop", "bicubic", "squash"),
    "cub200": ("resize-random-crop", 0.08, "imagenet", "center-crop", "bicubic", "squash"),
    "cars196": ("flip", 0.08, "none", "resize", "bicubic", "crop"),
    "eurosat": ("none", 0.08, "none", "resize", "bicubic", "squash"),
}


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_paper_presets_use_the_references_pipeline(name: str) -> None:
    cfg = preset_config(name)
    d = cfg.data
    got = (d.augment, d.augment_scale, d.normalize, d.test_crop, d.interpolation, d.photo_resize)
    assert got == PIPELINE[d.datasets[0]]
    assert d.crop_pct == 0.875 and d.augment_flip and d.augment_statistics  # Resize 256 → crop 224
    assert (cfg.train.precision, cfg.model.head_init) == ("16-mixed", "trunc-normal")
    assert "82.76" in PRESETS["cifar100-b0.05"].description


@pytest.fixture(scope="module")
def paper_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("paper_data")
    for write in PRESET_FIXTURES.values():
        write(root)
    return root


@pytest.mark.parametrize("name", PAPER_PRESETS)
def test_preset_builds_on_its_dataset(name: str, paper_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDLORM_DATA", str(paper_root / "cache"))
    (dataset, tasks, *_), _ = ROWS[name]
    cfg = preset_config(name)
    cfg.data.root = str(paper_root)
    cfg.data.image_size = 32  # stored and fed at 32 px: the layout and the scenario are what is tested
    cfg.model.backbone, cfg.model.weights = "test_vit", "random"
    cfg.train.device, cfg.train.precision = "cpu", "32"  # the preset's 16-mixed needs CUDA
    exp = build_experiment(cfg)

    assert list(exp.scenario.task_sizes) == tasks
    assert exp.scenario.num_classes == sum(tasks) == exp.model.num_classes
    assert exp.scenario.class_order == tuple(range(sum(tasks)))  # natural order, as the reference
    assert [len(p) for p in exp.partitions] == [10] * len(tasks)
    assert min(len(idx) for task in exp.partitions for idx in task) >= 6
    assert exp.train.images.dtype == torch.uint8 and exp.test.images.dtype == torch.uint8
    assert sorted(exp.test.labels.unique().tolist()) == list(range(sum(tasks)))
    # LoRA on the four linear layers of all 6 blocks, at the preset's rank, nowhere else.
    assert len(exp.layers) == 6 * 4 and all(VIT_TARGET.match(n) for n in exp.layers)
    assert {int(VIT_TARGET.match(n)[1]) for n in exp.layers} == set(range(6))
    assert {lay.rank for lay in exp.layers.values()} == {cfg.model.rank}
    assert exp.model.name == "test_vit" and dataset in cfg.data.datasets
    with torch.no_grad():
        logits = exp.model(exp.test.images[:2].to(exp.device))
    assert logits.shape == (2, sum(tasks))
