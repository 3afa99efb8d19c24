"""Shared fixtures: a tiny real-data configuration that runs the whole engine in seconds."""

from __future__ import annotations

import os

import pytest

from fedlorm.config import RunConfig, apply_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY = [
    "data.datasets=mnist",
    "data.image_size=32",
    "data.train_per_class=8",
    "data.test_per_class=5",
    "scenario.tasks=2",
    "scenario.num_clients=3",
    "scenario.min_samples=2",
    "model.rank=2",
    "train.rounds=2",
    "train.local_epochs=1",
    "train.batch_size=8",
]


def tiny_config(*overrides: str) -> RunConfig:
    """MNIST (the offline 5k subset), 2 tasks x 5 classes, 3 clients, EfficientNet-Lite0 at 32 px."""
    return apply_overrides(RunConfig(), [*TINY, *overrides])


@pytest.fixture
def tiny() -> RunConfig:
    return tiny_config()
