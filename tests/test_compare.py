"""``fedlorm compare``: same scenario per seed, mean ± std over seeds, resume of finished and of
interrupted runs, several presets in one go, the paper's numbers beside the measured ones."""

from __future__ import annotations

import csv
import json
import os
import signal
import statistics
import subprocess
import sys

import pytest
from conftest import TINY, tiny_config

import fedlorm.runtime.simulator
from fedlorm.cli import main
from fedlorm.compare import (
    comparison_table,
    method_config,
    paired_differences,
    plan_comparison,
    run_comparison,
    run_comparisons,
    split_method_overrides,
    summarize_method,
    t_quantile_975,
)
from fedlorm.config import ConfigError, RunConfig, config_to_dict
from fedlorm.presets import published_accuracy
from fedlorm.runtime.checkpoint import CHECKPOINT_RECORD, save_checkpoint
from fedlorm.runtime.engine import KILL_ENV
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
        "download_bytes": 2_000_000 * (1 + cfg.seed),
        "rounds": [{}] * 4,
    }


def _writer(calls: list):
    def run(cfg: RunConfig, run_dir):
        calls.append((cfg.method, cfg.seed))
        results = _fake_results(cfg, [90.0 - cfg.seed, 60.0 + 10 * cfg.seed])
        (run_dir / "results.json").write_text(json.dumps(results))
        return results

    return run


def _plain(cfg: RunConfig) -> dict:
    return json.loads(json.dumps(config_to_dict(cfg)))


def _checkpoint(run_dir, cfg: RunConfig) -> None:
    """A checkpoint record of ``cfg`` in ``run_dir``, as an interrupted run leaves it."""
    save_checkpoint(run_dir, {"config": _plain(cfg), "completed_step": "task0.round0", "progress": {}}, {})


def test_summaries_are_mean_and_sample_std_over_seeds(tmp_path):
    calls: list = []
    by_method = run_comparison(RunConfig(), ["lorm", "fedavg"], [0, 1, 2], tmp_path, run=_writer(calls))
    assert calls == [(m, s) for s in (0, 1, 2) for m in ("lorm", "fedavg")]
    row = summarize_method("lorm", by_method["lorm"])
    assert row.final_accuracy == pytest.approx((70.0, statistics.stdev([60.0, 70.0, 80.0])))
    assert row.seen_accuracy[0] == pytest.approx([89.0, 70.0])
    assert row.wall_seconds == pytest.approx(11.0)
    # 4 MB over 10 clients × 4 steps; download 2, 4 and 6 MB (mean 4 MB) the same way.
    assert row.upload_mb_per_client_round == pytest.approx(0.1)
    assert row.download_mb_per_client_round == pytest.approx(0.1)
    assert "| lorm " in comparison_table([row]) and "70.00 ± 10.00" in comparison_table([row])


def test_traffic_is_per_client_asked_when_rows_say_how_many():
    cfg = method_config(RunConfig(), "lorm", 0)
    results = _fake_results(cfg, [80.0])
    results["rounds"] = [{"clients": n} for n in (5, 5, 10, 10)]  # participation 0.5, then statistics
    assert summarize_method("lorm", [results]).upload_mb_per_client_round == pytest.approx(4.0 / 30)


def test_paired_differences_are_per_seed_with_a_t_interval():
    runs = {
        "lorm": [{"seed": s, "final_accuracy": a} for s, a in ((0, 81.0), (1, 84.0), (2, 80.0), (3, 70.0))],
        "fedavg": [{"seed": s, "final_accuracy": a} for s, a in ((0, 80.0), (1, 82.0), (2, 77.0))],
        "ffa": [{"seed": 5, "final_accuracy": 1.0}],
    }
    (d,) = paired_differences(runs, "lorm")  # ffa shares no seed with lorm: no row
    # differences 1, 2, 3 over the 3 common seeds: mean 2, sd 1, t(2) = 4.303
    assert (d.reference, d.method, d.seeds) == ("lorm", "fedavg", [0, 1, 2])
    half = 4.303 / 3**0.5
    assert (d.mean, d.low, d.high) == pytest.approx((2.0, 2.0 - half, 2.0 + half))
    one = paired_differences({"a": runs["lorm"][:1], "b": runs["fedavg"][:1]}, "a")[0]
    assert (one.mean, one.low, one.high) == (1.0, None, None)


