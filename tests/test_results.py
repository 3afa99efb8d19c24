"""Results I/O: atomic strict JSON, the metrics CSV, plots and the summary table."""

import csv
import json
import logging
import math
import sys

import numpy as np
import pytest

from fedlorm.results import (
    MetricsCSV,
    plot_comparison,
    plot_run,
    summary_table,
    versions,
    write_json_atomic,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _results(T: int = 3, with_rounds: bool = True) -> dict:
    R = [[90.0], [95.0, 80.0], [60.0, 75.0, 85.0]][:T]
    res = {
        "config": {"method": "lorm", "data": {"datasets": ["fashion_mnist"]},
                   "scenario": {"beta": 0.5}},
        "seed": 0,
        "accuracy_matrix": R,
        "task_aware_accuracy_matrix": R,
        "task_test_sizes": [100, 50, 50][:T],
        "final_accuracy": 70.0,
        "final_accuracy_task_mean": 220 / 3,
        "average_incremental_accuracy": 250 / 3,
        "forgetting": 20.0 if T > 1 else None,
        "bwt": -17.5 if T > 1 else None,
        "wall_seconds": 12.34,
        "upload_bytes": 1000,
    }
    if with_rounds:
        res["rounds"] = [
            {"task": t, "round": r, "factor": "BA"[r % 2], "train_loss": 1.0,
             "seen_accuracy": 50.0 + 10 * r, "merge_seconds": 0.1, "upload_bytes": 10}
            for t in range(T) for r in range(3)
        ]
    return res


def test_write_json_atomic_roundtrip(tmp_path):
    path = tmp_path / "run" / "results.json"  # parent created on demand
    obj = {"a": 1, "m": np.array([[1.5, 2.0]]), "x": np.float32(0.25), "p": tmp_path, "t": (1, 2)}
    assert write_json_atomic(path, obj) == path
    text = path.read_text()
    assert text.startswith("{\n  ")  # indent=2
    assert json.loads(text) == {"a": 1, "m": [[1.5, 2.0]], "x": 0.25, "p": str(tmp_path),
                                "t": [1, 2]}
    assert sorted(p.name for p in path.parent.iterdir()) == ["results.json"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, np.float64("nan"), np.array([1.0, -np.inf])])
