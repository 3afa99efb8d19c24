"""When does LoRM's closed-form merge beat averaging? Tables and a plot from finished comparisons.

Run on demand, after the ``fedlorm compare`` commands of the README's "When LoRM's merge wins"
section: ``python benchmarks/evidence.py [--runs runs/evidence] [--out docs]``.

``--runs`` holds one comparison per setting (``b0.5``, ``b0.05``, ... for the heterogeneity sweep,
a preset name for another benchmark), each in ``fedlorm compare``'s layout
``DIR/METHOD/sSEED/results.json``. A folder ``SETTING-VARIANT`` (e.g. ``headroom-full``: LoRM with
full statistics) joins ``SETTING``'s tables as rows ``METHOD-VARIANT``, paired on the same seeds.
It prints and writes (to ``--out``):

- ``evidence-selection.csv``: the validation grid (``--selection``, layout
  ``SETTING/VARIANT/METHOD/sSEED``) each method's learning rate was chosen from;
- ``evidence-beta.csv``/``.png``: final accuracy, mean ± std over seeds, per method and setting;
- ``evidence-paired.csv``: LoRM minus each other method, paired by seed, mean and 95 % t-interval;
- ``evidence-forgetting.csv``: for runs with ``train.forgetting_diagnostics``, the oracle head's
  accuracy, the stale head's cost (oracle − actual) and the features' loss against the frozen
  backbone (head-only's oracle − this oracle), with the mean feature drift.

``head-only`` and ``joint`` do not depend on β (the analytic head is built from sums over all clients,
which equal the centralised sums; joint has one client), so a β setting (a folder named ``b…``)
without them borrows them from ``--references`` (default ``runs/cmp``, the README's first table),
paired on the same seeds.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path
from typing import Any

from fedlorm.compare import paired_differences, summarize_method

REFERENCE_METHODS = ("head-only", "joint")
ORDER = ("lorm", "lorm-avg", "fedavg", "ffa", "head-only", "joint")


def load_setting(folder: Path) -> dict[str, list[dict[str, Any]]]:
    """Finished runs of one comparison folder, by method (seed order)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*/s*/results.json")):
        results = json.loads(path.read_text())
        if results.get("tasks_completed") != len(results["scenario"]["task_sizes"]):
            continue
        out.setdefault(path.parent.parent.name, []).append(results)
    for runs in out.values():
        runs.sort(key=lambda r: r["seed"])
    ordered = [m for m in ORDER if m in out] + sorted(set(out) - set(ORDER))
    return {m: out[m] for m in ordered}


def _cell(mean: float, std: float, n: int) -> str:
    return "–" if math.isnan(mean) else (f"{mean:.2f}" if n == 1 else f"{mean:.2f} ± {std:.2f} ({n})")


