"""``fedavg-product``: the exact sample-weighted mean of the products s·B_iA_i, back to rank r by SVD."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlorm import merging
from fedlorm.adapters import LoRALayer
from fedlorm.methods.base import Arrays
from fedlorm.methods.replies import ReplySpec, Summand, value
from fedlorm.methods.steps import Factor
from fedlorm.methods.within_task.base import LayerShape, WithinTaskMerge

__all__ = ["ProductAverage"]


@dataclass(frozen=True)
class ProductAverage(WithinTaskMerge):
    """ΔW = Σ n_i s·B_iA_i / Σ n_i, then the balanced rank-r factors (``merging.low_rank_factors``)."""

    schedule: tuple[Factor, ...] = (Factor.BOTH,)

    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        return {f"{name}.nBA": n * layer_delta(layer)}

    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        return {f"{name}.nBA": value(shape.d_out, shape.d_in)}

    def solve(
        self,
        name: str,
        factor: Factor,
        sums: Arrays,
        n: Tensor,
        A: Tensor,
        B: Tensor,
        *,
        scaling: float,
        ridge: float,
    ) -> tuple[Tensor, Tensor]:
        return to_rank(sums[f"{name}.nBA"] / n, A, scaling=scaling)


def layer_delta(layer: LoRALayer) -> Tensor:
    """The layer's s·B A in float64."""
    return layer.scaling * (layer.lora_B.detach().to(torch.float64) @ layer.lora_A.detach().to(torch.float64))


def to_rank(delta: Tensor, A: Tensor, *, scaling: float) -> tuple[Tensor, Tensor]:
    """(A, B) of A's rank and dtype whose s·B A is the best approximation of ``delta``."""
    B_new, A_new = merging.low_rank_factors(delta / scaling, A.shape[0])
    return A_new.to(A.dtype), B_new.to(A.dtype)
