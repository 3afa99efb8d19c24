"""``fedlorm compare``: several methods on the same scenarios (same seeds → same partitions and class
order), summarised as mean ± std over seeds in a markdown table, a CSV file and a plot.

Each run keeps its own directory ``OUT/METHOD/sSEED`` with the usual results files, so an interrupted
comparison resumes: finished runs of the same config are read back, not repeated, and a run that was
interrupted continues from its checkpoint. Several presets are compared in one go under
``OUT/PRESET/METHOD/sSEED``, each with its own table, plus a combined table with a preset column.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlorm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_plain,
    config_to_dict,
    validate_config,
)
from fedlorm.methods import METHODS
from fedlorm.presets import PRESETS, published_accuracy
from fedlorm.results import plot_comparison
from fedlorm.run_setup import clear_output
from fedlorm.runtime.checkpoint import CheckpointError, find_checkpoint, load_record

__all__ = [
    "MethodSummary",
    "PairedDifference",
    "PlannedRun",
    "check_methods",
    "check_presets",
    "comparison_dirs",
    "comparison_table",
    "execute_comparison",
    "paired_differences",
    "paired_table",
    "plan_comparison",
    "run_comparison",
    "run_comparisons",
    "split_method_overrides",
    "summarize_method",
    "write_comparison",
    "write_table",
]

logger = logging.getLogger(__name__)

PUBLISHED_METHOD = "lorm"
"""The method whose rows show the paper's published accuracy (the paper reports LoRM's)."""

Runner = Callable[[RunConfig, Path], dict[str, Any]]
"""``runner(cfg, run_dir)``: run (or resume) one run in ``run_dir`` and return its results dict."""


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
    download_mb_per_client_round: float | None = None
    paper_final_accuracy: float | None = None
    preset: str | None = None


@dataclass(frozen=True)
class PlannedRun:
    """One run of a comparison: its method, seed, config and directory."""

    method: str
    seed: int
    cfg: RunConfig
    run_dir: Path


Base = RunConfig | Callable[[str], RunConfig]
"""A comparison's starting config: one for every method, or ``base(method)`` (a preset's config with
that method's validated settings and the user's common overrides, as ``fedlorm compare`` builds it)."""


def method_config(base: Base, method: str, seed: int, overrides: Sequence[str] = ()) -> RunConfig:
    """``base`` (for ``method``) with ``method``'s own ``key=value`` overrides, ``method`` and
    ``seed`` set (joint: its one-task, one-client scenario)."""
    start = base(method) if callable(base) else base
    cfg = apply_overrides(config_from_plain(config_to_dict(start)), overrides)
    cfg.method, cfg.seed = method, seed
    return METHODS[method].run_config(cfg)


def split_method_overrides(
    overrides: Sequence[str], methods: Sequence[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """Common ``key=value`` overrides, and per method the ``METHOD:key=value`` ones (e.g.
    ``lorm:train.lr=1e-3``: each method at its own learning rate, on the same seeds and partitions)."""
    common: list[str] = []
    own: dict[str, list[str]] = {m: [] for m in methods}
    for item in overrides:
        head, sep, rest = item.partition(":")
        if not sep or "=" in head:
            common.append(item)
        elif head in own:
            own[head].append(rest)
        else:
            raise ConfigError(
                f"override {item!r} is for method {head!r}, which is not in --methods "
                f"({', '.join(methods)}); write METHOD:key=value for one of them"
            )
    return common, own


def _check_names(
    names: Sequence[str], known: Mapping[str, Any], kind: str, option: str, empty: str
) -> list[str]:
    """``names``, each a key of ``known`` and listed once; a one-line error naming the bad one otherwise."""
    if not names:
        raise ConfigError(f"{option} is empty; {empty}")
    for name in names:
        if name not in known:
            raise ConfigError(f"{kind} {name!r} is unknown; choose from: {', '.join(sorted(known))}")
    if len(set(names)) != len(names):
        raise ConfigError(f"{option} lists a {kind} twice: {','.join(names)}")
    return list(names)


def check_methods(methods: Sequence[str]) -> list[str]:
    """The method names, each known and listed once; a one-line error otherwise."""
    return _check_names(methods, METHODS, "method", "--methods",
                        "give a comma-separated list, e.g. lorm,fedavg")


def check_presets(presets: Sequence[str]) -> list[str]:
    """The preset names, each known and listed once; a one-line error otherwise."""
    return _check_names(presets, PRESETS, "preset", "--preset",
                        "give a preset or a comma-separated list of presets")


def comparison_dirs(presets: Sequence[str], out: Path) -> dict[str, Path]:
    """Each preset's comparison directory: ``out`` itself for one preset (the single-preset layout,
    so earlier comparisons still resume), ``out/PRESET`` for several."""
    if len(presets) == 1:
        return {presets[0]: out}
    return {name: out / name for name in presets}


def _plain(cfg: RunConfig) -> dict[str, Any]:
    """``cfg`` as it reads back from a JSON file (tuples become lists), for comparing stored configs."""
    return json.loads(json.dumps(config_to_dict(cfg)))


def _other_config(run_dir: Path) -> ConfigError:
    return ConfigError(
        f"{str(run_dir)!r} holds a run of another config; choose another --out or remove it"
    )


def _same_config(stored: Any, cfg: RunConfig) -> bool:
    """Whether a stored config is ``cfg``. Read through today's schema: a key added since the run was
    recorded takes its default, which is how that run behaved (new keys default to the old behaviour)."""
    try:
        return _plain(config_from_plain(stored)) == _plain(cfg)
    except (ConfigError, TypeError, ValueError, AttributeError):
        return False


def _finished(run_dir: Path, cfg: RunConfig) -> dict[str, Any] | None:
    """The stored results of ``run_dir`` if it holds a finished run of exactly ``cfg``."""
    path = run_dir / "results.json"
    if not path.is_file():
        return None
    try:
        results = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not _same_config(results.get("config"), cfg):
        raise _other_config(run_dir)
    sizes = results.get("scenario", {}).get("task_sizes", [])
    return results if results.get("tasks_completed") == len(sizes) else None


def _resumable(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether ``run_dir`` holds a checkpoint of exactly ``cfg`` (an interrupted run to continue).

    A checkpoint of another config is an error, as is an unreadable one: it is never deleted here.
    """
    if find_checkpoint(run_dir) is None:
        return False
    try:
        record = load_record(run_dir)
    except CheckpointError as err:
        raise ConfigError(f"{err}; remove {str(run_dir)!r} or choose another --out") from None
    if not _same_config(record.get("config"), cfg):
        raise _other_config(run_dir)
    return True


