"""Named configurations: the built-in offline benchmark, a fast smoke test and classic splits.

A preset is a set of overrides on :class:`fedlorm.config.RunConfig`'s defaults, so every preset is a
plain, inspectable dict and a results file's ``config`` shows exactly what ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fedlorm.config import ConfigError, RunConfig, config_from_dict

__all__ = ["PRESETS", "Preset", "preset_config"]


@dataclass(frozen=True)
class Preset:
    """A named set of config overrides with a one-line description."""

    description: str
    overrides: dict[str, Any] = field(default_factory=dict)


PRESETS: dict[str, Preset] = {
    "default": Preset(
        "built-in offline benchmark: Fashion-MNIST then MNIST, 5 tasks x 4 classes, 10 clients, "
        "beta 0.5, EfficientNet-Lite0 (ImageNet) at 48 px"
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


def preset_config(name: str) -> RunConfig:
    """The config of preset ``name`` (defaults plus its overrides)."""
    if name not in PRESETS:
        raise ConfigError(
            f"preset {name!r} is unknown; choose one of: {', '.join(sorted(PRESETS))}"
        )
    return config_from_dict(PRESETS[name].overrides)
