"""The engine end to end on real (offline) MNIST with the pretrained EfficientNet-Lite0.

The protocol checks rebuild each merge from per-client quantities with ``fedlorm.merging``'s
convenience forms and compare with what the server computed from summed replies only.
"""

from __future__ import annotations

import csv
import importlib.metadata
import json
import sys

import pytest
import torch
from conftest import tiny_config

from fedlorm import merging
from fedlorm.adapters import InputStatistics
from fedlorm.config import ConfigError
from fedlorm.fcl import summarize
from fedlorm.methods import add_arrays
from fedlorm.methods.arrays import HEAD
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.report import METRICS_FIELDS
from fedlorm.runtime.simulator import run_simulation
from fedlorm.seeding import torch_generator


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = tiny_config()
    exp = build_experiment(cfg)
    results = run_simulation(cfg, out, experiment=exp)
    return cfg, exp, results, out


def test_results_files_hold_the_promised_fields(tiny_run):
    cfg, _, _, out = tiny_run
    saved = json.loads((out / "results.json").read_text())
    for key in (
        "config",
        "seed",
        "versions",
        "accuracy_matrix",
        "task_aware_accuracy_matrix",
        "task_test_sizes",
        "final_accuracy",
        "final_accuracy_task_mean",
        "average_incremental_accuracy",
        "forgetting",
        "bwt",
        "wall_seconds",
        "upload_bytes",
        "download_bytes",
    ):
        assert key in saved, key
    matrix = saved["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]
    assert saved["task_test_sizes"] == [25, 25]
    summary = summarize(matrix, saved["task_test_sizes"])
    assert saved["final_accuracy"] == pytest.approx(summary["final_accuracy"])
    assert saved["config"]["scenario"]["num_clients"] == 3
    assert saved["versions"]["torch"] == importlib.metadata.version("torch")
    assert saved["upload_bytes"] == sum(r["upload_bytes"] for r in saved["rounds"]) > 0
    assert saved["download_bytes"] == sum(r["download_bytes"] for r in saved["rounds"]) > 0
    # Task-aware accuracy can never be below class-IL accuracy on the same task.
    for row, aware in zip(matrix, saved["task_aware_accuracy_matrix"], strict=True):
        assert all(a >= c - 1e-9 for a, c in zip(aware, row, strict=True))
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == METRICS_FIELDS
    assert len(rows) == 2 * (cfg.train.rounds + 1)
    assert [r["factor"] for r in rows[:3]] == ["B", "A", "none"]
    # Wall times: every step took time, the merge is part of its step; by default only a task's last
    # step is evaluated.
    for i, row in enumerate(rows):
        step, merge, evaluation = (float(row[k]) for k in ("step_seconds", "merge_seconds", "eval_seconds"))
        last = i == len(rows) - 1 or rows[i + 1]["task"] != row["task"]
        assert step > 0 and (evaluation > 0) == last and 0 <= merge <= step
    assert (out / "accuracy.png").stat().st_size > 1000


def test_pretrained_features_learn_the_first_task(tiny_run):
    _, _, results, _ = tiny_run
    # 5 MNIST digits from 40 images, 32 px: far above the 20 % of chance within the task.
    assert results["task_aware_accuracy_matrix"][0][0] > 50.0


def test_same_seed_same_numbers_and_other_seed_other_partition(tiny_run):
    _, exp, results, _ = tiny_run
    again = run_simulation(tiny_config())
    assert again["accuracy_matrix"] == results["accuracy_matrix"]
    assert again["rounds"][0]["train_loss"] == results["rounds"][0]["train_loss"]
    other = build_experiment(tiny_config("seed=1"))
    sizes = [[len(d) for d in e.client_data(0)] for e in (exp, other)]
    assert sizes[0] != sizes[1] or not torch.equal(exp.partitions[0][0], other.partitions[0][0])


def _record_clients(exp, instruction, arrays):
    """Run every client and keep what the server must never see: per-client factors and Grams."""
    factors, grams, heads, sums, total = [], [], [], None, 0
    for k, data in enumerate(exp.client_data(instruction.task)):
        generator = torch_generator(exp.cfg.seed, "client", instruction.task, instruction.round, k)
        reply = exp.client.update(arrays, instruction, data, generator)
        sums = add_arrays(sums, reply.summands)
        total += reply.num_examples
        factors.append(
            {n: (lay.lora_A.detach().clone(), lay.lora_B.detach().clone()) for n, lay in exp.layers.items()}
        )
        heads.append(exp.model.head.weight.detach().clone())
        modules = {**exp.layers, HEAD: exp.model.head}
        modes = {n: "diag" for n in exp.layers} | {HEAD: "full"}
        with InputStatistics(modules, mode=modes) as stats, torch.no_grad():
            exp.model(data.images)
        grams.append(stats.grams())
    return factors, grams, heads, sums, total


def test_server_merges_equal_the_per_client_closed_forms():
    exp = build_experiment(tiny_config("lorm.head_merge=regmean"))
    server, classes = exp.server, exp.scenario.task_classes(0)
    server.start_task(0, classes, torch_generator(0, "server"))
    steps = list(server.instructions(0, classes))
    assert [s.factor for s in steps] == ["B", "A", "none"]
    task_deltas = []
    for instruction in steps:
        arrays = {k: v.clone() for k, v in server.arrays(instruction).items()}
        factors, grams, heads, sums, total = _record_clients(exp, instruction, arrays)
        server.aggregate(instruction, sums, total)
        for name in exp.layers:
            g = [gr[name] for gr in grams]
            if instruction.factor == "B":
                expected = merging.merge_b(
                    [f[name][1] for f in factors],
                    arrays[f"{name}.lora_A"],
                    g,
                    reference=arrays[f"{name}.lora_B"],
                )
                torch.testing.assert_close(server.B[name], expected, rtol=1e-5, atol=1e-7)
            elif instruction.factor == "A":
                expected = merging.merge_a(
                    [f[name][0] for f in factors], g, reference=arrays[f"{name}.lora_A"]
                )
                torch.testing.assert_close(server.A[name], expected, rtol=1e-5, atol=1e-7)
        if instruction.phase == "train":
            head_grams = [merging.shrink_gram(gr[HEAD], 0.5) for gr in grams]
            expected_head = merging.regmean(heads, head_grams, reference=arrays[f"{HEAD}.weight"])
            torch.testing.assert_close(server.head_weight, expected_head, rtol=1e-4, atol=1e-6)
        else:
            name = next(iter(exp.layers))
            delta = server.B[name].double() @ server.A[name].double()
            task_deltas.append((delta, sum(gr[name] for gr in grams)))
    name = next(iter(exp.layers))
    expected = merging.merge_tasks([d for d, _ in task_deltas], [g for _, g in task_deltas])
    torch.testing.assert_close(server.merged[name], expected.float(), rtol=1e-5, atol=1e-7)


def test_task_merge_is_deployed_and_old_head_rows_stay():
    exp = build_experiment(tiny_config("train.rounds=1"))
    results = run_simulation(exp.cfg, experiment=exp)
    server = exp.server
    deployed = server.deployed_arrays()
    name = next(iter(exp.layers))
    # Diagonal statistics: the merged update goes as the factor pair of the stacked task factors.
    assert f"{name}.fixed_delta" not in deployed
    product = deployed[f"{name}.fixed_B"].double() @ deployed[f"{name}.fixed_A"].double()
    torch.testing.assert_close(product, server.merged[name].double(), rtol=1e-5, atol=1e-7)
    assert not deployed[f"{name}.lora_B"].any()
    assert len(results["accuracy_matrix"]) == 2


@pytest.mark.parametrize(
    "override",
    [
        "lorm.stats_model=trained",
        "lorm.stats_model=trained lorm.task_start=merged",
        "lorm.head_merge=regmean",
        "lorm.alpha_backbone=0.5",
        "method=finetune",
    ],
)
def test_variants_run_and_differ_from_the_default(tiny_run, override):
    _, _, results, _ = tiny_run
    variant = run_simulation(tiny_config(*override.split()))
    assert len(variant["accuracy_matrix"]) == 2
    assert all(0.0 <= v <= 100.0 for row in variant["accuracy_matrix"] for v in row)
    assert variant["rounds"] != results["rounds"]


def test_one_backbone_whatever_the_number_of_clients():
    exp = build_experiment(tiny_config("scenario.num_clients=5"))
    assert exp.client.model is exp.model
    assert len(exp.client_data(0)) == 5


def test_reference_statistics_need_the_pretrained_task_start():
    with pytest.raises(ValueError, match=r"needs lorm\.task_start='pretrained', got 'merged'"):
        build_experiment(tiny_config("lorm.task_start=merged"))


@pytest.mark.parametrize("method", ["lorm", "fedavg"])
def test_evaluating_only_at_task_ends_leaves_the_numbers_unchanged(method):
    """train.eval_every_round=false only skips evaluations: the accuracy matrices, the traffic and
    the final deployed model are those of a run that evaluates after every round."""
    common = (f"method={method}", "lorm.head_merge=analytic")
    every = build_experiment(tiny_config(*common, "train.eval_every_round=true"))
    ends = build_experiment(tiny_config(*common))  # the default evaluates at task ends only
    a, b = run_simulation(every.cfg, experiment=every), run_simulation(ends.cfg, experiment=ends)
    for key in ("accuracy_matrix", "task_aware_accuracy_matrix", "upload_bytes", "download_bytes"):
        assert a[key] == b[key], key
    # Only the evaluated steps (each task's last) report an evaluation time.
    rows = b["rounds"]
    last = [i == len(rows) - 1 or rows[i + 1]["task"] != row["task"] for i, row in enumerate(rows)]
    assert [r["eval_seconds"] > 0 for r in rows] == last and all(r["eval_seconds"] > 0 for r in a["rounds"])
    deployed_a, deployed_b = every.server.deployed_arrays(), ends.server.deployed_arrays()
    assert all(torch.equal(deployed_a[k], deployed_b[k]) for k in deployed_a)


def test_tensorboard_scalars_are_the_metrics_rows_and_a_missing_package_is_one_clear_error(
    tmp_path, monkeypatch
):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    cfg = tiny_config("train.tensorboard=true", "train.rounds=1", "train.eval_every_round=true")
    results = run_simulation(cfg, tmp_path / "run")
    events = accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    rows = results["rounds"]
    for name in ("seen_accuracy", "step_seconds", "upload_bytes"):
        scalars = events.Scalars(f"step/{name}")
        assert [s.step for s in scalars] == list(range(1, len(rows) + 1))
        assert [s.value for s in scalars] == pytest.approx([r[name] for r in rows], rel=1e-6)
    seen = events.Scalars("task/seen_accuracy")
    assert [s.step for s in seen] == [1, 2]
    assert [s.value for s in seen] == pytest.approx(
        [r["seen_accuracy"] for r in rows if r["phase"] != "train"]
    )
    assert [s.value for s in events.Scalars("task_accuracy/task_1")] == pytest.approx(
        [row[0] for row in results["accuracy_matrix"]]
    )

    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"pip install 'fedlorm\[tensorboard\]'"):
        run_simulation(cfg, tmp_path / "again")
    assert not (tmp_path / "again" / "results.json").exists()
