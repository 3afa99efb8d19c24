"""The forgetting diagnostics (feature drift, oracle head) against independent computations."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from torch import nn

from fedlorm.config import ConfigError
from fedlorm.flower.settings import settings_from_run_config
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation

ANALYTIC = ["lorm.head_merge=analytic", "train.forgetting_diagnostics=true", "train.eval_every_round=false"]


def test_a_frozen_backbone_has_no_drift_and_its_oracle_is_its_own_head():
    """head-only never moves the backbone: every drift is exactly 0, and the oracle head, solved
    from the same sums the server folded task by task, predicts what the deployed head does."""
    results = run_simulation(tiny_config(*ANALYTIC, "method=head-only"))
    # abs 1e-4: the run averages its hits in float32
    report = results["forgetting_diagnostics"]
    assert report["feature_drift_per_task"] == [0.0, 0.0]
    assert report["oracle_head_accuracy_per_task"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-4)
    assert report["oracle_head_final_accuracy"] == pytest.approx(results["final_accuracy"], abs=1e-4)


def test_oracle_head_equals_stacked_ridge_least_squares():
    """The oracle of a trained LoRM run equals a ridge least-squares fit (float64, stacked
    [F̂; √λ I] against [Y; 0]) of the final model's features of every training image."""
    exp = build_experiment(tiny_config(*ANALYTIC, "method=lorm"))
    results = run_simulation(exp.cfg, experiment=exp)
    report = results["forgetting_diagnostics"]
    model = exp.model
    model.eval()
    with torch.no_grad():
        train_f = model.features(exp.train.images).double()
        test_f = model.features(exp.test.images).double()
    used = torch.cat([idx for task in exp.partitions for idx in task])
    F = torch.cat([train_f[used], torch.ones(len(used), 1, dtype=torch.float64)], 1)
    Y = nn.functional.one_hot(exp.train.labels[used], exp.scenario.num_classes).double()
    lam = exp.cfg.lorm.head_ridge * float((F * F).sum(0).mean())
    stacked = torch.cat([F, lam**0.5 * torch.eye(F.shape[1], dtype=torch.float64)])
    target = torch.cat([Y, torch.zeros(F.shape[1], Y.shape[1], dtype=torch.float64)])
    solution = torch.linalg.lstsq(stacked, target).solution
    logits = torch.cat([test_f, torch.ones(len(test_f), 1, dtype=torch.float64)], 1) @ solution
    hits = logits.argmax(1) == exp.test.labels
    expected = []
    for t in range(exp.scenario.num_tasks):
        classes = exp.scenario.task_classes(t)
        rows = (exp.test.labels >= classes.start) & (exp.test.labels < classes.stop)
        expected.append(100.0 * float(hits[rows].double().mean()))
    assert report["oracle_head_accuracy_per_task"] == pytest.approx(expected, abs=1e-9)
    overall = 100.0 * float(hits.double().mean())
    assert report["oracle_head_final_accuracy"] == pytest.approx(overall, abs=1e-9)
    # Training on task 2 moved task 1's features; the last task is measured where it ended.
    drift = report["feature_drift_per_task"]
    assert drift[0] > 1e-3 and drift[-1] == 0.0
    assert report["mean_feature_drift"] == drift[0]


def test_flower_refuses_the_in_process_diagnostic():
    with pytest.raises(ConfigError, match=r"train\.forgetting_diagnostics"):
        settings_from_run_config({"preset": "smoke", "train.forgetting_diagnostics": True})


def test_first_session_adaptation_leaves_no_stale_head():
    """lorm-fsa: task 2 only adds its classes to the head, so the backbone ends where task 1 left it
    (no drift) and the deployed head is the oracle's, the ridge fit on final features."""
    results = run_simulation(tiny_config(*ANALYTIC, "method=lorm-fsa"))
    report = results["forgetting_diagnostics"]
    assert report["feature_drift_per_task"] == [0.0, 0.0]
    assert report["oracle_head_accuracy_per_task"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-4)
    assert [(r["task"], r["phase"]) for r in results["rounds"] if r["task"] == 1] == [(1, "head_stats")]
    trained = run_simulation(tiny_config(*ANALYTIC, "method=lorm"))
    assert trained["accuracy_matrix"][0] == results["accuracy_matrix"][0]  # task 1 trains as before
    knob = run_simulation(tiny_config(*ANALYTIC, "method=lorm", "lorm.adapt_tasks=1"))
    assert knob["accuracy_matrix"] == results["accuracy_matrix"]


def test_adapt_tasks_needs_the_analytic_head():
    with pytest.raises(ConfigError, match=r"lorm\.adapt_tasks = 1 is not allowed"):
        build_experiment(tiny_config("lorm.adapt_tasks=1"))
    with pytest.raises(ValueError, match=r"set lorm\.head_merge = 'analytic'"):
        build_experiment(tiny_config("method=lorm-fsa"))
