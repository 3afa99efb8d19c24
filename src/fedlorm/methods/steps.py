"""What one protocol step is: its phase, the factor it trains, and the one name it goes by."""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedlorm.methods.base import Instruction

__all__ = ["Factor", "Phase", "step_label"]


class Phase(StrEnum):
    """The kind of a step; the values are the strings checkpoints and metrics.csv record."""

    TRAIN = "train"
    """Clients train and send the round's merge summands."""
    TASK_STATS = "task_stats"
    """Clients send the Grams of the adapted layers' inputs, for the cross-task merge."""
    HEAD_STATS = "head_stats"
    """Clients send their deployed features' sums, for the analytic head."""
    FISHER_STATS = "fisher_stats"
    """Clients send their summed squared per-sample gradients (diagonal Fisher), for EWC."""


class Factor(StrEnum):
    """What clients train in a step: LoRA factor(s), ``none`` (the head only, or no training) or
    ``prompts`` (a prompt pool and the head, no LoRA factor)."""

    A = "A"
    B = "B"
    BOTH = "both"
    NONE = "none"
    PROMPTS = "prompts"

    @property
    def trained(self) -> tuple[str, ...]:
        """The LoRA factor letters this value trains, e.g. ``("A", "B")`` for ``both``."""
        return {Factor.BOTH: ("A", "B"), Factor.NONE: (), Factor.PROMPTS: ()}.get(self, (self.value,))


_STEP_WORDS = {
    Phase.TASK_STATS: ("layer statistics", "stats"),
    Phase.HEAD_STATS: ("head statistics", "head"),
    Phase.FISHER_STATS: ("Fisher statistics", "fisher"),
}
"""Non-training phases: (readable label, word in the stable id)."""

_TRAINS = {Factor.A: "A", Factor.B: "B", Factor.BOTH: "A+B", Factor.NONE: "head", Factor.PROMPTS: "prompts"}


def step_label(instruction: Instruction, *, stable: bool = False) -> str:
    """The step's name within its task, e.g. ``round 2 (A)`` or ``head statistics`` (progress bar,
    logs); ``stable``: its 0-based id in the run, e.g. ``task1.round0`` or ``task0.head``
    (checkpoints, kill points), unique per step."""
    phase, task = instruction.phase, instruction.task
    if phase is Phase.TRAIN:
        if stable:
            return f"task{task}.round{instruction.round}"
        return f"round {instruction.round + 1} ({_TRAINS[instruction.factor]})"
    label, word = _STEP_WORDS[phase]
    return f"task{task}.{word}" if stable else label
