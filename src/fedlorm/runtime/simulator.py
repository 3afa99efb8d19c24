"""The in-process runtime: every client in turn on the one shared model, the server between rounds.

It is a transport of the protocol in :mod:`fedlorm.methods.base` and nothing more: clients get the
broadcast arrays and the instruction, replies are summed, the server sees only the sums.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from fedlorm.config import RunConfig, config_to_dict
from fedlorm.fcl import summarize
from fedlorm.methods import Instruction, add_arrays
from fedlorm.methods.common import HEAD, apply_arrays
from fedlorm.methods.validation import InvalidReplyError, check_reply
from fedlorm.results import MetricsCSV, plot_run, versions, write_json_atomic
from fedlorm.runtime.evaluation import Evaluation, evaluate
from fedlorm.runtime.experiment import Experiment, build_experiment
from fedlorm.seeding import derive_seed, torch_generator

__all__ = ["METRICS_FIELDS", "run_simulation"]

logger = logging.getLogger(__name__)

METRICS_FIELDS = [
    "task",
    "round",
    "phase",
    "factor",
    "train_loss",
    "seen_accuracy",
    "newest_task_fraction",
    "merge_seconds",
    "upload_bytes",
    "clients",
    "rejected",
]


def run_simulation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Run the whole class-incremental sequence in process; return (and write) the results dict."""
    started = time.perf_counter()
    exp = experiment or build_experiment(cfg)
    torch.manual_seed(derive_seed(cfg.seed, "torch"))
    out = Path(out_dir) if out_dir is not None else None
    csv = MetricsCSV(out / "metrics.csv", METRICS_FIELDS) if out is not None else None
    scenario, server = exp.scenario, exp.server
    plan = [
        list(server.instructions(t, scenario.task_classes(t))) for t in range(scenario.num_tasks)
    ]
    bar = tqdm(
        total=sum(map(len, plan)) * cfg.scenario.num_clients,
        disable=not progress,
        unit="client",
        dynamic_ncols=True,
    )
    server_rng = torch_generator(cfg.seed, "server")
    matrix: list[list[float]] = []
    aware: list[list[float]] = []
    diagnostics: list[dict[str, Any]] = []
    rounds: list[dict[str, Any]] = []
    upload_total = 0
    test_sizes = [
        int(((exp.test.labels >= c.start) & (exp.test.labels < c.stop)).sum())
        for c in (scenario.task_classes(t) for t in range(scenario.num_tasks))
    ]
    for task in range(scenario.num_tasks):
        classes = scenario.task_classes(task)
        shares = exp.client_data(task)
        server.start_task(task, classes, server_rng)
        evaluation: Evaluation | None = None
        steps = plan[task]
        for step, instruction in enumerate(steps):
            bar.set_description(f"task {task + 1}/{scenario.num_tasks} {_step_name(instruction)}")
            row, up = _run_step(exp, instruction, shares, bar)
            upload_total += up
            if cfg.train.eval_every_round or step == len(steps) - 1:
                apply_arrays(exp.model, exp.layers, server.deployed_arrays())
                evaluation = evaluate(
                    exp.model,
                    exp.test.images,
                    exp.test.labels,
                    scenario,
                    task,
                    cfg.train.eval_batch_size,
                )
                row["seen_accuracy"] = round(evaluation.seen_accuracy, 4)
                row["newest_task_fraction"] = round(evaluation.newest_task_fraction, 4)
            rounds.append(row)
            if csv is not None:
                csv.append(row)
        assert evaluation is not None
        matrix.append(evaluation.class_il)
        aware.append(evaluation.task_aware)
        diagnostics.append(_diagnostics(exp, evaluation))
        logger.info("task %d: accuracy on seen classes %.2f%%", task + 1, evaluation.seen_accuracy)
        results = _results(
            exp,
            matrix,
            aware,
            test_sizes,
            diagnostics,
            rounds,
            upload_total,
            time.perf_counter() - started,
        )
        if out is not None:
            write_json_atomic(out / "results.json", results)
    bar.close()
    if out is not None:
        plot_run(results, out / "accuracy.png")
    return results


