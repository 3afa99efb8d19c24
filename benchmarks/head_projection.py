"""Choose the analytic head's random projection (M, σ) and ridge offline, from one pass of features.

Run on demand::

    python benchmarks/head_projection.py --preset default data.validation_per_class=100
    python benchmarks/head_projection.py --model runs/headroom-lorm-fsa-s0/model \\
        --widths 0,1000,2000,4000 --activations relu,tanh --ridges 1e-3,1e-2,1e-1 --csv grid.csv

The analytic head (``lorm.head_merge = analytic``) is solved from sums over every client, and those
sums are the sums over the stacked data. So while the backbone does not move, the head's accuracy
needs no federated run: this script collects each task's training features once (the union of the
clients' shares, through the test-time transform, as the ``head_stats`` step does) and the
evaluation features, then for every (M, σ, ridge) folds the tasks' sums in order, re-solves the head
after each task exactly as the server does (same R from the run's seed, same sums, same solver, a
float32 head over every class) and scores the classes seen so far. It prints, and with ``--csv``
writes, the final accuracy and the average incremental accuracy of each grid point.

Two backbones qualify, because every task's sums go through the one backbone the script uses:

- the frozen pretrained backbone (default): what ``head-only`` deploys, built as a run builds it;
- ``--model DIR``: a finished run's ``model/`` whose backbone stopped moving after its first task
  (``lorm-fsa``, any method with ``lorm.adapt_tasks = 1``, ``head-only``). Each task's sums were
  collected through the deployed model at that task's end, which from task 1 on is the exported one.
  A run that adapted more tasks collected its earlier tasks' sums through backbones ``model/`` no
  longer holds; it is refused. The run's config and seed (``model.json``) fix the data, the class
  order and R; ``key=value`` overrides go on top, so choose on the split the run did not train on.

Choose on a validation split (``data.validation_per_class``), never on the test set.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from fedlorm.backbones import Backbone
from fedlorm.config import ConfigError, RunConfig, apply_overrides, config_from_plain
from fedlorm.export import load_model, read_model_info
from fedlorm.fcl import Scenario
from fedlorm.fcl.metrics import summarize
from fedlorm.merging import analytic_head_solve, analytic_head_summands
from fedlorm.methods import METHODS
from fedlorm.precision import autocast
from fedlorm.presets import resolve_config
from fedlorm.projection import ACTIVATIONS, RandomFeatures, projection_matrix
from fedlorm.runtime.experiment import RunData, build_data, build_model, effective_config, resolve_device

DEFAULT_WIDTHS = "0,500,1000,2000"
DEFAULT_ACTIVATIONS = "relu"
DEFAULT_RIDGES = "1e-3,1e-2,1e-1,1"
PLAIN = "-"
"""The activation column of M = 0 (the head on the pooled features; σ plays no part)."""


@dataclass
class Features:
    """Pooled features of one backbone: per task the training features and class positions, and
    the evaluation set's."""

    train: list[tuple[Tensor, Tensor]]
    test: Tensor
    test_labels: Tensor


@dataclass
class Row:
    """One grid point's accuracies (%)."""

    width: int
    activation: str
    ridge: float
    input_width: int
    """The ridge head's input width: M, or the pooled features' d for M = 0."""
    final_accuracy: float
    average_incremental_accuracy: float
    final_accuracy_task_mean: float
    accuracy_matrix: list[list[float]]
    seconds: float

    @property
    def gram_bytes(self) -> int:
        """Bytes of one client's float64 F̂ᵀF̂ (or ĤᵀĤ) per head_stats step."""
        return 8 * (self.input_width + 1) ** 2


def frozen_backbone(cfg: RunConfig) -> tuple[RunConfig, RunData, Backbone]:
    """What ``head-only`` with the analytic head deploys for ``cfg``: its config, data and model."""
    lorm = dataclasses.replace(cfg.lorm, head_merge="analytic", head_projection=0)
    cfg = effective_config(dataclasses.replace(cfg, method="head-only", lorm=lorm))
    data = build_data(cfg)
    model, _ = build_model(cfg, data.scenario.num_classes, resolve_device(cfg.train.device))
    return cfg, data, model