def plan_comparison(
    base: Base,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    method_overrides: Mapping[str, Sequence[str]] | None = None,
) -> list[PlannedRun]:
    """Every method × seed under ``out``, each config validated and each directory checked, so that
    bad input (or a run of another config in the way) fails before any training.

    ``method_overrides``: ``key=value`` overrides applied to one method's runs only.
    """
    own = method_overrides or {}
    plan = [
        PlannedRun(m, s, method_config(base, m, s, own.get(m, ())), out / m / f"s{s}")
        for s in seeds
        for m in check_methods(methods)
    ]
    for planned in plan:
        validate_config(planned.cfg)
    for planned in plan:
        _finished(planned.run_dir, planned.cfg)
        _resumable(planned.run_dir, planned.cfg)
    return plan


def _run_one(planned: PlannedRun, run: Runner, resume: Runner | None) -> dict[str, Any]:
    """Read back a finished run, continue an interrupted one from its checkpoint, or start afresh."""
    method, seed, cfg, run_dir = planned.method, planned.seed, planned.cfg, planned.run_dir
    # Looked up just before the run, so a second compare on other methods can share ``out``.
    results = _finished(run_dir, cfg)
    if results is not None:
        logger.info("%s, seed %d: finished run found in %s", method, seed, run_dir)
        return results
    if resume is not None and _resumable(run_dir, cfg):
        logger.info("resuming %s, seed %d from the checkpoint in %s", method, seed, run_dir)
        return resume(cfg, run_dir)
    logger.info("running %s, seed %d → %s", method, seed, run_dir)
    created = _make_dirs(run_dir)
    clear_output(run_dir)
    try:
        return run(cfg, run_dir)
    except BaseException:
        for folder in created:  # a run that failed before writing anything (bad data, device) leaves nothing
            with contextlib.suppress(OSError):
                folder.rmdir()  # only ever removes an empty directory
        raise