def test_method_overrides_apply_to_their_method_only(tmp_path):
    common, own = split_method_overrides(
        ["train.rounds=2", "lorm:train.lr=1e-3", "data.root=C:/data", "ffa:model.rank=1"], ["lorm", "ffa"]
    )
    assert common == ["train.rounds=2", "data.root=C:/data"]
    assert own == {"lorm": ["train.lr=1e-3"], "ffa": ["model.rank=1"]}
    plan = plan_comparison(RunConfig(), ["lorm", "ffa"], [0], tmp_path, own)
    assert [(p.cfg.train.lr, p.cfg.model.rank) for p in plan] == [(1e-3, RunConfig().model.rank), (3e-3, 1)]
    with pytest.raises(ConfigError, match="'fedavg', which is not in --methods"):
        split_method_overrides(["fedavg:train.lr=1e-3"], ["lorm"])


def test_a_run_recorded_before_a_config_key_existed_is_read_back(tmp_path):
    """A key added since takes its default, which is how the recorded run behaved."""
    cfg = method_config(RunConfig(), "lorm", 0)
    results = _fake_results(cfg, [80.0])
    del results["config"]["train"]["forgetting_diagnostics"]
    (tmp_path / "lorm" / "s0").mkdir(parents=True)
    (tmp_path / "lorm" / "s0" / "results.json").write_text(json.dumps(results))
    calls: list = []
    by_method = run_comparison(RunConfig(), ["lorm"], [0], tmp_path, run=_writer(calls))
    assert calls == [] and by_method["lorm"][0]["final_accuracy"] == 80.0


def test_t_quantiles_are_students():
    # textbook values of the two-sided 95 % t quantile, and the normal limit
    assert [t_quantile_975(df) for df in (1, 4, 9, 29, 200)] == [12.706, 2.776, 2.262, 2.045, 1.96]
    with pytest.raises(ValueError, match="expected ≥ 1"):
        t_quantile_975(0)


def test_download_column_and_a_dash_for_results_without_download_bytes(tmp_path):
    cfg = method_config(RunConfig(), "lorm", 0)
    new, old = _fake_results(cfg, [80.0]), _fake_results(cfg, [80.0])
    new["download_bytes"] = 8_000_000
    del old["download_bytes"]
    assert summarize_method("lorm", [new]).download_mb_per_client_round == pytest.approx(0.2)
    # Only the runs that record download count (a rerun may mix old and new results files).
    assert summarize_method("lorm", [new, old]).download_mb_per_client_round == pytest.approx(0.2)
    row = summarize_method("lorm", [old])
    assert row.download_mb_per_client_round is None
    header, _, cells = comparison_table([row]).splitlines()
    names = [c.strip() for c in header.strip("|").split("|")]
    values = dict(zip(names, [c.strip() for c in cells.strip("|").split("|")], strict=True))
    assert names[-2:] == ["upload / client / round (MB)", "download / client / round (MB)"]
    assert values["upload / client / round (MB)"] == "0.10"
    assert values["download / client / round (MB)"] == "–"


def test_published_accuracy_per_preset():
    assert [published_accuracy(f"cifar100-b{b}") for b in (0.5, 0.1, 0.05)] == [86.95, 81.75, 82.76]
    assert published_accuracy("imagenet-r-b0.5") is None
    assert published_accuracy("default") is None and published_accuracy("nope") is None


def test_paper_column_only_on_lorm_rows_beside_the_final_accuracy():
    cfg = method_config(RunConfig(), "lorm", 0)
    runs = [_fake_results(cfg, [80.0, 70.0])]
    lorm = summarize_method("lorm", runs, preset="cifar100-b0.1")
    fedavg = summarize_method("fedavg", runs, preset="cifar100-b0.1")
    other = summarize_method("lorm", runs, preset="default")
    assert (lorm.paper_final_accuracy, fedavg.paper_final_accuracy, other.paper_final_accuracy) == (
        81.75, None, None
    )
    lines = comparison_table([lorm, fedavg, other]).splitlines()
    assert [c.strip() for c in lines[0].strip("|").split("|")][1:3] == ["final acc (%)", "paper (%)"]
    assert [[c.strip() for c in line.strip("|").split("|")][1:3] for line in lines[2:]] == [
        ["70.00", "81.75"], ["70.00", "–"], ["70.00", "–"]
    ]


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


