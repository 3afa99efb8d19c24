"""Where a run writes, what it may replace, and which config it runs: one set of rules for every way a
run starts (``fedlorm run``, ``fedlorm compare``, ``fedlorm flower ...`` and the Flower ServerApp).

- The output folder is the one given, or ``runs/NAME`` (:func:`default_output`); it must be a
  directory that exists and is writable, or one that can be created.
- Results already there (:data:`RUN_OUTPUTS`) are replaced only when the caller asked to overwrite.
- A checkpoint there is an unfinished run: it is continued with resume, replaced with overwrite and
  otherwise refused.
- A resumed run takes its config and folder from the checkpoint, so options that would change
  either are refused.

Every refusal is one :class:`~fedlorm.config.ConfigError` line that names the folder and the way
out, and comes before anything in the folder changes. This module imports neither torch nor flwr
until a check needs the checkpoint reader or the method registry.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from fedlorm.config import ConfigError, RunConfig, config_from_plain
from fedlorm.presets import resolve_config

__all__ = [
    "COMMAND_LINE",
    "MODEL_DIR",
    "RESULT_FILES",
    "RUN_CONFIG",
    "RUN_OUTPUTS",
    "Options",
    "RunSetup",
    "add_run_arguments",
    "check_creatable",
    "check_output",
    "check_resume",
    "checkpointed_config",
    "clear_output",
    "comparison_output",
    "default_output",
    "server_setup",
    "setup_from_args",
]

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.json", "metrics.csv", "accuracy.png")
"""The files every finished run writes into its output folder."""
MODEL_DIR = "model"
"""The folder a finished run writes its model to (as :data:`fedlorm.export.MODEL_DIR`)."""
SERVER_STATE = "server_state.safetensors"
"""The server's final state, which a Flower run also writes (as the federation module names it)."""
RUN_OUTPUTS = (*RESULT_FILES, SERVER_STATE, MODEL_DIR)
"""Everything of an earlier run that a new run in the same folder would replace."""


@dataclass(frozen=True)
class Options:
    """How a refusal names the folder and the ways out: command-line options or run-config keys."""

    out: str
    """The name of the output folder's setting, e.g. ``--out``."""
    resume: str
    """How to resume the run in the folder; ``{out}`` stands for the folder."""
    overwrite: str
    """How to replace what is in the folder."""
    verb: str
    """What the user does with the last two, e.g. ``pass``."""
    where: str = ""
    """Appended to the way out, e.g. `` in the run config``."""


COMMAND_LINE = Options(out="--out", resume="--resume {out}", overwrite="--overwrite", verb="pass")
"""The wording of ``fedlorm run`` and ``fedlorm flower ...``."""
RUN_CONFIG = Options(
    out="out", resume="resume=true", overwrite="overwrite=true", verb="set", where=" in the run config"
)
"""The wording of the ServerApp, which plain ``flwr run`` starts with run-config keys."""


@dataclass(frozen=True)
class RunSetup:
    """A checked plan for one run: the config it runs and the folder it writes to."""

    cfg: RunConfig
    """The config as given (preset, TOML file, overrides), or the checkpoint's when resuming."""
    effective: RunConfig
    """``cfg`` as the run uses it: the method's own changes applied (e.g. ``joint``'s one client)
    and every combination checked."""
    out: Path
    """The output folder; it may not exist yet (:meth:`prepare` creates it)."""
    resume: bool = False
    """Continue the run checkpointed in :attr:`out` instead of starting one."""
    overwrite: bool = False
    """Replace an earlier run's results and checkpoint in :attr:`out`."""

    def prepare(self) -> Path:
        """Create the output folder and, for a new run, remove an earlier run's results and checkpoint.

        Call it once the run is about to write, after the data loaded: a run that fails before
        then leaves the folder as it was.

        Returns:
            The output folder.
        """
        self.out.mkdir(parents=True, exist_ok=True)
        if not self.resume:
            clear_output(self.out)
        return self.out


def default_output(prefix: str, preset: str, cfg: RunConfig) -> Path:
    """The folder a run writes to when none is given: ``runs/{prefix}{preset}-{method}-s{seed}``.

    Args:
        prefix: Names the runtime, e.g. ``"flower-"``; ``""`` for an in-process run.
        preset: The preset the config started from.
        cfg: The run's config (its method and seed name the folder).

    Returns:
        A path relative to the working directory.
    """
    return Path("runs") / f"{prefix}{preset}-{cfg.method}-s{cfg.seed}"


