"""``lorm.cross_task = ties``: TIES-merging (Yadav et al. 2023) of the task deltas ΔW_t.

Per layer and task, trim ΔW_t to its top ``lorm.ties_density`` share of entries by magnitude;
elect each entry's sign as the sign of the trimmed deltas' sum; average, per entry, only the
trimmed values that agree with the elected sign (the disjoint mean); scale by ``lorm.ties_scale``.
Trimming is per layer (per parameter tensor, as peft's ``ties`` merge does), since the rule folds
one layer at a time. Every fold re-merges all tasks so far, so the rule keeps each task's dense
ΔW_t (float64, T·d_out·d_in numbers per layer, in ``P`` and in checkpoints). The merged update is
elementwise, not a sum of the tasks' factor products, so it is deployed and broadcast dense
(``fixed_delta``); ``model/`` stays exact because export writes a dense frozen update as an exact
identity factorisation (:func:`fedlorm.adapters.peft_io.deployed_factors`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlorm.config import LormConfig
from fedlorm.methods.base import Arrays
from fedlorm.methods.cross_task.base import CrossTaskRule

__all__ = ["TiesMerge", "ties_merge", "trim"]


def trim(delta: Tensor, density: float) -> Tensor:
    """``delta`` with all but its round(density·numel) (at least 1) largest-magnitude entries zeroed."""
    flat = delta.reshape(-1)
    keep = max(1, round(density * flat.numel()))
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return torch.where(mask, flat, torch.zeros_like(flat)).reshape(delta.shape)


def ties_merge(deltas: Tensor, density: float, scale: float) -> Tensor:
    """TIES merge of the stacked task deltas (T × …): trim, elect signs, disjoint mean, scale."""
    trimmed = torch.stack([trim(d, density) for d in deltas])
    sign = torch.sign(trimmed.sum(dim=0))
    agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
    total = torch.where(agree, trimmed, torch.zeros_like(trimmed)).sum(dim=0)
    count = agree.sum(dim=0)
    mean = torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))
    return scale * mean


class TiesMerge(CrossTaskRule):
    """ΔW = λ·TIES(ΔW_1, …, ΔW_T); no statistics; keeps every task's ΔW_t in ``P``."""

    def __init__(self, ridge: float, density: float = 0.2, scale: float = 1.0) -> None:
        super().__init__(ridge)
        self.density = density
        self.scale = scale

    @classmethod
    def from_config(cls, lorm: LormConfig) -> TiesMerge:
        return cls(lorm.ridge, lorm.ties_density, lorm.ties_scale)

    def factored(self, alpha_backbone: float) -> bool:
        return False  # trimming and sign election act per entry: no Σ_t s·B_t A_t diag(w_t) form

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
        stack = delta[None] if name not in self.P else torch.cat([self.P[name], delta[None]])
        self.P[name] = stack
        return ties_merge(stack, self.density, self.scale).to(dtype)

    def column_weights(self, name: str, rows: Tensor, tasks: int) -> Tensor:
        raise NotImplementedError("the TIES merge has no factor form")
