"""``lorm.head_merge = regmean``: the paper's head, response matching on the clients' features."""

from __future__ import annotations

from torch import Tensor

from fedlorm import merging
from fedlorm.methods.arrays import HEAD
from fedlorm.methods.base import Arrays
from fedlorm.methods.heads.average import TrainedAverageHead
from fedlorm.methods.heads.base import Head
from fedlorm.methods.replies import ReplySpec, gram, value

__all__ = ["RegMeanHead"]


class RegMeanHead(TrainedAverageHead):
    """W = (Σ W_i G̃_i)(Σ G̃_i)⁻¹ with G̃ shrunk by ``lorm.alpha_head``; the bias is averaged."""

    @property
    def gram_mode(self) -> str | None:
        return "diag" if self.lorm.alpha_head == 0 else "full"

    def summands(self, weight: Tensor, bias: Tensor, gram: Tensor | None, n: int) -> Arrays:
        assert gram is not None
        shrunk = merging.shrink_gram(gram, self.lorm.alpha_head)
        WG, G = merging.regmean_summands(weight.detach(), shrunk)
        return {**self._bias_summands(bias, n), f"{HEAD}.WG": WG, f"{HEAD}.G": G}

    def spec(self) -> ReplySpec:
        return {
            **self._bias_spec(),
            f"{HEAD}.WG": value(self.classes, self.features),
            f"{HEAD}.G": gram(self.features, full=self.lorm.alpha_head != 0),
        }

    def solve(self, sums: Arrays, weight: Tensor, bias: Tensor, *, ridge: float) -> Head:
        merged = merging.regmean_solve(
            sums[f"{HEAD}.WG"], sums[f"{HEAD}.G"], reference=weight, dtype=weight.dtype, ridge=ridge
        )
        return merged, self._bias(sums, bias)
