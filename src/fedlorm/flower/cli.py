"""``fedlorm flower ...``: run an experiment on Flower, in simulation, on loopback, or on a SuperLink.

- ``simulate``: a private simulation SuperLink, N virtual SuperNodes (Ray), ``flwr run``;
- ``deploy-local``: a SuperLink and N SuperNode processes on 127.0.0.1 (insecure), ``flwr run``;
- ``submit``: ``flwr run`` against a SuperLink connection of ``$FLWR_HOME/config.toml`` (real deployments);
- ``app-config``: the ``[tool.flwr.app.config]`` table an app's pyproject.toml must declare.

``--partitions DIR`` (``simulate``, ``deploy-local``) feeds the run from the folders ``fedlorm
partition`` wrote: SuperNode k reads only ``DIR/client-k`` and the ServerApp only ``DIR/server``
(``submit --server-data PATH`` names the server's folder on the SuperLink host).

The experiment is chosen as for ``fedlorm run`` (preset, TOML file, ``key=value`` overrides); the
resolved config travels in full as the run config, and results land in ``--out`` as for ``fedlorm run``
(results.json, metrics.csv, accuracy.png, model/) plus ``server_state.safetensors`` and the Flower process
logs. The ServerApp checkpoints ``--out`` after every step; ``--resume DIR`` continues a run that was
killed there (its config comes from the checkpoint). Imports no flwr or torch until a command runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedlorm.config import ConfigError, RunConfig
from fedlorm.flower.settings import (
    RUNTIME_DEFAULTS,
    FlowerSettings,
    default_run_config,
    run_config_for,
    to_toml,
)
from fedlorm.logs import add_logging_arguments
from fedlorm.presets import resolve_config

__all__ = ["add_parser", "main", "run"]

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.json", "metrics.csv", "accuracy.png", "server_state.safetensors")
"""What a run writes (as serverapp.RESULT_FILES, named here without importing flwr)."""


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``flower`` command (with its sub-commands) to an argparse ``subparsers`` object."""
    flower = subparsers.add_parser("flower", help="run an experiment on Flower (simulation or deployment)")
    commands = flower.add_subparsers(dest="flower_command", parser_class=type(flower))
    simulate = commands.add_parser("simulate", help="Flower simulation: N virtual SuperNodes (Ray)")
    _common_arguments(simulate)
    _partitions_argument(simulate)
    simulate.add_argument("--supernodes", type=int, help="virtual SuperNodes (default: scenario.num_clients)")
    simulate.add_argument(
        "--federation-config",
        action="append",
        default=[],
        metavar="K=V",
        help="extra simulation settings, e.g. client-resources-num-gpus=0.25 (repeatable)",
    )
    local = commands.add_parser("deploy-local", help="a SuperLink and N SuperNode processes on 127.0.0.1")
    _common_arguments(local)
    _partitions_argument(local)
    local.add_argument("--supernodes", type=int, help="SuperNode processes (default: scenario.num_clients)")
    submit = commands.add_parser("submit", help="run on a deployed SuperLink (a connection in FLWR_HOME)")
    _common_arguments(submit)
    submit.add_argument("--superlink", required=True, help="connection name in $FLWR_HOME/config.toml")
    submit.add_argument(
        "--server-data",
        metavar="PATH",
        help="the server/ folder of `fedlorm partition` on the SuperLink host (absolute path there; "
        "not checked here): the ServerApp evaluates on it and loads no dataset",
    )
    app_config = commands.add_parser(
        "app-config", help="print the [tool.flwr.app.config] table a Flower app's pyproject.toml declares"
    )
    add_logging_arguments(app_config)
    return flower


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", help="named configuration (see `fedlorm presets`; default: default)")
    parser.add_argument("--config", type=Path, help="TOML file applied on top of the preset")
    parser.add_argument("--method", help="federated method (default: lorm)")
    parser.add_argument("--seed", type=int, help="seed of every random choice in the run")
    parser.add_argument(
        "--out", type=Path, help="output directory (default: runs/flower-PRESET-METHOD-sSEED)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    parser.add_argument(
        "--resume",
        type=Path,
        metavar="DIR",
        help="continue the run checkpointed in DIR (a killed ServerApp or SuperLink); its config "
        "comes from the checkpoint",
    )
    parser.add_argument(
        "--min-clients",
        type=int,
        default=RUNTIME_DEFAULTS["min-clients"],
        help="merge a step only if at least this many clients replied validly (default: %(default)s)",
    )
    parser.add_argument(
        "--reply-timeout",
        type=float,
        default=RUNTIME_DEFAULTS["reply-timeout"],
        help="seconds to wait for a step's replies; later ones are dropped (default: %(default)s)",
    )
    parser.add_argument(
        "--node-wait",
        type=float,
        default=RUNTIME_DEFAULTS["node-wait"],
        help="seconds to wait at start for one SuperNode per client (default: %(default)s)",
    )
    parser.add_argument("--no-federated-eval", action="store_true", help="skip the clients' local evaluation")
    add_logging_arguments(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.rounds=5"
    )


