"""Flower deployment on loopback: one SuperLink and three SuperNode processes, ``flwr run`` of this repo.

Each test starts its own processes on free ports with its own FLWR_HOME (insecure, loopback only,
runtime dependency installation off) and stops them by pid in teardown. In deployment every message
runs in a fresh ClientApp process, so the run is kept small: smoke preset, 3 clients, 1 round a task,
no federated evaluation. One test gives every SuperNode only its own partition folder and the server
only its server/ folder, with no dataset readable by any process.
"""

from __future__ import annotations

import csv
import json
import shutil
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

pytest.importorskip("flwr")

from conftest import tiny_config
from reference_runs import ReferenceRun, assert_equals_reference
from safetensors.torch import load_file

from fedlorm.config import apply_overrides
from fedlorm.flower.delivery import NEW_TO_NODE
from fedlorm.flower.federation import SERVER_STATE
from fedlorm.flower.launch import (
    FlowerProcess,
    flwr_run,
    start_superlink,
    start_supernode,
    write_connection,
)
from fedlorm.flower.settings import FlowerSettings, run_config_for
from fedlorm.presets import preset_config
from fedlorm.runtime.partitions import write_partitions

# One xdist worker runs them one after another: each starts four processes of its own, and two such
# deployments side by side on a small machine slow each other past their reply timeouts.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("deployment")]

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = 3
OVERRIDES = ["train.threads=1", f"scenario.num_clients={CLIENTS}", "train.rounds=1"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Configs here pin train.threads=1, which build_experiment applies process-wide; undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@contextmanager
def _loopback_processes(
    home: Path, data_dirs: Sequence[Path | None] = (None,) * CLIENTS
) -> Iterator[tuple[FlowerProcess, list[FlowerProcess]]]:
    """A SuperLink and SuperNode k (with ``data_dirs[k]`` as its data-dir) on 127.0.0.1, connection
    "loopback" in ``home``, as (SuperLink, SuperNodes); every process stopped by pid afterwards."""
    processes = []
    try:
        link, address = start_superlink(home)
        processes.append(link)
        nodes = [
            start_supernode(home, address, k, CLIENTS, data_dir=folder) for k, folder in enumerate(data_dirs)
        ]
        processes += nodes
        write_connection(home, "loopback", address)
        yield link, nodes
    finally:
        for process in processes:
            process.stop()
        assert not any(p.alive() for p in processes)


@pytest.fixture
def loopback(tmp_path):
    """A SuperLink and one SuperNode per client on 127.0.0.1; every process stopped by pid afterwards."""
    home = tmp_path / "flwr-home"
    with _loopback_processes(home) as (_, nodes):
        yield home, nodes


def _run(home: Path, out: Path, log: Path, reply_timeout: float, resume: bool = False) -> int:
    cfg = apply_overrides(preset_config("smoke"), OVERRIDES)
    settings = FlowerSettings(
        preset="smoke", out=str(out), reply_timeout=reply_timeout, federated_eval=False, resume=resume
    )
    return flwr_run(ROOT, "loopback", run_config_for(cfg, settings), flwr_home=home, log=log, timeout=500)


def test_a_supernode_killed_mid_run_is_dropped_and_the_run_completes(loopback, tmp_path):
    home, nodes = loopback
    out, log = tmp_path / "out", tmp_path / "run.log"
    victim = nodes[2]
    codes: list[int] = []
    runner = threading.Thread(target=lambda: codes.append(_run(home, out, log, reply_timeout=90.0)))
    started = time.perf_counter()
    runner.start()
    deadline = time.monotonic() + 300
    while _completed_steps(out / "metrics.csv") < 1:
        assert runner.is_alive() and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    victim.kill()
    assert not victim.alive()
    runner.join(timeout=500)
    print(f"deployed run with a SuperNode killed: {time.perf_counter() - started:.1f} s")
    assert codes == [0], log.read_text()[-3000:]

    results = json.loads((out / "results.json").read_text())
    assert results["tasks_completed"] == 2, log.read_text()[-3000:]
    steps = results["flower"]["steps"]
    assert steps[0]["merged"] == [0, 1, 2]
    lost = [i for i, step in enumerate(steps) if step["dropped"]]
    # From the step after the kill (or the one after, if client 2 had already answered it) to the end,
    # client 2 is dropped and the other two are merged.
    assert lost == list(range(lost[0], 4)) and lost[0] in (1, 2)
    for i in lost:
        assert steps[i]["merged"] == [0, 1] and not steps[i]["state_kept"]
        assert [d["partition"] for d in steps[i]["dropped"]] == [2] and steps[i]["dropped"][0]["reason"]
    assert {d["partition"] for d in results["flower"]["dropped"]} == {2}
    assert [r["rejected"] for r in results["rounds"]] == [0 if i not in lost else 1 for i in range(4)]
    assert "client 2" in log.read_text() and "dropped" in log.read_text()
    assert all(0.0 <= v <= 100.0 for row in results["accuracy_matrix"] for v in row)


def test_a_deployed_run_sigkilled_at_the_superlink_resumes_and_equals_the_in_process_run(
    tmp_path, reference_run
):
    """The SuperLink (with its ServerApp) is SIGKILLed once the run's first task is checkpointed; a
    fresh SuperLink and SuperNodes, given ``resume``, finish the run with the uninterrupted numbers."""
    out = tmp_path / "out"
    with _loopback_processes(tmp_path / "flwr-home") as (link, _):
        runner = threading.Thread(
            target=lambda: _run(tmp_path / "flwr-home", out, tmp_path / "run.log", 300.0)
        )
        runner.start()
        deadline = time.monotonic() + 400
        while _checkpointed_step(out) != "task0.stats":
            assert runner.is_alive() and time.monotonic() < deadline, (tmp_path / "run.log").read_text()[
                -3000:
            ]
            time.sleep(0.1)
        link.kill()
        runner.join(timeout=120)
    assert not runner.is_alive()
    # Killed mid-run: the checkpoint is there and results.json holds task 1 only.
    assert _checkpointed_step(out) in ("task0.stats", "task1.round0")
    assert json.loads((out / "results.json").read_text())["tasks_completed"] == 1

    with _loopback_processes(tmp_path / "flwr-home-2"):
        code = _run(tmp_path / "flwr-home-2", out, tmp_path / "resumed.log", 300.0, resume=True)
    assert code == 0, (tmp_path / "resumed.log").read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks_completed"] == 2 and not (out / "checkpoint.json").exists()
    assert [s["merged"] for s in results["flower"]["steps"]] == [[0, 1, 2]] * 4
    assert results["flower"]["dropped"] == []
    # The fresh SuperNodes held nothing: at the first resumed step each got the whole broadcast
    # (beyond its client's delta where that was smaller), and never anything extra again.
    resent = results["flower"]["resent"]
    assert len({(r["task"], r["round"], r["phase"]) for r in resent}) <= 1
    assert all(r["reason"] == NEW_TO_NODE and r["bytes"] > 0 for r in resent)
    reference = reference_run(apply_overrides(preset_config("smoke"), OVERRIDES))
    _assert_equals_in_process(results, out, reference)


def test_a_deployed_secure_two_task_run_completes_and_equals_the_in_process_secure_run(
    loopback, tmp_path, reference_run
):
    """secure.aggregation on real SuperNodes: every step is a SecAgg+ sum (several message rounds per
    step, the mod's keys kept in each node's context between them) and the run's numbers are the
    in-process secure run's. (Plain deployed runs are compared with in-process ones by the resume and
    the own-folders tests.)"""
    home, _ = loopback
    out, log = tmp_path / "out", tmp_path / "run.log"
    cfg = apply_overrides(preset_config("smoke"), [*OVERRIDES, "secure.aggregation=true"])
    settings = FlowerSettings(preset="smoke", out=str(out), reply_timeout=300.0, federated_eval=False)
    started = time.perf_counter()
    code = flwr_run(ROOT, "loopback", run_config_for(cfg, settings), flwr_home=home, log=log, timeout=1800)
    print(f"deployed secure run (3 SuperNodes, loopback): {time.perf_counter() - started:.1f} s")
    assert code == 0, log.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks_completed"] == 2, log.read_text()[-3000:]
    assert all(s["secure"] and s["merged"] == [0, 1, 2] for s in results["flower"]["steps"])
    assert len(results["flower"]["steps"]) == 4 and results["flower"]["dropped"] == []
    assert results["flower"]["resent"] == []  # the nodes kept their arrays between secure steps
    _assert_equals_in_process(results, out, reference_run(cfg))


def _checkpointed_step(out: Path) -> str | None:
    """The last step the run in ``out`` checkpointed, or None."""
    try:
        return json.loads((out / "checkpoint.json").read_text())["completed_step"]
    except (OSError, ValueError, KeyError):
        return None


def test_deployed_nodes_reading_only_their_own_folders_equal_the_in_process_run(tmp_path, reference_run):
    """Tiny config, 2 tasks: SuperNode k holds only a copy of client-k/, the server only a copy of
    server/, and data.root names no folder, so no process could load a dataset."""
    cfg = tiny_config("train.threads=1", "train.rounds=1")
    parts = tmp_path / "parts"
    write_partitions(cfg, parts)
    own = {}
    for who in [*(f"client-{k}" for k in range(CLIENTS)), "server"]:
        own[who] = tmp_path / f"{who}-host" / who
        shutil.copytree(parts / who, own[who])
    shutil.rmtree(parts)  # only the per-node copies are left
    home, out, log = tmp_path / "flwr-home", tmp_path / "out", tmp_path / "run.log"
    blind = apply_overrides(cfg, [f"data.root={tmp_path / 'no-datasets-here'}", "data.download=false"])
    settings = FlowerSettings(
        out=str(out), reply_timeout=300.0, federated_eval=False, server_data=str(own["server"])
    )
    run_config = run_config_for(blind, settings)
    started = time.perf_counter()
    with _loopback_processes(home, [own[f"client-{k}"] for k in range(CLIENTS)]) as (_, nodes):
        code = flwr_run(ROOT, "loopback", run_config, flwr_home=home, log=log, timeout=500)
        node_logs = "\n".join(node.tail(200) for node in nodes)
    print(f"deployed with per-node folders (3 SuperNodes, loopback): {time.perf_counter() - started:.1f} s")
    assert code == 0, log.read_text()[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["tasks_completed"] == 2, log.read_text()[-3000:]
    assert results["flower"]["dropped"] == [], node_logs[-3000:]
    assert results["flower"]["ignored_nodes"] == {}
    assert [s["merged"] for s in results["flower"]["steps"]] == [[0, 1, 2]] * 4
    assert results["flower"]["resent"] == []  # each node kept its arrays in Flower's node state

    _assert_equals_in_process(results, out, reference_run(cfg))


def _assert_equals_in_process(results: dict, out: Path, reference: ReferenceRun) -> None:
    """The deployed run (two tasks) equals the in-process run of its config: accuracies, metrics rows
    and the merged server state it saved in ``out``."""
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert_equals_reference(results, load_file(str(out / SERVER_STATE)), reference)


def _completed_steps(path: Path) -> int:
    if not path.exists():
        return 0
    with path.open() as handle:
        return len(list(csv.DictReader(handle)))
