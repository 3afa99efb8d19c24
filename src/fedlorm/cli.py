"""The ``fedlorm`` command: ``run`` an experiment, ``compare`` methods, run on ``flower``, list ``presets``,
``predict`` and ``evaluate`` with the model a run left, write each node's data (``partition``).

Bad input (unknown names, values out of range, missing data, an output directory that already holds
results or cannot be created, a model folder or image that cannot be read) ends with one line on
stderr and exit code 2, before anything is written. The help a terminal shows is written with the
parsers below and laid out by :mod:`fedlorm.cli_help`; this docstring is not part of it.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlorm import __version__
from fedlorm.cli_help import add_command, command_parser_options
from fedlorm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_plain,
    load_toml,
    validate_config,
)
from fedlorm.flower.cli import add_parser as add_flower_parser
from fedlorm.flower.cli import run as run_flower
from fedlorm.logs import add_logging_arguments, command_logging, log_level
from fedlorm.presets import PRESETS, config_sources, resolve_config
from fedlorm.run_setup import (
    MODEL_DIR,
    add_run_arguments,
    check_creatable,
    comparison_output,
    setup_from_args,
)

__all__ = ["main"]

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2 (argparse's own code, without the usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="fedlorm",
        **command_parser_options(
            """
            Federated class-incremental learning with LoRA adapters and closed-form merges (LoRM,
            ICLR 2025). Run one experiment, compare methods on the same scenarios and seeds, run
            on Flower, or use the model a run left.

            Bad input ends with one line on stderr and exit code 2, before anything is written.
            Every command has its own help: fedlorm COMMAND --help.
            """,
            [
                "fedlorm run --preset smoke --out runs/smoke",
                "fedlorm compare --methods lorm,fedavg,ffa --seeds 0,1,2 --out runs/cmp",
                "fedlorm flower simulate --preset smoke",
            ],
        ),
    )
    parser.add_argument("--version", action="version", version=f"fedlorm {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    run = add_command(
        sub,
        "run",
        summary="Run one federated class-incremental experiment.",
        description="""
            Run one experiment in this process and write results.json, metrics.csv,
            accuracy.png and the deployed model (model/) to the output folder. The config is a
            preset, then a TOML file, then key=value overrides, each on top of the one before.

            The run checkpoints its folder after every step: an interrupted run continues with
            --resume. A folder that already holds results is refused unless --overwrite is given.
            """,
        examples=[
            "fedlorm run",
            "fedlorm run --preset smoke --out runs/smoke",
            "fedlorm run --method fedavg --seed 1 train.rounds=6 model.rank=8",
            "fedlorm run --resume runs/smoke",
        ],
    )
    add_run_arguments(
        run,
        default_out="runs/PRESET-METHOD-sSEED",
        resume_help="Continue the interrupted run in DIR from its last completed step, with the config "
        "stored in its checkpoint.",
    )
    run.add_argument("--quiet", action="store_true", help="Show no progress bar.")
    add_logging_arguments(run)
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. train.rounds=5."
    )
    compare = add_command(
        sub,
        "compare",
        summary="Run several methods on the same scenarios and seeds, with a table and a plot.",
        description="""
            Run every method with every seed on the same class order and client partitions, then
            write comparison.md, comparison.csv and comparison.png. Each run keeps its own folder
            OUT/METHOD/sSEED; finished runs of the same config are read back and interrupted ones
            continue from their checkpoints, so running the same command again resumes it.

            With several presets, each is compared in OUT/PRESET and a combined table is written
            to OUT.
            """,
        examples=[
            "fedlorm compare --methods lorm,fedavg,ffa,head-only,joint --seeds 0,1,2 --out runs/cmp",
            "fedlorm compare --methods lorm,fedavg --preset smoke lorm:train.lr=1e-3",
        ],
    )
    compare.add_argument(
        "--methods", required=True, help="Comma-separated methods, e.g. lorm,fedavg,ffa,joint."
    )
    compare.add_argument("--seeds", default="0", help="Comma-separated seeds (default: 0).")
    compare.add_argument(
        "--preset",
        default="default",
        help="Named configuration, or a comma-separated list of them, each compared in OUT/PRESET "
        "(default: default).",
    )
    compare.add_argument("--config", type=Path, help="TOML file applied on top of every preset.")
    compare.add_argument(
        "--out",
        type=Path,
        help="Output folder (default: runs/compare-PRESET, or runs/compare-FIRST-and-N-more for "
        "several presets).",
    )
    compare.add_argument("--quiet", action="store_true", help="Show no progress bars.")
    add_logging_arguments(compare)
    compare.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config overrides for every run, e.g. train.rounds=5; METHOD:key=value applies to one "
        "method only, e.g. lorm:train.lr=1e-3.",
    )
    partition = add_command(
        sub,
        "partition",
        summary="Write each client's share of every task, and the server's evaluation set, to folders.",
        description="""
            Draw the run's seeded split of the data across clients, exactly as a run would, and
            write each client's share of every task to DIR/client-K and the evaluation set to
            DIR/server. A Flower node given one of these folders reads no dataset. The format is
            described in docs/partitions.md.
            """,
        examples=[
            "fedlorm partition --preset smoke --seed 0 --out parts/smoke",
            "fedlorm partition --out parts/four scenario.num_clients=4",
        ],
    )
    partition.add_argument("--preset", help="Named configuration to start from (default: default).")
    partition.add_argument("--config", type=Path, help="TOML file applied on top of the preset.")
    partition.add_argument("--seed", type=int, help="Seed of the run the folders are for (default: 0).")
    partition.add_argument(
        "--out", type=Path, required=True, metavar="DIR", help="Folder to write client-K/ and server/ to."
    )
    partition.add_argument(
        "--overwrite", action="store_true", help="Replace partition folders already in DIR."
    )
    add_logging_arguments(partition)
    partition.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. scenario.num_clients=4."
    )
    presets = add_command(
        sub,
        "presets",
        summary="List the named configurations, or show one and where each of its settings comes from.",
        description="""
            Without a name, list every preset with a one-line description (the built-in offline
            benchmark, a quick smoke run, the paper's settings) and the settings chosen for each
            method on the preset's own validation split. With a name, show every setting of a run
            of that preset that differs from the config's default, and whether it comes from the
            preset, its validated table or the method.
            """,
        examples=["fedlorm presets", "fedlorm presets headroom --method lorm-fsa"],
    )
    presets.add_argument("name", nargs="?", help="A preset to show in full.")
    presets.add_argument(
        "--method", help="The method whose validated settings to show with a name (default: lorm)."
    )
    add_logging_arguments(presets)
    predict = add_command(
        sub,
        "predict",
        summary="Show the top classes of image files under the model a run left.",
        description="""
            Load the model/ folder of a finished run and print, for each image, its most likely
            classes with their probabilities. Images are resized or cropped as the run's test
            images were.
            """,
        examples=["fedlorm predict --model runs/default-lorm-s0/model shoe.png --top 3"],
    )
    _add_model_argument(predict)
    predict.add_argument(
        "--top", type=int, default=5, metavar="K", help="Classes shown per image (default: 5)."
    )
    add_logging_arguments(predict)
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="Image files in any format PIL reads.")
    evaluate = add_command(
        sub,
        "evaluate",
        summary="Measure the class-incremental accuracy of a run's model on a test split.",
        description="""
            Load the model/ folder of a finished run and measure its accuracy over every class it
            has seen, with no task id, on the test split of the run's own data settings, or of
            --preset and the overrides given.
            """,
        examples=[
            "fedlorm evaluate --model runs/default-lorm-s0/model",
            "fedlorm evaluate --model runs/default-lorm-s0/model data.test_per_class=50",
        ],
    )
    _add_model_argument(evaluate)
    evaluate.add_argument(
        "--preset", help="Take the data settings from this preset instead of the run's own config."
    )
    evaluate.add_argument("--config", type=Path, help="TOML file applied on top of that config.")
    add_logging_arguments(evaluate)
    evaluate.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. data.test_per_class=50."
    )
    add_flower_parser(sub)  # imports neither flwr nor torch
    return parser


def _add_model_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="DIR",
        help="The model/ folder a finished run wrote, e.g. runs/default-lorm-s0/model.",
    )


def _command_run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, timm) only once the arguments are known to be sane.
    from fedlorm.results import summary_table
    from fedlorm.runtime.experiment import build_experiment
    from fedlorm.runtime.simulator import resume_simulation, run_simulation

    setup = setup_from_args(args)
    out = setup.out
    if setup.resume:
        results = resume_simulation(out, progress=not args.quiet)
        print(summary_table(results))
        print(f"results: {out / 'results.json'}")
        return 0
    experiment = build_experiment(setup.cfg)
    setup.prepare()
    results = run_simulation(setup.cfg, out, progress=not args.quiet, experiment=experiment)
    print(summary_table(results))
    print(
        f"results: {out / 'results.json'}  metrics: {out / 'metrics.csv'}  plot: {out / 'accuracy.png'}"
        f"  model: {out / MODEL_DIR}"
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


def _command_compare(args: argparse.Namespace) -> int:
    from fedlorm.compare import check_methods, check_presets, run_comparisons, split_method_overrides
    from fedlorm.runtime.simulator import resume_simulation, run_simulation

    methods = check_methods(_names(args.methods))
    seeds = _int_list("--seeds", args.seeds)
    presets = check_presets(_names(args.preset))
    common, own = split_method_overrides(args.overrides, methods)
    bases = {name: functools.partial(_preset_base, name, args.config, common) for name in presets}
    out = comparison_output(args.out, presets)

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
    check_creatable("--out", args.out)
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
