"""The ``fedlorm`` command: ``run`` an experiment, ``compare`` methods, run on ``flower``, list ``presets``,
``predict`` and ``evaluate`` with the model a run left, write each node's data (``partition``).

Bad input (unknown names, values out of range, missing data, an output directory that already holds
results or cannot be created, a model folder or image that cannot be read) ends with one line on
stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlorm import __version__
from fedlorm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_plain,
    load_toml,
    validate_config,
)
from fedlorm.logs import add_logging_arguments, command_logging, log_level
from fedlorm.presets import PRESETS, config_sources, resolve_config

__all__ = ["main"]

EXIT_USAGE = 2
RESULT_FILES = ("results.json", "metrics.csv", "accuracy.png")
CHECKPOINT = "checkpoint.json"  # fedlorm.runtime.checkpoint.CHECKPOINT_RECORD, without importing torch
MODEL = "model"  # fedlorm.export.MODEL_DIR, without importing torch


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own code, without the usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fedlorm", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"fedlorm {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="run one federated class-incremental experiment")
    run.add_argument(
        "--preset", help="named configuration (see `fedlorm presets`; default: default)"
    )
    run.add_argument("--config", type=Path, help="TOML file applied on top of the preset")
    run.add_argument("--method", help="federated method (default: lorm)")
    run.add_argument("--seed", type=int, help="seed of every random choice in the run")
    run.add_argument(
        "--out", type=Path, help="output directory (default: runs/PRESET-METHOD-sSEED)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    run.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the interrupted run in DIR from its last completed round (config from DIR)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    add_logging_arguments(run)
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.rounds=5"
    )
    compare = sub.add_parser(
        "compare", help="run several methods on the same scenarios and seeds; table and plot"
    )
    compare.add_argument(
        "--methods", required=True, help="comma-separated methods, e.g. lorm,fedavg,ffa,joint"
    )
    compare.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    compare.add_argument(
        "--preset",
        default="default",
        help="named configuration, or a comma-separated list of them, each compared in OUT/PRESET "
        "(see `fedlorm presets`)",
    )
    compare.add_argument("--config", type=Path, help="TOML file applied on top of every preset")
    compare.add_argument(
        "--out", type=Path, help="output directory (default: runs/compare-PRESET, or "
        "runs/compare-FIRST-and-N-more for several presets); finished runs in it are reused and "
        "interrupted ones resumed from their checkpoints"
    )
    compare.add_argument("--quiet", action="store_true", help="no progress bars")
    add_logging_arguments(compare)
    compare.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.rounds=5; "
        "METHOD:key=value for one method only, e.g. lorm:train.lr=1e-3"
    )
    partition = sub.add_parser(
        "partition",
        help="write each client's share of every task, and the server's evaluation set, to its own "
        "folder (see docs/partitions.md)",
    )
    partition.add_argument("--preset", help="named configuration (default: default)")
    partition.add_argument("--config", type=Path, help="TOML file applied on top of the preset")
    partition.add_argument("--seed", type=int, help="seed of the run the folders are for")
    partition.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="writes DIR/client-K/ and DIR/server/"
    )
    partition.add_argument(
        "--overwrite", action="store_true", help="replace the partition folders already in DIR"
    )
    add_logging_arguments(partition)
    partition.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. scenario.num_clients=4"
    )
    presets = sub.add_parser(
        "presets",
        help="list the presets, or show one preset's settings and where each comes from",
        description="Without a name, list every preset with its validated per-method settings. "
        "With a name, show every setting of that preset's run that differs from the config "
        "default, and where it comes from. Example: fedlorm presets headroom --method lorm-fsa",
    )
    presets.add_argument("name", nargs="?", help="a preset to show in full")
    presets.add_argument("--method", help="the method whose validated settings to show (default: lorm)")
    add_logging_arguments(presets)
    predict = sub.add_parser("predict", help="the top classes of image files under a run's model")
    _add_model_argument(predict)
    predict.add_argument(
        "--top", type=int, default=5, metavar="K", help="classes shown per image (default: 5)"
    )
    add_logging_arguments(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    evaluate = sub.add_parser(
        "evaluate", help="class-IL accuracy of a run's model on a dataset's test split"
    )
    _add_model_argument(evaluate)
    evaluate.add_argument(
        "--preset", help="take the data settings from this preset (default: the run's config)"
    )
    evaluate.add_argument("--config", type=Path, help="TOML file applied on top of that config")
    add_logging_arguments(evaluate)
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. data.test_per_class=50"
    )
    # The Flower commands; importing their parser pulls in neither flwr nor torch.
    from fedlorm.flower.cli import add_parser as add_flower_parser

    add_flower_parser(sub)
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="the model/ folder a finished run wrote, e.g. runs/default-lorm-s0/model",
    )


def _creatable_dir(option: str, path: Path) -> None:
    """A one-line error naming ``path`` unless it is a writable directory or can be created as one."""
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"{option} {str(path)!r} exists and is not a directory")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ConfigError(f"{option} {str(path)!r} is not writable")
        return
    parent = next(p for p in path.absolute().parents if p.exists())
    if not parent.is_dir():
        raise ConfigError(
            f"{option} {str(path)!r} cannot be created: {str(parent)!r} is a file, not a directory"
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {str(path)!r} cannot be created: {str(parent)!r} is not writable")


def _run_config(args: argparse.Namespace) -> RunConfig:
    return resolve_config(
        args.preset or "default", args.config, args.overrides, method=args.method, seed=args.seed
    )


def _output_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    from fedlorm.runtime.checkpoint import load_record

    out = args.out or Path("runs") / f"{args.preset or 'default'}-{cfg.method}-s{cfg.seed}"
    _creatable_dir("--out", out)
    if (out / CHECKPOINT).exists() and not args.overwrite:
        try:
            step = load_record(out).get("completed_step", "?")
        except ValueError:
            step = "unknown: its checkpoint is unreadable"
        raise ConfigError(
            f"--out {str(out)!r} holds an unfinished run (last completed step {step}); "
            f"pass --resume {str(out)!r} to continue it or --overwrite to start over"
        )
    existing = [name for name in (*RESULT_FILES, MODEL) if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"--out {str(out)!r} already holds results ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another --out"
        )
    return out


def resume_dir(args: argparse.Namespace) -> Path:
    """``--resume``'s directory, holding a readable checkpoint; options that would change the
    checkpointed run are errors (ConfigError / CheckpointError, one line). ``fedlorm run`` and
    ``fedlorm flower`` share it."""
    from fedlorm.runtime.checkpoint import load_record

    given = {
        "--preset": args.preset is not None,
        "--config": args.config is not None,
        "--method": args.method is not None,
        "--seed": args.seed is not None,
        "--out": args.out is not None,
        "--overwrite": args.overwrite,
        "key=value overrides": bool(args.overrides),
    }
    clash = [name for name, present in given.items() if present]
    if clash:
        raise ConfigError(
            f"--resume takes the run's config and directory from its checkpoint; drop {', '.join(clash)}"
        )
    out = args.resume
    if not out.is_dir():
        raise ConfigError(f"--resume {str(out)!r} is not a directory")
    _creatable_dir("--resume", out)
    load_record(out)  # a missing or unreadable checkpoint fails here, before any heavy work
    return out


def _command_run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, timm) only once the arguments are known to be sane.
    from fedlorm.results import summary_table
    from fedlorm.runtime.checkpoint import remove_checkpoint
    from fedlorm.runtime.experiment import build_experiment
    from fedlorm.runtime.simulator import resume_simulation, run_simulation

    if args.resume is not None:
        out = resume_dir(args)
        results = resume_simulation(out, progress=not args.quiet)
        print(summary_table(results))
        print(f"results: {out / 'results.json'}")
        return 0
    cfg = _run_config(args)
    out = _output_dir(args, cfg)
    experiment = build_experiment(cfg)
    out.mkdir(parents=True, exist_ok=True)
    remove_checkpoint(out)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    if (out / MODEL).is_dir():
        shutil.rmtree(out / MODEL)
    results = run_simulation(cfg, out, progress=not args.quiet, experiment=experiment)
    print(summary_table(results))
    print(
        f"results: {out / 'results.json'}  metrics: {out / 'metrics.csv'}  plot: {out / 'accuracy.png'}"
        f"  model: {out / MODEL}"
    )
    return 0


def _int_list(option: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{option} {text!r} is not a comma-separated list of integers") from None
    if not values or min(values) < 0 or len(set(values)) != len(values):
        raise ConfigError(f"{option} {text!r}: expected distinct integers >= 0, e.g. 0,1,2")
    return values


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def _preset_base(preset: str, config: Path | None, overrides: Sequence[str], method: str) -> RunConfig:
    """A comparison's config of ``method`` on ``preset``: its validated settings, then the user's."""
    return resolve_config(preset, config, overrides, method=method)


def _compare_out(args: argparse.Namespace, presets: Sequence[str]) -> Path:
    """``--out``, or runs/compare-PRESET (one preset), runs/compare-FIRST-and-N-more (several)."""
    name = presets[0] if len(presets) == 1 else f"{presets[0]}-and-{len(presets) - 1}-more"
    out = args.out or Path("runs") / f"compare-{name}"
    _creatable_dir("--out", out)
    return out


def _command_compare(args: argparse.Namespace) -> int:
    from fedlorm.compare import check_methods, check_presets, run_comparisons, split_method_overrides
    from fedlorm.runtime.simulator import resume_simulation, run_simulation

    methods = check_methods(_names(args.methods))
    seeds = _int_list("--seeds", args.seeds)
    presets = check_presets(_names(args.preset))
    common, own = split_method_overrides(args.overrides, methods)
    bases = {name: functools.partial(_preset_base, name, args.config, common) for name in presets}
    out = _compare_out(args, presets)

    def run(run_cfg: RunConfig, run_dir: Path) -> dict:
        print(f"{run_cfg.method}, seed {run_cfg.seed} → {run_dir}", flush=True)
        return run_simulation(run_cfg, run_dir, progress=not args.quiet)

    def resume(run_cfg: RunConfig, run_dir: Path) -> dict:
        print(f"{run_cfg.method}, seed {run_cfg.seed} → {run_dir} (resuming its checkpoint)", flush=True)
        return resume_simulation(run_dir, progress=not args.quiet)

    results = run_comparisons(bases, methods, seeds, out, run=run, resume=resume, method_overrides=own)
    _report_comparison(results, out, args.seeds)
    return 0


def _report_comparison(results: dict[str, dict[str, list[dict]]], out: Path, seeds: str) -> None:
    """Each preset's table, CSV and plot in its directory, with several presets a combined table and
    CSV (preset column) in ``out``; print the table."""
    from fedlorm.compare import (
        comparison_dirs,
        comparison_table,
        paired_differences,
        paired_table,
        summarize_method,
        write_comparison,
        write_table,
    )

    dirs, rows, paired = comparison_dirs(list(results), out), [], []
    for preset, by_method in results.items():
        preset_rows = [summarize_method(m, runs, preset=preset) for m, runs in by_method.items()]
        preset_paired = paired_differences(by_method, next(iter(by_method)))
        paths = write_comparison(
            preset_rows, dirs[preset], title=f"{preset}, seeds {seeds}", paired=preset_paired
        )
        rows.extend(preset_rows)
        paired.extend(preset_paired)
    if len(results) == 1:
        print(comparison_table(rows))
        if paired:
            print(paired_table(paired))
        print(f"table: {paths['md']}  csv: {paths['csv']}  plot: {paths['png']}")
        return
    paths = write_table(rows, out, preset_column=True)
    print(comparison_table(rows, preset_column=True))
    print(f"table: {paths['md']}  csv: {paths['csv']}  (each preset's table and plot: {out}/PRESET)")


def _model_info(path: Path) -> dict:
    """The checked model.json of ``--model``: a one-line error naming the folder otherwise."""
    from fedlorm.export import read_model_info

    if not path.exists():
        raise ConfigError(
            f"--model {str(path)!r} does not exist; give the model/ folder of a finished run "
            "(e.g. runs/default-lorm-s0/model)"
        )
    if not path.is_dir():
        raise ConfigError(f"--model {str(path)!r} is not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"--model {str(path)!r} is not readable")
    return read_model_info(path)


def _command_predict(args: argparse.Namespace) -> int:
    from fedlorm.export import load_model, model_preprocessing
    from fedlorm.inference import predict_images, read_image

    if args.top < 1:
        raise ConfigError(f"--top {args.top} is not allowed; expected an integer >= 1")
    info = _model_info(args.model)
    preprocessing = model_preprocessing(info)
    images = [read_image(path, preprocessing) for path in args.images]
    saved = load_model(args.model)
    for path, top in zip(args.images, predict_images(saved, images, args.top), strict=True):
        print(path)
        for name, probability in top:
            print(f"  {probability:.4f}  {name}")
    return 0


def _evaluate_config(args: argparse.Namespace, info: dict) -> RunConfig:
    """``--preset`` (or the run's own config from model.json), then ``--config``, then overrides."""
    if args.preset is not None:
        return resolve_config(args.preset, args.config, args.overrides)
    cfg = config_from_plain(info["config"])
    if args.config is not None:
        cfg = load_toml(args.config, base=cfg)
    cfg = apply_overrides(cfg, args.overrides)
    validate_config(cfg)
    return cfg


def _command_evaluate(args: argparse.Namespace) -> int:
    from fedlorm.export import load_model
    from fedlorm.inference import evaluate_saved
    from fedlorm.precision import check_precision
    from fedlorm.runtime.experiment import resolve_device

    info = _model_info(args.model)
    cfg = _evaluate_config(args, info)
    device = resolve_device(cfg.train.device)
    check_precision(cfg.train.precision, device)
    scores = evaluate_saved(load_model(args.model, device), cfg)
    print(
        f"class-IL accuracy {scores.accuracy:.2f}% on {scores.images} test images of "
        f"{scores.classes} classes ({', '.join(scores.datasets)})"
    )
    return 0


def _command_partition(args: argparse.Namespace) -> int:
    cfg = resolve_config(args.preset or "default", args.config, args.overrides, seed=args.seed)
    _creatable_dir("--out", args.out)
    from fedlorm.data.partition_store import check_output

    check_output(args.out, args.overwrite)  # before the datasets are loaded
    from fedlorm.runtime.partitions import write_partitions

    folders = write_partitions(cfg, args.out, overwrite=args.overwrite)
    clients = sum(path.name != "server" for path in folders)
    print(f"wrote {clients} client folders and server/ to {args.out}")
    return 0


def _command_presets(args: argparse.Namespace) -> int:
    if args.name is None:
        width = max(map(len, PRESETS))
        for name, preset in PRESETS.items():
            print(f"{name:<{width}}  {preset.description}")
            for method, settings in preset.validated.items():
                chosen = ", ".join(f"{key}={value}" for key, value in settings.items())
                print(f"{'':<{width}}    validated for {method}: {chosen}")
        return 0
    if args.method is not None:
        from fedlorm.compare import check_methods  # imports the methods (torch): only when asked

        check_methods([args.method])
    cfg = resolve_config(args.name, method=args.method)
    print(f"{args.name}: {PRESETS[args.name].description}")
    for key, source in config_sources(cfg).items():
        if source != "default":
            print(f"  {key} = {_flat_value(cfg, key)}  ({source})")
    return 0


def _flat_value(cfg: RunConfig, key: str) -> object:
    value: object = cfg
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _dispatch(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """Run the chosen command; without one, print the help (exit 2)."""
    if args.command == "run":
        return _command_run(args)
    if args.command == "compare":
        return _command_compare(args)
    if args.command == "flower":
        from fedlorm.flower.cli import run as run_flower

        return run_flower(args)
    if args.command == "partition":
        return _command_partition(args)
    if args.command == "presets":
        return _command_presets(args)
    if args.command == "predict":
        return _command_predict(args)
    if args.command == "evaluate":
        return _command_evaluate(args)
    parser.print_help()
    return EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlorm`` console script; returns the exit code."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        with command_logging(log_level(args)):
            return _dispatch(parser, args)
    except (ValueError, OSError, RuntimeError) as err:
        # Every bad-input error of fedlorm is a ValueError with a one-line message for the user; an
        # OSError names the path the system refused.
        if os.environ.get("FEDLORM_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fedlorm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlorm: interrupted", file=sys.stderr)
        return 130