def saved_backbone(directory: Path, overrides: Sequence[str]) -> tuple[RunConfig, RunData, Backbone]:
    """A finished run's ``model/`` with its config (plus ``overrides``) and data; refused unless its
    backbone stopped moving after the first task."""
    info = read_model_info(directory)
    cfg = apply_overrides(config_from_plain(info["config"]), overrides)
    method = METHODS.get(cfg.method)
    trains = method is not None and method.within_task is not None and method.within_task.trains_adapters
    limit = method.adapted_tasks(cfg) if method is not None else None
    if method is None or method.within_task is None or (trains and (limit is None or limit > 1)):
        raise ConfigError(
            f"model {str(directory)!r} comes from method {cfg.method!r}"
            f"{'' if limit is None else f' with {limit} adapted tasks'}, whose backbone moved after its "
            "first task: its earlier tasks' head sums went through backbones model/ does not hold; use a "
            "run of lorm-fsa, lorm.adapt_tasks=1 or head-only, or the frozen backbone (no --model)"
        )
    cfg = effective_config(cfg)
    data = build_data(cfg)
    saved = load_model(directory, resolve_device(cfg.train.device))
    if saved.class_names != data.class_names:
        raise ConfigError(
            f"model {str(directory)!r} knows classes {saved.class_names[:4]}… in another order than the "
            f"data of its config ({data.class_names[:4]}…): overrides must not change the classes"
        )
    return cfg, data, saved.model


