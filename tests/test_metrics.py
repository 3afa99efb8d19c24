"""FCIL metrics on hand-made accuracy matrices, checked against hand arithmetic.

The definitions are those of docs/design.md, "Metrics".
"""

import math

import numpy as np
import pytest

from fedlorm.fcl import average_accuracy, summarize

# Three tasks with unequal test sets, so sample-weighted and task-mean averages differ.
# Task 0 is learned to 90, *improves* to 95 after task 1, then drops to 60: forgetting uses the
# best earlier value (95), BWT the value right after learning (90).
R3 = [
    [90.0],
    [95.0, 80.0],
    [60.0, 75.0, 85.0],
]
N3 = [100, 50, 50]


def test_average_accuracy_sample_weighted_and_task_mean():
    assert average_accuracy(R3, N3, 0) == pytest.approx(90.0)
    # (100·95 + 50·80) / 150 = 13500 / 150 = 90.0 ; task mean (95 + 80) / 2 = 87.5
    assert average_accuracy(R3, N3, 1) == pytest.approx(90.0)
    assert average_accuracy(R3, N3, 1, weighting="tasks") == pytest.approx(87.5)
    # (100·60 + 50·75 + 50·85) / 200 = (6000 + 3750 + 4250) / 200 = 70.0
    assert average_accuracy(R3, N3, 2) == pytest.approx(70.0)
    # (60 + 75 + 85) / 3 = 220 / 3
    assert average_accuracy(R3, N3, 2, weighting="tasks") == pytest.approx(220 / 3)


def test_summarize_three_tasks():
    s = summarize(R3, N3)
    assert s["accuracy_per_task"] == pytest.approx([90.0, 90.0, 70.0])
    assert s["final_accuracy"] == pytest.approx(70.0)
    assert s["final_accuracy_task_mean"] == pytest.approx(220 / 3)
    # (90 + 90 + 70) / 3 = 250 / 3
    assert s["average_incremental_accuracy"] == pytest.approx(250 / 3)
    # j=0: max(90, 95) − 60 = 35 ; j=1: max(80) − 75 = 5  → (35 + 5) / 2 = 20
    assert s["forgetting"] == pytest.approx(20.0)
    # j=0: 60 − 90 = −30 ; j=1: 75 − 80 = −5  → −35 / 2 = −17.5
    assert s["bwt"] == pytest.approx(-17.5)
    assert isinstance(s["final_accuracy"], float)


def test_summarize_equal_sizes_weightings_agree():
    s = summarize(R3, [40, 40, 40])
    # equal n: both finals are (60 + 75 + 85) / 3
    assert s["final_accuracy"] == pytest.approx(s["final_accuracy_task_mean"])
    assert s["final_accuracy"] == pytest.approx(220 / 3)


def test_single_task():
    s = summarize([[42.5]], [10])
    assert s["final_accuracy"] == s["final_accuracy_task_mean"] == pytest.approx(42.5)
    assert s["average_incremental_accuracy"] == pytest.approx(42.5)
    assert s["forgetting"] is None and s["bwt"] is None
    assert s["accuracy_per_task"] == [42.5]


def test_square_matrix_upper_triangle_ignored():
    square = np.array([[90, np.nan, np.nan], [95, 80, np.nan], [60, 75, 85]], dtype=float)
    assert summarize(square, np.array(N3)) == summarize(R3, N3)
    rows_with_none = [[90, None, None], [95, 80, None], [60, 75, 85]]
    assert summarize(rows_with_none, N3)["forgetting"] == pytest.approx(20.0)


def test_run_in_progress_with_all_sizes():
    # Two tasks evaluated out of three: average_accuracy accepts the longer n.
    assert average_accuracy(R3[:2], N3, 1) == pytest.approx(90.0)


@pytest.mark.parametrize(
    ("R", "n", "match"),
    [
        ([[90.0], [95.0]], [1, 1], "ragged"),
        ([[90.0, 1.0, 2.0], [95.0, 80.0]], [1, 1], "ragged"),
        ([[90.0], [-1.0, 80.0]], [1, 1], r"R\[1\]\[0\]"),
        ([[100.5]], [1], r"\[0, 100\]"),
        ([[math.nan]], [1], r"\[0, 100\]"),
        ([[50.0], [None, 60.0]], [1, 1], "missing"),
        ([[50.0], [40.0, 60.0]], [1, 1, 1], "3 test-set sizes"),
        ([[50.0], [40.0, 60.0]], [1], "1 test-set sizes"),
        ([[50.0]], [0], "positive integer"),
        ([[50.0]], [2.5], "positive integer"),
        ([], [], "empty"),
    ],
)
def test_validation_errors(R, n, match):
    with pytest.raises(ValueError, match=match):
        summarize(R, n)


def test_average_accuracy_errors():
    with pytest.raises(ValueError, match="out of range"):
        average_accuracy(R3, N3, 3)
    with pytest.raises(ValueError, match="out of range"):
        average_accuracy(R3, N3, -1)
    with pytest.raises(ValueError, match="weighting"):
        average_accuracy(R3, N3, 1, weighting="classes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="only 2 test sizes"):
        average_accuracy(R3, N3[:2], 0)
