"""The ``fedlorm`` command: a real run, and bad input as one line with exit code 2, nothing written."""

from __future__ import annotations

import json
import logging
import math
import os
import subprocess
import sys

import pytest
from conftest import TINY

from fedlorm.cli import _build_parser, main
from fedlorm.logs import log_level
from fedlorm.presets import PRESETS


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_presets_lists_every_preset(capsys):
    code, out, _ = _run(capsys, "presets")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines if not line.startswith(" ")] == list(PRESETS)
    validated = [line.split()[2].rstrip(":") for line in lines if line.strip().startswith("validated for")]
    assert validated == [m for p in PRESETS.values() for m in p.validated]


def test_run_writes_results_and_refuses_to_overwrite(capsys, tmp_path):
    out_dir = tmp_path / "run"
    code, out, err = _run(capsys, "run", "--quiet", "--seed", "3", "--out", str(out_dir), *TINY)
    assert code == 0, err
    assert "final acc" in out
    results = json.loads((out_dir / "results.json").read_text())
    assert results["seed"] == 3 and results["config"]["seed"] == 3
    assert f"model: {out_dir / 'model'}" in out
    assert json.loads((out_dir / "model" / "model.json").read_text())["seed"] == 3
    before = _files(out_dir)
    assert {"results.json", "model/model.json", "model/adapter_model.safetensors"} <= set(before)
    code, _, err = _run(capsys, "run", "--quiet", "--out", str(out_dir), *TINY)
    assert code == 2
    assert "already holds results" in err and "--overwrite" in err
    assert _files(out_dir) == before


def _files(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--preset", "nope"], "preset 'nope' is unknown"),
        (["--method", "nope"], "method 'nope' is unknown"),
        (["model.backbone=not_a_model"], "not_a_model"),
        (["data.datasets=nope"], "nope"),
        (["scenario.beta=0"], "scenario.beta = 0.0"),
        (["model.rank=0"], "model.rank = 0"),
        (["train.rounds=0"], "train.rounds = 0"),
        (["scenario.num_clients=30"], "clients"),
        (["data.root=/does/not/exist"], "/does/not/exist"),
        (["train.roundz=2"], "unknown config key 'train.roundz'"),
        (["--config", "/does/not/exist.toml"], "does not exist"),
        (["--seed", "x"], "invalid int value"),
        (["model.weights=/does/not/exist.pth"], "/does/not/exist.pth"),
    ],
)
def test_bad_input_is_one_line_exit_2_and_writes_nothing(capsys, tmp_path, args, fragment):
    out_dir = tmp_path / "out"
    code, _, err = _run(capsys, "run", "--quiet", "--out", str(out_dir), *TINY, *args)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fedlorm: error: "), err
    assert fragment in lines[0]
    assert not out_dir.exists()


def test_console_script_exit_code_and_no_traceback(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "fedlorm", "run", "--out", str(tmp_path / "o"), "scenario.beta=-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert (
        proc.stderr.strip()
        == "fedlorm: error: scenario.beta = -1.0 is not allowed; expected a number > 0"
    )


# -- log level --------------------------------------------------------------------------------------
COMMANDS = [
    ["run"],
    ["compare", "--methods", "lorm"],
    ["presets"],
    ["predict", "--model", "m", "a.png"],
    ["evaluate", "--model", "m"],
    ["flower", "simulate"],
    ["flower", "deploy-local"],
    ["flower", "submit", "--superlink", "link"],
    ["flower", "app-config"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
@pytest.mark.parametrize(
    ("options", "level"),
    [
        ([], logging.WARNING),
        (["-v"], logging.INFO),
        (["-vv"], logging.DEBUG),
        (["--log-level", "ERROR"], logging.ERROR),
        (["-vv", "--log-level", "warning"], logging.WARNING),
    ],
)
def test_every_command_takes_the_log_options(command, options, level):
    assert log_level(_build_parser().parse_args([*command, *options])) == level


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c[:2]))
def test_a_bad_log_level_is_one_line_exit_2(capsys, command):
    code, out, err = _run(capsys, *command, "--log-level", "loud")
    assert (code, out) == (2, "")
    assert err == (
        "fedlorm: error: argument --log-level: 'loud' is not a log level; use debug, info, warning or error\n"
    )


def test_verbose_shows_the_engine_info_lines_and_leaves_logging_as_it_was(capsys, tmp_path):
    root = logging.getLogger()
    before = (list(root.handlers), root.level, logging.getLogger("fedlorm").level)
    code, _, err = _run(capsys, "run", "--quiet", "-v", "--out", str(tmp_path / "run"), *TINY)
    assert code == 0, err
    assert "INFO fedlorm.runtime.engine: task 1: accuracy on seen classes" in err
    assert "task 2: accuracy on seen classes" in err and "diverged" not in err
    assert json.loads((tmp_path / "run" / "results.json").read_text())["diverged"] is None
    assert (list(root.handlers), root.level, logging.getLogger("fedlorm").level) == before


def test_divergence_is_one_warning_at_the_default_level_and_in_results(capsys, tmp_path):
    code, _, err = _run(capsys, "run", "--quiet", "--out", str(tmp_path / "run"), *TINY, "train.lr=1e6")
    assert code == 0, err
    assert "accuracy on seen classes" not in err  # info lines stay hidden by default
    warnings = [line for line in err.splitlines() if "diverged" in line]
    assert len(warnings) == 1, err
    # Diverged replies beyond the public per-sample bound (2^40) are rejected like hostile ones, so
    # the first step whose merged replies diverged may be round 2: task 1 round 2 (A) here.
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    limit = 10 * math.log(5)
    first = next(row for row in results["rounds"] if row["train_loss"] != "" and row["train_loss"] > limit)
    label = f"task 1 round {first['round'] + 1} ({first['factor']})"
    assert warnings[0].startswith(f"WARNING fedlorm.runtime.report: {label}: training diverged")
    assert "lower train.lr (now 1e+06)" in warnings[0]
    assert results["diverged"] == {"task": 0, "round": first["round"], "loss": first["train_loss"]}
    assert first["train_loss"] > 10 * math.log(5) * 1000  # far above a uniform guess over 5 classes
