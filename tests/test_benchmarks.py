"""The on-demand benchmarks stay runnable: their quick modes finish and report both sides."""

from __future__ import annotations

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
