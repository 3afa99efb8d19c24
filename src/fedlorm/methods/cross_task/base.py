"""The interface every cross-task rule implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from fedlorm.config import LormConfig
from fedlorm.methods.base import Arrays
from fedlorm.methods.replies import ReplySpec, Summand

__all__ = ["CrossTaskRule"]


class CrossTaskRule(ABC):
    """Folds task deltas into the deployed ΔW, keeping the running sums ``P`` (and ``Q``) per layer.

    Where the deployed update has the factor form ΔW = Σ_t s·B_t A_t diag(w_t), the server keeps
    each task's coefficient row p_t (:meth:`task_row`) and asks :meth:`column_weights` for the w_t.
    """

    needs_statistics = False
    """Whether each task ends with a ``task_stats`` step (the layers' input Grams)."""

    def __init__(self, ridge: float) -> None:
        self.ridge = ridge
        self.P: dict[str, Tensor] = {}
        self.Q: dict[str, Tensor] = {}

    @classmethod
    def from_config(cls, lorm: LormConfig) -> CrossTaskRule:
        """The rule with the run's settings (``lorm.ridge``; a rule with its own keys reads them too)."""
        return cls(lorm.ridge)

    def factored(self, alpha_backbone: float) -> bool:
        """Whether the deployed ΔW is Σ_t s·B_t A_t diag(w_t) (sent as a factor pair)."""
        return True

    def summands(self, name: str, gram: Tensor) -> Arrays:
        """One client's ``task_stats`` reply for layer ``name`` (only with :attr:`needs_statistics`)."""
        raise NotImplementedError(f"{type(self).__name__} has no task_stats step")

    def spec(self, name: str, gram: Summand) -> ReplySpec:
        """What :meth:`summands` sends."""
        raise NotImplementedError(f"{type(self).__name__} has no task_stats step")

    def task_row(self, name: str, sums: Arrays | None, d_in: int, device: torch.device) -> Tensor:
        """The task's coefficient row p_t (d_in, float64): all ones unless the rule weighs features."""
        return torch.ones(d_in, dtype=torch.float64, device=device)

    @abstractmethod
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
        """Add task delta ``delta`` (float64) of layer ``name`` to the sums; return the deployed ΔW.

        ``sums``: the ``task_stats`` step's summed replies (None without one); ``tasks``: how many
        tasks are folded, this one included; ``reference``: the deployed ΔW so far, if any.
        """

    @abstractmethod
    def column_weights(self, name: str, rows: Tensor, tasks: int) -> Tensor:
        """The w_t (T × d_in) with ΔW = Σ_t s·B_t A_t diag(w_t), from the task rows p_t."""

    def _add(self, table: dict[str, Tensor], name: str, value: Tensor) -> Tensor:
        table[name] = value if name not in table else table[name] + value
        return table[name]

    def state_dict(self) -> Arrays:
        """P and Q per layer, as ``P.{layer}``, ``Q.{layer}``."""
        return {
            f"{prefix}.{name}": v for prefix, t in (("P", self.P), ("Q", self.Q)) for name, v in t.items()
        }

    def load_state_dict(self, state: Mapping[str, Tensor], names: list[str], device: torch.device) -> None:
        """Restore :meth:`state_dict` for layers ``names`` (copies on ``device``)."""
        for prefix, table in (("P", self.P), ("Q", self.Q)):
            table.clear()
            for name in names:
                if f"{prefix}.{name}" in state:
                    table[name] = state[f"{prefix}.{name}"].to(device, copy=True)