@torch.no_grad()
def pooled_features(model: Backbone, images: Tensor, cfg: RunConfig) -> Tensor:
    """The model's pooled features of uint8 ``images`` (test-time transform, eval mode, the run's
    precision and evaluation batch size), float32 on CPU."""
    model.eval()
    device = model.head.weight.device
    out = [torch.empty(0, model.feature_dim)]
    for batch in images.split(cfg.train.eval_batch_size):
        with autocast(device, cfg.train.precision):
            out.append(model.features(batch.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def collect(model: Backbone, cfg: RunConfig, data: RunData) -> Features:
    """Every task's training features (the clients' shares, in client order) and the evaluation set's."""
    train = []
    for shares in data.partitions:
        rows = torch.cat(list(shares))
        train.append((pooled_features(model, data.train.images[rows], cfg), data.train.labels[rows]))
    return Features(train, pooled_features(model, data.test.images, cfg), data.test.labels)


def expand(features: Tensor, projection: RandomFeatures | None) -> Tensor:
    """The head's input: the features, or σ(F R) (float32, CPU)."""
    return features if projection is None else projection(features)


def score(
    features: Features,
    scenario: Scenario,
    projection: RandomFeatures | None,
    ridges: Sequence[float],
) -> dict[float, list[list[float]]]:
    """Per ridge, the class-IL accuracy matrix of the analytic head solved after each task."""
    inputs = [(expand(f, projection), y) for f, y in features.train]
    test = expand(features.test, projection)
    width = test.shape[1]
    classes = scenario.num_classes
    gram, cross = None, torch.zeros(width + 1, classes, dtype=torch.float64)
    matrices: dict[float, list[list[float]]] = {ridge: [] for ridge in ridges}
    for task, (h, y) in enumerate(inputs):
        task_classes = scenario.task_classes(task)
        targets = nn.functional.one_hot(y - task_classes.start, len(task_classes)).double()
        g, c = analytic_head_summands(h, targets)
        gram = g if gram is None else gram + g
        cross[:, task_classes.start : task_classes.stop] += c
        seen = task_classes.stop
        rows = features.test_labels < seen
        labels = features.test_labels[rows]
        for ridge in ridges:
            weight, bias = analytic_head_solve(gram, cross[:, :seen], ridge=ridge)
            # The deployed head: float32, zero rows for unseen classes, logits over the seen ones.
            full_weight, full_bias = torch.zeros(classes, width), torch.zeros(classes)
            full_weight[:seen], full_bias[:seen] = weight.float(), bias.float()
            predictions = nn.functional.linear(test[rows], full_weight, full_bias)[:, :seen].argmax(1)
            row = []
            for j in range(task + 1):
                span = scenario.task_classes(j)
                mine = (labels >= span.start) & (labels < span.stop)
                hits = predictions[mine] == labels[mine]
                row.append(100.0 * float(hits.float().mean()) if hits.numel() else 0.0)
            matrices[ridge].append(row)
    return matrices


def grid(
    features: Features,
    scenario: Scenario,
    seed: int,
    widths: Sequence[int],
    activations: Sequence[str],
    ridges: Sequence[float],
) -> list[Row]:
    """Every (M, σ, ridge) of the grid (σ only for M > 0), R from ``seed`` as the run derives it."""
    sizes = [
        int(((features.test_labels >= c.start) & (features.test_labels < c.stop)).sum())
        for c in (scenario.task_classes(t) for t in range(scenario.num_tasks))
    ]
    d = features.test.shape[1]
    rows = []
    for width in widths:
        for activation in [PLAIN] if width == 0 else activations:
            started = time.perf_counter()
            projection = None if width == 0 else RandomFeatures(projection_matrix(d, width, seed), activation)
            matrices = score(features, scenario, projection, ridges)
            seconds = (time.perf_counter() - started) / len(ridges)
            for ridge, matrix in matrices.items():
                summary = summarize(matrix, sizes)
                rows.append(
                    Row(
                        width,
                        activation,
                        ridge,
                        width or d,
                        summary["final_accuracy"],
                        summary["average_incremental_accuracy"],
                        summary["final_accuracy_task_mean"],
                        matrix,
                        seconds,
                    )
                )
    return rows


def write_csv(rows: Sequence[Row], path: Path) -> None:
    """One line per grid point: M, σ, ridge, the accuracies and the per-client Gram size."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            [
                "head_projection",
                "head_activation",
                "head_ridge",
                "final_accuracy",
                "average_incremental_accuracy",
                "final_accuracy_task_mean",
                "gram_bytes_float64",
                "accuracy_matrix",
            ]
        )
        for r in rows:
            writer.writerow(
                [
                    r.width,
                    r.activation,
                    repr(r.ridge),
                    f"{r.final_accuracy:.4f}",
                    f"{r.average_incremental_accuracy:.4f}",
                    f"{r.final_accuracy_task_mean:.4f}",
                    r.gram_bytes,
                    json.dumps(r.accuracy_matrix),
                ]
            )


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or any(v < 0 for v in values):
        raise ValueError(f"--widths {text!r}: expected integers >= 0, comma-separated")
    return values


def _floats(text: str) -> list[float]:
    values = [float(v) for v in text.split(",") if v.strip()]
    if not values or not all(v > 0 for v in values):
        raise ValueError(f"--ridges {text!r}: expected numbers > 0, comma-separated")
    return values


def _activations(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in values if v not in ACTIVATIONS]
    if not values or unknown:
        raise ValueError(f"--activations {text!r}: allowed are {', '.join(ACTIVATIONS)}, comma-separated")
    return values


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default=None, help="the run's preset (frozen backbone; default: default)")
    ap.add_argument("--seed", type=int, default=None, help="the run's seed (frozen backbone; default 0)")
    ap.add_argument(
        "--model", type=Path, default=None, help="a finished run's model/ (backbone fixed after task 1)"
    )
    ap.add_argument("--widths", default=DEFAULT_WIDTHS, help=f"M values (0: no projection); {DEFAULT_WIDTHS}")
    ap.add_argument("--activations", default=DEFAULT_ACTIVATIONS, help=f"σ values; {DEFAULT_ACTIVATIONS}")
    ap.add_argument("--ridges", default=DEFAULT_RIDGES, help=f"lorm.head_ridge values; {DEFAULT_RIDGES}")
    ap.add_argument("--csv", type=Path, default=None, help="also write the grid to this CSV file")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "overrides", nargs="*", help="config key=value overrides, e.g. data.validation_per_class=100"
    )
    return ap.parse_args(argv)


def run(args: argparse.Namespace) -> list[Row]:
    """Build the backbone, collect its features once, score the grid; prints progress and the table."""
    widths, activations, ridges = _ints(args.widths), _activations(args.activations), _floats(args.ridges)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.model is not None:
        if args.preset is not None or args.seed is not None:
            raise ValueError("--model takes its preset and seed from model.json: drop --preset and --seed")
        cfg, data, model = saved_backbone(args.model, args.overrides)
        source = f"model {args.model} ({cfg.method})"
    else:
        cfg = resolve_config(args.preset or "default", None, args.overrides, seed=args.seed)
        cfg, data, model = frozen_backbone(cfg)
        source = f"frozen {cfg.model.backbone}"
    started = time.perf_counter()
    features = collect(model, cfg, data)
    split = "validation" if cfg.data.validation_per_class is not None else "test"
    print(
        f"{source}, seed {cfg.seed}: features of {sum(len(y) for _, y in features.train)} training and "
        f"{len(features.test_labels)} {split} images in {time.perf_counter() - started:.1f} s"
    )
    rows = grid(features, data.scenario, cfg.seed, widths, activations, ridges)
    print(f"{'M':>6} {'σ':>8} {'ridge':>8} {'final %':>8} {'AIA %':>8} {'s/ridge':>8}")
    for r in rows:
        print(
            f"{r.width:>6} {r.activation:>8} {r.ridge:>8.0e} {r.final_accuracy:>8.2f} "
            f"{r.average_incremental_accuracy:>8.2f} {r.seconds:>8.2f}"
        )
    best = max(rows, key=lambda r: r.final_accuracy)
    print(
        f"best on {split}: lorm.head_projection={best.width}"
        f"{'' if best.width == 0 else f' lorm.head_activation={best.activation}'} "
        f"lorm.head_ridge={best.ridge:g} ({best.final_accuracy:.2f} %)"
    )
    if args.csv is not None:
        write_csv(rows, args.csv)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        run(args)
    except ValueError as e:  # ConfigError included: one line, exit code 2
        print(f"head_projection.py: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
