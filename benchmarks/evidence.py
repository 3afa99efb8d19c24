"""The evidence behind the README's results: every run it rests on, and every table and plot, from one plan.

Run on demand (CPU hours; runs resume and finished ones are read back):

    python benchmarks/evidence.py plan                  # every run of the plan, and which are done
    python benchmarks/evidence.py run --workers 2       # run what is missing, one thread each
    python benchmarks/evidence.py report                # tables, CSVs and plots; README and docs blocks

The plan has two stages, both in ``--runs`` (default ``runs/evidence``):

1. **Selection** (``select/SETTING/METHOD/lrLR/s0``), on each setting's own validation split
   (``data.validation_per_class=100``, seed 0), never on the test set: each method's learning rate
   from {3e-4, 1e-3, 3e-3}, the grid extended once to 1e-4 or 1e-2 where its best lies on an edge;
   then LoRM's rank from {1, 4, 8} at β = 0.5 at its chosen rate; then the analytic head's random
   projection (M, σ, ridge; ``projection/SETTING-METHOD.csv``), scored offline by
   ``benchmarks/head_projection.py`` for the methods whose backbone stops moving (head-only on the
   frozen backbone, lorm-fsa on its selection run's model) and, for the methods that adapt every
   task, by one federated validation run with head-only's choice (``lrLR-proj``). A projection is
   kept only where it beats the plain head on the same validation split. Every key a preset's
   validated table may hold is passed explicitly, so a selection run does not depend on what was
   chosen before.
   ``head-only`` with the analytic head does not train anything a rate acts on (one run), and
   ``head-only`` and ``joint`` do not depend on β: they are selected and tested at β = 0.5 only and
   serve the other β settings (the analytic head is solved from sums over all clients, which equal
   the centralised sums; joint has one client).
2. **Test** (``test/SETTING/METHOD/sSEED``): ``fedlorm run --preset P --method M --seed S`` with no
   other setting, so each run uses the preset's validated table, seeds 0, 1, 2, with the forgetting
   diagnostics (oracle head, feature drift), setting by setting and seed by seed (``--settings``
   picks and orders them). Where LoRM's or FedAvg's table holds a projection, its plain head is run
   too (``METHOD-plain``), to show what the projection adds.

``report`` checks that every preset's validated table holds what the selection chose (and says
which entries differ), then writes ``docs/evidence-*.csv``, ``docs/evidence-*.png``,
``docs/evidence-tables.md``, and rewrites the blocks between ``<!-- evidence:NAME -->`` and
``<!-- /evidence:NAME -->`` in README.md and docs/evidence.md: nothing is copied by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedlorm.compare import paired_differences, summarize_method
from fedlorm.config import config_from_plain, config_to_dict
from fedlorm.methods import METHODS as REGISTRY
from fedlorm.presets import PRESETS, resolve_config

SETTINGS = {"b0.5": "default", "b0.1": "default-b0.1", "b0.05": "default-b0.05", "headroom": "headroom"}
"""Setting label → preset."""
METHODS = ("lorm", "lorm-avg", "fedavg", "ffa", "lorm-fsa", "head-only", "joint")
FEDERATED = ("lorm", "lorm-avg", "fedavg", "ffa", "lorm-fsa", "head-only")
BETA_FREE = ("head-only", "joint")
"""Methods whose runs do not depend on β: run at β = 0.5 only, shared by the other β settings."""
RATES = ("3e-4", "1e-3", "3e-3")
EDGE = {"3e-4": "1e-4", "3e-3": "1e-2"}
"""A grid whose best rate is this edge is extended once by the value."""
RANKS = (1, 4, 8)
RANK_SETTING = "b0.5"
SEEDS = (0, 1, 2)
PROJECTION_GRID = ["--widths", "0,500,1000,2000,4000", "--activations", "relu,gelu,tanh",
                   "--ridges", "1e-4,1e-3,1e-2,1e-1,1"]
"""M up to 4000: a head-only run's sums stay below LoRM's full-statistics upload (docs/projection-head.md)."""
ADAPTING = ("lorm", "lorm-avg", "fedavg", "ffa")
PLAIN = ("lorm.head_projection=0",)
PLAIN_VARIANTS = ("lorm", "fedavg")
"""Methods whose test runs are repeated with the plain head, to show what the projection adds."""
VALIDATION = ["data.validation_per_class=100"]
COMMON = ["train.threads=1"]
TEST = ["train.forgetting_diagnostics=true"]


@dataclass(frozen=True)
class PlannedRun:
    """One ``fedlorm run`` of the plan."""

    folder: Path
    preset: str
    method: str
    seed: int
    overrides: tuple[str, ...] = ()

    def command(self, resume: bool = False) -> list[str]:
        base = [sys.executable, "-m", "fedlorm", "run", "--quiet"]
        if resume:
            return [*base, "--resume", str(self.folder)]
        return [*base, "--out", str(self.folder), "--preset", self.preset, "--method", self.method,
                "--seed", str(self.seed), *self.overrides]

    def config(self) -> dict[str, Any]:
        cfg = config_to_dict(resolve_config(self.preset, overrides=self.overrides, method=self.method,
                                            seed=self.seed))
        cfg.pop("preset", None)
        return cfg


@dataclass(frozen=True)
class ProjectionScan:
    """One ``benchmarks/head_projection.py`` grid, written to ``csv``."""

    csv: Path
    args: tuple[str, ...]

    @property
    def folder(self) -> Path:
        return self.csv.parent

    def command(self, resume: bool = False) -> list[str]:
        script = Path(__file__).with_name("head_projection.py")
        return [sys.executable, str(script), "--threads", "1", *PROJECTION_GRID, "--csv", str(self.csv),
                *self.args]

    def rows(self) -> list[dict[str, Any]] | None:
        if not self.csv.is_file():
            return None
        with self.csv.open() as handle:
            return [
                {"M": int(r["head_projection"]), "σ": r["head_activation"], "ridge": float(r["head_ridge"]),
                 "final": float(r["final_accuracy"])}
                for r in csv.DictReader(handle)
            ]


def _results(run: PlannedRun) -> dict[str, Any] | None:
    """The finished results of ``run``'s folder if they were made by ``run``'s config, else None."""
    path = run.folder / "results.json"
    if not path.is_file() or (run.folder / "checkpoint.json").exists():
        return None
    results = json.loads(path.read_text())
    if results.get("tasks_completed") != len(results["scenario"]["task_sizes"]):
        return None
    recorded = dict(results["config"])
    recorded.pop("preset", None)
    expected = run.config()
    if _effective(recorded) != _effective(expected):
        raise SystemExit(f"{run.folder} holds a run of another config; move it away")
    return results


def _effective(cfg: dict[str, Any]) -> dict[str, Any]:
    """A config as the run records it: joint's one task on one client applied (method's own change);
    the ``secure`` section left out when secure aggregation is off, and the projection's activation
    without a projection (their keys then act on nothing, and their defaults may change)."""
    out = config_to_dict(REGISTRY[cfg["method"]].run_config(config_from_plain(cfg)))
    if not out["secure"]["aggregation"]:
        out.pop("secure")
    if not out["lorm"]["head_projection"]:
        out["lorm"].pop("head_activation")
    return out


@dataclass
class Selection:
    """What the finished selection runs chose, and the runs still needed to choose."""

    scores: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    """(setting, method) → grid label (``lr1e-3``, ``lr3e-4-r8``) → validation final accuracy."""
    chosen: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    """(setting, method) → chosen dotted keys (only where the whole grid has finished)."""
    needed: list[PlannedRun] = field(default_factory=list)


def _runs_at(method: str, setting: str) -> bool:
    """Whether ``method`` has runs of its own at ``setting``: β-free methods run at β = 0.5 and on
    ``headroom`` only, and serve the other β settings from β = 0.5."""
    return method not in BETA_FREE or setting in ("b0.5", "headroom")


def _selection_run(root: Path, setting: str, method: str, label: str, keys: dict[str, Any]) -> PlannedRun:
    overrides = [*COMMON, *VALIDATION, *(f"{k}={v}" for k, v in keys.items())]
    return PlannedRun(root / "select" / setting / method / label / "s0", SETTINGS[setting], method, 0,
                      tuple(overrides))


def _selection_keys(method: str, rate: str | None, rank: int = 4) -> dict[str, Any]:
    """Every key a validated table may set for ``method``, explicitly (the grid point's values)."""
    keys: dict[str, Any] = {"model.rank": rank}
    if rate is not None:
        keys["train.lr"] = rate
    if method != "joint":  # every other method here deploys the analytic head
        keys["lorm.head_projection"] = 0
    return keys


def select(root: Path) -> Selection:
    """Walk the selection stage: score finished grid points, choose, and list the runs still needed."""
    out = Selection()
    for setting in SETTINGS:
        for method in METHODS:
            if not _runs_at(method, setting):
                continue
            if method == "head-only":  # nothing a rate acts on: one run, nothing chosen
                run = _selection_run(root, setting, method, "", _selection_keys(method, None))
                results = _results(run)
                if results is None:
                    out.needed.append(run)
                else:
                    out.scores[(setting, method)] = {"federated run": results["final_accuracy"]}
                continue
            scores: dict[str, float] = {}
            grid = list(RATES)
            while True:
                runs = {r: _selection_run(root, setting, method, f"lr{r}", _selection_keys(method, r))
                        for r in grid}
                pending = False
                for rate, run in runs.items():
                    results = _results(run)
                    if results is None:
                        out.needed.append(run)
                        pending = True
                    else:
                        scores[f"lr{rate}"] = results["final_accuracy"]
                if pending:
                    break
                best = max(sorted(grid, key=float), key=lambda r: scores[f"lr{r}"])  # ties: smaller rate
                extension = EDGE.get(best)
                if extension is None or extension in grid or len(grid) > len(RATES):
                    out.chosen[(setting, method)] = {"train.lr": float(best)}
                    break
                grid.append(extension)
            out.scores[(setting, method)] = scores
    # LoRM's rank at β = 0.5, at its chosen rate.
    chosen = out.chosen.get((RANK_SETTING, "lorm"))
    if chosen is not None:
        rate = _label(chosen["train.lr"])
        ranks = {4: out.scores[(RANK_SETTING, "lorm")][f"lr{rate}"]}
        for rank in RANKS:
            if rank == 4:
                continue
            run = _selection_run(root, RANK_SETTING, "lorm", f"lr{rate}-r{rank}",
                                 _selection_keys("lorm", rate, rank))
            results = _results(run)
            if results is None:
                out.needed.append(run)
            else:
                ranks[rank] = results["final_accuracy"]
                out.scores[(RANK_SETTING, "lorm")][f"lr{rate}-r{rank}"] = results["final_accuracy"]
        if len(ranks) == len(RANKS):
            out.chosen[(RANK_SETTING, "lorm")]["model.rank"] = max(ranks, key=ranks.get)
    _select_projection(root, out)
    return out


def _projection_choice(rows: list[dict[str, Any]], ridge: float) -> tuple[dict[str, Any], float, float]:
    """The best grid point's keys, its accuracy and the plain head's (M = 0 at the preset's ridge)."""
    best = max(rows, key=lambda r: r["final"])
    plain = next(r["final"] for r in rows if r["M"] == 0 and math.isclose(r["ridge"], ridge))
    keys = {"lorm.head_projection": best["M"], "lorm.head_activation": best["σ"],
            "lorm.head_ridge": best["ridge"]}
    return keys, best["final"], plain


def _select_projection(root: Path, out: Selection) -> None:
    """Choose each setting's projected head where it beats the plain one on validation."""
    for setting, preset in SETTINGS.items():
        ridge = PRESETS[preset].overrides["lorm"]["head_ridge"]
        frozen_setting = "b0.5" if setting.startswith("b") else setting
        scans = {
            "head-only": ProjectionScan(root / "projection" / f"{frozen_setting}-head-only.csv",
                                        ("--preset", SETTINGS[frozen_setting], *VALIDATION)),
        }
        fsa = out.chosen.get((setting, "lorm-fsa"))
        if fsa is not None:
            model = _selection_run(root, setting, "lorm-fsa", f"lr{_label(fsa['train.lr'])}", {}).folder
            scans["lorm-fsa"] = ProjectionScan(root / "projection" / f"{setting}-lorm-fsa.csv",
                                               ("--model", str(model / "model"), *VALIDATION))
        for method, scan in scans.items():
            rows = scan.rows()
            if rows is None:
                out.needed.append(scan)
                continue
            keys, best, plain = _projection_choice(rows, ridge)
            out.scores.setdefault((setting, method), {})["projection"] = best
            out.scores[(setting, method)]["plain head"] = plain
            if keys["lorm.head_projection"] > 0 and best > plain:
                out.chosen.setdefault((setting, method), {}).update(keys)
        frozen = out.chosen.get((setting, "head-only"), {})
        if "lorm.head_projection" not in frozen:
            continue
        projection = {k: v for k, v in frozen.items() if k.startswith("lorm.")}
        for method in ADAPTING:
            chosen = out.chosen.get((setting, method))
            if chosen is None:
                continue
            rate = _label(chosen["train.lr"])
            run = _selection_run(root, setting, method, f"lr{rate}-proj",
                                 {**_selection_keys(method, rate), **projection})
            results = _results(run)
            if results is None:
                out.needed.append(run)
                continue
            plain = out.scores[(setting, method)][f"lr{rate}"]
            out.scores[(setting, method)][f"lr{rate}-proj"] = results["final_accuracy"]
            if results["final_accuracy"] > plain:
                chosen.update(projection)


def _label(rate: float) -> str:
    """1e-3 → "1e-3", as the grid's folder labels write it."""
    mantissa, exponent = f"{rate:.0e}".split("e")
    return f"{mantissa}e-{int(exponent[1:])}" if exponent.startswith("-") else f"{rate:g}"


def test_runs(root: Path, settings: Iterable[str] = tuple(SETTINGS)) -> list[PlannedRun]:
    """The test stage at the presets' validated settings: for each of ``settings``, seed by seed,
    every method (so a stage cut short leaves whole seeds); then the plain head of PLAIN_VARIANTS
    where their table holds a projection, in the same order."""
    runs, plain_runs = [], []
    for setting in settings:
        preset = SETTINGS[setting]
        for seed in SEEDS:
            for method in METHODS:
                if not _runs_at(method, setting):
                    continue
                runs.append(PlannedRun(root / "test" / setting / method / f"s{seed}", preset, method, seed,
                                       tuple([*COMMON, *TEST])))
                projected = "lorm.head_projection" in PRESETS[preset].validated.get(method, {})
                if method in PLAIN_VARIANTS and projected:
                    ridge = PRESETS[preset].overrides["lorm"]["head_ridge"]
                    plain_runs.append(PlannedRun(root / "test" / setting / f"{method}-plain" / f"s{seed}",
                                                 preset, method, seed,
                                                 tuple([*COMMON, *TEST, *PLAIN, f"lorm.head_ridge={ridge}"])))
    return runs + plain_runs


def _execute(runs: Iterable[PlannedRun], workers: int) -> None:
    """Run ``runs`` ``workers`` at a time (resuming checkpoints), one torch thread each."""
    queue = list(runs)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    active: list[tuple[PlannedRun, subprocess.Popen]] = []
    while queue or active:
        while queue and len(active) < workers:
            run = queue.pop(0)
            run.folder.mkdir(parents=True, exist_ok=True)
            resume = (run.folder / "checkpoint.json").exists()
            print(f"{time.strftime('%H:%M:%S')} start {run.folder}", flush=True)
            active.append((run, subprocess.Popen(run.command(resume), env=env, stdout=subprocess.DEVNULL)))
        time.sleep(2)
        for item in list(active):
            run, proc = item
            if proc.poll() is not None:
                active.remove(item)
                print(f"{time.strftime('%H:%M:%S')} done {run.folder} (exit {proc.returncode})", flush=True)


# -- report -------------------------------------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    mean, std = _mean_std(values)
    return f"{mean:.2f}" if len(values) == 1 else f"{mean:.2f} ± {std:.2f}"


def _test_results(root: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Finished test runs: setting → method → results in seed order (β-free methods shared). Only
    whole seeds count: a seed of a setting enters once every method's run of it has finished (a
    plain-head variant joins a seed that has, once its own run has), so every method of a setting
    is summarised over the same seeds."""
    done: dict[tuple[str, str], dict[str, dict[str, Any] | None]] = {}
    for run in test_runs(root):
        setting, method, seed = run.folder.parts[-3:]
        done.setdefault((setting, seed), {})[method] = _results(run)
    out: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for (setting, _), by_method in done.items():
        if all(results is not None for method, results in by_method.items() if method in METHODS):
            for method, results in by_method.items():
                if results is not None:
                    out.setdefault(setting, {}).setdefault(method, []).append(results)
    for setting in ("b0.1", "b0.05"):
        seeds = {r["seed"] for runs in out.get(setting, {}).values() for r in runs}
        for method in BETA_FREE:
            shared = [r for r in out.get("b0.5", {}).get(method, []) if r["seed"] in seeds]
            if shared:
                out[setting][method] = shared
    return {s: {m: out[s][m] for m in _row_order(out[s])} for s in SETTINGS if s in out}


def _row_order(methods: Iterable[str]) -> list[str]:
    """The methods in table order, each variant (``METHOD-plain``) right after its method."""
    present = set(methods)
    return [name for m in METHODS for name in (m, f"{m}-plain") if name in present]


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if rows:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _replace_block(path: Path, name: str, text: str) -> None:
    """Put ``text`` between ``<!-- evidence:name -->`` and ``<!-- /evidence:name -->`` in ``path``."""
    if not path.is_file():
        return
    begin, end = f"<!-- evidence:{name} -->", f"<!-- /evidence:{name} -->"
    content = path.read_text()
    if begin not in content or end not in content:
        return
    head, rest = content.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text.rstrip()}\n{end}{rest.split(end, 1)[1]}")


def report(root: Path, out: Path, readme: Path) -> None:
    sel = select(root)
    lines: list[str] = []
    emit = lines.append
    emit("### Learning rates and LoRM's rank, chosen on each setting's validation split (seed 0)\n")
    emit("| setting | method | validation final accuracy (%) per grid point | chosen |")
    emit("|---|---|---|---|")
    selection_rows = []
    for (setting, method), scores in sel.scores.items():
        chosen = sel.chosen.get((setting, method), {})
        grid = ", ".join(f"{k.removeprefix('lr')}: {v:.2f}" for k, v in
                         sorted(scores.items(), key=lambda kv: _sort_key(kv[0])))
        picked = ", ".join(f"{k} = {v:g}" if isinstance(v, float) else f"{k} = {v}"
                           for k, v in chosen.items())
        picked = picked or ("–" if method == "head-only" else "pending")
        emit(f"| {setting} | {method} | {grid} | {picked} |")
        for label, accuracy in scores.items():
            selection_rows.append({"setting": setting, "method": method, "grid_point": label,
                                   "validation_final_accuracy": accuracy})
    mismatches = _check_presets(sel)
    emit("")
    if mismatches:
        emit("**The presets' validated tables differ from this selection:** " + "; ".join(mismatches) + "\n")
    data = _test_results(root)
    table_rows, paired_rows, forgetting_rows = [], [], []
    for setting, by_method in data.items():
        for method, runs in by_method.items():
            summary = summarize_method(method, runs)
            table_rows.append({
                "setting": setting, "method": method, "seeds": " ".join(map(str, summary.seeds)),
                "final_mean": summary.final_accuracy[0], "final_std": summary.final_accuracy[1],
                "avg_inc_mean": summary.average_incremental_accuracy[0],
                "forgetting_mean": summary.forgetting[0],
                "upload_mb_per_client_run": statistics.fmean(
                    r["upload_bytes"] / r["config"]["scenario"]["num_clients"] / 1e6 for r in runs),
            })
            if method != "joint" and all("forgetting_diagnostics" in r for r in runs):
                forgetting_rows.append(_diagnostics(setting, method, runs, by_method.get("head-only", [])))
        if "lorm" in by_method:
            for d in paired_differences(by_method, "lorm"):
                paired_rows.append({"setting": setting, "difference": f"{d.method} − lorm",
                                    "seeds": len(d.seeds), "mean": -d.mean,
                                    "ci95_low": None if d.high is None else -d.high,
                                    "ci95_high": None if d.low is None else -d.low})
    results_md = _results_table(data)
    seeds = "; ".join(f"{setting}: seeds {', '.join(str(r['seed']) for r in next(iter(by.values())))}"
                      for setting, by in data.items())
    emit(f"### Final accuracy on the test set (%), mean ± std over seeds ({seeds or 'none yet'})\n")
    emit(results_md)
    emit("\n### Each method minus LoRM, paired by seed (points; 95 % t-interval)\n")
    emit("| setting | difference | seeds | mean | 95 % interval |\n|---|---|---:|---:|---:|")
    for r in paired_rows:
        interval = "–" if r["ci95_low"] is None else f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
        emit(f"| {r['setting']} | {r['difference']} | {r['seeds']} | {r['mean']:+.2f} | {interval} |")
    emit("\n### Gap to joint training of the best federated method (paired by seed)\n")
    emit(_gap_table(data))
    emit("\n### Where accuracy goes: forgetting diagnostics (means over seeds)\n")
    emit("| setting | method | final | oracle head | stale head costs | features vs frozen | mean drift |")
    emit("|---|---|---:|---:|---:|---:|---:|")
    for r in forgetting_rows:
        emit(f"| {r['setting']} | {r['method']} | {r['final']:.2f} | {r['oracle_head']:.2f} | "
             f"{r['stale_head_cost']:+.2f} | {r['features_vs_frozen']:+.2f} | {r['mean_drift']:.3f} |")
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / "evidence-selection.csv", selection_rows)
    _write_csv(out / "evidence-results.csv", table_rows)
    _write_csv(out / "evidence-paired.csv", paired_rows)
    _write_csv(out / "evidence-forgetting.csv", forgetting_rows)
    _plot(data, out / "evidence-results.png")
    text = "\n".join(lines) + "\n"
    (out / "evidence-tables.md").write_text(text)
    _replace_block(readme, "results", results_md)
    _replace_block(out / "evidence.md", "tables", text)
    print(text)


def _diagnostics(
    setting: str, method: str, runs: list[dict[str, Any]], frozen_runs: list[dict[str, Any]]
) -> dict[str, Any]:
    """Means over seeds of the oracle head (the final backbone under a head re-solved from every
    task's features), what the deployed head loses against it, and the features' gain over the
    frozen backbone (head-only's accuracy is its own oracle)."""
    frozen = {r["seed"]: r["final_accuracy"] for r in frozen_runs}
    oracle = {r["seed"]: r["forgetting_diagnostics"]["oracle_head_final_accuracy"] for r in runs}
    gains = [oracle[seed] - frozen[seed] for seed in oracle if seed in frozen]
    return {
        "setting": setting, "method": method, "seeds": len(runs),
        "final": statistics.fmean(r["final_accuracy"] for r in runs),
        "oracle_head": statistics.fmean(oracle.values()),
        "stale_head_cost": statistics.fmean(oracle[r["seed"]] - r["final_accuracy"] for r in runs),
        "features_vs_frozen": statistics.fmean(gains) if gains else math.nan,
        "mean_drift": statistics.fmean(r["forgetting_diagnostics"]["mean_feature_drift"] for r in runs),
    }


def _sort_key(label: str) -> tuple[float, str]:
    rate = label.removeprefix("lr").split("-r")[0]
    try:
        return float(rate), label
    except ValueError:
        return 0.0, label


def expected_tables(sel: Selection) -> dict[str, dict[str, dict[str, Any]]]:
    """What each preset's validated table should hold by the selection: every method's chosen rate
    (β-free methods' from β = 0.5 on every β preset), and on the built-in benchmark's presets LoRM's
    rank where it is not the default 4."""
    tables: dict[str, dict[str, dict[str, Any]]] = {}
    rank = sel.chosen.get((RANK_SETTING, "lorm"), {}).get("model.rank")
    for setting, preset in SETTINGS.items():
        for method in METHODS:
            source = "b0.5" if method in BETA_FREE and setting.startswith("b") else setting
            chosen = {k: v for k, v in sel.chosen.get((source, method), {}).items() if k != "model.rank"}
            if method == "lorm" and setting.startswith("b") and rank not in (None, 4):
                chosen["model.rank"] = rank
            if chosen:
                tables.setdefault(preset, {})[method] = chosen
    return tables


def _check_presets(sel: Selection) -> list[str]:
    """Entries where a preset's validated table and the selection disagree."""
    problems = []
    for preset, methods in expected_tables(sel).items():
        for method, chosen in methods.items():
            have = PRESETS[preset].validated.get(method, {})
            problems += [f"{preset} {method} {key}: table {have.get(key)!r}, chosen {value!r}"
                         for key, value in chosen.items() if have.get(key) != value]
    return problems


def _results_table(data: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    """Final accuracy, mean ± std over seeds, and in brackets the method minus LoRM paired by seed
    (``*``: its 95 % interval excludes 0)."""
    settings = list(data)
    head = "| method | " + " | ".join(settings) + " |\n|---|" + "---:|" * len(settings)
    rows = [head]
    differences = {
        s: {d.method: d for d in paired_differences(data[s], "lorm")} for s in settings if "lorm" in data[s]
    }
    for method in _row_order(m for s in settings for m in data[s]):
        cells = []
        for s in settings:
            cell = _cell([r["final_accuracy"] for r in data[s].get(method, [])])
            d = differences.get(s, {}).get(method)
            if d is not None:
                significant = d.low is not None and (d.low > 0 or d.high < 0)
                cell += f" ({-d.mean:+.2f}{'*' if significant else ''})"
            cells.append(cell)
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _gap_table(data: dict[str, dict[str, list[dict[str, Any]]]]) -> str:
    rows = ["| setting | best federated method | its accuracy | joint | gap (joint − best), 95 % interval |",
            "|---|---|---:|---:|---|"]
    for setting, by_method in data.items():
        federated = {m: runs for m, runs in by_method.items() if m.removesuffix("-plain") in FEDERATED}
        if not federated or "joint" not in by_method:
            continue
        best = max(federated, key=lambda m: statistics.fmean(r["final_accuracy"] for r in federated[m]))
        (diff,) = paired_differences({"joint": by_method["joint"], best: federated[best]}, "joint")
        interval = "–" if diff.low is None else f"[{diff.low:+.2f}, {diff.high:+.2f}]"
        best_cell = _cell([r["final_accuracy"] for r in federated[best]])
        joint_cell = _cell([r["final_accuracy"] for r in by_method["joint"]])
        rows.append(f"| {setting} | {best} | {best_cell} | {joint_cell} | {diff.mean:+.2f} {interval} |")
    return "\n".join(rows)


def _plot(data: dict[str, dict[str, list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(data)
    methods = _row_order(m for s in settings for m in data[s])
    if not methods:
        return
    fig, ax = plt.subplots(figsize=(8.0, 4.5))
    width = 0.8 / len(methods)
    for k, method in enumerate(methods):
        shift = (k - (len(methods) - 1) / 2) * width
        points = [(x + shift, *_mean_std([r["final_accuracy"] for r in data[s][method]]))
                  for x, s in enumerate(settings) if data[s].get(method)]
        if points:
            xs, means, stds = zip(*points, strict=True)
            ax.errorbar(xs, means, yerr=stds, marker="o", ls="none", capsize=3, label=method)
    ax.set_xticks(range(len(settings)), settings)
    ax.set_xlabel("setting (built-in benchmark at β = 0.5, 0.1, 0.05; headroom)")
    ax.set_ylabel("final class-IL accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _settings(text: str) -> list[str]:
    """``--settings``: known labels only."""
    chosen = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SETTINGS]
    if unknown or not chosen:
        raise SystemExit(f"evidence.py: error: --settings {text!r}: allowed: {', '.join(SETTINGS)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("plan", "run", "report"))
    parser.add_argument("--runs", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--stage", choices=("select", "test", "all"), default="all")
    parser.add_argument("--settings", default=",".join(SETTINGS),
                        help="comma-separated settings of the test stage, in the order they run "
                        f"(default: {','.join(SETTINGS)})")
    args = parser.parse_args()
    if args.action == "report":
        report(args.runs, args.out, args.readme)
        return
    while True:
        sel = select(args.runs) if args.stage in ("select", "all") else Selection()
        pending = list(sel.needed)
        if args.stage in ("test", "all") and not sel.needed:
            planned = test_runs(args.runs, _settings(args.settings))
            pending += [run for run in planned if _results(run) is None]
        if args.action == "plan" or not pending:
            for run in pending:
                print(" ".join(run.command()[2:]))
            print(f"{len(pending)} runs to go" + ("" if not sel.needed else " (selection first)"))
            return
        _execute(pending, args.workers)


if __name__ == "__main__":
    main()
