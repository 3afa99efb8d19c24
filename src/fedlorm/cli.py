"""The ``fedlorm`` command: ``run`` a federated class-incremental experiment, list ``presets``.

Bad input (unknown names, values out of range, missing data, an output directory that already holds
results) ends with one line on stderr and exit code 2, before anything is written.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from fedlorm import __version__
from fedlorm.config import ConfigError, RunConfig, apply_overrides, load_toml, validate_config
from fedlorm.presets import PRESETS, preset_config

__all__ = ["main"]

EXIT_USAGE = 2
RESULT_FILES = ("results.json", "metrics.csv", "accuracy.png")


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
        "--preset", default="default", help="named configuration (see `fedlorm presets`)"
    )
    run.add_argument("--config", type=Path, help="TOML file applied on top of the preset")
    run.add_argument("--method", help="federated method (default: lorm)")
    run.add_argument("--seed", type=int, help="seed of every random choice in the run")
    run.add_argument(
        "--out", type=Path, help="output directory (default: runs/PRESET-METHOD-sSEED)"
    )
    run.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.rounds=5"
    )
    sub.add_parser("presets", help="list the presets")
    return parser


def _run_config(args: argparse.Namespace) -> RunConfig:
    cfg = preset_config(args.preset)
    if args.config is not None:
        cfg = load_toml(args.config, base=cfg)
    cfg = apply_overrides(cfg, args.overrides)
    if args.method is not None:
        cfg.method = args.method
    if args.seed is not None:
        cfg.seed = args.seed
    validate_config(cfg)
    return cfg


def _output_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    out = args.out or Path("runs") / f"{args.preset}-{cfg.method}-s{cfg.seed}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"--out {str(out)!r} already holds results ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another --out"
        )
    return out


def _command_run(args: argparse.Namespace) -> int:
    # Heavy imports (torch, timm) only once the arguments are known to be sane.
    from fedlorm.results import summary_table
    from fedlorm.runtime.experiment import build_experiment
    from fedlorm.runtime.simulator import run_simulation

    cfg = _run_config(args)
    out = _output_dir(args, cfg)
    experiment = build_experiment(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    results = run_simulation(cfg, out, progress=not args.quiet, experiment=experiment)
    print(summary_table(results))
    print(
        f"results: {out / 'results.json'}  metrics: {out / 'metrics.csv'}  plot: {out / 'accuracy.png'}"
    )
    return 0


def _command_presets() -> int:
    width = max(map(len, PRESETS))
    for name, preset in PRESETS.items():
        print(f"{name:<{width}}  {preset.description}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``fedlorm`` console script; returns the exit code."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command == "run":
            return _command_run(args)
        if args.command == "presets":
            return _command_presets()
        parser.print_help()
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as err:
        # Every bad-input error of fedlorm is a ValueError with a one-line message for the user.
        if os.environ.get("FEDLORM_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"fedlorm: error: {message}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("fedlorm: interrupted", file=sys.stderr)
        return 130