def _partitions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partitions",
        type=Path,
        metavar="DIR",
        help="folders written by `fedlorm partition` for this run: SuperNode k reads only "
        "DIR/client-k, the server only DIR/server (no dataset is loaded)",
    )


def _check_partitions(given: Path, clients: int) -> Path:
    """``given`` resolved, if it holds client-0 .. client-(clients-1) and server (ConfigError, one
    line naming it, if not). The folders' contents are checked by the nodes that read them."""
    from fedlorm.flower.launch import toml_string

    root = given.expanduser().resolve()
    where = f"--partitions {str(given)!r}"
    if not root.exists():
        raise ConfigError(f"{where} does not exist; write it with `fedlorm partition --out {given}`")
    if not root.is_dir():
        raise ConfigError(f"{where} is not a directory")
    expected = [f"client-{k}" for k in range(clients)] + ["server"]
    missing = [name for name in expected if not (root / name).is_dir()]
    if missing:
        listed = ", ".join(f"{name}/" for name in missing[:3]) + (", …" if len(missing) > 3 else "")
        raise ConfigError(
            f"{where} has no {listed}; it must hold client-0/ .. client-{clients - 1}/ and server/ "
            "(`fedlorm partition` with this run's preset, seed and overrides writes them)"
        )
    try:
        toml_string(str(root))
    except ValueError as err:
        raise ConfigError(f"{where}: {err}") from None
    return root


def _config(args: argparse.Namespace) -> RunConfig:
    if args.resume is not None:
        return _checkpointed_config(args)
    return resolve_config(
        args.preset or "default", args.config, args.overrides, method=args.method, seed=args.seed
    )