def test_an_interrupted_run_is_resumed_from_its_checkpoint_not_restarted(tmp_path):
    base = RunConfig()
    _checkpoint(tmp_path / "fedavg" / "s1", method_config(base, "fedavg", 1))
    (tmp_path / "fedavg" / "s1" / "metrics.csv").write_text("rows of the completed steps\n")
    ran: list = []
    resumed: list = []

    def resume(cfg: RunConfig, run_dir):
        resumed.append((cfg.method, cfg.seed, run_dir))
        assert (run_dir / "metrics.csv").read_text() == "rows of the completed steps\n"  # kept
        return _writer([])(cfg, run_dir)

    by_method = run_comparison(base, ["lorm", "fedavg"], [0, 1], tmp_path, run=_writer(ran), resume=resume)
    assert ran == [("lorm", 0), ("fedavg", 0), ("lorm", 1)]
    assert resumed == [("fedavg", 1, tmp_path / "fedavg" / "s1")]
    assert [r["final_accuracy"] for r in by_method["fedavg"]] == [60.0, 70.0]


def test_a_checkpoint_of_another_config_fails_before_any_run(tmp_path):
    other = method_config(RunConfig(), "fedavg", 1)
    other.train.rounds = 7
    _checkpoint(tmp_path / "fedavg" / "s1", other)
    ran: list = []
    with pytest.raises(ConfigError, match="fedavg/s1' holds a run of another config"):
        run_comparison(
            RunConfig(), ["lorm", "fedavg"], [0, 1], tmp_path, run=_writer(ran), resume=_writer(ran)
        )
    assert ran == [] and not (tmp_path / "lorm").exists()
    assert (tmp_path / "fedavg" / "s1" / CHECKPOINT_RECORD).is_file()


def test_an_unreadable_checkpoint_is_an_error_and_is_kept(tmp_path):
    (tmp_path / "lorm" / "s0").mkdir(parents=True)
    (tmp_path / "lorm" / "s0" / CHECKPOINT_RECORD).write_text("{not json")
    with pytest.raises(ConfigError, match=r"not readable JSON.*; remove .* or choose another --out") as err:
        run_comparison(RunConfig(), ["lorm"], [0], tmp_path, run=_writer([]), resume=_writer([]))
    assert "\n" not in str(err.value)
    assert (tmp_path / "lorm" / "s0" / CHECKPOINT_RECORD).read_text() == "{not json"


def test_a_failing_run_keeps_the_finished_ones_and_the_rerun_skips_them(tmp_path):
    calls: list = []
    write = _writer(calls)

    def crash_on_fedavg_s1(cfg: RunConfig, run_dir):
        if (cfg.method, cfg.seed) == ("fedavg", 1):
            raise RuntimeError("out of memory")
        return write(cfg, run_dir)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_comparison(RunConfig(), ["lorm", "fedavg"], [0, 1], tmp_path, run=crash_on_fedavg_s1)
    assert calls == [("lorm", 0), ("fedavg", 0), ("lorm", 1)]
    assert not (tmp_path / "fedavg" / "s1").exists()  # it failed before writing: no empty directory
    again: list = []
    by_method = run_comparison(RunConfig(), ["lorm", "fedavg"], [0, 1], tmp_path, run=_writer(again))
    assert again == [("fedavg", 1)]
    assert [r["final_accuracy"] for r in by_method["lorm"]] == [60.0, 70.0]


