"""The ServerApp's main loop: tasks × protocol steps over a Flower grid, evaluation and results files.

It mirrors the in-process simulator step for step (same plan, same server random stream, same
evaluation after each step, same results.json and metrics.csv, same clients asked in each step:
:func:`step_clients`), so for the same config and seed the two runtimes give the same numbers; the
only difference is the transport of the messages. On top it
records which clients each step dropped and why (``results["flower"]``), and saves the server's final
state (``server_state.safetensors``) so that merged adapters can be compared across runtimes. Like
the simulator, it leaves the deployed model in ``model/``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ConfigRecord
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedlorm.flower.messages import to_array_record
from fedlorm.flower.settings import FlowerSettings
from fedlorm.flower.strategy import FedlormStrategy, StepReport
from fedlorm.methods import Instruction
from fedlorm.results import MetricsCSV, plot_run, write_json_atomic
from fedlorm.runtime.experiment import Experiment
from fedlorm.runtime.progress import RunProgress
from fedlorm.runtime.report import (
    METRICS_FIELDS,
    evaluate_step,
    metrics_row,
    note_divergence,
    run_results,
    save_run_model,
    task_diagnostics,
    task_test_sizes,
)
from fedlorm.runtime.simulator import step_clients, step_plan
from fedlorm.seeding import derive_seed, torch_generator

__all__ = ["SERVER_STATE", "run_federation"]

logger = logging.getLogger(__name__)

SERVER_STATE = "server_state.safetensors"


def run_federation(grid: Grid, exp: Experiment, settings: FlowerSettings, out: Path | None) -> dict[str, Any]:
    """Run every task over ``grid``; return (and write to ``out``) the results dict."""
    started = time.perf_counter()
    cfg, scenario, server = exp.cfg, exp.scenario, exp.server
    torch.manual_seed(derive_seed(cfg.seed, "torch"))
    server_rng = torch_generator(cfg.seed, "server")
    strategy = FedlormStrategy(
        server,
        cfg.scenario.num_clients,
        settings.min_clients,
        settings.reply_timeout,
        participants=lambda instruction: step_clients(cfg, instruction),
    )
    strategy.summary()
    served = strategy.discover(grid, wait=settings.node_wait)
    logger.info("%d of %d clients have a SuperNode", len(served), cfg.scenario.num_clients)
    plan = step_plan(exp)
    csv = MetricsCSV(out / "metrics.csv", METRICS_FIELDS) if out is not None else None
    state = RunProgress()
    flower: dict[str, Any] = {
        "min_clients": settings.min_clients,
        "reply_timeout": settings.reply_timeout,
        "clients_at_start": served,
        "steps": [],
        "dropped": [],
        "federated_evaluation": [],
        "ignored_nodes": strategy.ignored,
    }
    extra = {"runtime": "flower", "flower": flower}  # results.json's Flower-only keys
    test_sizes = task_test_sizes(exp)
    step_index = 0
    for task, steps in enumerate(plan):
        server.start_task(task, scenario.task_classes(task), server_rng)
        for step, instruction in enumerate(steps):
            step_index += 1
            last = step == len(steps) - 1
            report = _run_step(grid, strategy, step_index, instruction, settings.reply_timeout)
            row = _row(exp, instruction, report)
            note_divergence(exp, state, instruction, row)
            _record_report(flower, instruction, report)
            if cfg.train.eval_every_round or last:
                evaluation = evaluate_step(exp, task, row)
            state.step_done(row)
            if csv is not None:
                csv.append(row)
        state.task_done(evaluation.class_il, evaluation.task_aware, task_diagnostics(exp, evaluation))
        logger.info("task %d: accuracy on seen classes %.2f%%", task + 1, evaluation.seen_accuracy)
        if settings.federated_eval:
            flower["federated_evaluation"].append(
                _federated_evaluation(grid, strategy, step_index, task, settings.reply_timeout)
            )
        if out is not None:
            results = run_results(exp, state, test_sizes, time.perf_counter() - started, extra)
            write_json_atomic(out / "results.json", results)
    results = run_results(exp, state, test_sizes, time.perf_counter() - started, extra)
    if out is not None:
        write_json_atomic(out / "results.json", results)
        save_file(
            {k: v.detach().cpu().contiguous().clone() for k, v in server.state_dict().items()},
            str(out / SERVER_STATE),
        )
        plot_run(results, out / "accuracy.png")
        save_run_model(exp, out)
    return results


def _run_step(
    grid: Grid, strategy: FedlormStrategy, step_index: int, instruction: Instruction, timeout: float
) -> StepReport:
    """Broadcast one step, wait for the replies (at most ``timeout`` s), merge what is valid."""
    started = time.perf_counter()
    strategy.discover(grid)
    arrays = to_array_record(strategy.server.arrays(instruction))
    config = ConfigRecord(instruction.to_record())
    messages = strategy.configure_train(step_index, arrays, config, grid)
    replies = grid.send_and_receive(messages, timeout=timeout)
    strategy.aggregate_train(step_index, replies)
    report = strategy.report
    assert report is not None
    logger.info(
        "%s: merged clients %s, dropped %d (%.1f s)",
        report.step,
        report.merged,
        len(report.dropped),
        time.perf_counter() - started,
    )
    return report


def _federated_evaluation(
    grid: Grid, strategy: FedlormStrategy, step_index: int, task: int, timeout: float
) -> dict[str, Any]:
    strategy.discover(grid)
    arrays = to_array_record(strategy.server.deployed_arrays())
    messages = strategy.configure_evaluate(step_index, arrays, ConfigRecord({"task": task}), grid)
    metrics = strategy.aggregate_evaluate(step_index, grid.send_and_receive(messages, timeout=timeout))
    if metrics is None:
        logger.warning("task %d: no client evaluated the merged model", task + 1)
        return {"task": task, "accuracy": None, "partitions": [], "accuracies": []}
    logger.info("task %d: clients' accuracy on their own data %.2f%%", task + 1, metrics["accuracy"])
    return {"task": task, **{key: metrics[key] for key in ("accuracy", "partitions", "accuracies")}}


def _row(exp: Experiment, instruction: Instruction, report: StepReport) -> dict[str, Any]:
    """The step's metrics.csv row: every client the step asked counts, each one not merged as rejected."""
    clients = len(report.asked)
    return metrics_row(
        exp,
        instruction,
        report.tally,
        upload_bytes=report.upload_bytes,
        download_bytes=report.download_bytes,
        clients=clients,
        rejected=clients - len(report.merged),
    )


def _record_report(flower: dict[str, Any], instruction: Instruction, report: StepReport) -> None:
    flower["steps"].append(report.to_record())
    for dropped in report.dropped:
        flower["dropped"].append(
            {
                "task": instruction.task,
                "round": instruction.round,
                "phase": instruction.phase,
                "node_id": dropped.node_id,
                "partition": dropped.partition,
                "reason": dropped.reason,
            }
        )