def check_creatable(option: str, path: Path) -> None:
    """Refuse ``path`` unless it is a writable directory or can be created as one.

    Args:
        option: How the message names the path, e.g. ``"--out"``.
        path: The folder to check; nothing is created.

    Raises:
        ConfigError: One line naming ``path`` and what is wrong with it.
    """
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


def check_output(out: Path, *, overwrite: bool, options: Options = COMMAND_LINE) -> None:
    """Refuse a folder that holds an unfinished run or an earlier run's results, unless ``overwrite``.

    Args:
        out: The output folder of a new run (it may not exist).
        overwrite: Whether the caller asked to replace what is there.
        options: The words the message uses for the folder and the ways out.

    Raises:
        ConfigError: One line naming the folder, what it holds and how to go on.
    """
    from fedlorm.runtime.checkpoint import find_checkpoint, load_record

    if overwrite:
        return
    where = f"{options.out} {str(out)!r}"
    if find_checkpoint(out) is not None:
        try:
            step = load_record(out).get("completed_step", "?")
        except ValueError:
            step = "unknown: its checkpoint is unreadable"
        resume = options.resume.format(out=repr(str(out)))
        raise ConfigError(
            f"{where} holds an unfinished run (last completed step {step}); {options.verb} {resume}"
            f"{options.where} to continue it or {options.overwrite} to start over"
        )
    existing = [name for name in RUN_OUTPUTS if (out / name).exists()]
    if existing:
        raise ConfigError(
            f"{where} already holds results ({', '.join(existing)}); {options.verb} {options.overwrite}"
            f"{options.where} to replace them or choose another {options.out}"
        )


def clear_output(out: Path) -> None:
    """Remove an earlier run's results, model and checkpoint from ``out`` (other files stay).

    Args:
        out: An output folder that :func:`check_output` allowed the new run to use.
    """
    from fedlorm.runtime.checkpoint import find_checkpoint, remove_checkpoint

    if find_checkpoint(out) is not None or any((out / name).exists() for name in RUN_OUTPUTS):
        logger.info("replacing an earlier run's results in %s", out)
    remove_checkpoint(out)
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def check_resume(folder: Path, given: Mapping[str, bool], *, option: str = "--resume") -> Path:
    """The folder of a run to resume, holding a readable checkpoint.

    Args:
        folder: The folder the caller wants to resume.
        given: For each option that would change the checkpointed run (its config or folder),
            whether the caller also gave it.
        option: How the message names ``folder``.

    Returns:
        ``folder``.

    Raises:
        ConfigError: If another option was given, or ``folder`` is not a writable directory.
        CheckpointError: If ``folder`` holds no readable checkpoint.
    """
    from fedlorm.runtime.checkpoint import load_record

    clash = [name for name, present in given.items() if present]
    if clash:
        raise ConfigError(
            f"{option} takes the run's config and directory from its checkpoint; drop {', '.join(clash)}"
        )
    if not folder.is_dir():
        raise ConfigError(f"{option} {str(folder)!r} is not a directory")
    check_creatable(option, folder)
    load_record(folder)  # a missing or unreadable checkpoint fails here, before any heavy work
    return folder


