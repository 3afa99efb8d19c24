"""Named configurations: the built-in offline benchmark, a fast smoke test, classic splits, and the
LoRM paper's 18 settings (6 datasets × 3 Dirichlet β, listed in docs/paper-settings.md).

A preset is a set of overrides on :class:`fedlorm.config.RunConfig`'s defaults, so every preset is a
plain, inspectable dict and a results file's ``config`` shows exactly what ran.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlorm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    flat_keys,
    load_toml,
    validate_config,
)

__all__ = ["PAPER_BACKBONE", "PAPER_PRESETS", "PAPER_SETTINGS", "PRESETS", "SOURCES", "PaperSetting",
           "Preset", "config_sources", "preset_config", "published_accuracy", "resolve_config"]


@dataclass(frozen=True)
class Preset:
    """A named set of config overrides with a one-line description.

    ``validated``: per method, the settings chosen for this very preset on its validation split
    (dotted ``key: value``; docs/evidence.md has each grid). A run of the preset starts from them,
    after the preset's own overrides and before the user's file and ``key=value`` overrides.
    """

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)
    validated: dict[str, dict[str, Any]] = field(default_factory=dict)


# Chosen on a validation split (data.validation_per_class=100), never on the test set: the analytic
# head lifted LoRM from 43.6 % to 80.2 % there, and ridge 0.1 was the best of 1e-6..1e-1. One local
# epoch keeps a run short (not tuned). No augmentation: on validation, random-resized crops (area
# 0.6-1, no flip: digits) cost LoRM 3.3 points (80.15 against 83.45) and left FFA-LoRA unchanged.
_BUILTIN: dict[str, Any] = {
    "train": {"local_epochs": 1},
    "lorm": {"head_merge": "analytic", "head_ridge": 0.1},
}
_BUILTIN_TEXT = (
    "Fashion-MNIST then MNIST, 5 tasks x 4 classes, 10 clients, beta {beta}, EfficientNet-Lite0 "
    "(ImageNet) at 48 px, analytic ridge head"
)

# The validated tables below are what benchmarks/evidence.py's selection chose on each preset's own
# validation split (seed 0; grids and scores in docs/evidence.md): a rate per method, and the
# projected analytic head (M = 4000, ridge 0.1), which beat the plain head for every method there.
def _chosen(lr: float | None, activation: str) -> dict[str, Any]:
    """A validated entry: learning rate ``lr`` (None: the method trains nothing a rate acts on) and
    the projected head with ``activation``."""
    head = {"lorm.head_projection": 4000, "lorm.head_activation": activation, "lorm.head_ridge": 0.1}
    return head if lr is None else {"train.lr": lr, **head}


def _validated(rates: dict[str, float], activation: str, joint_lr: float) -> dict[str, dict[str, Any]]:
    """One preset's table: the adapting methods' rates, head-only's head, joint's rate."""
    table = {method: _chosen(lr, activation) for method, lr in rates.items()}
    table["head-only"] = _chosen(None, activation)
    table["joint"] = {"train.lr": joint_lr}
    return table


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "built-in offline benchmark: " + _BUILTIN_TEXT.format(beta=0.5),
        _BUILTIN,
        _validated({"lorm": 3e-4, "lorm-avg": 3e-4, "fedavg": 3e-4, "ffa": 3e-4, "lorm-fsa": 3e-4},
                   "tanh", joint_lr=1e-3),
    ),
    "default-b0.1": Preset(
        "the built-in benchmark with more heterogeneous clients: " + _BUILTIN_TEXT.format(beta=0.1),
        {**_BUILTIN, "scenario": {"beta": 0.1}},
        _validated({"lorm": 1e-3, "lorm-avg": 1e-3, "fedavg": 3e-4, "ffa": 3e-4, "lorm-fsa": 3e-4},
                   "tanh", joint_lr=1e-3),
    ),
    "default-b0.05": Preset(
        "the built-in benchmark with very heterogeneous clients: " + _BUILTIN_TEXT.format(beta=0.05),
        {**_BUILTIN, "scenario": {"beta": 0.05}},
        _validated({"lorm": 1e-3, "lorm-avg": 1e-3, "fedavg": 3e-4, "ffa": 3e-4, "lorm-fsa": 1e-3},
                   "tanh", joint_lr=1e-3),
    ),
    "headroom": Preset(
        "the built-in benchmark where adaptation pays: Fashion-MNIST alone at 24 px, 5 tasks x 2 "
        "classes, 10 clients, beta 0.5, EfficientNet-Lite0, analytic ridge head",
        # Found on the validation split with head-only and joint only (no federated LoRA method
        # looked at): joint beat head-only by 8.7 points at 32 px and by 13.3 at 24 px, where the
        # ImageNet features of these small images are weak (head-only 71.2 %, joint 84.5 %).
        {
            "data": {"datasets": ["fashion_mnist"], "image_size": 24},
            "train": {"local_epochs": 1},
            "lorm": {"head_merge": "analytic", "head_ridge": 0.1},
        },
        _validated({"lorm": 1e-4, "lorm-avg": 3e-4, "fedavg": 3e-4, "ffa": 3e-4, "lorm-fsa": 3e-3},
                   "relu", joint_lr=3e-3),
    ),
    "smoke": Preset(
        "a few tens of seconds: MNIST 2 tasks x 5 classes, 4 clients, 32 px, 2 rounds",
        {
            "data": {
                "datasets": ["mnist"],
                "image_size": 32,
                "train_per_class": 24,
                "test_per_class": 20,
            },
            "scenario": {"tasks": 2, "num_clients": 4, "min_samples": 2},
            "model": {"rank": 2},
            "train": {"rounds": 2, "local_epochs": 1, "batch_size": 16},
        },
    ),
    "split-fmnist-5x2": Preset(
        "classic Split Fashion-MNIST: 5 tasks x 2 classes, 10 clients, beta 0.5, 32 px",
        {
            "data": {
                "datasets": ["fashion_mnist"],
                "image_size": 32,
                "train_per_class": 500,
                "test_per_class": 500,
            },
            "scenario": {"tasks": 5},
            "train": {"rounds": 4, "local_epochs": 2},
        },
    ),
}


PAPER_BACKBONE = "vit_base_patch16_224.augreg_in21k"
"""The paper's backbone (timm name): ViT-B/16 pretrained on ImageNet-21k."""

