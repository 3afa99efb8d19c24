"""``regmean``: RegMean on the clients' full updates ΔW_i = s·B_iA_i, back to rank r by SVD."""

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
from fedlorm.methods.within_task.product import layer_delta, to_rank

__all__ = ["DeltaRegMean"]


@dataclass(frozen=True)
class DeltaRegMean(WithinTaskMerge):
    """ΔW = (Σ ΔW_i G̃_i)(Σ G̃_i)⁻¹, then the balanced rank-r factors; clients send ΔW_i G̃_i, G̃_i."""

    schedule: tuple[Factor, ...] = (Factor.BOTH,)
    needs_grams = True

    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        assert gram is not None
        WG, G = merging.regmean_summands(layer_delta(layer), gram)
        return {f"{name}.WG": WG, f"{name}.G": G}

    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        return {f"{name}.WG": value(shape.d_out, shape.d_in), f"{name}.G": gram}

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
        current = scaling * (B.to(torch.float64) @ A.to(torch.float64))
        delta = merging.regmean_solve(sums[f"{name}.WG"], sums[f"{name}.G"], reference=current, ridge=ridge)
        return to_rank(delta, A, scaling=scaling)
