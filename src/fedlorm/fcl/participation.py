"""Client sampling: which clients a training round asks (``scenario.participation``).

A round with participation fraction f among K clients asks m = max(1, ⌊f·K + ½⌋) clients (the nearest
integer, halves rounded up), drawn without replacement from the random stream named
(seed, ``"participation"``, task, round). The draw is a pure function of those values, so the
in-process simulator, the Flower runtime and a resumed run ask the same clients. With f = 1 (or
whenever m = K) every client is asked and nothing is drawn.
"""

from __future__ import annotations

import math

import torch

from fedlorm.seeding import torch_generator

__all__ = ["clients_per_round", "sample_clients"]


def clients_per_round(num_clients: int, fraction: float) -> int:
    """How many of ``num_clients`` clients a training round asks: max(1, f·K rounded half up)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"participation must be in (0, 1], got {fraction!r}")
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients!r}")
    return min(num_clients, max(1, math.floor(fraction * num_clients + 0.5)))


def sample_clients(seed: int, num_clients: int, fraction: float, task: int, round: int) -> list[int]:
    """The clients (ascending indices) that training round ``round`` of task ``task`` asks."""
    count = clients_per_round(num_clients, fraction)
    if count == num_clients:
        return list(range(num_clients))
    order = torch.randperm(num_clients, generator=torch_generator(seed, "participation", task, round))
    return sorted(order[:count].tolist())