Triple = tuple[Any, Any, Any]


@dataclass(frozen=True)
class PaperSetting:
    """One dataset row of the paper's settings; tuples hold one value per β (in ``betas`` order).

    ``published``: the paper's LoRM final average accuracy per β, where the paper reports it.
    """

    prefix: str
    dataset: str
    title: str
    classes: int
    tasks: int | tuple[int, ...]
    betas: tuple[float, float, float]
    rounds: int
    ranks: tuple[int, int, int]
    lrs: tuple[float, float, float]
    alpha_head: float
    lr_a: Triple = (None, None, None)
    lr_b: Triple = (None, None, None)
    published: Triple = (None, None, None)
    pipeline: dict[str, Any] = field(default_factory=dict)
    """``data.*`` keys of the reference's preprocessing: augmentation, normalisation, test crop."""

    def name(self, beta: float) -> str:
        """Preset name for ``beta``, e.g. ``cifar100-b0.05``."""
        return f"{self.prefix}-b{beta}"

    def task_text(self) -> str:
        """How the classes split into tasks, for descriptions."""
        if isinstance(self.tasks, int):
            return f"{self.tasks} tasks x {self.classes // self.tasks} classes"
        sizes = list(self.tasks)
        head = [n for n in sizes if n == sizes[0]]
        rest = "".join(f" + {n}" for n in sizes[len(head):])
        return f"{len(sizes)} tasks ({len(head)} x {sizes[0]}{rest} classes)"

    def preset(self, i: int) -> Preset:
        """The preset for the ``i``-th β."""
        beta, rank, lr = self.betas[i], self.ranks[i], self.lrs[i]
        train: dict[str, Any] = {"rounds": self.rounds, "local_epochs": 5, "batch_size": 16, "lr": lr}
        lr_text = f"lr {lr:g}"
        for key, values in (("lr_a", self.lr_a), ("lr_b", self.lr_b)):
            if values[i] is not None:
                train[key] = values[i]
                lr_text += f", {key} {values[i]:g}"
        paper = f"; paper's final acc {self.published[i]}" if self.published[i] is not None else ""
        description = (
            f"LoRM paper: {self.title}, {self.task_text()}, beta {beta}, ViT-B/16 (IN-21k) 224 px, "
            f"10 clients, {self.rounds} rounds, rank {rank}, {lr_text}, head alpha {self.alpha_head}"
            f"{paper} (GPU)"
        )
        return Preset(description, {
            "data": {"datasets": [self.dataset], "image_size": 224, "train_per_class": None,
                     "test_per_class": None, **self.pipeline},
            "scenario": {"tasks": self.tasks if isinstance(self.tasks, int) else list(self.tasks),
                         "class_order": "natural", "num_clients": 10, "beta": beta, "min_samples": 6},
            "model": {"backbone": PAPER_BACKBONE, "rank": rank, "head_init": "trunc-normal"},
            "train": {**train, "precision": "16-mixed"},
            "lorm": {"alpha_backbone": 0.0, "alpha_head": self.alpha_head, "head_merge": "regmean",
                     "stats_model": "reference"},
        })


