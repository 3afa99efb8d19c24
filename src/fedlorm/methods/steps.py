"""What one protocol step is: its phase, the factor it trains, the instruction that carries both to
the clients, and the one name the step goes by."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["Factor", "Instruction", "Phase", "step_label"]


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


@dataclass(frozen=True)
class Instruction:
    """What the server asks of every client in one step; flat, so it travels as a config record.

    ``phase`` and ``factor`` may be given as their strings; they are stored as the enums.
    ``round`` is the training round, -1 for the end-of-task statistics steps.
    """

    task: int
    round: int
    phase: Phase
    factor: Factor
    class_start: int
    class_stop: int

    def __post_init__(self) -> None:
        object.__setattr__(self, "phase", Phase(self.phase))
        object.__setattr__(self, "factor", Factor(self.factor))

    def to_record(self) -> dict[str, int | str]:
        """Plain key/value form (Flower ConfigRecord, checkpoints); enums as their plain strings."""
        return {
            "task": self.task,
            "round": self.round,
            "phase": self.phase.value,
            "factor": self.factor.value,
            "class_start": self.class_start,
            "class_stop": self.class_stop,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, int | str]) -> Instruction:
        """Inverse of :meth:`to_record`; ValueError on an unknown phase or factor."""
        return cls(
            task=int(record["task"]),
            round=int(record["round"]),
            phase=Phase(str(record["phase"])),
            factor=Factor(str(record["factor"])),
            class_start=int(record["class_start"]),
            class_stop=int(record["class_stop"]),
        )

    @property
    def classes(self) -> range:
        """Class positions of the current task (the only logits the local loss sees)."""
        return range(self.class_start, self.class_stop)


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
