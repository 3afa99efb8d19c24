"""The Flower runtime: run-config mapping, records, fault handling and equivalence with the simulator.

Fault tests drive the real ClientApp in this process through a loopback ``Grid`` that can corrupt,
fail or withhold a reply, and compare the merged state with the protocol run over the surviving
clients only. The equivalence test runs a real Flower simulation (``fedlorm flower simulate``: a
private SuperLink, Ray, virtual SuperNodes) and compares it with the in-process simulator.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, tiny_config
from reference_runs import assert_equals_reference

pytest.importorskip("flwr")

from flwr.app import Array, Error, Message, MessageType
from flwr.supercore.task_identity import TaskIdentity
from safetensors.torch import load_file

from fedlorm.config import ConfigError, apply_overrides, config_to_dict, flat_keys
from fedlorm.export import load_model
from fedlorm.flower import client, clientapp, launch, serverapp
from fedlorm.flower.delivery import FlowerDelivery
from fedlorm.flower.federation import SERVER_STATE, run_federation
from fedlorm.flower.launch import APP_COMPONENTS
from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.messages import ARRAYS, CONFIG, SUMMANDS, from_array_record, to_array_record
from fedlorm.flower.settings import (
    FlowerSettings,
    default_run_config,
    run_config_for,
    settings_from_run_config,
)
from fedlorm.flower.strategy import FedlormStrategy
from fedlorm.methods import Instruction, add_arrays, payload_bytes
from fedlorm.methods.ewc import ANCHOR, FISHER
from fedlorm.presets import preset_config
from fedlorm.runtime.checkpoint import CheckpointError
from fedlorm.runtime.delivery import Broadcast
from fedlorm.runtime.engine import step_clients, step_plan
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.partitions import write_partitions
from fedlorm.runtime.report import untimed
from fedlorm.seeding import torch_generator

ROOT = Path(__file__).resolve().parents[1]
NODE0 = 101


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Configs here pin train.threads=1, which build_experiment applies process-wide; undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module", autouse=True)
def _drop_client_experiments():
    """The in-process ClientApp caches its experiment; free it when this module is done."""
    yield
    client._CACHE.clear()


@pytest.fixture(autouse=True)
def _keep_fedlorm_logging():
    """The ClientApp routes fedlorm's logger to Flower's handlers (fedlorm.flower.logs); undo it here."""
    logger = logging.getLogger("fedlorm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.fixture(autouse=True)
def _message_identity():
    """Messages built outside a Flower process need a run/node/task identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LoopbackGrid(LocalGrid):
    """SuperNodes NODE0.. serving ``partitions``; replies come from the real ClientApp in process.

    ``fault(step, partition, request, reply)`` may return a changed train or evaluate reply, or None
    to withhold it (a reply that did not come back within the timeout); ``step`` counts the calls
    that carried train messages. A ClientApp exception propagates (the tests' crashes).
    """

    def __init__(self, run_config, partitions, fault=None, num_partitions=None):
        super().__init__(clientapp.app, run_config, partitions, num_partitions, first_node=NODE0)
        self.fault = fault
        self.step = 0

    def send_and_receive(self, messages, *, timeout=None):
        messages = list(messages)
        self.step += any(m.metadata.message_type == MessageType.TRAIN for m in messages)
        return super().send_and_receive(messages, timeout=timeout)

    def deliver(self, message, context):
        reply = self.app(message, context)
        if self.fault is not None and message.metadata.message_type != MessageType.QUERY:
            reply = self.fault(self.step, context.node_config["partition-id"], message, reply)
        return reply


# -- run config ------------------------------------------------------------------------------------
def test_pyproject_declares_the_apps_and_mirrors_every_config_key():
    flwr = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]
    assert flwr["app"]["components"] == APP_COMPONENTS
    declared = flat_keys(flwr["app"]["config"])
    assert declared == default_run_config(), "regenerate [tool.flwr.app.config] from default_run_config()"
    # flwr 1.42 rewrites pyproject.toml (comments the table out) when it finds one.
    assert "federations" not in flwr


