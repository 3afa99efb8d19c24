"""What a run reports: step names, metrics.csv rows, the evaluation after a step, results.json.

Both runtimes (the in-process simulator and the Flower ServerApp) build their outputs here, so that
for the same config and seed they write the same files with the same fields and meanings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlorm.config import config_to_dict
from fedlorm.export import MODEL_DIR, save_model
from fedlorm.fcl import summarize
from fedlorm.methods import METHODS, Instruction
from fedlorm.methods.arrays import HEAD, PROJECTED_HEAD
from fedlorm.methods.steps import Phase, step_label
from fedlorm.presets import config_sources
from fedlorm.results import versions
from fedlorm.runtime.evaluation import Evaluation, evaluate
from fedlorm.runtime.experiment import Experiment
from fedlorm.runtime.progress import RunProgress
from fedlorm.secure.fold import SecureFold

__all__ = [
    "KEPT_WORDS",
    "METRICS_FIELDS",
    "TIMING_FIELDS",
    "StepTally",
    "divergence_limit",
    "evaluate_step",
    "metrics_row",
    "note_divergence",
    "run_results",
    "save_run_model",
    "secure_tally",
    "step_name",
    "task_diagnostics",
    "task_test_sizes",
    "untimed",
]

logger = logging.getLogger(__name__)

DIVERGENCE_FACTOR = 10.0
"""A training step diverged if its mean loss exceeds this many times log(classes in the task)."""

METRICS_FIELDS = [
    "task",
    "round",
    "phase",
    "factor",
    "train_loss",
    "seen_accuracy",
    "newest_task_fraction",
    "step_seconds",
    "merge_seconds",
    "eval_seconds",
    "upload_bytes",
    "download_bytes",
    "clients",
    "rejected",
    "state_kept",
]
"""The columns of metrics.csv, one row per step (:func:`metrics_row`)."""

KEPT_WORDS = {
    "no-reply": "no valid reply (or no contribution to a secure sum) came back",
    "too-few": "fewer than min-clients valid replies (Flower)",
    "halted": "the SecAgg+ protocol halted or failed (Flower)",
    "contributors": "a re-run secure step would have summed other clients than its first run (Flower)",
    "decode": "the secure sum does not decode as the sum of its contributors' encodings",
    "sums": "the decoded secure sums fail their checks",
    "merge": "the merge raised an error or left non-finite values",
}
"""``state_kept`` values of a step that merged nothing (the previous state stays), and what each means;
"" where the step merged."""

TIMING_FIELDS = ("step_seconds", "merge_seconds", "eval_seconds")
"""The wall-time columns: the whole step (broadcast, the clients' local work, replies, checks and
merge; for a training step that is training plus the statistics the merge needs), the server's merge
alone, and the evaluation after the step (0 where none ran). They differ between runs of the same
seed; every other column is reproducible."""


@dataclass
class StepTally:
    """What one step did: whom it asked, what it folded, what it sent and received.

    Every transport's ``run_step`` returns one (:class:`fedlorm.runtime.engine.Transport`); the
    engine turns it into the step's metrics row.
    """

    clients: int = 0
    """The clients the step asked."""
    rejected: int = 0
    """Asked clients whose reply is not in the merge (invalid, missing, not in the secure sum)."""
    examples: int = 0
    loss_sum: float = 0.0
    upload_bytes: int = 0
    download_bytes: int = 0
    """The step's broadcast as the protocol sends it: each asked client's delta
    (:mod:`fedlorm.runtime.delivery`), summed."""
    merge_seconds: float = 0.0
    kept: str = ""
    """A word of :data:`KEPT_WORDS` when nothing was merged (the previous state stays), else ""."""
    dropped: dict[int, str] = field(default_factory=dict)
    """Client → reason, for each reply the server checked and left out (plain mode)."""


def secure_tally(
    fold: SecureFold, instruction: Instruction, *, clients: int, contributors: int, upload_bytes: int
) -> StepTally:
    """The tally of ``instruction``'s folded secure sum (:func:`~fedlorm.secure.fold.fold_secure_sum`);
    a kept state is logged with its reason.

    Args:
        fold: What folding the secure sum did.
        instruction: The step.
        clients: How many clients the step asked.
        contributors: How many of them are in the sum; the rest count as rejected.
        upload_bytes: The contributors' masked uploads, summed.

    Returns:
        The step's tally (its ``download_bytes`` is the transport's to fill in).
    """
    if fold.kept is not None:
        logger.warning("%s: %s; the previous global state stays", step_name(instruction), fold.reason)
    return StepTally(
        clients=clients,
        rejected=clients - contributors,
        examples=fold.examples,
        loss_sum=fold.loss_sum,
        upload_bytes=upload_bytes,
        merge_seconds=fold.merge_seconds,
        kept=fold.kept or "",
    )


def step_name(instruction: Instruction) -> str:
    """A step's readable name, e.g. ``task 1 round 2 (A)`` (1-based; logs, Flower's step reports)."""
    return f"task {instruction.task + 1} {step_label(instruction)}"


def metrics_row(
    exp: Experiment,
    instruction: Instruction,
    tally: StepTally | None,
    *,
    upload_bytes: int,
    download_bytes: int,
    clients: int,
    rejected: int,
    kept: str | None = None,
) -> dict[str, Any]:
    """A step's metrics.csv row before evaluation; ``tally`` None: nothing was merged (state kept).

    ``kept``: the row's ``state_kept`` word (:data:`KEPT_WORDS`); None takes the tally's, and
    ``no-reply`` without one.
    ``upload_bytes``: the replies' tensor payload; ``download_bytes``: the broadcast's, summed over
    the clients it was sent to.
    """
    train = instruction.phase is Phase.TRAIN
    return {
        "task": instruction.task,
        "round": instruction.round if train else exp.cfg.train.rounds,
        "phase": instruction.phase.value,
        "factor": instruction.factor.value,
        "train_loss": _mean_loss(tally) if train else "",
        "seen_accuracy": "",
        "newest_task_fraction": "",
        "step_seconds": 0.0,
        "merge_seconds": round(tally.merge_seconds, 6) if tally is not None else 0.0,
        "eval_seconds": 0.0,
        "upload_bytes": upload_bytes,
        "download_bytes": download_bytes,
        "clients": clients,
        "rejected": rejected,
        "state_kept": kept if kept is not None else (tally.kept if tally is not None else "no-reply"),
    }


def untimed(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``rows`` without the wall-time columns (:data:`TIMING_FIELDS`): what two runs of a seed share."""
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in rows]


