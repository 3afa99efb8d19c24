"""Start Flower's processes and submit runs: a SuperLink (simulation or deployment), SuperNodes, ``flwr run``.

Used by ``fedlorm flower ...`` and by the loopback tests. Every process is started in its own process
group and stopped through its pid (its children, e.g. ``flower-superexec`` and app processes, go with
it). Flower's runtime dependency installation, telemetry and update check are switched off unless the
environment says otherwise: with installation on, ``flwr run`` would build a fresh environment and
download torch. A SuperNode's SuperExec polls for messages every 0.2 s instead of Flower's 1 s
(``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``). Imports neither flwr nor torch.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

from fedlorm.flower.settings import Scalar, default_run_config, to_toml

__all__ = [
    "FLOWER_ENV_DEFAULTS",
    "FlowerProcess",
    "flower_env",
    "flwr_run",
    "free_port",
    "start_superlink",
    "start_supernode",
    "toml_string",
    "write_app",
    "write_connection",
]

logger = logging.getLogger(__name__)

FLOWER_ENV_DEFAULTS = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    # How often a SuperNode's SuperExec asks for a new message to run (Flower's default: 1 s; every
    # message waits half of it on average). 0.2 s costs little CPU on loopback.
    "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": "0.2",
}

APP_COMPONENTS = {
    "serverapp": "fedlorm.flower.serverapp:app",
    "clientapp": "fedlorm.flower.clientapp:app",
}


def flower_env(flwr_home: Path | None = None, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for Flower processes: ``base`` (default os.environ), FLWR_HOME, safe defaults."""
    env = dict(os.environ if base is None else base)
    for key, value in FLOWER_ENV_DEFAULTS.items():
        env.setdefault(key, value)
    if flwr_home is not None:
        env["FLWR_HOME"] = str(flwr_home)
    # Flower's processes start each other by name (flower-superexec, flwr-serverapp, ...).
    scripts = str(Path(sys.executable).parent)
    if scripts not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(p for p in (scripts, env.get("PATH", "")) if p)
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _executable(name: str) -> str:
    """A Flower console script, preferring the one beside this Python (the venv's)."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install Flower with `pip install fedlorm[flower]`")
    return found


@dataclass
class FlowerProcess:
    """A Flower process started in its own process group, with its output in ``log``."""

    name: str
    command: list[str]
    log: Path
    process: subprocess.Popen[bytes] = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        """Whether the process has not exited yet."""
        return self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL the process and everything it started, at once (a crash, for fault tests)."""
        family = [self.pid, *_descendants(self.pid)]
        _signal_all(family, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=10)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process, SIGKILL it and everything it started after ``grace`` seconds.

        Flower detaches some children (``flower-superexec`` runs in a session of its own), so they are
        found through the parent links in /proc rather than through the process group.
        """
        family = [self.pid, *_descendants(self.pid)]
        if self.alive():
            _signal_all([self.pid], signal.SIGTERM)
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=grace)
        family += [pid for pid in _descendants(self.pid) if pid not in family]
        _signal_all(family, signal.SIGKILL)
        with suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=grace)

    def tail(self, lines: int = 30) -> str:
        """The last lines of the process's output (for error messages)."""
        if not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def _descendants(pid: int) -> list[int]:
    """Pids of every live descendant of ``pid`` (Linux /proc; empty elsewhere)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces) start at the last ')'.
        fields = stat[stat.rfind(")") + 2 :].split()
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _signal_all(pids: Sequence[int], sig: int) -> None:
    for pid in pids:
        with suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _spawn(name: str, command: list[str], log: Path, env: Mapping[str, str]) -> FlowerProcess:
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as handle:
        process = subprocess.Popen(
            command, stdout=handle, stderr=subprocess.STDOUT, env=dict(env), start_new_session=True
        )
    logger.info("started %s (pid %d): %s", name, process.pid, " ".join(command))
    return FlowerProcess(name=name, command=command, log=log, process=process)


def _wait_healthy(proc: FlowerProcess, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.process.returncode}:\n{proc.tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    proc.stop()
    raise RuntimeError(f"{proc.name} was not ready on port {port} after {timeout:g} s:\n{proc.tail()}")


def start_superlink(
    flwr_home: Path,
    *,
    port: int | None = None,
    simulation: bool = False,
    log: Path | None = None,
    timeout: float = 60.0,
) -> tuple[FlowerProcess, str]:
    """An insecure SuperLink on 127.0.0.1 (Fleet and Control over one port); returns it and its address."""
    port = port or free_port()
    command = [
        _executable("flower-superlink"),
        "--insecure",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
    ]
    if simulation:
        command.append("--simulation")
    proc = _spawn("superlink", command, log or flwr_home / "superlink.log", flower_env(flwr_home))
    _wait_healthy(proc, port, timeout)
    return proc, f"127.0.0.1:{port}"


def start_supernode(
    flwr_home: Path,
    superlink: str,
    partition: int,
    num_partitions: int,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    log: Path | None = None,
) -> FlowerProcess:
    """An insecure SuperNode serving client ``partition`` of ``num_partitions`` (loopback runs).

    With ``data_dir`` (its ``client-K`` folder from ``fedlorm partition``), the node reads only that
    folder (node config ``data-dir``).
    """
    node_config = f"partition-id={partition} num-partitions={num_partitions}"
    if data_dir is not None:
        node_config += f" data-dir={toml_string(str(Path(data_dir).resolve()))}"
    command = [
        _executable("flower-supernode"),
        "--insecure",
        "--superlink",
        superlink,
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
        "--node-config",
        node_config,
    ]
    home = flwr_home / f"supernode-{partition}"
    return _spawn(
        f"supernode {partition}", command, log or flwr_home / f"supernode-{partition}.log", flower_env(home)
    )


def toml_string(value: str) -> str:
    """``value`` as a TOML string that Flower's ``--node-config`` parser keeps whole (spaces included).

    ValueError for a value it cannot carry: ' together with " or a backslash, or a newline.
    """
    if "'" not in value and "\n" not in value:
        return f"'{value}'"  # a literal string: no escapes
    if '"' not in value and "\\" not in value and "\n" not in value:
        return f'"{value}"'
    raise ValueError(
        f"{value!r} cannot be passed in a Flower node config (it holds ' together with \" or \\, "
        "or a newline)"
    )


def write_connection(
    flwr_home: Path, name: str, address: str, *, root_certificates: Path | None = None
) -> Path:
    """Add SuperLink connection ``name`` to ``$FLWR_HOME/config.toml`` (insecure unless a CA is given)."""
    path = flwr_home / "config.toml"
    flwr_home.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    if "[superlink]" not in text:
        text = f'[superlink]\ndefault = "{name}"\n' + text
    entry = f'\n[superlink.{name}]\naddress = "{address}"\n'
    if root_certificates is None:
        entry += "insecure = true\n"
    else:
        entry += f"root-certificates = {json.dumps(str(root_certificates))}\n"
    path.write_text(text + entry)
    return path


def write_app(directory: Path) -> Path:
    """A minimal Flower app (pyproject.toml only) whose components are the installed fedlorm apps."""
    from fedlorm import __version__

    directory.mkdir(parents=True, exist_ok=True)
    components = "".join(f'{key} = "{value}"\n' for key, value in APP_COMPONENTS.items())
    text = (
        "[project]\n"
        'name = "fedlorm-flower"\n'
        f'version = "{__version__}"\n'
        'description = "fedlorm on Flower (generated by fedlorm flower)"\n'
        'license = "Apache-2.0"\n\n'
        "[tool.flwr.app]\n"
        'publisher = "fedlorm"\n\n'
        "[tool.flwr.app.components]\n"
        f"{components}\n"
        "[tool.flwr.app.config]\n"
        f"{to_toml(default_run_config())}"
    )
    path = directory / "pyproject.toml"
    path.write_text(text)
    return directory


def flwr_run(
    app: Path,
    connection: str,
    run_config: Mapping[str, Scalar],
    *,
    flwr_home: Path,
    federation_config: Sequence[str] = (),
    log: Path | None = None,
    timeout: float | None = None,
) -> int:
    """``flwr run APP CONNECTION --run-config FILE --stream``; returns its exit code.

    The run config goes in a temporary TOML file; ``log`` (default: the terminal) gets the streamed
    logs of the ServerApp.
    """
    with tempfile.TemporaryDirectory(prefix="fedlorm-run-config-") as work:
        config_file = Path(work) / "run-config.toml"
        config_file.write_text(to_toml(run_config))
        command = [
            _executable("flwr"),
            "run",
            str(app),
            connection,
            "--run-config",
            str(config_file),
            "--stream",
        ]
        for item in federation_config:
            command += ["--federation-config", item]
        env = flower_env(flwr_home)
        logger.info("running: %s", " ".join(command))
        if log is None:
            return subprocess.run(command, env=env, timeout=timeout, check=False).returncode
        with log.open("ab") as handle:
            return subprocess.run(
                command, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False
            ).returncode