def _checkpointed_config(args: argparse.Namespace) -> RunConfig:
    """The config of the run checkpointed in ``--resume`` (ConfigError, one line, if there is none, it
    is damaged, or the command also chose a config or an output directory)."""
    from fedlorm.cli import resume_dir
    from fedlorm.config import config_from_plain
    from fedlorm.runtime.checkpoint import load_record

    out = resume_dir(args)
    try:
        return config_from_plain(load_record(out)["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"--resume: the checkpoint in {str(out)!r} is damaged: {err}") from None


def _output_dir(args: argparse.Namespace, cfg: RunConfig) -> Path:
    if args.resume is not None:
        return args.resume.expanduser().resolve()
    preset = args.preset or "default"
    out = (args.out or Path("runs") / f"flower-{preset}-{cfg.method}-s{cfg.seed}").expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    existing = [name for name in RESULT_FILES if (out / name).exists()]
    if existing and not args.overwrite:
        raise ConfigError(
            f"--out {str(out)!r} already holds results ({', '.join(existing)}); "
            "pass --overwrite to replace them or choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    for name in existing:
        (out / name).unlink()
    return out


def _clients(cfg: RunConfig) -> int:
    """Clients the run really has (``joint`` turns the scenario into one client)."""
    from fedlorm.methods import METHODS

    return METHODS[cfg.method].run_config(cfg).scenario.num_clients


def _asked(cfg: RunConfig, clients: int) -> int:
    """Clients a training round asks (``scenario.participation`` of ``clients``)."""
    from fedlorm.fcl.participation import clients_per_round

    return clients_per_round(clients, cfg.scenario.participation)


def run(args: argparse.Namespace) -> int:
    """Handle ``fedlorm flower ...``; returns the exit code (0: every task completed)."""
    from fedlorm.flower import launch

    if args.flower_command is None:
        raise ConfigError("choose a flower command: simulate, deploy-local, submit or app-config")
    if args.flower_command == "app-config":
        print("[tool.flwr.app.config]\n" + to_toml(default_run_config()), end="")
        return 0
    cfg = _config(args)
    settings = FlowerSettings(
        preset=args.preset or "default",
        resume=args.resume is not None,
        min_clients=args.min_clients,
        reply_timeout=args.reply_timeout,
        node_wait=args.node_wait,
        federated_eval=not args.no_federated_eval,
    )
    clients = _clients(cfg)
    asked = _asked(cfg, clients)
    if not 1 <= settings.min_clients <= asked:
        who = (
            "the run's clients"
            if asked == clients
            else f"the clients a training round asks: scenario.participation = "
            f"{cfg.scenario.participation:g} of {clients}"
        )
        raise ConfigError(f"--min-clients {settings.min_clients} is not in 1..{asked} ({who})")
    supernodes = getattr(args, "supernodes", None) or clients
    partitions = _check_partitions(args.partitions, clients) if getattr(args, "partitions", None) else None
    data: dict[str, str] = {"server_data": getattr(args, "server_data", None) or ""}
    if partitions is not None:
        data["server_data"] = str(partitions / "server")
        if args.flower_command == "simulate":
            # Virtual SuperNodes get no node config of their own: each reads client-data/client-K.
            data["client_data"] = str(partitions)
    out = _output_dir(args, cfg)
    settings = FlowerSettings(**{**settings.__dict__, **data, "out": str(out)})
    run_config = run_config_for(cfg, settings)
    logs = out / "flower-logs"
    with tempfile.TemporaryDirectory(prefix="fedlorm-flower-") as work:
        app = launch.write_app(Path(work) / "app")
        if args.flower_command == "submit":
            home = Path(os.environ.get("FLWR_HOME", Path.home() / ".flwr"))
            code = launch.flwr_run(app, args.superlink, run_config, flwr_home=home)
        else:
            code = _run_locally(
                launch, args, app, Path(work) / "flwr", logs, run_config, supernodes, clients, partitions
            )
    return _report(out, code)


def _run_locally(
    launch: Any,
    args: argparse.Namespace,
    app: Path,
    home: Path,
    logs: Path,
    run_config: dict[str, Any],
    supernodes: int,
    clients: int,
    partitions: Path | None = None,
) -> int:
    """Start a private SuperLink (and SuperNodes for deploy-local), run, stop everything.

    With ``partitions``, SuperNode k of deploy-local is given ``data-dir=partitions/client-k``.
    """
    simulation = args.flower_command == "simulate"
    link, address = launch.start_superlink(home, simulation=simulation, log=logs / "superlink.log")
    nodes = []
    try:
        launch.write_connection(home, "fedlorm", address)
        if simulation:
            federation = [f"num-supernodes={supernodes}", *args.federation_config]
            return int(
                launch.flwr_run(app, "fedlorm", run_config, flwr_home=home, federation_config=federation)
            )
        nodes = [
            launch.start_supernode(
                home,
                address,
                k % clients,
                clients,
                data_dir=None if partitions is None else partitions / f"client-{k % clients}",
                log=logs / f"supernode-{k}.log",
            )
            for k in range(supernodes)
        ]
        return int(launch.flwr_run(app, "fedlorm", run_config, flwr_home=home))
    finally:
        for proc in [*nodes, link]:
            proc.stop()


def _report(out: Path, code: int) -> int:
    from fedlorm.results import summary_table

    path = out / "results.json"
    if not path.exists():
        print(
            f"fedlorm: error: the Flower run wrote no results (flwr exit code {code}); "
            f"see the logs in {out / 'flower-logs'}",
            file=sys.stderr,
        )
        return 1
    results = json.loads(path.read_text())
    print(summary_table(results))
    dropped = results.get("flower", {}).get("dropped", [])
    if dropped:
        print(f"{len(dropped)} client replies dropped (reasons in results.json, key flower.dropped)")
    print(f"results: {path}  metrics: {out / 'metrics.csv'}  plot: {out / 'accuracy.png'}")
    tasks = len(results["scenario"]["task_sizes"])
    if results["tasks_completed"] < tasks:
        print(
            f"fedlorm: error: the run stopped after {results['tasks_completed']} of {tasks} tasks",
            file=sys.stderr,
        )
        return 1
    return 0 if code == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedlorm.flower ...``: exactly ``fedlorm flower ...`` (same options, errors, exit codes)."""
    from fedlorm.cli import main as fedlorm_main

    return fedlorm_main(["flower", *(sys.argv[1:] if argv is None else argv)])
