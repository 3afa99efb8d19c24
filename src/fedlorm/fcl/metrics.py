"""FCIL metrics on the accuracy matrix R: R[t][j] = accuracy (%) on task j's test set after task t.

Hand-written on purpose: each metric is a few lines over R, and papers differ subtly (sample- vs
task-weighted averages, which rows the forgetting max runs over, 0- vs 1-based tasks). We follow
docs/design.md ("Metrics") exactly and store R and the test sizes n so any other variant can be
recomputed.
Tasks are 0-based here: row t is "after task t", and the last row is T-1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

__all__ = ["average_accuracy", "summarize"]

Matrix = Sequence[Sequence[float | None]]


def _check_sizes(n: Sequence[int]) -> list[int]:
    sizes = list(n)
    for j, v in enumerate(sizes):
        try:
            ok = not isinstance(v, (bool, str)) and float(v) == int(v) and int(v) >= 1
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise ValueError(f"test-set size n[{j}] must be a positive integer, got {v!r}")
    return [int(v) for v in sizes]


def _check_matrix(R: Matrix, num_rows: int | None = None) -> list[list[float]]:
    """Lower-triangular part of R as floats; row t may have t+1 entries or T (the rest ignored)."""
    rows = [list(r) for r in R]
    T = len(rows)
    if T == 0:
        raise ValueError("accuracy matrix is empty (no task has been evaluated)")
    if num_rows is not None and num_rows != T:
        raise ValueError(
            f"accuracy matrix has {T} rows but {num_rows} test-set sizes were given; "
            "they must describe the same tasks"
        )
    out: list[list[float]] = []
    for t, row in enumerate(rows):
        if len(row) not in (t + 1, T):
            raise ValueError(
                f"accuracy matrix is ragged: row {t} has {len(row)} entries, expected {t + 1} "
                f"(lower-triangular) or {T} (square)"
            )
        vals: list[float] = []
        for j in range(t + 1):
            v = row[j]
            if v is None:
                raise ValueError(f"R[{t}][{j}] is missing (None); every j <= t needs a value")
            try:
                x = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"R[{t}][{j}] = {v!r} is not a number") from None
            if not math.isfinite(x) or x < 0 or x > 100:
                raise ValueError(f"R[{t}][{j}] = {v!r} is not an accuracy in [0, 100] (percent)")
            vals.append(x)
        out.append(vals)
    return out


def _avg(row: list[float], n: list[int], weighting: str) -> float:
    if weighting == "samples":
        return sum(r * w for r, w in zip(row, n, strict=False)) / sum(n[: len(row)])
    if weighting == "tasks":
        return sum(row) / len(row)
    raise ValueError(f"weighting must be 'samples' or 'tasks', got {weighting!r}")


def average_accuracy(
    R: Matrix,
    n: Sequence[int],
    t: int,
    weighting: Literal["samples", "tasks"] = "samples",
) -> float:
    """A_t: accuracy on all classes seen after task t, weighted by test samples (paper) or by tasks.

    ``n`` may be longer than R (a run in progress knows every task's test size up front).
    """
    rows = _check_matrix(R)
    sizes = _check_sizes(n)
    if len(sizes) < len(rows):
        raise ValueError(f"accuracy matrix has {len(rows)} rows but only {len(sizes)} test sizes")
    if isinstance(t, bool) or not 0 <= t < len(rows):
        raise ValueError(f"task index t={t!r} out of range [0, {len(rows)})")
    return _avg(rows[t], sizes, weighting)


def summarize(R: Matrix, n: Sequence[int]) -> dict[str, Any]:
    """Headline FCIL numbers from R and test sizes n (docs/design.md, "Metrics").

    Forgetting and BWT are None when T = 1 (no earlier task to forget).
    """
    sizes = _check_sizes(n)
    rows = _check_matrix(R, num_rows=len(sizes))
    T = len(rows)
    per_task = [_avg(rows[t], sizes, "samples") for t in range(T)]
    last = rows[-1]
    if T > 1:
        # Chaudhry et al.: best accuracy on task j at any earlier point (rows j..T-2) minus final.
        forgetting: float | None = sum(
            max(rows[s][j] for s in range(j, T - 1)) - last[j] for j in range(T - 1)
        ) / (T - 1)
        bwt: float | None = sum(last[j] - rows[j][j] for j in range(T - 1)) / (T - 1)
    else:
        forgetting = bwt = None
    return {
        "final_accuracy": per_task[-1],
        "final_accuracy_task_mean": _avg(last, sizes, "tasks"),
        "average_incremental_accuracy": sum(per_task) / T,
        "forgetting": forgetting,
        "bwt": bwt,
        "accuracy_per_task": per_task,
    }
