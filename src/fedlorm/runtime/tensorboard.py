"""TensorBoard scalars of a run (``train.tensorboard``): every metrics.csv row and every task's accuracy.

Written with torch's ``SummaryWriter`` (the ``tensorboard`` extra) to ``OUT/tensorboard``; the x axis
is the step's index in the run (1-based), so a resumed run continues the curves where its checkpoint
left them and drops what the killed session wrote after it. metrics.csv and results.json stay the
record; these files are for looking at a run while it goes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlorm.config import ConfigError

__all__ = ["TENSORBOARD_DIR", "RunBoard", "open_board"]

TENSORBOARD_DIR = "tensorboard"

_STEP_SCALARS = (
    "train_loss",
    "seen_accuracy",
    "step_seconds",
    "merge_seconds",
    "eval_seconds",
    "upload_bytes",
    "download_bytes",
    "rejected",
)
"""The metrics.csv columns written per step, under ``step/NAME``."""


class RunBoard:
    """A TensorBoard event writer for one run session."""

    def __init__(self, out: Path, first_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed session drops the events a killed session wrote after its checkpoint.
        self.writer = SummaryWriter(str(out / TENSORBOARD_DIR), purge_step=first_step + 1)

    def step(self, index: int, row: Mapping[str, Any]) -> None:
        """The metrics row of the run's ``index``-th step (1-based); empty or textual values are skipped."""
        for name in _STEP_SCALARS:
            value = row.get(name, "")
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(f"step/{name}", value, index)

    def task(self, index: int, task: int, accuracies: Sequence[float], seen: float) -> None:
        """After task ``task`` (0-based) ended at step ``index``: accuracy on seen classes and per task."""
        self.writer.add_scalar("task/seen_accuracy", seen, task + 1)
        for j, accuracy in enumerate(accuracies):
            self.writer.add_scalar(f"task_accuracy/task_{j + 1}", accuracy, index)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()


def open_board(enabled: bool, out: Path | None, first_step: int) -> RunBoard | None:
    """A :class:`RunBoard` if ``enabled`` and the run has an output directory; ConfigError (one line)
    if the ``tensorboard`` package is missing."""
    if not enabled or out is None:
        return None
    try:
        import tensorboard  # noqa: F401  (torch's writer needs it)
    except ImportError:
        raise ConfigError(
            "train.tensorboard = true needs the tensorboard package: pip install 'fedlorm[tensorboard]'"
        ) from None
    return RunBoard(out, first_step)