def checkpointed_config(folder: Path) -> RunConfig:
    """The config of the run checkpointed in ``folder`` (read from its record, no tensors).

    Args:
        folder: The folder of the interrupted run.

    Returns:
        The config the run started with.

    Raises:
        ConfigError: If the checkpoint is missing or its config is damaged.
    """
    from fedlorm.runtime.checkpoint import load_record

    try:
        return config_from_plain(load_record(folder)["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"--resume: the checkpoint in {str(folder)!r} is damaged: {err}") from None


def _effective(cfg: RunConfig) -> RunConfig:
    from fedlorm.runtime.experiment import effective_config  # imports torch: only once a run is asked for

    return effective_config(cfg)


def add_run_arguments(parser: argparse.ArgumentParser, *, default_out: str, resume_help: str) -> None:
    """Add the options :func:`setup_from_args` reads to a command that starts a run.

    They are ``--preset``, ``--config``, ``--method``, ``--seed``, ``--out``, ``--overwrite`` and
    ``--resume``; the command adds its ``key=value`` overrides itself, last.

    Args:
        parser: The command's parser.
        default_out: The output folder used without ``--out``, as the help shows it.
        resume_help: What ``--resume DIR`` does for this command, in a sentence.
    """
    parser.add_argument(
        "--preset", help="Named configuration to start from; 'fedlorm presets' lists them (default: default)."
    )
    parser.add_argument("--config", type=Path, help="TOML file applied on top of the preset.")
    parser.add_argument("--method", help="Federated method (default: lorm).")
    parser.add_argument("--seed", type=int, help="Seed of every random choice in the run (default: 0).")
    parser.add_argument("--out", type=Path, help=f"Output folder (default: {default_out}).")
    parser.add_argument("--overwrite", action="store_true", help="Replace the results already in --out.")
    parser.add_argument("--resume", type=Path, metavar="DIR", help=resume_help)


def setup_from_args(args: argparse.Namespace, *, prefix: str = "") -> RunSetup:
    """The checked set-up of ``fedlorm run`` or ``fedlorm flower ...`` from its parsed arguments.

    A new run's config comes from ``--preset``, ``--config``, ``--method``, ``--seed`` and the
    ``key=value`` overrides, its folder from ``--out`` (or :func:`default_output`); with
    ``--resume DIR`` both come from the checkpoint in DIR. Nothing is created or removed here.

    Args:
        args: The command's arguments.
        prefix: The default folder's prefix, e.g. ``"flower-"``.

    Returns:
        The run's set-up; call :meth:`RunSetup.prepare` before the run writes.

    Raises:
        ConfigError: One line, if the config or the folder cannot be used.
    """
    if args.resume is not None:
        given = {
            "--preset": args.preset is not None,
            "--config": args.config is not None,
            "--method": args.method is not None,
            "--seed": args.seed is not None,
            "--out": args.out is not None,
            "--overwrite": args.overwrite,
            "key=value overrides": bool(args.overrides),
        }
        out = check_resume(args.resume, given)
        cfg = checkpointed_config(out)
        return RunSetup(cfg, _effective(cfg), out, resume=True)
    preset = args.preset or "default"
    cfg = resolve_config(preset, args.config, args.overrides, method=args.method, seed=args.seed)
    out = args.out or default_output(prefix, preset, cfg)
    check_creatable("--out", out)
    check_output(out, overwrite=args.overwrite)
    return RunSetup(cfg, _effective(cfg), out, overwrite=args.overwrite)


def comparison_output(given: Path | None, presets: Sequence[str]) -> Path:
    """The folder of ``fedlorm compare``, checked to be creatable.

    Finished runs in it are read back and interrupted ones resumed (:mod:`fedlorm.compare`), so an
    existing folder is no refusal.

    Args:
        given: ``--out``, or None.
        presets: The presets compared.

    Returns:
        ``given``, or ``runs/compare-PRESET`` for one preset and ``runs/compare-FIRST-and-N-more``
        for several.

    Raises:
        ConfigError: If the folder cannot be written or created.
    """
    name = presets[0] if len(presets) == 1 else f"{presets[0]}-and-{len(presets) - 1}-more"
    out = given or Path("runs") / f"compare-{name}"
    check_creatable("--out", out)
    return out


def server_setup(
    cfg: RunConfig, *, out: str, preset: str, resume: bool, overwrite: bool
) -> RunSetup:
    """The checked set-up of a run the Flower ServerApp starts from its run config.

    Args:
        cfg: The run's config from the run config.
        out: The run-config key ``out``; ``""`` means ``runs/flower-PRESET-METHOD-sSEED`` under
            the ServerApp's working directory.
        preset: The run-config key ``preset``.
        resume: Continue the run checkpointed in the folder; nothing there is removed.
        overwrite: Replace an earlier run's results and checkpoint.

    Returns:
        The run's set-up with an absolute folder; call :meth:`RunSetup.prepare` before the run
        writes. Nothing is created or removed here.

    Raises:
        ConfigError: If the folder holds results or an unfinished run and neither ``resume`` nor
            ``overwrite`` was set, or it cannot be created.
    """
    folder = (Path(out) if out else default_output("flower-", preset, cfg)).expanduser().resolve()
    check_creatable("out", folder)
    if not resume:
        check_output(folder, overwrite=overwrite, options=RUN_CONFIG)
    return RunSetup(cfg, _effective(cfg), folder, resume=resume, overwrite=overwrite)
