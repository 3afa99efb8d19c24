"""Results I/O: results.json (atomic, strict JSON), metrics.csv (a row per round), plots, tables.

The engine builds the results dict (keys: config, seed, versions, accuracy_matrix,
task_aware_accuracy_matrix, task_test_sizes, final_accuracy, final_accuracy_task_mean,
average_incremental_accuracy, forgetting, bwt, wall_seconds, upload_bytes, optional rounds); this
module only writes, plots and formats it. Matplotlib is imported lazily and used through its
object API with the Agg canvas, so no global backend or pyplot state is touched.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import sys
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from fedlorm import __version__
from fedlorm.fcl.metrics import average_accuracy, summarize

__all__ = [
    "MetricsCSV",
    "plot_comparison",
    "plot_run",
    "summary_table",
    "versions",
    "write_json_atomic",
]

_REQUIRED_PACKAGES = ("torch", "torchvision", "timm", "numpy")
_OPTIONAL_PACKAGES = ("flwr", "peft")


# --------------------------------------------------------------------------- JSON


def _json_default(obj: Any) -> Any:
    """Convert what results hold besides JSON types: numpy/torch values, paths, dataclasses."""
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy arrays/scalars and torch tensors, without importing either
        return obj.tolist()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as indented JSON via a temp file in the same directory and ``os.replace``.

    Readers never see a half-written file; NaN/Inf raise ValueError (strict JSON; nothing written).
    """
    path = Path(path)
    try:
        text = json.dumps(obj, indent=2, allow_nan=False, default=_json_default)
    except ValueError as e:
        hint = " (NaN/Inf are not valid JSON)" if "Out of range float" in str(e) else ""
        raise ValueError(f"cannot write {path}: {e}{hint}") from e
    path.parent.mkdir(parents=True, exist_ok=True)
    # os.open with mode 0o666 honours the umask (mkstemp would leave results.json at 0600).
    tmp = path.parent / f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _dist_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """Versions of Python, fedlorm and key packages, from package metadata (imports nothing heavy).

    Required packages map to None when missing; optional ones (flwr, peft) appear only if installed.
    """
    out: dict[str, str | None] = {"python": platform.python_version(), "fedlorm": __version__}
    for name in _REQUIRED_PACKAGES:
        out[name] = _dist_version(name)
    for name in _OPTIONAL_PACKAGES:
        v = _dist_version(name)
        if v is not None:
            out[name] = v
    torch = sys.modules.get("torch")  # build details only when torch is already loaded
    if torch is not None:
        out["torch_build"] = getattr(torch, "__version__", None)
        out["torch_cuda"] = getattr(getattr(torch, "version", None), "cuda", None)
    out["platform"] = platform.platform()
    return out


# --------------------------------------------------------------------------- CSV


