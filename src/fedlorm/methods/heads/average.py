"""``lorm.head_merge = fedavg``: the clients' trained heads averaged, weighted by sample counts."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlorm.methods.arrays import HEAD
from fedlorm.methods.base import Arrays
from fedlorm.methods.heads.base import Head, HeadStrategy
from fedlorm.methods.replies import ReplySpec, count, value

__all__ = ["TrainedAverageHead"]


class TrainedAverageHead(HeadStrategy):
    """W = Σ n_i W_i / Σ n_i and b = Σ n_i b_i / Σ n_i; clients send n_i·W_i, n_i·b_i and n_i.

    The count ``head.n`` is every training reply's Σ n_i, which the within-task merges divide by.
    """

    def summands(self, weight: Tensor, bias: Tensor, gram: Tensor | None, n: int) -> Arrays:
        return {**self._bias_summands(bias, n), f"{HEAD}.nW": n * weight.detach().to(torch.float64)}

    def spec(self) -> ReplySpec:
        return {**self._bias_spec(), f"{HEAD}.nW": value(self.classes, self.features)}

    def solve(self, sums: Arrays, weight: Tensor, bias: Tensor, *, ridge: float) -> Head:
        return (sums[f"{HEAD}.nW"] / sums[f"{HEAD}.n"]).to(weight.dtype), self._bias(sums, bias)

    def _bias_summands(self, bias: Tensor, n: int) -> Arrays:
        return {
            f"{HEAD}.nb": n * bias.detach().to(torch.float64),
            f"{HEAD}.n": torch.tensor(float(n), dtype=torch.float64),
        }

    def _bias_spec(self) -> ReplySpec:
        return {f"{HEAD}.nb": value(self.classes), f"{HEAD}.n": count()}

    @staticmethod
    def _bias(sums: Arrays, bias: Tensor) -> Tensor:
        """b = Σ n_i b_i / Σ n_i (response matching does not determine the bias)."""
        return (sums[f"{HEAD}.nb"] / sums[f"{HEAD}.n"]).to(bias.dtype)
