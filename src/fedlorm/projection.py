"""A fixed random-feature layer for the analytic head: h = σ(F R), R a seeded Gaussian d × M matrix.

RanPAC (NeurIPS 2023) solves its ridge classifier on such features rather than on the pooled features
F themselves: the non-linear expansion to M > d dimensions makes classes that overlap in F more
separable by a linear head. R is drawn from the run's seed (stream ``"head_projection"``), so every
client and the server derive the same matrix and only the (M + 1)-wide sums travel.

R's entries are N(0, 1/d): each projected feature then has the scale of the pooled features' root
mean square, which keeps ``tanh`` and ``sigmoid`` out of saturation. ReLU and the identity are
positively homogeneous, so for them the scale changes nothing (the ridge is relative to the sums).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedlorm.seeding import torch_generator

__all__ = ["ACTIVATIONS", "RandomFeatures", "activation_from_module_name", "projection_matrix"]

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}
"""``lorm.head_activation`` → the ``torch.nn`` module σ applies (RanPAC uses ReLU)."""


def projection_matrix(features: int, width: int, seed: int) -> Tensor:
    """R (``features`` × ``width``, float32, CPU): N(0, 1/features) entries from the run seed's
    ``"head_projection"`` stream, the same on every machine."""
    if features < 1 or width < 1:
        raise ValueError(f"a projection needs features >= 1 and width >= 1, got {features} and {width}")
    generator = torch_generator(seed, "head_projection")
    return torch.randn(features, width, generator=generator, dtype=torch.float32) / math.sqrt(features)


def activation_from_module_name(name: str) -> str:
    """The ``lorm.head_activation`` whose ``torch.nn`` class is called ``name`` (as model.json stores it)."""
    for key, module in ACTIVATIONS.items():
        if module.__name__ == name:
            return key
    allowed = ", ".join(m.__name__ for m in ACTIVATIONS.values())
    raise ValueError(f"head projection activation {name!r} is unknown; allowed: {allowed}")


class RandomFeatures(nn.Module):
    """h = σ(F R) for pooled features F (N, d); R is a fixed buffer, never trained.

    Computed in float32 with autocast off, whatever precision the backbone ran at, so that the
    deployed model sees the features the head's sums were collected on.
    """

    def __init__(self, matrix: Tensor, activation: str) -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown; allowed: {', '.join(ACTIVATIONS)}")
        if matrix.ndim != 2:
            raise ValueError(f"a projection matrix is 2-D (d × M), got shape {tuple(matrix.shape)}")
        self.activation_name = activation
        self.activation = ACTIVATIONS[activation]()
        # Not persistent: a run derives R from its seed; an exported model stores it in its own file.
        self.register_buffer("weight", matrix.to(torch.float32), persistent=False)

    @property
    def in_features(self) -> int:
        """d, the pooled feature width."""
        return int(self.weight.shape[0])

    @property
    def out_features(self) -> int:
        """M, the projected width."""
        return int(self.weight.shape[1])

    def forward(self, features: Tensor) -> Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.activation(features.float() @ self.weight)

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, activation={self.activation_name}"
