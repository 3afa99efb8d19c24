"""``lorm.cross_task = task_arithmetic``: the deployed update is the sum of the task deltas."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlorm.methods.base import Arrays
from fedlorm.methods.cross_task.base import CrossTaskRule

__all__ = ["TaskArithmetic"]


class TaskArithmetic(CrossTaskRule):
    """ΔW = Σ_t ΔW_t; no statistics."""

    def fold(
        self,
        name: str,
        delta: Tensor,
        sums: Arrays | None,
        tasks: int,
        reference: Tensor | None,
        *,
        dtype: torch.dtype,
    ) -> Tensor:
        return self._add(self.P, name, delta).to(dtype, copy=True)

    def column_weights(self, name: str, rows: Tensor, tasks: int) -> Tensor:
        return rows
