"""The on-demand benchmarks stay runnable: their quick modes finish and report both sides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_quick(script: str, *args: str, timeout: int = 600) -> str:
    """stdout of ``benchmarks/SCRIPT --quick ARGS`` offline; the run must succeed."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--quick", *args],
        capture_output=True, text=True, timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_merge_benchmark_quick_mode_runs_and_agrees():
    stdout = run_quick("merge.py", timeout=300)
    assert "baseline" in stdout and "speed-up" in stdout


def test_traffic_benchmark_quick_mode_runs_and_reports_both_protocols():
    stdout = run_quick("traffic.py", "--threads", "1", timeout=300)
    assert "Acceptance: one client's whole run on cifar100-b0.1" in stdout
    assert "stats_model=reference (preset)" in stdout and "stats_model=trained" in stdout
    row = next(line for line in stdout.splitlines() if line.startswith("eurosat-b1.0"))
    assert float(row.split()[-1]) < 1e-6  # the broadcast's factors multiply out to the dense merge


@pytest.mark.slow
def test_train_step_benchmark_quick_mode_runs_and_both_sides_agree():
    stdout = run_quick("train_step.py", "--threads", "1", timeout=600)
    row = next(line for line in stdout.splitlines() if line.startswith("vit_tiny_patch16_224"))
    assert float(row.split()[2]) < 1e-5  # fedlorm's and peft's LoRA compute the same function
    assert "step time ratio fedlorm / peft" in stdout and "10 clients:" in stdout


def test_paper_step_benchmark_quick_mode_projects_a_wall_time():
    stdout = run_quick("paper_step.py", "--threads", "1", timeout=600)
    row = next(line for line in stdout.splitlines() if line.startswith("| 32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step, statistics, evaluation, speedup, hours = cells[1:]
    assert float(step) > 0 and float(statistics) > 0 and float(evaluation) > 0
    assert speedup == "1.00x" and float(hours) > 0