def _forgetting_rows(by_method: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per method, means over the seeds whose runs carry the diagnostics."""
    # A frozen backbone's oracle head is its own analytic head (tests/test_forgetting.py checks
    # that they agree), so head-only runs without the diagnostics lend their final accuracy.
    frozen = {
        r["seed"]: r.get("forgetting_diagnostics", {}).get("oracle_head_final_accuracy", r["final_accuracy"])
        for r in by_method.get("head-only", [])
    }
    rows = []
    for method, runs in by_method.items():
        runs = [r for r in runs if "forgetting_diagnostics" in r]
        if not runs or method == "joint":
            continue
        oracle = [r["forgetting_diagnostics"]["oracle_head_final_accuracy"] for r in runs]
        actual = [r["final_accuracy"] for r in runs]
        lost = [frozen[r["seed"]] - o for r, o in zip(runs, oracle, strict=True) if r["seed"] in frozen]
        rows.append({
            "method": method,
            "seeds": " ".join(str(r["seed"]) for r in runs),
            "final_accuracy": statistics.fmean(actual),
            "oracle_head_accuracy": statistics.fmean(oracle),
            "stale_head_cost": statistics.fmean(o - a for o, a in zip(oracle, actual, strict=True)),
            "feature_loss_vs_frozen": statistics.fmean(lost) if lost else math.nan,
            "mean_feature_drift": statistics.fmean(
                r["forgetting_diagnostics"]["mean_feature_drift"] for r in runs
            ),
            "forgetting": statistics.fmean(r["forgetting"] for r in runs),
        })
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _plot(table: dict[str, dict[str, tuple[float, float, int]]], settings: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.5))
    xs = list(range(len(settings)))
    width = 0.8 / max(len(table), 1)  # methods side by side within a setting; settings are unrelated
    for k, (method, cells) in enumerate(table.items()):
        shift = (k - (len(table) - 1) / 2) * width
        points = [(x + shift, *cells[s][:2]) for x, s in zip(xs, settings, strict=True) if s in cells]
        if points:
            x, mean, std = zip(*points, strict=True)
            ax.errorbar(x, mean, yerr=std, marker="o", ls="none", capsize=3, label=method)
    ax.set_xticks(xs, settings)
    ax.set_xlabel("setting")
    ax.set_ylabel("final class-IL accuracy (%), mean ± std over seeds")
    ax.grid(alpha=0.3)
    if table:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def selection_table(folder: Path) -> list[dict[str, Any]]:
    """The validation grid of step 0: ``folder/SETTING/VARIANT/METHOD/s0/results.json`` → rows."""
    rows = []
    for path in sorted(folder.glob("*/*/*/s*/results.json")):
        results = json.loads(path.read_text())
        if results.get("tasks_completed") != len(results["scenario"]["task_sizes"]):
            continue
        if results["config"]["data"]["validation_per_class"] is None:
            raise SystemExit(f"{path} was scored on the test set; the selection grid must use validation")
        variant, setting = path.parent.parent.parent.name, path.parent.parent.parent.parent.name
        rows.append({
            "setting": setting, "variant": variant, "method": path.parent.parent.name,
            "seed": results["seed"], "validation_final_accuracy": results["final_accuracy"],
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/evidence"))
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--references", type=Path, default=Path("runs/cmp"),
        help="a comparison of the built-in benchmark whose head-only and joint runs serve every β",
    )
    parser.add_argument("--selection", default="select", help="folder under --runs with the validation grid")
    args = parser.parse_args()
    lines: list[str] = []

    def emit(text: str = "") -> None:
        print(text)
        lines.append(text)

    selection = selection_table(args.runs / args.selection) if (args.runs / args.selection).is_dir() else []
    if selection:
        emit("### Validation grid (seed 0)\n")
        emit("| setting | variant | method | validation final acc (%) |\n|---|---|---|---:|")
        for r in sorted(selection, key=lambda r: (r["setting"], r["method"], r["variant"])):
            accuracy = r["validation_final_accuracy"]
            emit(f"| {r['setting']} | {r['variant']} | {r['method']} | {accuracy:.2f} |")
        emit()

    settings = sorted(
        p.name for p in args.runs.iterdir()
        if p.is_dir() and p.name != args.selection and any(p.glob("*/s*/results.json"))
    )
    data = {s: load_setting(args.runs / s) for s in settings}
    for name in list(data):  # a variant folder SETTING-VARIANT joins SETTING as METHOD-VARIANT rows
        base, _, variant = name.rpartition("-")
        if base in data:
            for method, runs in data.pop(name).items():
                data[base][f"{method}-{variant}"] = runs
    settings = list(data)
    lender = load_setting(args.references) if args.references.is_dir() else {}
    for setting, by_method in data.items():
        for method in REFERENCE_METHODS:
            if method not in by_method and method in lender and setting.startswith("b"):
                by_method[method] = lender[method]

    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    beta_rows, paired_rows, forgetting_rows = [], [], []
    for setting, by_method in data.items():
        for method, runs in by_method.items():
            summary = summarize_method(method, runs)
            mean, std = summary.final_accuracy
            table.setdefault(method, {})[setting] = (mean, std, len(runs))
            beta_rows.append({
                "setting": setting, "method": method, "seeds": " ".join(map(str, summary.seeds)),
                "final_mean": mean, "final_std": std,
                "forgetting_mean": summary.forgetting[0],
                "upload_mb_per_client_round": summary.upload_mb_per_client_round,
                "upload_mb_per_client_run": statistics.fmean(
                    r["upload_bytes"] / r["config"]["scenario"]["num_clients"] / 1e6 for r in runs
                ),
                "download_mb_per_client_round": summary.download_mb_per_client_round,
            })
        if "lorm" in by_method:
            for d in paired_differences(by_method, "lorm"):
                paired_rows.append({
                    "setting": setting, "difference": f"lorm − {d.method}", "seeds": len(d.seeds),
                    "mean": d.mean, "ci95_low": d.low, "ci95_high": d.high,
                })
        forgetting_rows += [{"setting": setting, **row} for row in _forgetting_rows(by_method)]

    emit("### Final accuracy on the test set (%), mean ± std (seeds)\n")
    emit("| method | " + " | ".join(settings) + " |")
    emit("|---|" + "---:|" * len(settings))
    for method, cells in table.items():
        emit(f"| {method} | " + " | ".join(_cell(*cells[s]) if s in cells else "–" for s in settings) + " |")
    emit("\n### Traffic per client in MB: per protocol step it is asked to, and over the run\n")
    emit("| setting | method | upload / step | download / step | upload, whole run |")
    emit("|---|---|---:|---:|---:|")
    for r in beta_rows:
        down = r["download_mb_per_client_round"]
        emit(
            f"| {r['setting']} | {r['method']} | {r['upload_mb_per_client_round']:.2f} | "
            + ("–" if down is None else f"{down:.2f}") + f" | {r['upload_mb_per_client_run']:.1f} |"
        )
    emit("\n### LoRM minus each method, paired by seed (points)\n")
    emit("| setting | difference (points) | seeds | mean | 95 % interval |\n|---|---|---:|---:|---:|")
    for r in paired_rows:
        interval = "–" if r["ci95_low"] is None else f"[{r['ci95_low']:+.2f}, {r['ci95_high']:+.2f}]"
        emit(f"| {r['setting']} | {r['difference']} | {r['seeds']} | {r['mean']:+.2f} | {interval} |")
    if forgetting_rows:
        emit("\n### Forgetting diagnostics (means over the seeds listed)\n")
        emit(
            "| setting | method | seeds | final acc | oracle head | stale head costs | features lost "
            "vs frozen | mean drift | forgetting |\n|---|---|---|---:|---:|---:|---:|---:|---:|"
        )
        for r in forgetting_rows:
            emit(
                f"| {r['setting']} | {r['method']} | {r['seeds']} | {r['final_accuracy']:.2f} | "
                f"{r['oracle_head_accuracy']:.2f} | {r['stale_head_cost']:+.2f} | "
                f"{r['feature_loss_vs_frozen']:+.2f} | {r['mean_feature_drift']:.3f} | "
                f"{r['forgetting']:.2f} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "evidence-selection.csv", selection)
    _write_csv(args.out / "evidence-beta.csv", beta_rows)
    _write_csv(args.out / "evidence-paired.csv", paired_rows)
    _write_csv(args.out / "evidence-forgetting.csv", forgetting_rows)
    _plot(table, settings, args.out / "evidence-beta.png")
    (args.out / "evidence-tables.md").write_text("\n".join(lines) + "\n")
    print(f"\nwritten: evidence-tables.md, evidence-*.csv and evidence-beta.png in {args.out}")


if __name__ == "__main__":
    main()
