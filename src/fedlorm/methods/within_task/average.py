"""Sample-weighted averages of the trained factors: FedIT (``fedavg``), FFA-LoRA (``ffa``),
``lorm-avg`` (LoRM's alternation, averaged) and ``head-only`` (no factor trained)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.methods.base import Arrays
from fedlorm.methods.replies import ReplySpec, Summand, value
from fedlorm.methods.steps import Factor
from fedlorm.methods.within_task.base import LayerShape, WithinTaskMerge

__all__ = ["FactorAverage"]


@dataclass(frozen=True)
class FactorAverage(WithinTaskMerge):
    """Each trained factor becomes Σ n_i X_i / Σ n_i; clients send n_i·X_i."""

    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        factors = {"A": layer.lora_A.detach(), "B": layer.lora_B.detach()}
        return {f"{name}.n{f}": n * factors[f].to(torch.float64) for f in Factor(factor).trained}

    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        shapes = {"A": (shape.rank, shape.d_in), "B": (shape.d_out, shape.rank)}
        return {f"{name}.n{f}": value(*shapes[f]) for f in Factor(factor).trained}

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
        dtype = A.dtype
        if "A" in Factor(factor).trained:
            A = (sums[f"{name}.nA"] / n).to(dtype)
        if "B" in Factor(factor).trained:
            B = (sums[f"{name}.nB"] / n).to(dtype)
        return A, B
