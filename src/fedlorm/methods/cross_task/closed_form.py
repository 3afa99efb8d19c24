"""``lorm.cross_task = closed_form``: response matching across tasks, ΔW = (Σ_t ΔW_t G̃_t)(Σ_t G̃_t)⁻¹."""

from __future__ import annotations

import torch
from torch import Tensor

from fedlorm import merging
from fedlorm.methods.base import Arrays
from fedlorm.methods.cross_task.base import CrossTaskRule
from fedlorm.methods.replies import ReplySpec, Summand

__all__ = ["ClosedFormTasks"]


class ClosedFormTasks(CrossTaskRule):
    """P += ΔW_t G̃_t, Q += G̃_t, ΔW = P Q⁻¹; clients send G̃_t at each task's end (``task_stats``).

    With diagonal statistics ΔW = Σ_t s·B_t A_t diag(g_t / q) (0 where q = 0): a factor pair.
    """

    needs_statistics = True

    def factored(self, alpha_backbone: float) -> bool:
        return alpha_backbone == 0  # full statistics mix input features: no factor form

    def summands(self, name: str, gram: Tensor) -> Arrays:
        return {f"{name}.G": gram}

    def spec(self, name: str, gram: Summand) -> ReplySpec:
        return {f"{name}.G": gram}

    def task_row(self, name: str, sums: Arrays | None, d_in: int, device: torch.device) -> Tensor:
        assert sums is not None
        return sums[f"{name}.G"].to(device, torch.float64)

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
        assert sums is not None
        p, q = merging.merge_tasks_summands(delta, sums[f"{name}.G"])
        Q = self._add(self.Q, name, q)
        P = self._add(self.P, name, p)
        return merging.merge_tasks_solve(P, Q, reference=reference, dtype=dtype, ridge=self.ridge)

    def column_weights(self, name: str, rows: Tensor, tasks: int) -> Tensor:
        # Diagonal statistics: ΔW = P diag(Q)⁻¹, merging._solve_right's rule (unseen columns 0).
        q = self.Q[name].to(rows.device)
        seen = q > 0
        return torch.where(seen, rows / torch.where(seen, q, torch.ones_like(q)), torch.zeros_like(rows))
