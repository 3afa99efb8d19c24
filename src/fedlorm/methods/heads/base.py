"""The interface every head strategy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

import torch
from torch import Tensor

from fedlorm.backbones import Backbone
from fedlorm.config import LormConfig
from fedlorm.methods.arrays import HEAD
from fedlorm.methods.base import Arrays, ClientData, Instruction
from fedlorm.methods.replies import ReplySpec

__all__ = ["HeadStrategy"]

Head = tuple[Tensor, Tensor]
"""A head's (weight, bias)."""


class HeadStrategy(ABC):
    """The head's part of a training round (summands, spec, solve) and, for strategies that fit
    the deployed head to features, an end-of-task ``head_stats`` step with its own state."""

    collects_features = False
    """Whether each task ends with a ``head_stats`` step whose sums build the deployed head."""

    supports_frozen_backbone = False
    """Whether a task without training rounds (past ``lorm.adapt_tasks``) still gets a correct head
    for its classes: the deployed head is solved from the ``head_stats`` sums alone, no trained rows."""

    def __init__(self, lorm: LormConfig, classes: int, features: int) -> None:
        self.lorm = lorm
        self.classes = classes
        self.features = features

    @property
    def gram_mode(self) -> str | None:
        """The head-input Gram clients collect in a training round (``full``/``diag``), or None."""
        return None

    def start_task(self, task: int, generator: torch.Generator) -> None:
        """Called when the server starts ``task``, after it drew the task's adapters from
        ``generator`` (the server's seeded stream); a strategy that needs randomness draws here."""
        return None

    @abstractmethod
    def summands(self, weight: Tensor, bias: Tensor, gram: Tensor | None, n: int) -> Arrays:
        """One client's head summands after a training round on ``n`` samples."""

    @abstractmethod
    def spec(self) -> ReplySpec:
        """What :meth:`summands` sends."""

    @abstractmethod
    def solve(self, sums: Arrays, weight: Tensor, bias: Tensor, *, ridge: float) -> Head:
        """The merged trained head from the summed replies (``weight``, ``bias``: the current one)."""

    def feature_summands(
        self, model: Backbone, data: ClientData, instruction: Instruction, *, batch_size: int, precision: str
    ) -> Arrays:
        """One client's sums for the ``head_stats`` step (only with :attr:`collects_features`)."""
        raise NotImplementedError(f"{type(self).__name__} has no head_stats step")

    def feature_spec(self, instruction: Instruction) -> ReplySpec:
        """What :meth:`feature_summands` sends."""
        raise NotImplementedError(f"{type(self).__name__} has no head_stats step")

    def fold_features(self, sums: Arrays, classes: range, like: Head) -> None:
        """Fold a ``head_stats`` step's sums in and re-solve the deployed head (shaped as ``like``)."""
        raise NotImplementedError(f"{type(self).__name__} has no head_stats step")

    def deployed(self) -> Head | None:
        """The head to deploy instead of the trained one; None: deploy the trained head."""
        return None

    def deployed_arrays(self, trained: Head) -> Arrays:
        """The deployed model's head arrays: :meth:`deployed`'s head, else ``trained``."""
        weight, bias = self.deployed() or trained
        return {f"{HEAD}.weight": weight, f"{HEAD}.bias": bias}

    def state_dict(self) -> Arrays:
        """The strategy's own state (checkpoint contract of :meth:`Server.state_dict`)."""
        return {}

    def load_state_dict(self, state: Mapping[str, Tensor], device: object) -> None:
        """Restore :meth:`state_dict` (copies; tensors the server deploys go to ``device``)."""
        return None