def test_run_config_carries_any_config_exactly():
    cfg = apply_overrides(
        preset_config("smoke"),
        [
            "scenario.tasks=[3,4,3]",
            "data.datasets=mnist,fashion_mnist",
            "train.lr_a=0.001",
            "train.lr_b=none",
            "train.threads=1",
            "model.targets=none",
            "lorm.alpha_head=0.25",
            "seed=7",
        ],
    )
    settings = FlowerSettings(
        preset="smoke", out="/x", min_clients=2, reply_timeout=5.0, federated_eval=False
    )
    run_config = run_config_for(cfg, settings)
    assert all(isinstance(v, bool | int | float | str) for v in run_config.values())
    back, back_settings = settings_from_run_config(run_config)
    assert config_to_dict(back) == config_to_dict(cfg)
    assert back_settings == settings


def test_unset_keys_keep_the_preset_and_bad_values_fail():
    cfg, settings = settings_from_run_config(
        {**default_run_config(), "preset": "smoke", "train.rounds": 1, "data.datasets": "mnist"}
    )
    expected = apply_overrides(preset_config("smoke"), ["train.rounds=1"])
    assert config_to_dict(cfg) == config_to_dict(expected)
    assert settings.min_clients == 1 and settings.federated_eval is True
    with pytest.raises(ConfigError, match="neither fedlorm config keys"):
        settings_from_run_config({"train.round": 3})
    with pytest.raises(ConfigError, match=r"min-clients = 5 .* \(4\)"):
        settings_from_run_config({"preset": "smoke", "min-clients": 5})
    with pytest.raises(ConfigError, match="reply-timeout"):
        settings_from_run_config({"reply-timeout": 0})
    with pytest.raises(ConfigError, match=r"train\.rounds"):
        settings_from_run_config({"train.rounds": "many"})


def test_arrays_cross_bit_for_bit():
    arrays = {
        "w": torch.randn(3, 5, generator=torch.Generator().manual_seed(0)),
        "g": torch.randn(7, dtype=torch.float64, generator=torch.Generator().manual_seed(1)),
        "n": torch.tensor(12.0, dtype=torch.float64),
        "t": torch.randn(4, 6)[:, ::2],  # not contiguous
    }
    back = from_array_record(to_array_record(arrays))
    assert back.keys() == arrays.keys()
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value)