def test_several_presets_each_in_their_own_directory_all_checked_first(tmp_path):
    bases = {"smoke": RunConfig(), "default": RunConfig()}
    bases["default"].train.rounds = 3
    calls: list = []
    results = run_comparisons(bases, ["lorm"], [0, 1], tmp_path, run=_writer(calls))
    assert list(results) == ["smoke", "default"] and calls == [("lorm", 0), ("lorm", 1)] * 2
    stored = json.loads((tmp_path / "default" / "lorm" / "s1" / "results.json").read_text())
    assert stored["config"]["train"]["rounds"] == 3 and stored["seed"] == 1
    # One bad config in the last preset: nothing runs, not even the first preset's new seed.
    bases["default"].train.rounds = 0
    again: list = []
    with pytest.raises(ConfigError, match=r"train\.rounds = 0"):
        run_comparisons(bases, ["lorm"], [0, 1, 2], tmp_path, run=_writer(again))
    assert again == [] and not (tmp_path / "smoke" / "lorm" / "s2").exists()
    # One preset keeps the single-comparison layout OUT/METHOD/sSEED.
    run_comparisons({"smoke": RunConfig()}, ["lorm"], [0], tmp_path / "one", run=_writer([]))
    assert (tmp_path / "one" / "lorm" / "s0" / "results.json").is_file()


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
        (["--methods", "lorm", "ffa:train.lr=1e-3"], "is for method 'ffa', which is not in --methods"),
        (["--methods", "lorm,ffa", "ffa:model.rank=0"], "model.rank = 0"),
        (["--methods", "lorm", "--preset", "smoke,nope"], "preset 'nope' is unknown; choose from: "),
        (["--methods", "lorm", "--preset", "smoke,smoke"], "--preset lists a preset twice: smoke,smoke"),
        (["--methods", "lorm", "--preset", " , "], "--preset is empty"),
        (["--methods", "lorm", "--preset", "smoke,cifar100-b0.5", "model.rank=0"], "model.rank = 0"),
        # Found only when the first run loads its data: the run directories made for it go again.
        (["--methods", "lorm", "--preset", "smoke,split-fmnist-5x2", "data.root=/does/not/exist"],
         "not found in /does/not/exist"),
    ],
)
def test_bad_compare_arguments_fail_in_one_line_before_running(tmp_path, capsys, argv, message):
    assert main(["compare", "--out", str(tmp_path / "c"), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_compare_cli_end_to_end_and_resume(tmp_path, capsys):
    argv = ["compare", "--methods", "lorm,ffa,joint", "--seeds", "0,1", "--out", str(tmp_path),
            "--quiet", *TINY, "train.rounds=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.count(", seed ") == 6
    with open(tmp_path / "comparison.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert list(rows) == ["lorm", "ffa", "joint"]
    finals = [json.loads((tmp_path / "lorm" / f"s{s}" / "results.json").read_text())["final_accuracy"]
              for s in (0, 1)]
    assert float(rows["lorm"]["final_mean"]) == pytest.approx(statistics.fmean(finals))
    assert float(rows["lorm"]["final_std"]) == pytest.approx(statistics.stdev(finals))
    assert (tmp_path / "comparison.png").stat().st_size > 1000
    with open(tmp_path / "paired.csv") as handle:
        paired = {r["method"]: r for r in csv.DictReader(handle)}
    ffa = [json.loads((tmp_path / "ffa" / f"s{s}" / "results.json").read_text())["final_accuracy"]
           for s in (0, 1)]
    assert list(paired) == ["ffa", "joint"] and paired["ffa"]["reference"] == "lorm"
    difference = statistics.fmean(finals) - statistics.fmean(ffa)
    assert float(paired["ffa"]["mean_difference"]) == pytest.approx(difference)
    assert "lorm − ffa" in printed and "lorm − ffa" in (tmp_path / "comparison.md").read_text()
    stamp = (tmp_path / "ffa" / "s1" / "results.json").stat().st_mtime_ns
    assert main(argv) == 0
    assert "seed" not in capsys.readouterr().out.split("| method")[0]  # nothing re-run
    assert (tmp_path / "ffa" / "s1" / "results.json").stat().st_mtime_ns == stamp


def _fake_simulation(cfg: RunConfig, run_dir, progress: bool = False) -> dict:
    """Stands in for the simulator: writes a finished run's results.json at once."""
    results = _fake_results(cfg, [90.0 - cfg.seed, 80.0 - cfg.model.rank - cfg.seed])
    (run_dir / "results.json").write_text(json.dumps(results))
    return results


def test_compare_cli_several_presets_tables_and_default_out(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(fedlorm.runtime.simulator, "run_simulation", _fake_simulation)
    monkeypatch.chdir(tmp_path)
    argv = ["compare", "--preset", "cifar100-b0.5,cifar100-b0.1", "--methods", "lorm,fedavg",
            "--seeds", "0,1", "--quiet", "train.rounds=2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "runs" / "compare-cifar100-b0.5-and-1-more"
    assert printed.count("seed") == 8 and f"{out.relative_to(tmp_path)}/cifar100-b0.1/fedavg/s1" in printed
    assert printed.splitlines()[8].startswith("| preset ")
    for preset in ("cifar100-b0.5", "cifar100-b0.1"):
        stored = json.loads((out / preset / "fedavg" / "s1" / "results.json").read_text())
        assert stored["config"]["scenario"]["beta"] == float(preset.split("-b")[1])
        assert stored["config"]["train"]["rounds"] == 2  # the override applies to every preset
        assert (out / preset / "comparison.png").stat().st_size > 1000
        with open(out / preset / "comparison.csv") as handle:
            assert "preset" not in next(csv.reader(handle))
    with open(out / "comparison.csv") as handle:
        rows = {(r["preset"], r["method"]): r for r in csv.DictReader(handle)}
    assert list(rows) == [(p, m) for p in ("cifar100-b0.5", "cifar100-b0.1") for m in ("lorm", "fedavg")]
    # Ranks 1 and 16: final accuracies 79 - rank and 78 - rank over seeds 0 and 1.
    assert float(rows["cifar100-b0.5", "lorm"]["final_mean"]) == pytest.approx(78.5)
    assert float(rows["cifar100-b0.1", "fedavg"]["final_mean"]) == pytest.approx(63.5)
    assert [rows[k]["paper_final"] for k in rows] == ["86.95", "", "81.75", ""]
    assert float(rows["cifar100-b0.1", "lorm"]["download_mb_per_client_round"]) == pytest.approx(0.075)
    table = (out / "comparison.md").read_text().splitlines()
    assert table[0].split("|")[1:4] == [" preset        ", " method ", " final acc (%) "]
    assert "| cifar100-b0.1 | lorm   | 63.50 ± 0.71  | 81.75     |" in table[4]


def _fedlorm(*argv: str, kill_at: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env.update({"HF_HUB_OFFLINE": "1", KILL_ENV: kill_at})
    return subprocess.run(
        [sys.executable, "-m", "fedlorm", *argv], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.mark.slow
def test_killed_compare_resumes_from_the_checkpoint_to_the_uninterrupted_numbers(tmp_path, capsys):
    small = ["--preset", "smoke", "--seeds", "0", "--quiet", "data.train_per_class=8",
             "data.test_per_class=5", "train.rounds=1", "train.threads=1"]
    argv = ["compare", "--methods", "joint,lorm", "--out", str(tmp_path / "cmp"), *small]
    # joint (one task) finishes; lorm is killed mid-round in its second task.
    proc = _fedlorm(*argv, kill_at="task1.round0.client1")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    lorm = tmp_path / "cmp" / "lorm" / "s0"
    assert (lorm / CHECKPOINT_RECORD).is_file()
    assert json.loads((lorm / "results.json").read_text())["tasks_completed"] == 1
    joint = tmp_path / "cmp" / "joint" / "s0" / "results.json"
    stamp = joint.stat().st_mtime_ns

    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"lorm, seed 0 → {lorm} (resuming its checkpoint)" in printed
    assert "joint, seed 0 →" not in printed and joint.stat().st_mtime_ns == stamp
    assert not list(lorm.glob("checkpoint*"))

    assert main(["compare", "--methods", "lorm", "--out", str(tmp_path / "ref"), *small]) == 0
    resumed = json.loads((lorm / "results.json").read_text())
    expected = json.loads((tmp_path / "ref" / "lorm" / "s0" / "results.json").read_text())
    assert resumed["tasks_completed"] == 2
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["upload_bytes"] == expected["upload_bytes"]
    with open(tmp_path / "cmp" / "comparison.csv") as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert float(rows["lorm"]["final_mean"]) == pytest.approx(expected["final_accuracy"])
