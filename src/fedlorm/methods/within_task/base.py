"""The interface every within-task client merge implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.methods.base import Arrays, ClientData, Instruction
from fedlorm.methods.replies import ReplySpec, Summand
from fedlorm.methods.steps import Factor

__all__ = ["ALTERNATE", "LayerShape", "WithinTaskMerge"]

ALTERNATE = (Factor.B, Factor.A)
"""B, A, B, … (B first: with B = 0 at a task's start, A has no gradient)."""


class LayerShape(NamedTuple):
    """An adapted layer's sizes: W is d_out × d_in, the adapter has rank r."""

    d_out: int
    d_in: int
    rank: int


@dataclass(frozen=True)
class WithinTaskMerge(ABC):
    """One within-task merge of the clients' LoRA factors.

    ``schedule``: the factor(s) trained in rounds 0, 1, … (cycled). Every summand is additive, so
    a rule runs unchanged in both runtimes and under secure aggregation.
    """

    schedule: tuple[Factor, ...]

    needs_grams = False
    """Whether clients collect the adapted layers' input Grams in a training round."""

    def factor(self, round_index: int) -> Factor:
        """The factor(s) clients train in round ``round_index``."""
        return self.schedule[round_index % len(self.schedule)]

    @property
    def trains_adapters(self) -> bool:
        """Whether any round trains a LoRA factor (head-only trains none)."""
        return any(f is not Factor.NONE for f in self.schedule)

    @abstractmethod
    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        """One client's additive reply for layer ``name`` after training ``factor`` on ``n`` samples."""

    def data_summands(
        self,
        model: Backbone,
        layers: Mapping[str, LoRALayer],
        data: ClientData,
        instruction: Instruction,
        *,
        batch_size: int,
    ) -> Arrays:
        """Summands that need the client's data after training (e.g. a Fisher), for every layer at
        once; sent besides :meth:`summands` (none by default). :meth:`spec` declares them too."""
        return {}

    @abstractmethod
    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        """What :meth:`summands` sends; ``gram`` is the layer's input Gram as the run shrinks it."""

    @abstractmethod
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
