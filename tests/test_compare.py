"""``fedlorm compare``: same scenario per seed, mean ± std over seeds, resume of finished runs."""

from __future__ import annotations

import csv
import json
import statistics

import pytest
from conftest import TINY, tiny_config

from fedlorm.cli import main
from fedlorm.compare import comparison_table, method_config, run_comparison, summarize_method
from fedlorm.config import ConfigError, RunConfig, config_to_dict
from fedlorm.runtime.experiment import build_experiment


def _fake_results(cfg: RunConfig, accuracy: list[float]) -> dict:
    return {
        "config": json.loads(json.dumps(config_to_dict(cfg))),
        "seed": cfg.seed,
        "method": cfg.method,
        "scenario": {"task_sizes": [2] * len(accuracy)},
        "tasks_completed": len(accuracy),
        "accuracy_per_task": accuracy,
        "final_accuracy": accuracy[-1],
        "average_incremental_accuracy": sum(accuracy) / len(accuracy),
        "forgetting": 100 - accuracy[-1],
        "wall_seconds": 10.0 + cfg.seed,
        "upload_bytes": 4_000_000,
        "rounds": [{}] * 4,
    }


def _writer(calls: list):
    def run(cfg: RunConfig, run_dir):
        calls.append((cfg.method, cfg.seed))
        results = _fake_results(cfg, [90.0 - cfg.seed, 60.0 + 10 * cfg.seed])
        (run_dir / "results.json").write_text(json.dumps(results))
        return results

    return run


def test_summaries_are_mean_and_sample_std_over_seeds(tmp_path):
    calls: list = []
    by_method = run_comparison(RunConfig(), ["lorm", "fedavg"], [0, 1, 2], tmp_path, run=_writer(calls))
    assert calls == [(m, s) for s in (0, 1, 2) for m in ("lorm", "fedavg")]
    row = summarize_method("lorm", by_method["lorm"])
    assert row.final_accuracy == pytest.approx((70.0, statistics.stdev([60.0, 70.0, 80.0])))
    assert row.seen_accuracy[0] == pytest.approx([89.0, 70.0])
    assert row.wall_seconds == pytest.approx(11.0)
    # 4 MB over 10 clients × 4 steps.
    assert row.upload_mb_per_client_round == pytest.approx(0.1)
    assert "| lorm " in comparison_table([row]) and "70.00 ± 10.00" in comparison_table([row])


def test_finished_runs_are_read_back_not_repeated(tmp_path):
    calls: list = []
    run_comparison(RunConfig(), ["lorm"], [0, 1], tmp_path, run=_writer(calls))
    (tmp_path / "lorm" / "s1" / "results.json").unlink()  # as if interrupted during seed 1
    again: list = []
    run_comparison(RunConfig(), ["lorm"], [0, 1], tmp_path, run=_writer(again))
    assert again == [("lorm", 1)]


def test_a_run_of_another_config_is_not_mixed_in(tmp_path):
    run_comparison(RunConfig(), ["lorm"], [0], tmp_path, run=_writer([]))
    other = RunConfig()
    other.train.rounds = 7
    with pytest.raises(ConfigError, match="holds a run of another config"):
        run_comparison(other, ["lorm"], [0], tmp_path, run=_writer([]))


def test_every_method_sees_the_same_partition_and_class_order():
    base = tiny_config("scenario.class_order=random")
    lorm = build_experiment(method_config(base, "lorm", 3))
    ffa = build_experiment(method_config(base, "ffa", 3))
    assert lorm.scenario.class_order == ffa.scenario.class_order
    assert all(
        (a == b).all() for a, b in zip(lorm.partitions[1], ffa.partitions[1], strict=True)
    )
    joint = method_config(base, "joint", 3)
    assert (joint.scenario.tasks, joint.scenario.num_clients) == (1, 1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "lorm,nope"], "method 'nope' is unknown"),
        (["--methods", "lorm,lorm"], "lists a method twice"),
        (["--methods", "lorm", "--seeds", "0,x"], "--seeds '0,x' is not a comma-separated list"),
        (["--methods", "lorm", "--seeds", "1,1"], "expected distinct integers"),
        (["--methods", "lorm", "train.rounds=0"], "train.rounds = 0 is not allowed"),
    ],
)
def test_bad_compare_arguments_fail_in_one_line_before_running(tmp_path, capsys, argv, message):
    assert main(["compare", "--out", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


def test_compare_cli_end_to_end_and_resume(tmp_path, capsys):
    argv = ["compare", "--methods", "lorm,ffa,joint", "--seeds", "0,1", "--out", str(tmp_path),
            "--quiet", *TINY, "train.rounds=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count("seed") == 6
    with open(tmp_path / "comparison.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["lorm", "ffa", "joint"]
    finals = [json.loads((tmp_path / "lorm" / f"s{s}" / "results.json").read_text())["final_accuracy"]
              for s in (0, 1)]
    assert float(rows["lorm"]["final_mean"]) == pytest.approx(statistics.fmean(finals))
    assert float(rows["lorm"]["final_std"]) == pytest.approx(statistics.stdev(finals))
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    stamp = (tmp_path / "ffa" / "s1" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "seed" not in capsys.readouterr().out.split("| method")[0]  # nothing re-run
    assert (tmp_path / "ffa" / "s1" / "results.json").stat().st_mtime_ns == stamp