def _pipeline(
    augment: str, normalize: str, test_crop: str = "center-crop", photo_resize: str = "squash", **more: Any
) -> dict[str, Any]:
    return {"augment": augment, "normalize": normalize, "test_crop": test_crop, "crop_pct": 0.875,
            "interpolation": "bicubic", "photo_resize": photo_resize, **more}


# The reference's transforms (docs/paper-settings.md). Every resize is bicubic. Photos are stored
# squashed to 224 x 224 (its Resize((224, 224)) at load), and the crops start from that square; at
# test time Resize 256 x 256 → CenterCrop 224 (crop_pct 0.875). Cars-196 is resized on its shorter
# side and centre-cropped once at load, never cropped again; EuroSAT's 64 px tile is resized whole to
# 224 px, neither augmented nor cropped (its README's commands).
PAPER_SETTINGS: tuple[PaperSetting, ...] = (
    PaperSetting("cifar100", "cifar100", "CIFAR-100", 100, 10, (0.5, 0.1, 0.05), 5, (1, 16, 16),
                 (3e-3, 3e-4, 5e-4), 0.5, published=(86.95, 81.75, 82.76),
                 pipeline=_pipeline("random-resized-crop", "half")),
    PaperSetting("imagenet-r", "imagenet_r", "ImageNet-R", 200, 10, (0.5, 0.1, 0.05), 5, (2, 32, 16),
                 (3e-3, 1e-3, 1e-3), 0.5, pipeline=_pipeline("random-resized-crop", "half")),
    PaperSetting("eurosat", "eurosat", "EuroSAT", 10, 5, (1.0, 0.5, 0.2), 5, (1, 1, 1),
                 (3e-3, 1e-3, 3e-3), 0.5, pipeline=_pipeline("none", "none", test_crop="resize")),
    PaperSetting("cub200", "cub200", "CUB-200", 200, 10, (1.0, 0.5, 0.2), 5, (1, 1, 1),
                 (1e-2, 3e-2, 3e-2), 0.3, lr_a=(3e-3, 1e-3, 3e-3),
                 pipeline=_pipeline("resize-random-crop", "imagenet")),
    PaperSetting("cars196", "cars196", "Cars-196", 196, (20,) * 9 + (16,), (1.0, 0.5, 0.2), 10,
                 (8, 8, 4), (1e-2, 1e-2, 1e-2), 0.5, lr_a=(1e-2,) * 3, lr_b=(1e-3,) * 3,
                 pipeline=_pipeline("flip", "none", test_crop="resize", photo_resize="crop")),
    PaperSetting("imagenet-a", "imagenet_a", "ImageNet-A", 200, 10, (1.0, 0.5, 0.2), 10, (4, 4, 4),
                 (1e-2, 1e-2, 1e-2), 0.5, lr_a=(1e-2,) * 3, lr_b=(1e-3,) * 3,
                 pipeline=_pipeline("random-resized-crop", "imagenet", augment_scale=0.05)),
)
"""The paper's per-dataset settings (docs/paper-settings.md). Classes are learned in natural label
order, as the reference does (task t = label ids t·n .. (t+1)·n − 1). Training runs under the
reference's ``16-mixed`` precision with timm's trunc-normal head. Statistics are collected in one
pass over each client's augmented data, network in eval mode: the reference asks for two passes but
its code makes one."""

PAPER_PRESETS: tuple[str, ...] = tuple(s.name(b) for s in PAPER_SETTINGS for b in s.betas)
"""Names of the 18 paper presets, in table order."""


