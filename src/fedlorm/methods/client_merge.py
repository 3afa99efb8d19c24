"""Within-task client merges of LoRA factors: LoRM's closed form and the baselines it is compared with.

A rule fixes which factor the clients train in each round and how the server turns the summed replies
into the next global (A, B). All replies are additive (every key below is a sum over clients), so each
rule runs unchanged in both runtimes and under secure aggregation:

=================  ===========  ====================================================================
method             trains       client sends (per layer)              server computes
=================  ===========  ====================================================================
``lorm``           B, A, B, …   B: B_iH_i, H_i; A: A_iG̃_i, G̃_i       closed form (docs/design.md)
``lorm-avg``       B, A, B, …   n_i·B_i or n_i·A_i                    sample-weighted mean
``fedavg``         A and B      n_i·A_i, n_i·B_i                      means of A and B (FedIT)
``ffa``            B only       n_i·B_i (A frozen at its init)        mean of B (FFA-LoRA)
``fedavg-product`` A and B      n_i·B_iA_i                            mean product, SVD to rank r
``regmean``        A and B      B_iA_iG̃_i, G̃_i                       RegMean on ΔW_i, SVD to rank r
``head-only``      nothing      (only the head)                       the pretrained backbone stays
``lorm-fsa``       as ``lorm``  as ``lorm``, first task only          later tasks: analytic head only
=================  ===========  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from fedlorm import merging
from fedlorm.adapters import LoRALayer
from fedlorm.methods.base import Arrays, Factor, ReplySpec

__all__ = ["CLIENT_MERGES", "ClientMerge"]

_F64 = torch.float64


@dataclass(frozen=True)
class ClientMerge:
    """One within-task merge: the per-round factor schedule and the aggregation rule.

    ``adapt_tasks``: how many tasks train the adapters (None: every task; ``lorm.adapt_tasks``
    overrides it).
    """

    schedule: Literal["alternate", "both", "B", "none"]
    rule: Literal["closed_form", "average", "product", "regmean"]
    adapt_tasks: int | None = None

    def factor(self, round_index: int) -> Factor:
        """The factor(s) clients train in round ``round_index`` (B first: B = 0 gives A no gradient)."""
        if self.schedule == "alternate":
            return "B" if round_index % 2 == 0 else "A"
        return self.schedule

    @property
    def needs_grams(self) -> bool:
        """Whether clients must collect the adapted layers' input statistics in a training round."""
        return self.rule in ("closed_form", "regmean")

    def summands(
        self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int
    ) -> Arrays:
        """One client's additive reply for layer ``name`` after training ``factor``."""
        A, B = layer.lora_A.detach(), layer.lora_B.detach()
        if factor == "none":
            return {}
        if self.rule == "closed_form":
            assert gram is not None
            if factor == "B":
                M, H = merging.merge_b_summands(B, A, gram)
                return {f"{name}.M": M, f"{name}.H": H}
            N, G = merging.merge_a_summands(A, gram)
            return {f"{name}.N": N, f"{name}.G": G}
        if self.rule == "average":
            return {f"{name}.n{f}": n * X.to(_F64) for f, X in (("A", A), ("B", B)) if f in _trained(factor)}
        delta = layer.scaling * (B.to(_F64) @ A.to(_F64))
        if self.rule == "product":
            return {f"{name}.nBA": n * delta}
        assert gram is not None
        WG, G = merging.regmean_summands(delta, gram)
        return {f"{name}.WG": WG, f"{name}.G": G}

    def spec(
        self, name: str, shape: tuple[int, int, int], factor: Factor, gram: tuple[int, ...]
    ) -> ReplySpec:
        """Keys, shapes and dtypes of :meth:`summands` for a (d_out, d_in, rank) layer."""
        d_out, d_in, rank = shape
        if factor == "none":
            return {}
        if self.rule == "closed_form":
            if factor == "B":
                return {f"{name}.M": ((d_out, rank), _F64), f"{name}.H": ((rank, rank), _F64)}
            return {f"{name}.N": ((rank, d_in), _F64), f"{name}.G": (gram, _F64)}
        if self.rule == "average":
            shapes = {"A": (rank, d_in), "B": (d_out, rank)}
            return {f"{name}.n{f}": (shapes[f], _F64) for f in _trained(factor)}
        if self.rule == "product":
            return {f"{name}.nBA": ((d_out, d_in), _F64)}
        return {f"{name}.WG": ((d_out, d_in), _F64), f"{name}.G": (gram, _F64)}

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
        """The new global (A, B) of layer ``name`` from the summed replies (``n`` = Σ n_i)."""
        dtype = A.dtype
        if factor == "none":
            return A, B
        if self.rule == "closed_form":
            if factor == "B":
                B = merging.merge_b_solve(
                    sums[f"{name}.M"], sums[f"{name}.H"], reference=B, dtype=dtype, ridge=ridge
                )
            else:
                A = merging.merge_a_solve(
                    sums[f"{name}.N"], sums[f"{name}.G"], reference=A, dtype=dtype, ridge=ridge
                )
            return A, B
        if self.rule == "average":
            if "A" in _trained(factor):
                A = (sums[f"{name}.nA"] / n).to(dtype)
            if "B" in _trained(factor):
                B = (sums[f"{name}.nB"] / n).to(dtype)
            return A, B
        if self.rule == "product":
            delta = sums[f"{name}.nBA"] / n
        else:
            current = scaling * (B.to(_F64) @ A.to(_F64))
            delta = merging.regmean_solve(
                sums[f"{name}.WG"], sums[f"{name}.G"], reference=current, ridge=ridge
            )
        B_new, A_new = merging.low_rank_factors(delta / scaling, A.shape[0])
        return A_new.to(dtype), B_new.to(dtype)


def _trained(factor: Factor) -> tuple[str, ...]:
    return {"both": ("A", "B"), "none": ()}.get(factor, (factor,))


CLIENT_MERGES: dict[str, ClientMerge] = {
    "lorm": ClientMerge("alternate", "closed_form"),
    "lorm-avg": ClientMerge("alternate", "average"),
    "fedavg": ClientMerge("both", "average"),
    "ffa": ClientMerge("B", "average"),
    "fedavg-product": ClientMerge("both", "product"),
    "regmean": ClientMerge("both", "regmean"),
    "head-only": ClientMerge("none", "average"),
    # First-session adaptation: LoRM on the first task only; later tasks only add their classes to
    # the analytic head through a backbone that no longer moves, so no class's sums go stale.
    "lorm-fsa": ClientMerge("alternate", "closed_form", adapt_tasks=1),
}
"""Method name → its within-task merge; all share LoRM's task structure and cross-task merge."""
