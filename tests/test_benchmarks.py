"""The on-demand benchmarks stay runnable: their quick modes finish and report both sides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_merge_benchmark_quick_mode_runs_and_agrees():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "merge.py"), "--quick"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "baseline" in proc.stdout and "speed-up" in proc.stdout


def test_traffic_benchmark_quick_mode_runs_and_reports_both_protocols():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "traffic.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert "Acceptance: one client's whole run on cifar100-b0.1" in proc.stdout
    assert "stats_model=reference (preset)" in proc.stdout and "stats_model=trained" in proc.stdout
    row = next(line for line in proc.stdout.splitlines() if line.startswith("eurosat-b1.0"))
    assert float(row.split()[-1]) < 1e-6  # the broadcast's factors multiply out to the dense merge


def test_train_step_benchmark_quick_mode_runs_and_both_sides_agree():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "train_step.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("vit_tiny_patch16_224"))
    assert float(row.split()[2]) < 1e-5  # fedlorm's and peft's LoRA compute the same function
    assert "step time ratio fedlorm / peft" in proc.stdout and "10 clients:" in proc.stdout


def test_paper_step_benchmark_quick_mode_projects_a_wall_time():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "paper_step.py"), "--quick", "--threads", "1"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| 32 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    step, statistics, evaluation, speedup, hours = cells[1:]
    assert float(step) > 0 and float(statistics) > 0 and float(evaluation) > 0
    assert speedup == "1.00x" and float(hours) > 0