def published_accuracy(preset: str) -> float | None:
    """The paper's LoRM final accuracy (%) for ``preset``, shown beside measured ones; None if unpublished."""
    for setting in PAPER_SETTINGS:
        for beta, value in zip(setting.betas, setting.published, strict=True):
            if setting.name(beta) == preset:
                return value
    return None


PRESETS.update(
    {s.name(b): s.preset(i) for s in PAPER_SETTINGS for i, b in enumerate(s.betas)}
)


def preset_config(name: str, method: str | None = None) -> RunConfig:
    """The config of preset ``name`` for ``method`` (default: the preset's own method): defaults,
    the preset's overrides, then its validated settings for that method; ``preset`` records ``name``."""
    if name not in PRESETS:
        raise ConfigError(
            f"preset {name!r} is unknown; choose one of: {', '.join(sorted(PRESETS))}"
        )
    preset = PRESETS[name]
    cfg = config_from_dict(preset.overrides)
    if method is not None:
        cfg.method = method
    cfg = config_from_dict(preset.validated.get(cfg.method, {}), base=cfg)
    cfg.preset = name
    return cfg


SOURCES = ("default", "preset", "validated", "method", "user")
"""Where a config value came from (:func:`config_sources`): the config's default, the preset's
overrides, the preset's validated table for the method, the method's own run config (e.g. joint's
one task on one client), or the user (a TOML file, ``key=value``, ``--method``, ``--seed``)."""


def config_sources(
    cfg: RunConfig, method_config: Callable[[RunConfig], RunConfig] | None = None
) -> dict[str, str]:
    """For every dotted key of ``cfg``, which of :data:`SOURCES` its value came from.

    Decided by value: a key whose value equals what ``cfg.preset`` gives for ``cfg.method`` is
    attributed to the last layer that set it there, any other value to the user. ``method_config``
    is the method's transform when ``cfg`` is the config as the run uses it. Without a preset,
    values are the default or the user's.
    """
    preset = PRESETS.get(cfg.preset) if cfg.preset is not None else None
    base = preset_config(cfg.preset, cfg.method) if preset is not None else RunConfig(method=cfg.method)
    expected = flat_keys(config_to_dict(base))
    transformed = expected
    # A method's run config may be a check rather than a change (a ViT-only method refuses the
    # default CNN backbone): then nothing of the expected config is the method's.
    with contextlib.suppress(ConfigError):
        if method_config is not None:
            transformed = flat_keys(config_to_dict(method_config(base)))
    overridden = set(flat_keys(preset.overrides)) if preset is not None else set()
    validated = set(flat_keys(preset.validated.get(cfg.method, {}))) if preset is not None else set()
    out = {}
    for key, value in flat_keys(config_to_dict(cfg)).items():
        if key in ("method", "seed", "preset"):
            out[key] = "default" if value == flat_keys(config_to_dict(RunConfig()))[key] else "user"
        elif value != transformed.get(key):
            out[key] = "user"
        elif transformed.get(key) != expected.get(key):
            out[key] = "method"
        elif key in validated:
            out[key] = "validated"
        elif key in overridden:
            out[key] = "preset"
        else:
            out[key] = "default"
    return out



def resolve_config(
    preset: str,
    config_file: str | Path | None = None,
    overrides: Sequence[str] = (),
    *,
    method: str | None = None,
    seed: int | None = None,
) -> RunConfig:
    """The command line's config: preset with its validated settings for the run's method, then a
    TOML file, then ``key=value`` overrides, then ``--method``/``--seed``; validated. Shared by
    ``run``, ``compare`` and ``flower``.

    The method may come from any of the user's layers, so they are applied once to find it, then
    again on top of the preset's validated settings for that method: the user's values always win.
    """

    def layered(base: RunConfig) -> RunConfig:
        cfg = load_toml(config_file, base=base) if config_file is not None else base
        cfg = apply_overrides(cfg, overrides)
        if method is not None:
            cfg.method = method
        if seed is not None:
            cfg.seed = seed
        return cfg

    cfg = layered(preset_config(preset, method=layered(preset_config(preset)).method))
    if cfg.preset != preset:
        raise ConfigError(
            f"config key 'preset' = {cfg.preset!r} cannot be set; choose the preset with --preset"
        )
    validate_config(cfg)
    return cfg