def _mean_loss(tally: StepTally | None) -> float | str:
    """The merged replies' sample-weighted mean loss; "" if none, "nan"/"inf" as text (strict JSON)."""
    if tally is None or not tally.examples:
        return ""
    loss = tally.loss_sum / tally.examples
    return round(loss, 6) if math.isfinite(loss) else str(loss)


def divergence_limit(classes: int) -> float:
    """The mean training loss above which a step over ``classes`` classes counts as diverged.

    The local loss is cross-entropy over the task's classes only, so a uniform guess scores
    log(classes), and a task's fresh head rows start there; training lowers it. A step whose mean is
    ten times that has logits confidently wrong by ~10·log(classes) on average, which a step that
    learns does not produce, while a noisy but sane step (a spike at a high lr) stays within a few
    times log(classes). Two classes at least: a one-class task has loss 0 and no scale of its own.
    """
    return DIVERGENCE_FACTOR * math.log(max(classes, 2))


def note_divergence(
    exp: Experiment, state: RunProgress, instruction: Instruction, row: Mapping[str, Any]
) -> None:
    """Record in ``state`` (and log, once per run) the first training step whose mean loss diverged.

    ``row`` is the step's metrics row; its loss is not finite or above :func:`divergence_limit`.
    """
    loss = row.get("train_loss", "")
    if state.diverged is not None or instruction.phase is not Phase.TRAIN or loss == "":
        return
    limit = divergence_limit(len(instruction.classes))
    if math.isfinite(float(loss)) and float(loss) <= limit:
        return
    state.diverged = {"task": instruction.task, "round": instruction.round, "loss": loss}
    logger.warning(
        "%s: training diverged: mean training loss %s is above %.3g, %g times the loss of a uniform "
        "guess over the task's %d classes; lower train.lr (now %g). The run goes on; later diverged "
        "steps are not reported",
        step_name(instruction),
        loss if isinstance(loss, str) else f"{loss:.6g}",
        limit,
        DIVERGENCE_FACTOR,
        len(instruction.classes),
        exp.cfg.train.lr,
    )