def test_core_imports_no_flower():
    code = (
        "import sys, fedlorm.cli, fedlorm.runtime.simulator, fedlorm.flower, fedlorm.flower.cli; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flwr', 'ray')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_the_wrapper_rejects_bad_input_before_starting_flower(tmp_path):
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home")}
    command = [sys.executable, "-m", "fedlorm.flower"]
    bad = subprocess.run(
        [*command, "simulate", "--preset", "smoke", "--min-clients", "9", "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip() == "fedlorm: error: --min-clients 9 is not in 1..4 (the run's clients)"
    assert not (tmp_path / "o").exists() and not (tmp_path / "flwr-home").exists()
    (tmp_path / "empty").mkdir()
    empty = str(tmp_path / "empty")
    for args, message in [
        (["deploy-local", "--resume", empty], f"{empty!r} holds no checkpoint.json: nothing to resume"),
        (["simulate", "--resume", empty, "--seed", "1"], "--resume takes the run's config and directory"),
        (["deploy-local", "--resume", str(tmp_path / "absent")], "is not a directory"),
    ]:
        bad = subprocess.run([*command, *args], env=env, capture_output=True, text=True)
        assert bad.returncode == 2 and message in bad.stderr, bad.stderr
        assert bad.stderr.count("\n") == 1 and bad.stderr.startswith("fedlorm: error: ")
    assert list((tmp_path / "empty").iterdir()) == [] and not (tmp_path / "flwr-home").exists()
    table = subprocess.run([*command, "app-config"], env=env, capture_output=True, text=True, check=True)
    declared = tomllib.loads(table.stdout)["tool"]["flwr"]["app"]["config"]
    assert flat_keys(declared) == default_run_config()


# -- faults ----------------------------------------------------------------------------------------
FAULT_CFG = ("train.threads=1", "scenario.num_clients=4", "train.rounds=1")


@pytest.fixture(scope="module")
def fault_setup():
    """Config, run config and the first step's surviving-client reference pieces."""
    cfg = tiny_config(*FAULT_CFG)
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    return cfg, run_config


def _first_step(cfg):
    """A fresh server at the first step of task 0, with its instruction and broadcast."""
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    instruction = next(iter(exp.server.instructions(0, classes)))
    return exp, instruction, exp.server.arrays(instruction)


def _protocol_state(cfg, partitions):
    """The server state after the first step merged exactly the given clients' summands (no Flower)."""
    exp, instruction, arrays = _first_step(cfg)
    client_exp = build_experiment(cfg)  # every client's data (a node's cached experiment holds one)
    sums, examples = None, 0
    for k in partitions:
        reply = client.local_update(client_exp, k, instruction, arrays)
        sums = add_arrays(sums, reply.summands)
        examples += reply.num_examples
    exp.server.aggregate(instruction, sums, examples)
    return exp.server.state_dict()


def _send_step(strategy, grid, instruction, arrays, clients):
    """One plain step over ``grid`` (every node is sent the whole broadcast); its report."""
    report = strategy.begin_step(instruction, clients, grid)
    deltas, report.download_bytes, _ = FlowerDelivery().plan(report.nodes, Broadcast(arrays))
    replies = grid.send_and_receive(strategy.configure_train(instruction, deltas, 1), timeout=30.0)
    return strategy.aggregate_train(report, instruction, replies)


def _flower_step(cfg, run_config, fault, min_clients=1):
    exp, instruction, arrays = _first_step(cfg)
    before = {k: v.clone() for k, v in exp.server.state_dict().items()}
    grid = LoopbackGrid(run_config, range(cfg.scenario.num_clients), fault)
    strategy = FedlormStrategy(exp.server, cfg.scenario.num_clients, min_clients, reply_timeout=30.0)
    assert strategy.discover(grid) == list(range(cfg.scenario.num_clients))
    report = _send_step(strategy, grid, instruction, arrays, range(cfg.scenario.num_clients))
    return exp.server.state_dict(), before, report


def _with_summand(reply, key_index, make):
    record = reply.content.array_records[SUMMANDS]
    key = sorted(record)[key_index]
    record[key] = Array(make(record[key].numpy()))
    return reply


FAULTS = {
    "nan": (lambda req, rep: _with_summand(rep, 0, lambda a: np.full_like(a, np.nan)), "NaN"),
    "shape": (lambda req, rep: _with_summand(rep, 1, lambda a: np.zeros((*a.shape, 2), a.dtype)), "shape"),
    "error": (
        lambda req, rep: Message(Error(code=0, reason="client crashed"), reply_to=req),
        "client crashed",
    ),
    "late": (lambda req, rep: None, "no reply within the 30 s"),
}


@pytest.mark.parametrize("kind", sorted(FAULTS))
def test_a_faulty_reply_is_dropped_and_the_survivors_merge_exactly(fault_setup, kind):
    cfg, run_config = fault_setup
    bad = 2
    corrupt, reason = FAULTS[kind]

    def fault(step, partition, request, reply):
        return corrupt(request, reply) if partition == bad else reply

    state, before, report = _flower_step(cfg, run_config, fault)
    assert [(d.partition, d.node_id) for d in report.dropped] == [(bad, NODE0 + bad)]
    assert reason in report.dropped[0].reason
    assert report.merged == [0, 1, 3] and report.kept == ""
    survivors = _protocol_state(cfg, [0, 1, 3])
    everyone = _protocol_state(cfg, [0, 1, 2, 3])
    assert state.keys() == survivors.keys()
    for key in state:
        assert torch.equal(state[key], survivors[key]), key
    changed = [k for k in state if not torch.equal(state[k], before[k])]
    assert changed, "the merge changed nothing"
    assert any(not torch.equal(state[k], everyone[k]) for k in changed), "the faulty client was merged"


def test_a_stale_or_duplicate_reply_is_dropped(fault_setup):
    cfg, run_config = fault_setup

    def fault(step, partition, request, reply):
        if partition == 1:
            reply.content.config_records["client"]["round"] = 3
        return reply

    state, _, report = _flower_step(cfg, run_config, fault)
    assert [d.partition for d in report.dropped] == [1]
    assert "answers step" in report.dropped[0].reason
    survivors = _protocol_state(cfg, [0, 2, 3])
    assert all(torch.equal(state[k], survivors[k]) for k in state)

    exp, instruction, arrays = _first_step(cfg)
    grid = LoopbackGrid(run_config, [0, 1, 1, 3, 4], num_partitions=4)
    grid.contexts[NODE0 + 4].node_config["num-partitions"] = 5
    strategy = FedlormStrategy(exp.server, 4, 1, reply_timeout=30.0)
    assert strategy.discover(grid) == [0, 1, 3]
    assert "already served by node 102" in strategy.ignored[NODE0 + 2]
    assert "partition 4 of 5, but the run has 4 clients" in strategy.ignored[NODE0 + 4]
    report = strategy.begin_step(instruction, range(4), grid)
    assert sorted(report.nodes) == [NODE0, NODE0 + 1, NODE0 + 3]
    deltas, report.download_bytes, _ = FlowerDelivery().plan(report.nodes, Broadcast(arrays))
    messages = strategy.configure_train(instruction, deltas, 1)
    assert sorted(m.metadata.dst_node_id for m in messages) == [NODE0, NODE0 + 1, NODE0 + 3]
    assert report.download_bytes == 3 * payload_bytes(arrays) > 0  # the whole broadcast to three nodes
    report = strategy.aggregate_train(report, instruction, grid.send_and_receive(messages))
    assert [(d.partition, d.node_id, d.reason) for d in report.dropped] == [(2, -1, "no SuperNode serves it")]
    assert report.merged == [0, 1, 3]


def test_too_few_valid_replies_keep_the_previous_state(fault_setup):
    cfg, run_config = fault_setup

    def fault(step, partition, request, reply):
        return None if partition in (0, 3) else reply

    state, before, report = _flower_step(cfg, run_config, fault, min_clients=3)
    assert report.kept == report.tally.kept == "too-few" and report.merged == []
    assert sorted(d.partition for d in report.dropped) == [0, 3]
    assert state.keys() == before.keys()
    assert all(torch.equal(state[k], before[k]) for k in state)


def test_a_run_with_a_vanished_client_completes_and_reports_it(fault_setup, tmp_path):
    cfg, run_config = fault_setup

    def fault(step, partition, request, reply):
        return None if partition == 3 and step >= 2 else reply

    exp = build_experiment(cfg)
    settings = FlowerSettings(out=str(tmp_path), min_clients=2, reply_timeout=30.0, federated_eval=True)
    results = run_federation(LoopbackGrid(run_config, range(4), fault), exp, settings, tmp_path)
    assert results["tasks_completed"] == 2
    dropped = results["flower"]["dropped"]
    # Step 1 merged everyone; steps 2-4 (task 0 statistics, task 1 B-round and statistics) lost client 3.
    assert [(d["task"], d["phase"], d["partition"]) for d in dropped] == [
        (0, "task_stats", 3),
        (1, "train", 3),
        (1, "task_stats", 3),
    ]
    assert all(d["node_id"] == NODE0 + 3 and "no reply within" in d["reason"] for d in dropped)
    assert [s["merged"] for s in results["flower"]["steps"]] == [
        [0, 1, 2, 3],
        [0, 1, 2],
        [0, 1, 2],
        [0, 1, 2],
    ]
    assert [r["rejected"] for r in results["rounds"]] == [0, 1, 1, 1]
    # The vanished client answered no evaluation either; the others did.
    assert [e["partitions"] for e in results["flower"]["federated_evaluation"]] == [[0, 1, 2], [0, 1, 2]]
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["accuracy_matrix"] == results["accuracy_matrix"]
    assert load_file(str(tmp_path / SERVER_STATE)).keys() == exp.server.state_dict().keys()
    # The deployed model, written by the same code as the in-process runtime's.
    saved = load_model(tmp_path / "model")
    assert saved.class_names == exp.class_names
    images = exp.test.images[:4]
    with torch.no_grad():
        torch.testing.assert_close(saved.model(images), exp.model(images), rtol=0, atol=1e-5)


class _ServerCrashError(Exception):
    """Stands for the ServerApp's process dying (an in-process grid cannot SIGKILL the test)."""


@pytest.mark.slow
def test_a_flower_run_that_died_resumes_from_its_checkpoint_and_equals_an_uninterrupted_one(
    fault_setup, tmp_path
):
    """Client 3 vanishes after the first step; the server dies while task 1's round is out. Resumed
    over a fresh grid (a new ServerApp, the same SuperNodes), the run gives the uninterrupted run's
    numbers, files, drop records and merged state."""
    cfg, run_config = fault_setup
    crash = [True]

    def fault(step, partition, request, reply):
        sent = None
        if request.metadata.message_type == MessageType.TRAIN:
            instruction = Instruction.from_record(request.content.config_records[CONFIG])
            sent = (instruction.task, instruction.phase)
        if sent == (1, "train") and crash[0]:
            crash[0] = False
            raise _ServerCrashError
        return None if partition == 3 and sent != (0, "train") else reply

    def run(out, resume=False):
        settings = FlowerSettings(out=str(out), min_clients=2, reply_timeout=30.0, federated_eval=True)
        exp = build_experiment(cfg)
        grid = LoopbackGrid(run_config, range(4), fault)
        return exp, run_federation(grid, exp, settings, out, resume=resume)

    with pytest.raises(_ServerCrashError):
        run(tmp_path / "split")
    checkpoint = json.loads((tmp_path / "split" / "checkpoint.json").read_text())
    assert checkpoint["completed_step"] == "task0.stats" and checkpoint["transport"]["step_index"] == 2
    exp, resumed = run(tmp_path / "split", resume=True)
    _, whole = run(tmp_path / "whole")

    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"] and resumed["tasks_completed"] == 2
    strip = [untimed(x["rounds"]) for x in (resumed, whole)]
    assert strip[0] == strip[1] and [r["rejected"] for r in resumed["rounds"]] == [0, 1, 1, 1]
    for key in ("steps", "dropped", "federated_evaluation"):
        assert resumed["flower"][key] == whole["flower"][key], key
    assert [d["partition"] for d in resumed["flower"]["dropped"]] == [3, 3, 3]
    assert not list((tmp_path / "split").glob("checkpoint*"))
    states = [load_file(str(tmp_path / d / SERVER_STATE)) for d in ("split", "whole")]
    assert states[0].keys() == states[1].keys() == exp.server.state_dict().keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    saved = [sorted((tmp_path / d / "model").iterdir()) for d in ("split", "whole")]
    assert [p.name for p in saved[0]] == [p.name for p in saved[1]] and saved[0]
    for split, whole_file in zip(*saved, strict=True):
        if split.suffix == ".safetensors":
            assert split.read_bytes() == whole_file.read_bytes(), split.name


def test_resuming_a_flower_run_without_a_checkpoint_is_one_clear_error(fault_setup, tmp_path):
    cfg, run_config = fault_setup
    settings = FlowerSettings(out=str(tmp_path), federated_eval=False, resume=True)
    with pytest.raises(CheckpointError, match=r"holds no checkpoint\.json: nothing to resume"):
        run_federation(
            LoopbackGrid(run_config, range(4)), build_experiment(cfg), settings, tmp_path, resume=True
        )


def _over_loopback(cfg, record, *, nodes, min_clients, out):
    """``cfg`` run over the loopback grid (``record`` sees every message), as (experiment, results)."""
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    exp = build_experiment(cfg)
    settings = FlowerSettings(out=str(out), min_clients=min_clients, reply_timeout=30.0, federated_eval=False)
    return exp, run_federation(LoopbackGrid(run_config, range(nodes), record), exp, settings, out)


def test_a_sampled_run_reaches_only_the_sampled_nodes_and_equals_the_in_process_run(tmp_path, reference_run):
    """``scenario.participation`` 0.5 over the loopback grid vs ``run_simulation`` (same seed).

    The loopback grid runs the real strategy, federation loop and ClientApp; only Flower's transport
    (SuperLink, Ray) is left out, which the full simulation test below covers for participation 1.
    """
    cfg = tiny_config(*FAULT_CFG, "train.rounds=2", "scenario.participation=0.5")
    reached = []

    def record(step, partition, request, reply):
        if request.metadata.message_type == MessageType.TRAIN:
            config = request.content.config_records[CONFIG]
            reached.append((config["task"], config["round"], config["phase"], partition))
        return reply

    exp, flower = _over_loopback(cfg, record, nodes=4, min_clients=2, out=tmp_path)
    reference = reference_run(cfg)
    local = reference.results

    expected = [
        (i.task, i.round, i.phase, k) for steps in step_plan(exp) for i in steps for k in step_clients(cfg, i)
    ]
    assert reached == expected
    train = [s for s in flower["flower"]["steps"] if "statistics" not in s["step"]]
    assert [len(s["asked"]) for s in train] == [2, 2, 2, 2]
    assert len({tuple(s["asked"]) for s in train}) > 1
    assert all(s["merged"] == s["asked"] for s in flower["flower"]["steps"])
    assert flower["flower"]["dropped"] == []
    assert [r["clients"] for r in local["rounds"]] == [2, 2, 4] * 2
    assert_equals_reference(flower, exp.server.state_dict(), reference, exact_accuracy=True, traffic=True)


def test_ewc_with_its_fisher_step_over_flower_equals_the_in_process_run(tmp_path, reference_run):
    """``ewc`` (a ``fisher_stats`` step after task 0, then the anchor and Fisher in every broadcast)
    over the loopback grid vs ``run_simulation``: every node answers every step without an error
    reply, and accuracies, rows, bytes and the server state (Fisher and anchor included) agree."""
    cfg = tiny_config("train.threads=1", "train.rounds=1", "method=ewc")
    steps, errors = [], []

    def record(step, partition, request, reply):
        if request.metadata.message_type == MessageType.TRAIN:
            config = request.content.config_records[CONFIG]
            steps.append((config["task"], config["phase"], partition))
        if reply.has_error():
            errors.append((partition, reply.error.reason))
        return reply

    exp, flower = _over_loopback(cfg, record, nodes=3, min_clients=3, out=tmp_path)
    reference = reference_run(cfg)

    assert errors == []
    assert [(t, k) for t, phase, k in steps if phase == "fisher_stats"] == [(0, 0), (0, 1), (0, 2)]
    assert flower["flower"]["dropped"] == []
    assert all(s["merged"] == s["asked"] == [0, 1, 2] for s in flower["flower"]["steps"])
    assert [r["phase"] for r in reference.results["rounds"]] == ["train", "fisher_stats", "train"]
    state = reference.server_state
    assert {p for p in (ANCHOR, FISHER) for key in state if key.startswith(p)} == {ANCHOR, FISHER}
    assert_equals_reference(flower, exp.server.state_dict(), reference, exact_accuracy=True, traffic=True)


def test_a_projected_analytic_head_over_flower_equals_the_in_process_run(tmp_path, reference_run):
    """``lorm-fsa`` with ``lorm.head_projection`` over the loopback grid vs ``run_simulation``: each node
    derives the server's R from the seed alone (nothing carries it), the (M + 1)-wide head sums merge
    as in process, and accuracies, rows, bytes and the server state agree."""
    cfg = tiny_config(
        "train.threads=1", "train.rounds=1", "method=lorm-fsa", "lorm.head_merge=analytic",
        "lorm.head_projection=48", "lorm.head_activation=tanh",
    )
    errors, broadcast = [], set()

    def record(step, partition, request, reply):
        broadcast.update(request.content.array_records.get(ARRAYS, {}).keys())
        if reply.has_error():
            errors.append((partition, reply.error.reason))
        return reply

    exp, flower = _over_loopback(cfg, record, nodes=3, min_clients=3, out=tmp_path)
    reference = reference_run(cfg)

    assert errors == [] and flower["flower"]["dropped"] == []
    assert not any("projection" in key for key in broadcast)
    (node_exp,) = client._CACHE.values()
    assert torch.equal(node_exp.model.projection.weight, exp.model.projection.weight)
    assert exp.server.state_dict()["analytic.gram"].shape == (49, 49)
    assert_equals_reference(flower, exp.server.state_dict(), reference, exact_accuracy=True, traffic=True)
    saved = load_model(tmp_path / "model")
    assert saved.model.projection is not None and saved.model.projected_head is not None


# -- per-node folders (fedlorm partition) ----------------------------------------------------------
PARTS_CFG = ("train.threads=1", "train.rounds=1")
TINY_ARGS = [*TINY, *PARTS_CFG]


@pytest.fixture(scope="module")
def tiny_parts(tmp_path_factory):
    """``fedlorm partition`` of the tiny config: DIR/client-0..2 and DIR/server."""
    out = tmp_path_factory.mktemp("parts") / "parts"
    write_partitions(tiny_config(*PARTS_CFG), out)
    return out


def _no_datasets(tmp_path, cfg):
    """``cfg`` with a data.root that does not exist: any process that loads a dataset fails."""
    return apply_overrides(cfg, [f"data.root={tmp_path / 'no-datasets-here'}", "data.download=false"])


def test_a_run_over_partition_folders_loads_no_dataset_and_equals_the_in_process_run(
    tiny_parts, tmp_path, reference_run
):
    """The server reads a copy of server/ only; nodes 0 and 1 their own copied folder (``data-dir``),
    node 2 ``client-data/client-2`` (the simulation route). No process can load a dataset."""
    cfg = tiny_config(*PARTS_CFG)
    reference = reference_run(cfg)

    own = {}
    for who in ("client-0", "client-1", "server"):
        own[who] = tmp_path / f"{who}-host" / who
        shutil.copytree(tiny_parts / who, own[who])
    out = tmp_path / "out"
    settings = FlowerSettings(
        out=str(out), reply_timeout=30.0, server_data=str(own["server"]), client_data=str(tiny_parts)
    )
    run_config = run_config_for(_no_datasets(tmp_path, cfg), settings)
    grid = LoopbackGrid(run_config, range(3))
    for k in (0, 1):
        grid.contexts[NODE0 + k].node_config[clientapp.DATA_DIR] = str(own[f"client-{k}"])
    exp = serverapp.server_experiment(*settings_from_run_config(run_config))
    assert len(exp.train) == 0 and exp.partitions == []
    assert exp.scenario == reference.scenario and exp.class_names == reference.class_names
    results = run_federation(grid, exp, settings, out)

    assert results["tasks_completed"] == 2 and results["flower"]["dropped"] == []
    assert [s["merged"] for s in results["flower"]["steps"]] == [[0, 1, 2]] * 4
    assert [e["partitions"] for e in results["flower"]["federated_evaluation"]] == [[0, 1, 2]] * 2
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    assert_equals_reference(results, exp.server.state_dict(), reference)
    assert (out / "results.json").exists() and load_model(out / "model").class_names == exp.class_names


def test_nodes_with_a_bad_folder_reply_errors_the_server_drops_and_logs_while_the_others_go_on(
    tiny_parts, tmp_path
):
    cfg = tiny_config(*PARTS_CFG)
    missing, other = tmp_path / "node-1" / "client-1", tiny_parts / "client-0"
    reasons = {
        1: f"partition folder {str(missing)!r} does not exist",
        2: f"partition folder {str(other)!r} holds the data of client 0, not of client 2",
    }
    settings = FlowerSettings(
        out=str(tmp_path / "out"), reply_timeout=30.0, server_data=str(tiny_parts / "server")
    )
    run_config = run_config_for(_no_datasets(tmp_path, cfg), settings)
    grid = LoopbackGrid(run_config, range(3))
    for k, folder in enumerate((tiny_parts / "client-0", missing, other)):
        grid.contexts[NODE0 + k].node_config[clientapp.DATA_DIR] = str(folder)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    watched = [logging.getLogger(name) for name in ("fedlorm.flower.strategy", "fedlorm.flower.clientapp")]
    for logger in watched:
        logger.addHandler(handler)
    try:
        exp = serverapp.server_experiment(*settings_from_run_config(run_config))
        results = run_federation(grid, exp, settings, tmp_path / "out")
    finally:
        for logger in watched:
            logger.removeHandler(handler)

    assert results["tasks_completed"] == 2
    assert [s["merged"] for s in results["flower"]["steps"]] == [[0]] * 4
    dropped = results["flower"]["dropped"]
    assert [d["partition"] for d in dropped] == [1, 2] * 4
    # The server learns one word (no path leaves a node); each node logs its reason.
    assert all(d["reason"] == "error reply: setup" for d in dropped)
    assert [r["rejected"] for r in results["rounds"]] == [2] * 4
    assert [e["partitions"] for e in results["flower"]["federated_evaluation"]] == [[0]] * 2
    logged = [r.getMessage() for r in records]
    for k, reason in reasons.items():
        assert any(f"client {k} (node {NODE0 + k}) dropped: error reply: setup" in m for m in logged), logged
        assert f"this node cannot take part: {reason}" in logged
    assert not any(str(tmp_path) in d["reason"] for d in dropped)


def test_the_launchers_give_each_node_its_folder_and_the_server_its_own(tiny_parts, tmp_path, monkeypatch):
    """``--partitions DIR`` without starting Flower: what deploy-local and simulate would start."""
    from fedlorm.cli import main

    started, runs = [], []

    class Stopped:
        def stop(self):
            pass

    def superlink(home, **kwargs):
        return Stopped(), "127.0.0.1:1"

    def supernode(home, address, partition, partitions, *, data_dir=None, log=None):
        started.append((partition, partitions, data_dir))
        return Stopped()

    def flwr_run(app, connection, run_config, **kwargs):
        runs.append((dict(run_config), list(kwargs.get("federation_config", ()))))
        return 0

    monkeypatch.setattr(launch, "start_superlink", superlink)
    monkeypatch.setattr(launch, "start_supernode", supernode)
    monkeypatch.setattr(launch, "flwr_run", flwr_run)
    tiny = [f"--partitions={tiny_parts}", *TINY_ARGS]
    assert main(["flower", "deploy-local", "--out", str(tmp_path / "a"), "--supernodes", "4", *tiny]) == 1
    assert started == [(k % 3, 3, tiny_parts / f"client-{k % 3}") for k in range(4)]
    ((run_config, _),) = runs
    assert run_config["server-data"] == str(tiny_parts / "server") and run_config["client-data"] == ""
    runs.clear()
    assert main(["flower", "simulate", "--out", str(tmp_path / "b"), *tiny]) == 1
    ((run_config, federation),) = runs
    assert federation == ["num-supernodes=3"]
    assert run_config["server-data"] == str(tiny_parts / "server")
    assert run_config["client-data"] == str(tiny_parts)
    assert len(started) == 4  # simulation starts no SuperNode process
    runs.clear()
    assert main(["flower", "deploy-local", "--out", str(tmp_path / "c"), *TINY_ARGS]) == 1
    ((run_config, _),) = runs
    assert run_config["server-data"] == run_config["client-data"] == ""
    assert started[-3:] == [(k, 3, None) for k in range(3)]


def test_the_launchers_check_the_partitions_folder_up_front(tiny_parts, tmp_path, capsys, monkeypatch):
    from fedlorm.cli import main

    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))  # nothing may be created there either
    broken = tmp_path / "broken"
    shutil.copytree(tiny_parts, broken)
    shutil.rmtree(broken / "client-2")
    shutil.rmtree(broken / "server")
    nowhere = tmp_path / "nowhere"
    cases = [
        (
            nowhere,
            f"--partitions {str(nowhere)!r} does not exist; "
            f"write it with `fedlorm partition --out {nowhere}`",
        ),
        (
            broken,
            f"--partitions {str(broken)!r} has no client-2/, server/; it must hold client-0/ .. client-2/ "
            "and server/ (`fedlorm partition` with this run's preset, seed and overrides writes them)",
        ),
    ]
    for command in ("deploy-local", "simulate"):
        for folder, message in cases:
            out = tmp_path / "out"
            code = main(["flower", command, "--out", str(out), "--partitions", str(folder), *TINY_ARGS])
            assert code == 2
            assert capsys.readouterr().err.strip() == f"fedlorm: error: {message}"
            assert not out.exists() and not home.exists()
    # A run of 4 clients needs client-3/ too.
    four = [*TINY_ARGS, "scenario.num_clients=4"]
    code = main(["flower", "deploy-local", "--out", str(out), "--partitions", str(tiny_parts), *four])
    assert code == 2 and "has no client-3/;" in capsys.readouterr().err


# -- equivalence with the in-process simulator -----------------------------------------------------
SMOKE = ["train.threads=1"]


@pytest.mark.slow
def test_flower_simulation_equals_the_in_process_run(tmp_path, reference_run):
    """``fedlorm flower simulate`` (SuperLink, Ray, 4 SuperNodes) vs ``run_simulation``; smoke, seed 0."""
    out = tmp_path / "flower"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    command = [sys.executable, "-m", "fedlorm.flower", "simulate", "--preset", "smoke", "--seed", "0"]
    done = subprocess.run(
        [*command, "--out", str(out), *SMOKE], env=env, capture_output=True, text=True, timeout=540
    )
    flower_seconds = time.perf_counter() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    flower = json.loads((out / "results.json").read_text())

    reference = reference_run(apply_overrides(preset_config("smoke"), SMOKE))
    local = reference.results
    print(f"smoke wall time: flower simulation {flower_seconds:.1f} s, in process {reference.seconds:.1f} s")

    assert flower["flower"]["dropped"] == [] and flower["flower"]["clients_at_start"] == [0, 1, 2, 3]
    assert flower["flower"]["ignored_nodes"] == {}
    assert flower["config"] == local["config"]
    assert (
        [len(row) for row in flower["accuracy_matrix"]]
        == [len(row) for row in local["accuracy_matrix"]]
        == [1, 2]
    )
    # Same files and rows as the simulator (timings aside): losses, accuracies, bytes, clients, rejections.
    assert set(flower) - set(local) == {"flower"} and set(local) <= set(flower)
    assert (flower["runtime"], local["runtime"]) == ("flower", "in-process")
    assert flower["diverged"] is None and local["diverged"] is None
    assert flower["download_bytes"] > 0
    assert flower["flower"]["resent"] == []  # every virtual SuperNode kept its arrays in its node state
    merged = load_file(str(out / SERVER_STATE))
    assert any(k.startswith("merged.") for k in merged)
    assert_equals_reference(flower, merged, reference, traffic=True)
    assert len(flower["flower"]["federated_evaluation"]) == 2

