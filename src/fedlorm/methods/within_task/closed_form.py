"""LoRM's within-task merge: alternating B- and A-rounds, each solved in closed form.

B-round (A shared): clients send M_i = B_i H_i and H_i = A G̃_i Aᵀ, the server solves
B = (Σ M_i)(Σ H_i)⁻¹. A-round (B shared): clients send N_i = A_i G̃_i and G̃_i, the server solves
A = (Σ N_i)(Σ G̃_i)⁻¹ (docs/design.md, "LoRM's alternating rounds").
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from fedlorm import merging
from fedlorm.adapters import LoRALayer
from fedlorm.methods import replies
from fedlorm.methods.base import Arrays
from fedlorm.methods.replies import ReplySpec, Summand
from fedlorm.methods.steps import Factor
from fedlorm.methods.within_task.base import ALTERNATE, LayerShape, WithinTaskMerge

__all__ = ["AlternatingClosedForm"]


@dataclass(frozen=True)
class AlternatingClosedForm(WithinTaskMerge):
    """Response matching of the round's factor with the other one shared (LoRM)."""

    schedule: tuple[Factor, ...] = ALTERNATE
    needs_grams = True

    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        assert gram is not None
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        if factor == Factor.B:
            M, H = merging.merge_b_summands(B, A, gram)
            return {f"{name}.M": M, f"{name}.H": H}
        N, G = merging.merge_a_summands(A, gram)
        return {f"{name}.N": N, f"{name}.G": G}

    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        if factor == Factor.B:
            H = replies.gram(shape.rank, full=True)  # A G̃ Aᵀ is a full r × r matrix even for diagonal G̃
            return {f"{name}.M": replies.value(shape.d_out, shape.rank), f"{name}.H": H}
        return {f"{name}.N": replies.value(shape.rank, shape.d_in), f"{name}.G": gram}

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
        if factor == Factor.B:
            B = merging.merge_b_solve(
                sums[f"{name}.M"], sums[f"{name}.H"], reference=B, dtype=A.dtype, ridge=ridge
            )
        else:
            A = merging.merge_a_solve(
                sums[f"{name}.N"], sums[f"{name}.G"], reference=A, dtype=A.dtype, ridge=ridge
            )
        return A, B