class MetricsCSV:
    """Append-only CSV log, one row per call, flushed at once (safe to tail while a run goes on).

    Reopening an existing file with the same header appends; a different header raises ValueError.
    """

    def __init__(self, path: str | os.PathLike[str], fieldnames: Sequence[str]) -> None:
        self.path = Path(path)
        self.fieldnames = list(fieldnames)
        if not self.fieldnames or len(set(self.fieldnames)) != len(self.fieldnames):
            raise ValueError(f"fieldnames must be non-empty and unique, got {self.fieldnames}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists() and self.path.stat().st_size > 0:
            with self.path.open(newline="", encoding="utf-8") as f:
                header = next(csv.reader(f), [])
            if header != self.fieldnames:
                raise ValueError(
                    f"{self.path} exists with header {header}, expected {self.fieldnames}; "
                    "use a new file or the same fields"
                )
        else:
            with self.path.open("w", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow(self.fieldnames)

    def append(self, row: Mapping[str, Any]) -> None:
        """Append one row; missing fields are left empty, unknown fields raise ValueError."""
        extra = sorted(set(row) - set(self.fieldnames))
        if extra:
            raise ValueError(f"unknown fields {extra} for {self.path} (fields: {self.fieldnames})")
        values = ["" if row.get(k) is None else row[k] for k in self.fieldnames]
        with self.path.open("a", newline="", encoding="utf-8") as f:
            csv.writer(f).writerow(values)
            f.flush()


# --------------------------------------------------------------------------- plots


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png_path(path: str | os.PathLike[str], default_name: str) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / default_name
    p.parent.mkdir(parents=True, exist_ok=True)
    return p


def plot_run(
    results: Mapping[str, Any], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Write a two-panel PNG: seen-class accuracy A_t per task (plus per-round points when
    ``results["rounds"]`` has them) and the accuracy-matrix heatmap R[t][j], values in the cells.

    ``path`` is the PNG file, or a directory to write ``accuracy.png`` in. Round entries use 0-based
    ``task`` (like the matrix rows); a task's rounds are spread over (task, task + 1] on the x axis.
    """
    import numpy as np

    R = results["accuracy_matrix"]
    n = results["task_test_sizes"]
    T = len(R)
    acc = [average_accuracy(R, n, t) for t in range(T)]
    fig = _new_figure((max(9.0, 4.0 + 0.9 * T), 4.2))
    ax1, ax2 = fig.subplots(1, 2, width_ratios=[1.0, 1.1])

    rounds = [
        r for r in results.get("rounds") or []
        # Rows of steps that were not evaluated (train.eval_every_round=false) hold "" or None.
        if r.get("seen_accuracy") not in (None, "") and r.get("task") is not None
    ]
    if rounds:
        by_task: dict[int, list[Mapping[str, Any]]] = {}
        for r in rounds:
            by_task.setdefault(int(r["task"]), []).append(r)
        xs, ys = [], []
        for t in sorted(by_task):
            group = sorted(by_task[t], key=lambda r: r.get("round", 0))
            for k, r in enumerate(group):
                xs.append(t + (k + 1) / len(group))
                ys.append(float(r["seen_accuracy"]))
        ax1.plot(xs, ys, lw=0.8, color="tab:gray", alpha=0.8, label="per round")
    ax1.plot(range(1, T + 1), acc, marker="o", lw=2, color="tab:blue", label="end of task")
    for x, y in zip(range(1, T + 1), acc, strict=True):
        ax1.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 6),
                     ha="center", fontsize=8)
    ax1.set_xlabel("task")
    ax1.set_ylabel("accuracy on seen classes (%)")
    ax1.set_xticks(range(1, T + 1))
    ax1.set_xlim(0 if rounds else 0.5, T + 0.5)
    lo = min([*acc, *(ys if rounds else [])])
    ax1.set_ylim(max(0.0, lo - 10.0), 100.0)
    ax1.grid(alpha=0.3)
    if rounds:
        ax1.legend(loc="lower left", fontsize=8)
    ax1.set_title("accuracy on seen classes (sample-weighted)")

    M = np.full((T, T), np.nan)
    for t, row in enumerate(R):
        M[t, : t + 1] = [float(v) for v in list(row)[: t + 1]]
    im = ax2.imshow(np.ma.masked_invalid(M), vmin=0, vmax=100, cmap="viridis")
    fs = max(5, 10 - T // 3)
    for t in range(T):
        for j in range(t + 1):
            ax2.text(j, t, f"{M[t, j]:.1f}", ha="center", va="center", fontsize=fs,
                     color="black" if M[t, j] > 60 else "white")
    ax2.set_xticks(range(T), [str(j + 1) for j in range(T)])
    ax2.set_yticks(range(T), [str(t + 1) for t in range(T)])
    ax2.set_xlabel("evaluated on task j")
    ax2.set_ylabel("after task t")
    ax2.set_title("accuracy matrix R[t][j] (%)")
    fig.colorbar(im, ax=ax2, shrink=0.85)

    if title is None:
        title = f"final accuracy {acc[-1]:.2f}%, average incremental {sum(acc) / T:.2f}%"
    fig.suptitle(title)
    out = _png_path(path, "accuracy.png")
    fig.savefig(out, dpi=120)
    return out


def _curve(values: Any) -> tuple[list[float], list[float] | None]:
    import numpy as np

    if isinstance(values, (tuple, list)) and len(values) == 2 and np.ndim(values[0]) == 1:
        mean = [float(v) for v in values[0]]
        std = [float(v) for v in values[1]]
        if len(mean) != len(std):
            raise ValueError(f"mean has {len(mean)} points but std has {len(std)}")
        return mean, std
    return [float(v) for v in values], None


def plot_comparison(
    curves: Mapping[str, Sequence[float] | tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike[str],
    title: str = "",
    xlabel: str = "task",
    ylabel: str = "accuracy on seen classes (%)",
    levels: Mapping[str, float] | None = None,
) -> Path:
    """One line per method over tasks 1..T; a ``(mean, std)`` pair adds a shaded ±std band.

    ``levels`` are single numbers drawn as dashed horizontal lines (e.g. joint training, which has
    one task and so no curve).
    """
    fig = _new_figure((7.0, 4.5))
    ax = fig.subplots()
    for name, level in (levels or {}).items():
        ax.axhline(level, ls="--", lw=1.2, color="0.35", label=f"{name} ({level:.1f})")
    for name, values in curves.items():
        mean, std = _curve(values)
        xs = list(range(1, len(mean) + 1))
        (line,) = ax.plot(xs, mean, marker="o", ms=4, label=name)
        if std is not None:
            ax.fill_between(xs, [m - s for m, s in zip(mean, std, strict=True)],
                            [m + s for m, s in zip(mean, std, strict=True)],
                            color=line.get_color(), alpha=0.2, lw=0)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if curves or levels:
        ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    out = _png_path(path, "comparison.png")
    fig.savefig(out, dpi=120)
    return out


# --------------------------------------------------------------------------- tables


def _label(results: Mapping[str, Any], i: int) -> str:
    """A short run name: ``results["name"]``, else method, dataset(s) and beta from the config."""
    if results.get("name"):
        return str(results["name"])
    cfg = results.get("config")
    parts: list[str] = []
    if isinstance(cfg, Mapping):
        method = cfg.get("method")
        if isinstance(method, Mapping):
            method = method.get("name")
        if method:
            parts.append(str(method))
        data = cfg.get("data") if isinstance(cfg.get("data"), Mapping) else cfg
        datasets = data.get("datasets", data.get("dataset"))
        if isinstance(datasets, str):
            parts.append(datasets)
        elif isinstance(datasets, Sequence) and datasets:
            parts.append("+".join(map(str, datasets)))
        scenario = cfg.get("scenario")
        if isinstance(scenario, Mapping) and scenario.get("beta") is not None:
            parts.append(f"beta={scenario['beta']}")
    return " ".join(parts) or f"run {i + 1}"


def _fmt(v: Any, digits: int) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "n/a"
    return f"{float(v):.{digits}f}"


def summary_table(results: Mapping[str, Any] | Iterable[Mapping[str, Any]]) -> str:
    """Markdown table (one row per run) of final and average incremental accuracy, forgetting,
    BWT and wall time; metrics missing from a dict are recomputed from its accuracy matrix."""
    runs = [results] if isinstance(results, Mapping) else list(results)
    header = ["run", "seed", "final acc (%)", "avg inc acc (%)", "forgetting", "BWT", "wall (s)"]
    rows = []
    for i, res in enumerate(runs):
        stats = dict(res)
        keys = ("final_accuracy", "average_incremental_accuracy", "forgetting", "bwt")
        if any(k not in stats for k in keys) and "accuracy_matrix" in res:
            computed = summarize(res["accuracy_matrix"], res["task_test_sizes"])
            stats = {**computed, **stats}
        rows.append([
            _label(res, i),
            "n/a" if res.get("seed") is None else str(res["seed"]),
            _fmt(stats.get("final_accuracy"), 2),
            _fmt(stats.get("average_incremental_accuracy"), 2),
            _fmt(stats.get("forgetting"), 2),
            _fmt(stats.get("bwt"), 2),
            _fmt(stats.get("wall_seconds"), 1),
        ])
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        padded = (
            c.ljust(w) if k < 2 else c.rjust(w)
            for k, (c, w) in enumerate(zip(cells, widths, strict=True))
        )
        return "| " + " | ".join(padded) + " |"

    sep = "|" + "|".join(
        "-" * (w + 2) if k < 2 else "-" * (w + 1) + ":" for k, w in enumerate(widths)
    ) + "|"
    return "\n".join([line(header), sep, *(line(r) for r in rows)])
