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
from pathlib import Path
from typing import Any

from fedlorm.cli_help import add_command
from fedlorm.config import ConfigError, RunConfig
from fedlorm.flower.settings import (
    RUNTIME_DEFAULTS,
    FlowerSettings,
    default_run_config,
    run_config_for,
    to_toml,
)
from fedlorm.logs import add_logging_arguments
from fedlorm.run_setup import add_run_arguments, setup_from_args

__all__ = ["add_parser", "run"]

logger = logging.getLogger(__name__)

def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``flower`` command, with its subcommands, to the ``fedlorm`` command.

    Args:
        subparsers: What ``ArgumentParser.add_subparsers`` returned for the ``fedlorm`` command.

    Returns:
        The ``flower`` command's parser.
    """
    flower = add_command(
        subparsers,
        "flower",
        summary="Run an experiment on Flower, in simulation or deployed.",
        description="""
            Run the same experiment as fedlorm run over Flower: the server's steps in a
            ServerApp, each client's work in a ClientApp on its own SuperNode. For the same config
            and seed it gives the numbers of the in-process run, and writes the same files to
            --out, plus server_state.safetensors and the Flower processes' logs.

            Choose a subcommand: simulate (virtual SuperNodes in one machine), deploy-local (real
            SuperLink and SuperNode processes on 127.0.0.1), submit (a SuperLink you run) or
            app-config. Each has its own help: fedlorm flower SUBCOMMAND --help.
            """,
        examples=[
            "fedlorm flower simulate --preset smoke --out runs/flower-smoke",
            "fedlorm flower deploy-local --resume runs/deployed",
        ],
    )
    commands = flower.add_subparsers(dest="flower_command", parser_class=type(flower), metavar="SUBCOMMAND")
    simulate = add_command(
        commands,
        "simulate",
        summary="Run in a Flower simulation, one virtual SuperNode per client.",
        description="""
            Start a private simulation SuperLink, run the experiment on virtual SuperNodes (Ray)
            with flwr run, and stop everything when the run ends. With --partitions, each node
            reads only its own folder written by fedlorm partition, and the server only the
            server folder.
            """,
        examples=[
            "fedlorm flower simulate --preset smoke --out runs/flower-smoke",
            "fedlorm flower simulate --preset smoke --partitions parts/smoke --out runs/flower-parts",
        ],
    )
    _common_arguments(simulate)
    _partitions_argument(simulate)
    simulate.add_argument(
        "--supernodes", type=int, help="Virtual SuperNodes to start (default: scenario.num_clients)."
    )
    simulate.add_argument(
        "--federation-config",
        action="append",
        default=[],
        metavar="K=V",
        help="An extra simulation setting, e.g. client-resources-num-gpus=0.25; repeat it for more.",
    )
    local = add_command(
        commands,
        "deploy-local",
        summary="Run on a SuperLink and SuperNode processes started on 127.0.0.1.",
        description="""
            Start a SuperLink and one SuperNode process per client on this machine (insecure,
            loopback only), run the experiment with flwr run, and stop every process when it
            ends. After a crash, the same command with --resume continues from the last completed
            step.
            """,
        examples=[
            "fedlorm flower deploy-local --preset smoke --out runs/deployed",
            "fedlorm flower deploy-local --resume runs/deployed",
        ],
    )
    _common_arguments(local)
    _partitions_argument(local)
    local.add_argument(
        "--supernodes", type=int, help="SuperNode processes to start (default: scenario.num_clients)."
    )
    submit = add_command(
        commands,
        "submit",
        summary="Run on a SuperLink you deployed, named in $FLWR_HOME/config.toml.",
        description="""
            Submit the experiment with flwr run to a running SuperLink, whose connection is
            named in $FLWR_HOME/config.toml. The SuperNodes must already run, each with its
            partition-id and num-partitions in its node config. docs/deployment.md shows a whole
            deployment.
            """,
        examples=[
            "fedlorm flower submit --superlink my-link --preset smoke --out /srv/runs/smoke",
            "fedlorm flower submit --superlink my-link --server-data /srv/parts/server --preset smoke",
        ],
    )
    _common_arguments(submit)
    submit.add_argument(
        "--superlink", required=True, help="The connection's name in $FLWR_HOME/config.toml."
    )
    submit.add_argument(
        "--server-data",
        metavar="PATH",
        help="The server/ folder written by fedlorm partition, as an absolute path on the SuperLink "
        "host (not checked here); the ServerApp evaluates on it and loads no dataset.",
    )
    app_config = add_command(
        commands,
        "app-config",
        summary="Print the run-config table a Flower app's pyproject.toml declares.",
        description="""
            Print the [tool.flwr.app.config] table that declares every run-config key fedlorm's
            Flower app reads: the runtime keys with their defaults, then every config key, whose
            empty value keeps the preset's.
            """,
        examples=["fedlorm flower app-config >> pyproject.toml"],
    )
    add_logging_arguments(app_config)
    return flower


def _common_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(
        parser,
        default_out="runs/flower-PRESET-METHOD-sSEED",
        resume_help="Continue the run checkpointed in DIR after its ServerApp or SuperLink died, with "
        "the config stored in the checkpoint.",
    )
    parser.add_argument(
        "--min-clients",
        type=int,
        default=RUNTIME_DEFAULTS["min-clients"],
        help="Merge a step only if at least this many clients replied validly (default: %(default)s).",
    )
    parser.add_argument(
        "--reply-timeout",
        type=float,
        default=RUNTIME_DEFAULTS["reply-timeout"],
        help="Seconds to wait for a step's replies; later ones are dropped (default: %(default)s).",
    )
    parser.add_argument(
        "--node-wait",
        type=float,
        default=RUNTIME_DEFAULTS["node-wait"],
        help="Seconds to wait at the start for one SuperNode per client (default: %(default)s).",
    )
    parser.add_argument(
        "--no-federated-eval", action="store_true", help="Skip the clients' evaluation on their own data."
    )
    add_logging_arguments(parser)
    parser.add_argument(
        "overrides", nargs="*", metavar="key=value", help="Config overrides, e.g. train.rounds=5."
    )


def _partitions_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--partitions",
        type=Path,
        metavar="DIR",
        help="Folders written by fedlorm partition for this run: SuperNode K reads only DIR/client-K "
        "and the server only DIR/server, so no process loads a dataset.",
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
    setup = setup_from_args(args, prefix="flower-")
    cfg = setup.cfg
    settings = FlowerSettings(
        preset=args.preset or "default",
        resume=setup.resume,
        overwrite=setup.overwrite,
        min_clients=args.min_clients,
        reply_timeout=args.reply_timeout,
        node_wait=args.node_wait,
        federated_eval=not args.no_federated_eval,
    )
    clients = setup.effective.scenario.num_clients  # joint turns the scenario into one client
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
    # Created here, and with --overwrite cleared here, so the results reported below are this run's.
    out = setup.prepare().expanduser().resolve()
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