def _step_name(instruction: Instruction) -> str:
    if instruction.phase == "task_stats":
        return "task statistics"
    return f"round {instruction.round + 1} ({instruction.factor})"


def _run_step(exp: Experiment, instruction: Instruction, shares, bar) -> tuple[dict[str, Any], int]:
    """One broadcast → local work on every client → summed replies → server merge."""
    cfg = exp.cfg
    arrays = exp.server.arrays(instruction)
    expected = exp.server.expected_reply(instruction)
    sums = None
    examples, upload, loss_sum, rejected = 0, 0, 0.0, 0
    for k, data in enumerate(shares):
        generator = torch_generator(cfg.seed, "client", instruction.task, instruction.round, k)
        reply = exp.client.update(arrays, instruction, data, generator)
        bar.update(1)
        upload += reply.upload_bytes
        try:
            check_reply(reply, expected)
        except InvalidReplyError as err:
            rejected += 1
            logger.warning("task %d %s: client %d rejected: %s", instruction.task + 1,
                           _step_name(instruction), k, err)
            continue
        sums = add_arrays(sums, reply.summands)
        examples += reply.num_examples
        loss_sum += reply.metrics.get("train_loss", 0.0) * reply.num_examples
    started = time.perf_counter()
    if sums is None:
        logger.warning("task %d %s: every client was rejected; the previous global state stays",
                       instruction.task + 1, _step_name(instruction))
    else:
        exp.server.aggregate(instruction, sums, examples)
    merge_seconds = time.perf_counter() - started
    row = {
        "task": instruction.task,
        "round": instruction.round if instruction.phase == "train" else cfg.train.rounds,
        "phase": instruction.phase,
        "factor": instruction.factor,
        "train_loss": round(loss_sum / examples, 6) if instruction.phase == "train" and examples else "",
        "seen_accuracy": "",
        "newest_task_fraction": "",
        "merge_seconds": round(merge_seconds, 6),
        "upload_bytes": upload,
        "clients": len(shares),
        "rejected": rejected,
    }
    return row, upload


def _diagnostics(exp: Experiment, evaluation: Evaluation) -> dict[str, Any]:
    """Where class-IL accuracy goes: predictions in the newest task, logit and head-row norms."""
    head = exp.server.deployed_arrays()[f"{HEAD}.weight"].float()
    task = len(evaluation.class_il) - 1
    row_norms = [
        float(head[c.start : c.stop].norm(dim=1).mean())
        for c in (exp.scenario.task_classes(j) for j in range(task + 1))
    ]
    return {
        "task": task,
        "newest_task_prediction_percent": evaluation.newest_task_fraction,
        "mean_logit_norm_per_task": evaluation.logit_norm_per_task,
        "mean_head_row_norm_per_task": row_norms,
    }


def _results(exp: Experiment, matrix, aware, test_sizes, diagnostics, rounds, upload_total, wall):
    summary = summarize(matrix, test_sizes[: len(matrix)])
    return {
        "config": config_to_dict(exp.cfg),
        "seed": exp.cfg.seed,
        "method": exp.cfg.method,
        "versions": versions(),
        "scenario": exp.scenario.to_dict(),
        "accuracy_matrix": matrix,
        "task_aware_accuracy_matrix": aware,
        "task_test_sizes": test_sizes[: len(matrix)],
        "final_accuracy": summary["final_accuracy"],
        "final_accuracy_task_mean": summary["final_accuracy_task_mean"],
        "average_incremental_accuracy": summary["average_incremental_accuracy"],
        "accuracy_per_task": summary["accuracy_per_task"],
        "forgetting": summary["forgetting"],
        "bwt": summary["bwt"],
        "tasks_completed": len(matrix),
        "wall_seconds": round(wall, 3),
        "upload_bytes": upload_total,
        "diagnostics": diagnostics,
        "rounds": rounds,
    }