def evaluate_step(exp: Experiment, task: int, row: dict[str, Any]) -> Evaluation:
    """Evaluate the deployed model after a step of ``task``; its accuracies go into the step's ``row``."""
    exp.server.deploy(exp.model, exp.layers)
    evaluation = evaluate(
        exp.model,
        exp.test.images,
        exp.test.labels,
        exp.scenario,
        task,
        exp.cfg.train.eval_batch_size,
        exp.cfg.train.precision,
    )
    row["seen_accuracy"] = round(evaluation.seen_accuracy, 4)
    row["newest_task_fraction"] = round(evaluation.newest_task_fraction, 4)
    return evaluation


def save_run_model(exp: Experiment, out: Path) -> Path:
    """Write the server's deployed model to ``out/model`` (:mod:`fedlorm.export`); return the folder."""
    exp.server.deploy(exp.model, exp.layers)
    return save_model(out / MODEL_DIR, exp.model, exp.layers, class_names=exp.class_names, cfg=exp.cfg)


def task_test_sizes(exp: Experiment) -> list[int]:
    """Test images per task (the weights of the summary accuracies)."""
    labels, scenario = exp.test.labels, exp.scenario
    return [
        int(((labels >= c.start) & (labels < c.stop)).sum())
        for c in (scenario.task_classes(t) for t in range(scenario.num_tasks))
    ]


def task_diagnostics(exp: Experiment, evaluation: Evaluation) -> dict[str, Any]:
    """Where class-IL accuracy goes: predictions in the newest task, logit and head-row norms."""
    deployed = exp.server.deployed_arrays()
    head = deployed.get(f"{PROJECTED_HEAD}.weight", deployed[f"{HEAD}.weight"]).float()
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


def run_results(
    exp: Experiment,
    state: RunProgress,
    test_sizes: list[int],
    wall: float,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The results.json dict of the tasks completed so far; ``extra`` (runtime-only keys) goes last."""
    matrix = state.matrix
    summary = summarize(matrix, test_sizes[: len(matrix)])
    return {
        "config": config_to_dict(exp.cfg),
        "config_sources": config_sources(exp.cfg, METHODS[exp.cfg.method].run_config),
        "seed": exp.cfg.seed,
        "method": exp.cfg.method,
        "versions": versions(),
        "scenario": exp.scenario.to_dict(),
        "accuracy_matrix": matrix,
        "task_aware_accuracy_matrix": state.aware,
        "task_test_sizes": test_sizes[: len(matrix)],
        "final_accuracy": summary["final_accuracy"],
        "final_accuracy_task_mean": summary["final_accuracy_task_mean"],
        "average_incremental_accuracy": summary["average_incremental_accuracy"],
        "accuracy_per_task": summary["accuracy_per_task"],
        "forgetting": summary["forgetting"],
        "bwt": summary["bwt"],
        "diverged": state.diverged,
        "tasks_completed": len(matrix),
        "wall_seconds": round(wall, 3),
        "upload_bytes": state.upload_bytes,
        "download_bytes": state.download_bytes,
        "diagnostics": state.diagnostics,
        "rounds": state.rounds,
        **(extra or {}),
    }
