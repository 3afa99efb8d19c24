"""Cost of secure aggregation: bytes and wall time per round, with and without it, in one run.

Run on demand: ``python benchmarks/secure_cost.py [key=value ...]`` (fedlorm config overrides on top
of the tests' tiny MNIST config: 3 clients, 2 tasks, 2 rounds).

Four runs of the same config and seed: in process without and with ``secure.aggregation`` (the
upload counts the summands' tensor payload, resp. the encoded digits as int64), and over an
in-process Flower grid that runs the real ClientApp (with Flower's ``secaggplus_mod``) and counts
every message's serialised size (protobuf, both directions: SecAgg+'s keys, shares and masked
vectors included). It prints per-step means and the secure/plain ratios measured in this run, and
the largest relative error of a merged array against the plain run.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from flwr.app import Context, Message
from flwr.common.serde import recorddict_to_proto
from flwr.supercore.task_identity import TaskIdentity

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import tiny_config

from fedlorm.flower import clientapp
from fedlorm.flower.federation import run_federation
from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.settings import FlowerSettings, run_config_for
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation


class CountingGrid(LocalGrid):
    """SuperNodes 1..n running the real ClientApp here; counts each message's serialised bytes."""

    def __init__(self, run_config: dict, partitions: int) -> None:
        super().__init__(clientapp.app, run_config, range(partitions))
        self.bytes_down = self.bytes_up = 0

    def deliver(self, message: Message, context: Context) -> Message | None:
        self.bytes_down += recorddict_to_proto(message.content).ByteSize()
        reply = super().deliver(message, context)
        if reply is not None and not reply.has_error():
            self.bytes_up += recorddict_to_proto(reply.content).ByteSize()
        return reply


def _in_process(overrides: list[str], secure: bool) -> tuple[dict, dict]:
    cfg = tiny_config("train.threads=1", f"secure.aggregation={str(secure).lower()}", *overrides)
    exp = build_experiment(cfg)
    results = run_simulation(cfg, experiment=exp)
    return results, exp.server.state_dict()


def _flower(overrides: list[str], secure: bool) -> tuple[dict, CountingGrid]:
    cfg = tiny_config("train.threads=1", f"secure.aggregation={str(secure).lower()}", *overrides)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    grid = CountingGrid(
        run_config_for(cfg, FlowerSettings(out="", federated_eval=False)), cfg.scenario.num_clients
    )
    settings = FlowerSettings(out="", min_clients=2, reply_timeout=60.0, federated_eval=False)
    with tempfile.TemporaryDirectory() as out:
        results = run_federation(grid, build_experiment(cfg), settings, Path(out))
    return results, grid


def main() -> None:
    """Measure and print."""
    overrides = sys.argv[1:]
    rows = {}
    for secure in (False, True):
        results, state = _in_process(overrides, secure)
        rows[secure] = (results, state)
    steps = len(rows[False][0]["rounds"])
    print(f"{steps} steps; per step (mean over the run):")
    for label, key in (
        ("upload bytes (all clients, payload)", "upload_bytes"),
        ("step seconds", "step_seconds"),
    ):
        plain = statistics.mean(r[key] for r in rows[False][0]["rounds"])
        secure = statistics.mean(r[key] for r in rows[True][0]["rounds"])
        print(
            f"  in process  {label:36s} plain {plain:11.4g} secure {secure:11.4g} ratio {secure / plain:6.2f}"
        )
    plain_state, secure_state = rows[False][1], rows[True][1]
    worst = max(
        float(
            (plain_state[k].double() - secure_state[k].double()).norm()
            / max(plain_state[k].double().norm(), 1e-300)
        )
        for k in plain_state
        if plain_state[k].is_floating_point() and plain_state[k].ndim >= 1
    )
    same = rows[False][0]["accuracy_matrix"] == rows[True][0]["accuracy_matrix"]
    print(f"  largest relative error of a merged array: {worst:.2e}; accuracy matrix identical: {same}")
    measured = {}
    for secure in (False, True):
        started = time.perf_counter()
        results, grid = _flower(overrides, secure)
        seconds = (time.perf_counter() - started) / steps
        measured[secure] = (grid.bytes_up / steps, grid.bytes_down / steps, seconds)
    for index, label in enumerate(
        ("bytes up (wire, all clients)", "bytes down (wire, all clients)", "wall seconds")
    ):
        plain, secure = measured[False][index], measured[True][index]
        print(
            f"  Flower grid {label:36s} plain {plain:11.4g} secure {secure:11.4g} ratio {secure / plain:6.2f}"
        )


if __name__ == "__main__":
    main()