def test_write_json_atomic_refuses_nan_and_keeps_old_file(tmp_path, bad):
    path = tmp_path / "results.json"
    write_json_atomic(path, {"ok": 1})
    with pytest.raises(ValueError, match="NaN"):
        write_json_atomic(path, {"final_accuracy": bad})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_write_json_atomic_unserializable(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic(tmp_path / "r.json", {"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_versions_metadata_only():
    heavy = [m for m in ("timm", "torchvision", "peft", "flwr") if m not in sys.modules]
    v = versions()
    assert isinstance(v["torch"], str) and v["torch"][0].isdigit()
    assert v["python"].count(".") == 2 and v["numpy"] and v["platform"]
    assert set(v) >= {"python", "fedlorm", "torch", "torchvision", "timm", "numpy", "platform"}
    assert [m for m in heavy if m in sys.modules] == []  # looked up, never imported
    json.dumps(v)


def test_metrics_csv_appends(tmp_path):
    path = tmp_path / "metrics.csv"
    fields = ["task", "round", "seen_accuracy"]
    log = MetricsCSV(path, fields)
    log.append({"task": 0, "round": 0, "seen_accuracy": 51.5})
    log.append({"task": 0, "round": 1})  # missing field → empty cell
    assert path.read_text().splitlines()[1] == "0,0,51.5"  # flushed at once
    MetricsCSV(path, fields).append({"task": 1, "round": 0, "seen_accuracy": None})
    rows = list(csv.reader(path.open()))
    assert rows == [fields, ["0", "0", "51.5"], ["0", "1", ""], ["1", "0", ""]]
    with pytest.raises(ValueError, match="header"):
        MetricsCSV(path, ["task", "loss"])
    with pytest.raises(ValueError, match="unknown fields"):
        log.append({"task": 2, "lr": 0.1})


@pytest.mark.parametrize("T", [3, 1])
def test_plot_run_writes_png(tmp_path, T):
    out = plot_run(_results(T, with_rounds=T == 3), tmp_path / "accuracy.png")
    data = out.read_bytes()
    assert out.name == "accuracy.png" and data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_plot_run_into_directory_and_comparison(tmp_path):
    assert plot_run(_results(2, with_rounds=False), tmp_path) == tmp_path / "accuracy.png"
    out = plot_comparison(
        {"lorm": ([90.0, 80.0, 70.0], [1.0, 2.0, 1.5]), "fedavg": [85.0, 60.0, 40.0]},
        tmp_path / "cmp.png",
        "CIFAR-100, beta=0.5",
    )
    assert out.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(ValueError, match="std"):
        plot_comparison({"x": ([1.0, 2.0], [1.0])}, tmp_path / "bad.png")


def test_summary_table():
    a = _results()
    b = _results(1) | {"name": "baseline", "wall_seconds": None}
    del b["final_accuracy"]  # recomputed from its matrix: 90.0
    table = summary_table([a, b])
    lines = table.splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| run") and "final acc (%)" in lines[0]
    assert set(lines[1]) <= {"|", "-", ":"}
    assert "lorm fashion_mnist beta=0.5" in lines[2]
    for cell in ("70.00", "83.33", "20.00", "-17.50", "12.3"):
        assert cell in lines[2]
    assert "baseline" in lines[3] and "90.00" in lines[3] and lines[3].count("n/a") == 3
    assert summary_table(a).splitlines()[2] == lines[2]


def test_plot_run_skips_steps_that_were_not_evaluated(tmp_path):
    results = _results(3)
    for row in results["rounds"][::2]:
        row["seen_accuracy"] = ""  # what the simulator writes with train.eval_every_round=false
    out = plot_run(results, tmp_path / "accuracy.png")
    assert out.read_bytes().startswith(PNG_MAGIC)


# -- divergence (imports inside: the versions test above checks that nothing heavy is loaded) -------
def _divergence_parts():
    from types import SimpleNamespace

    from fedlorm.config import RunConfig
    from fedlorm.methods import Instruction
    from fedlorm.runtime.progress import RunProgress

    exp = SimpleNamespace(cfg=RunConfig())

    def step(task, round_, phase="train", classes=4):
        return Instruction(task, round_, phase, "B", 10, 10 + classes)

    return exp, RunProgress(), step


def test_divergence_limit_is_ten_uniform_guesses():
    from fedlorm.runtime.report import divergence_limit

    assert divergence_limit(4) == pytest.approx(10 * math.log(4))
    assert divergence_limit(1) == divergence_limit(2) == pytest.approx(10 * math.log(2))


def test_only_the_first_diverged_training_step_is_recorded(caplog):
    from fedlorm.runtime.report import note_divergence

    exp, state, step = _divergence_parts()
    limit = 10 * math.log(4)
    with caplog.at_level(logging.WARNING, logger="fedlorm"):
        note_divergence(exp, state, step(0, 0), {"train_loss": limit})  # at the limit: fine
        note_divergence(exp, state, step(0, 1), {"train_loss": ""})  # nothing merged
        note_divergence(exp, state, step(0, -1, "task_stats"), {"train_loss": 1e9})
        assert state.diverged is None and not caplog.records
        note_divergence(exp, state, step(1, 2), {"train_loss": limit * 1.001})
        note_divergence(exp, state, step(1, 3), {"train_loss": "nan"})
    assert state.diverged == {"task": 1, "round": 2, "loss": limit * 1.001}
    assert len(caplog.records) == 1 and "task 2 round 3 (B)" in caplog.records[0].getMessage()


def test_a_loss_that_is_not_finite_diverged_and_stays_strict_json(tmp_path):
    from fedlorm.runtime.report import StepTally, metrics_row, note_divergence

    exp, state, step = _divergence_parts()
    row = metrics_row(
        exp, step(0, 0), StepTally(examples=3, loss_sum=math.inf), upload_bytes=0, download_bytes=0,
        clients=3, rejected=0,
    )
    assert row["train_loss"] == "inf"
    note_divergence(exp, state, step(0, 0), row)
    assert state.diverged == {"task": 0, "round": 0, "loss": "inf"}
    write_json_atomic(tmp_path / "r.json", {"rounds": [row], "diverged": state.diverged})


def test_checkpoints_from_before_the_divergence_record_still_load():
    from fedlorm.runtime.progress import RunProgress

    record = RunProgress(task=1, matrix=[[50.0]]).to_record()
    del record["diverged"]
    assert RunProgress.from_record(record).diverged is None
    with pytest.raises(ValueError, match="lacks elapsed"):
        RunProgress.from_record({k: v for k, v in record.items() if k != "elapsed"})
