"""Joint training: the upper bound, one centralised model trained on every task's data at once.

It is the fine-tuning method run on a transformed scenario (one task holding all classes, one client
holding all data), so it trains for the same rounds × local epochs per sample as the federated methods.
"""

from __future__ import annotations

import dataclasses

from fedlorm.config import RunConfig, config_from_plain

__all__ = ["JOINT", "joint_config"]

JOINT = "joint"


def joint_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with one task of all classes and one client (a copy; ``cfg`` is unchanged)."""
    out = config_from_plain(dataclasses.asdict(cfg))
    out.scenario.tasks = 1
    out.scenario.num_clients = 1
    out.scenario.min_samples = 1
    return out
