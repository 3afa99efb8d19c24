"""Where a run stands and what it has measured so far: the loop state a runtime keeps and checkpoints."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RunProgress"]

_ADDED_LATER: dict[str, Any] = {"diverged": None}
"""Fields newer than some checkpoints, with the value a record without them stands for."""


@dataclass
class RunProgress:
    """Position (next task and step) plus the metrics of every completed step and task.

    ``matrix[t][j]`` and ``aware[t][j]`` are class-IL and task-aware accuracies after task t;
    ``rounds`` holds one metrics row per completed step; ``elapsed`` is the wall time of earlier
    sessions of a resumed run; ``diverged`` is the first training step whose loss showed that it
    diverged (:func:`fedlorm.runtime.report.note_divergence`), or None.
    """

    task: int = 0
    step: int = 0
    matrix: list[list[float]] = field(default_factory=list)
    aware: list[list[float]] = field(default_factory=list)
    diagnostics: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)
    upload_bytes: int = 0
    download_bytes: int = 0
    elapsed: float = 0.0
    diverged: dict[str, Any] | None = None

    def step_done(self, row: Mapping[str, Any]) -> None:
        """Record one completed step's metrics row and move to the next step."""
        self.rounds.append(dict(row))
        self.upload_bytes += int(row.get("upload_bytes") or 0)
        self.download_bytes += int(row.get("download_bytes") or 0)
        self.step += 1

    def task_done(
        self, class_il: list[float], task_aware: list[float], diagnostics: Mapping[str, Any]
    ) -> None:
        """Record the end-of-task evaluation and move to the first step of the next task."""
        self.matrix.append(list(class_il))
        self.aware.append(list(task_aware))
        self.diagnostics.append(dict(diagnostics))
        self.task += 1
        self.step = 0

    def to_record(self) -> dict[str, Any]:
        """Plain JSON-compatible form (checkpoints)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> RunProgress:
        """Inverse of :meth:`to_record`; ValueError on a record that is not one."""
        names = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(names - set(record) - set(_ADDED_LATER))
        if missing:
            raise ValueError(f"run progress record lacks {', '.join(missing)}")
        progress = cls(**{name: record.get(name, _ADDED_LATER.get(name)) for name in names})
        if not (isinstance(progress.task, int) and isinstance(progress.step, int)):
            raise ValueError(f"run progress position {progress.task!r}/{progress.step!r} is not integer")
        if len(progress.matrix) != progress.task:
            raise ValueError(
                f"run progress is at task {progress.task} but holds {len(progress.matrix)} matrix rows"
            )
        return progress