def _make_dirs(run_dir: Path) -> list[Path]:
    """Create ``run_dir`` and its missing parents; return the created ones, deepest first."""
    created, folder = [], run_dir
    while not folder.exists():
        created.append(folder)
        folder = folder.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    return created


def execute_comparison(
    plan: Sequence[PlannedRun], *, run: Runner, resume: Runner | None = None
) -> dict[str, list[dict[str, Any]]]:
    """Do every planned run in order; return results by method (plan order), in seed order.

    ``run(cfg, run_dir)`` starts a run and ``resume(cfg, run_dir)`` continues the checkpointed one
    in ``run_dir`` (the CLI passes the simulator's); without ``resume`` an interrupted run starts over.
    A run that raises stops the comparison; the runs finished before it stay on disk for the rerun.
    """
    by_method: dict[str, list[dict[str, Any]]] = {p.method: [] for p in plan}
    for planned in plan:
        by_method[planned.method].append(_run_one(planned, run, resume))
    return by_method


def run_comparison(
    base: Base,
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    run: Runner,
    resume: Runner | None = None,
    method_overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """Run (or read back, or resume) every method × seed under ``out``; results by method, seed order.

    Every config is validated before the first run starts (:func:`plan_comparison`).
    """
    plan = plan_comparison(base, methods, seeds, out, method_overrides)
    return execute_comparison(plan, run=run, resume=resume)


def run_comparisons(
    bases: Mapping[str, Base],
    methods: Sequence[str],
    seeds: Sequence[int],
    out: Path,
    *,
    run: Runner,
    resume: Runner | None = None,
    method_overrides: Mapping[str, Sequence[str]] | None = None,
) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """:func:`run_comparison` for every preset (``bases``: preset name → config) in its own directory
    (:func:`comparison_dirs`); every preset × method × seed is planned before the first run starts."""
    dirs = comparison_dirs(list(bases), out)
    plans = {
        name: plan_comparison(cfg, methods, seeds, dirs[name], method_overrides)
        for name, cfg in bases.items()
    }
    return {name: execute_comparison(plan, run=run, resume=resume) for name, plan in plans.items()}


def _mean_std(values: Sequence[float | None]) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return math.nan, math.nan
    return statistics.fmean(finite), statistics.stdev(finite) if len(finite) > 1 else 0.0


def _mb_per_client_round(results: dict[str, Any], key: str) -> float | None:
    """``results[key]`` (bytes over the whole run) in MB per client asked and protocol step; None if
    absent."""
    total = results.get(key)
    if total is None:
        return None
    rows = results["rounds"]
    asked = [row.get("clients") for row in rows]
    if all(isinstance(n, int) and n > 0 for n in asked):  # per client asked (scenario.participation)
        return total / sum(asked) / 1e6
    return total / (results["config"]["scenario"]["num_clients"] * len(rows)) / 1e6


def summarize_method(
    method: str, runs: Sequence[dict[str, Any]], *, preset: str | None = None
) -> MethodSummary:
    """Mean ± std over seeds of one method's final accuracy, AIA, forgetting; mean cost.

    Download is averaged over the runs that record it (results files from before it was recorded
    lack it). ``preset`` names the setting, so that LoRM's row carries the paper's accuracy for it.
    """
    per_task = [r["accuracy_per_task"] for r in runs]
    curves = list(zip(*per_task, strict=True))
    upload = [_mb_per_client_round(r, "upload_bytes") for r in runs]
    download = [mb for mb in (_mb_per_client_round(r, "download_bytes") for r in runs) if mb is not None]
    published = published_accuracy(preset) if preset is not None and method == PUBLISHED_METHOD else None
    return MethodSummary(
        method=method,
        seeds=[int(r["seed"]) for r in runs],
        final_accuracy=_mean_std([r["final_accuracy"] for r in runs]),
        average_incremental_accuracy=_mean_std([r["average_incremental_accuracy"] for r in runs]),
        forgetting=_mean_std([r["forgetting"] for r in runs]),
        wall_seconds=statistics.fmean(r["wall_seconds"] for r in runs),
        upload_mb_per_client_round=statistics.fmean(upload),
        seen_accuracy=([_mean_std(c)[0] for c in curves], [_mean_std(c)[1] for c in curves]),
        download_mb_per_client_round=statistics.fmean(download) if download else None,
        paper_final_accuracy=published,
        preset=preset,
    )


# Two-sided 95 % quantiles of Student's t for 1..30 degrees of freedom (written out rather than
# importing scipy for eleven numbers' worth of use); beyond 30 the normal 1.96 is within 2 %.
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with ``df`` ≥ 1 degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom {df} is not allowed; expected ≥ 1")
    return _T975[df - 1] if df <= len(_T975) else 1.96


@dataclass(frozen=True)
class PairedDifference:
    """Final accuracy of ``reference`` minus ``method``, paired by seed (same partitions and class
    order), in points: mean and its 95 % t-interval (None with fewer than two common seeds)."""

    reference: str
    method: str
    seeds: list[int]
    mean: float
    low: float | None
    high: float | None


def paired_differences(
    by_method: Mapping[str, Sequence[Mapping[str, Any]]], reference: str
) -> list[PairedDifference]:
    """``reference`` against every other method, over the seeds both have finished."""
    ref = {int(r["seed"]): float(r["final_accuracy"]) for r in by_method[reference]}
    out = []
    for method, runs in by_method.items():
        if method == reference:
            continue
        other = {int(r["seed"]): float(r["final_accuracy"]) for r in runs}
        seeds = sorted(set(ref) & set(other))
        if not seeds:
            continue
        diffs = [ref[s] - other[s] for s in seeds]
        mean = statistics.fmean(diffs)
        low = high = None
        if len(diffs) > 1:
            half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
            low, high = mean - half, mean + half
        out.append(PairedDifference(reference, method, seeds, mean, low, high))
    return out


PAIRED_FIELDS = ["reference", "method", "seeds", "mean_difference", "ci95_low", "ci95_high"]


def paired_table(rows: Sequence[PairedDifference]) -> str:
    """Markdown table of paired differences in final accuracy (points, 95 % interval)."""
    lines = [
        "| difference in final acc (points) | seeds | mean | 95 % interval |",
        "|---|---:|---:|---:|",
    ]
    for d in rows:
        interval = "–" if d.low is None else f"[{d.low:+.2f}, {d.high:+.2f}]"
        lines.append(f"| {d.reference} − {d.method} | {len(d.seeds)} | {d.mean:+.2f} | {interval} |")
    return "\n".join(lines)


def _pm(value: tuple[float, float], seeds: int) -> str:
    mean, std = value
    if math.isnan(mean):
        return "–"
    return f"{mean:.2f}" if seeds == 1 else f"{mean:.2f} ± {std:.2f}"


COLUMNS = [
    "method",
    "final acc (%)",
    "paper (%)",
    "avg inc acc (%)",
    "forgetting",
    "wall (s)",
    "upload / client / round (MB)",
    "download / client / round (MB)",
]
CSV_FIELDS = [
    "method",
    "seeds",
    "final_mean",
    "final_std",
    "paper_final",
    "aia_mean",
    "aia_std",
    "forgetting_mean",
    "forgetting_std",
    "wall_seconds_mean",
    "upload_mb_per_client_round",
    "download_mb_per_client_round",
]
PRESET_COLUMN = "preset"
"""First column of the combined table and CSV of a comparison over several presets."""


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _table_cells(r: MethodSummary) -> list[str]:
    """One markdown row's cells, in :data:`COLUMNS` order."""
    seeds = len(r.seeds)
    return [
        r.method,
        _pm(r.final_accuracy, seeds),
        _number(r.paper_final_accuracy),
        _pm(r.average_incremental_accuracy, seeds),
        _pm(r.forgetting, seeds),
        f"{r.wall_seconds:.0f}",
        _number(r.upload_mb_per_client_round),
        _number(r.download_mb_per_client_round),
    ]


def _csv_cells(r: MethodSummary) -> list[Any]:
    """One CSV row, in :data:`CSV_FIELDS` order; a value that is not known is an empty cell."""
    return [
        r.method, " ".join(map(str, r.seeds)), *r.final_accuracy,
        "" if r.paper_final_accuracy is None else r.paper_final_accuracy,
        *r.average_incremental_accuracy, *r.forgetting, r.wall_seconds, r.upload_mb_per_client_round,
        "" if r.download_mb_per_client_round is None else r.download_mb_per_client_round,
    ]


def comparison_table(rows: Sequence[MethodSummary], *, preset_column: bool = False) -> str:
    """Markdown table, one row per method (mean ± std over seeds); ``preset_column`` puts each row's
    preset first, for the combined table of several presets."""
    lead = [PRESET_COLUMN] if preset_column else []
    cells = [lead + COLUMNS] + [([r.preset or ""] if preset_column else []) + _table_cells(r) for r in rows]
    widths = [max(len(row[c]) for row in cells) for c in range(len(cells[0]))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    texts = len(lead) + 1  # the name columns are left-aligned, the numbers right-aligned
    rule = "|" + "|".join("-" * (w + 1) + ("-" if k < texts else ":") for k, w in enumerate(widths)) + "|"
    return "\n".join([lines[0], rule, *lines[1:]])


def write_table(
    rows: Sequence[MethodSummary], out: Path, *, preset_column: bool = False
) -> dict[str, Path]:
    """``comparison.md`` and ``comparison.csv`` in ``out`` (with a preset column if asked)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "comparison.md", "csv": out / "comparison.csv"}
    paths["md"].write_text(comparison_table(rows, preset_column=preset_column) + "\n")
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(([PRESET_COLUMN] if preset_column else []) + CSV_FIELDS)
        for r in rows:
            writer.writerow(([r.preset or ""] if preset_column else []) + _csv_cells(r))
    return paths


def write_comparison(
    rows: Sequence[MethodSummary],
    out: Path,
    title: str = "",
    paired: Sequence[PairedDifference] = (),
) -> dict[str, Path]:
    """``comparison.md``, ``comparison.csv`` and ``comparison.png`` in ``out``; with ``paired``
    differences also their table (appended to ``comparison.md``) and ``paired.csv``."""
    paths = write_table(rows, out)
    if paired:
        with paths["md"].open("a") as handle:
            handle.write("\n" + paired_table(paired) + "\n")
        paths["paired"] = out / "paired.csv"
        with paths["paired"].open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(PAIRED_FIELDS)
            for d in paired:
                writer.writerow([
                    d.reference, d.method, " ".join(map(str, d.seeds)), d.mean,
                    "" if d.low is None else d.low, "" if d.high is None else d.high,
                ])
    paths["png"] = out / "comparison.png"
    curves = {r.method: r.seen_accuracy for r in rows if len(r.seen_accuracy[0]) > 1}
    levels = {r.method: r.final_accuracy[0] for r in rows if len(r.seen_accuracy[0]) == 1}
    plot_comparison(curves, paths["png"], title=title, levels=levels)
    return paths
