"""``fedlorm compare``: several methods on the same scenarios (same seeds → same partitions and class
order), summarised as mean ± std over seeds in a markdown table, a CSV file and a plot.

Each run keeps its own directory ``OUT/METHOD/sSEED`` with the usual results files, so an interrupted
comparison resumes: finished runs of the same config are read back, not repeated.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlorm.config import ConfigError, RunConfig, config_from_plain, config_to_dict, validate_config
from fedlorm.methods import JOINT, METHODS, joint_config
from fedlorm.results import plot_comparison

__all__ = ["MethodSummary", "comparison_table", "run_comparison", "summarize_method", "write_comparison"]

logger = logging.getLogger(__name__)

RUN_FILES = ("results.json", "metrics.csv", "accuracy.png")


@dataclass
class MethodSummary:
    """One method's results over seeds (mean and sample standard deviation where defined)."""

    method: str
    seeds: list[int]
    final_accuracy: tuple[float, float]
    average_incremental_accuracy: tuple[float, float]
    forgetting: tuple[float, float]
    wall_seconds: float
    upload_mb_per_client_round: float
    seen_accuracy: tuple[list[float], list[float]]


def method_config(base: RunConfig, method: str, seed: int) -> RunConfig:
    """``base`` with ``method`` and ``seed`` set (joint: its one-task, one-client scenario)."""
    cfg = config_from_plain(config_to_dict(base))
    cfg.method, cfg.seed = method, seed
    return joint_config(cfg) if method == JOINT else cfg


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names, each known and listed once; a one-line error otherwise."""
    if not methods:
        raise ConfigError("--methods is empty; give a comma-separated list, e.g. lorm,fedavg")
    for name in methods:
        if name not in METHODS:
            raise ConfigError(f"method {name!r} is unknown; choose from: {', '.join(sorted(METHODS))}")
    if len(set(methods)) != len(methods):
        raise ConfigError(f"--methods lists a method twice: {','.join(methods)}")
    return list(methods)


def _finished(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The stored results of ``run_dir`` if it holds a finished run of exactly ``cfg``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    wanted = json.loads(json.dumps(config_to_dict(cfg)))
    if results.get("config") != wanted:
        raise ConfigError(
            f"{str(run_dir)!r} holds a run of another config; choose another --out or remove it"
        )
    sizes = results.get("scenario", {}).get("task_sizes", [])
    return results if results.get("tasks_completed") == len(sizes) else None


def run_comparison(
    base: RunConfig,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    run: Callable[[RunConfig, Path], dict[str, Any]],
) -> dict[str, list[dict[str, Any]]]:
    """Run (or read back) every method × seed under ``out``; return results by method, seed order.

    ``run(cfg, run_dir)`` does one run and writes its files (the CLI passes the simulator). Every
    config is validated before the first run starts.
    """
    plan = [(m, s, method_config(base, m, s)) for s in seeds for m in check_methods(methods)]
    for _, _, cfg in plan:
        validate_config(cfg)
    for method, seed, cfg in plan:  # a run of another config fails here, before any training
        _finished(out / method / f"s{seed}", cfg)
    by_method: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for method, seed, cfg in plan:
        run_dir = out / method / f"s{seed}"
        # Looked up just before the run, so a second compare on other methods can share ``out``.
        results = _finished(run_dir, cfg)
        if results is None:
            logger.info("running %s, seed %d → %s", method, seed, run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                (run_dir / name).unlink(missing_ok=True)
            results = run(cfg, run_dir)
        else:
            logger.info("%s, seed %d: finished run found in %s", method, seed, run_dir)
        by_method[method].append(results)
    return by_method


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def summarize_method(method: str, runs: Sequence[dict[str, Any]]) -> MethodSummary:
    """Mean ± std over seeds of one method's final accuracy, AIA, forgetting; mean cost."""
    per_task = [r["accuracy_per_task"] for r in runs]
    curves = list(zip(*per_task, strict=True))
    upload = [
        r["upload_bytes"] / (r["config"]["scenario"]["num_clients"] * len(r["rounds"])) / 1e6
        for r in runs
    ]
    return MethodSummary(
        method=method,
        seeds=[int(r["seed"]) for r in runs],
        final_accuracy=_mean_std([r["final_accuracy"] for r in runs]),
        average_incremental_accuracy=_mean_std([r["average_incremental_accuracy"] for r in runs]),
        forgetting=_mean_std([r["forgetting"] for r in runs]),
        wall_seconds=statistics.fmean(r["wall_seconds"] for r in runs),
        upload_mb_per_client_round=statistics.fmean(upload),
        seen_accuracy=([_mean_std(c)[0] for c in curves], [_mean_std(c)[1] for c in curves]),
    )


def _pm(value: tuple[float, float], seeds: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {std:.2f}"


COLUMNS = [
    "method",
    "final acc (%)",
    "avg inc acc (%)",
    "forgetting",
    "wall (s)",
    "upload / client / round (MB)",
]


def comparison_table(rows: Sequence[MethodSummary]) -> str:
    """Markdown table, one row per method (mean ± std over seeds)."""
    cells = [COLUMNS] + [
        [
            r.method,
            _pm(r.final_accuracy, len(r.seeds)),
            _pm(r.average_incremental_accuracy, len(r.seeds)),
            _pm(r.forgetting, len(r.seeds)),
            f"{r.wall_seconds:.0f}",
            f"{r.upload_mb_per_client_round:.2f}",
        ]
        for r in rows
    ]
    widths = [max(len(row[c]) for row in cells) for c in range(len(COLUMNS))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    rule = "|" + "|".join("-" * (w + 1) + (":" if k else "-") for k, w in enumerate(widths)) + "|"
    return "\n".join([lines[0], rule, *lines[1:]])


def write_comparison(rows: Sequence[MethodSummary], out: Path, title: str = "") -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv", "png": out / "comparison.png"}
    paths["md"].write_text(comparison_table(rows) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["method", "seeds", "final_mean", "final_std", "aia_mean", "aia_std", "forgetting_mean",
             "forgetting_std", "wall_seconds_mean", "upload_mb_per_client_round"]
        )
        for r in rows:
            writer.writerow(
                [r.method, " ".join(map(str, r.seeds)), *r.final_accuracy,
                 *r.average_incremental_accuracy, *r.forgetting, r.wall_seconds,
                 r.upload_mb_per_client_round]
            )
    curves = {r.method: r.seen_accuracy for r in rows if len(r.seen_accuracy[0]) > 1}
    levels = {r.method: r.final_accuracy[0] for r in rows if len(r.seen_accuracy[0]) == 1}
    plot_comparison(curves, paths["png"], title=title, levels=levels)
    return paths
