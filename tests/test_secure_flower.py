"""Flower's SecAgg+ driven from a Message-API ServerApp (fedlorm.flower.secure), on encoded float64 sums.

An in-process loopback grid (every message serialised the way Flower would, replies from the real
ClientApp with the real ``secaggplus_mod``) checks exactness, dropout at each stage and bad
configuration; one test runs the same apps in Flower's simulation runtime (Ray, virtual SuperNodes).
"""

from __future__ import annotations

import math
import os
import sys

import numpy as np
import pytest

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.secure import (
    SecureSum,
    is_secure_message,
    optional_secaggplus_mod,
    secure_reply,
    secure_request,
    secure_sum,
)
from fedlorm.secure import EncodingSpec, decode, encode, error_bound

SPEC = EncodingSpec(bounds={"count": 2.0**31}, default_bound=2.0**40)
D_IN = 6
NODE0 = 201


def _summands(partition: int) -> dict[str, np.ndarray]:
    """Client ``partition``'s float64 summands: a Gram of wide-range activations and a sample count."""
    rng = np.random.default_rng(1000 + partition)
    rows = 30 + 7 * partition
    x = rng.standard_normal((rows, D_IN)) * np.logspace(-3, 3, D_IN)
    return {"gram": x.T @ x, "count": np.array(float(rows))}


LAYOUT = {key: (SPEC.words, *value.shape) for key, value in _summands(0).items()}

client_app = ClientApp()


@client_app.train(mods=[optional_secaggplus_mod])
def train(message: Message, context: Context) -> Message:
    """A secure step answers with the encoded summands; a plain train message gets a plain reply."""
    if not is_secure_message(message):
        return Message(RecordDict({"plain": ConfigRecord({"ok": True})}), reply_to=message)
    secure_request(message)  # raises when the mod is missing
    return secure_reply(message, encode(_summands(int(context.node_config["partition-id"])), SPEC))


bare_app = ClientApp()


@bare_app.train()
def bare_train(message: Message, context: Context) -> Message:
    """Like ``train`` but without the SecAgg+ mod: a misconfigured ClientApp."""
    secure_request(message)
    return Message(message.content, reply_to=message)


@pytest.fixture(autouse=True)
def _message_identity():
    """Messages built outside a Flower process need a run/node/task identity."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1


class LoopbackGrid(LocalGrid):
    """Nodes NODE0.. running ``app`` in this process; ``drop(node, stage)`` withholds that node's reply.

    Each message is deep-copied before delivery (:class:`LocalGrid`), as serialisation would: Flower's
    workflow sends one content object to every node and the mod edits what it receives.
    """

    def __init__(self, app: ClientApp, partitions: int, drop=None) -> None:
        super().__init__(app, {}, range(partitions), first_node=NODE0)
        self.drop = drop

    def deliver(self, message, context):
        stage = message.content.config_records[RECORD_KEY_CONFIGS][Key.STAGE]
        if self.drop is not None and self.drop(message.metadata.dst_node_id, stage):
            return None
        return super().deliver(message, context)


def _context() -> Context:
    return Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})


def _check_sum(result: SecureSum | None, partitions: list[int], nodes: list[int] | None = None) -> None:
    """The decoded secure sum equals the correctly rounded float64 sum of exactly ``partitions``."""
    assert result is not None and len(result.contributors) == len(partitions)
    if nodes is not None:
        assert result.contributors == nodes
    decoded = decode(result.sums, SPEC, len(result.contributors))
    for key in LAYOUT:
        values = np.stack([_summands(p)[key] for p in partitions]).reshape(len(partitions), -1)
        exact = np.array([math.fsum(column) for column in values.T]).reshape(values.shape[1:])
        exact = exact.reshape(decoded[key].shape)
        allowed = error_bound(SPEC, key, len(partitions)) + 2 * np.spacing(np.abs(exact))
        assert (np.abs(decoded[key] - exact) <= allowed).all(), key
    assert decoded["count"] == sum(30 + 7 * p for p in partitions)


def test_secure_sum_over_a_grid_is_exact():
    grid = LoopbackGrid(client_app, 4)
    result = secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT)
    _check_sum(result, [0, 1, 2, 3], [NODE0 + p for p in range(4)])
    again = secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT, server_round=2)  # state resets
    assert again is not None and all((again.sums[k] == result.sums[k]).all() for k in LAYOUT)


def test_plain_train_messages_pass_the_optional_mod():
    grid = LoopbackGrid(client_app, 2)
    message = Message(RecordDict({}), dst_node_id=NODE0, message_type="train")
    reply = client_app(message, grid.contexts[NODE0])
    assert reply.content.config_records["plain"]["ok"] is True


@pytest.mark.parametrize(
    ("stage", "merged"),
    [(Stage.COLLECT_MASKED_VECTORS, [0, 1, 3, 4]), (Stage.UNMASK, [0, 1, 2, 3, 4])],
)
def test_a_client_lost_mid_protocol(stage, merged):
    """Lost before masking: left out, its pairwise masks rebuilt; lost after: its input still counts."""
    grid = LoopbackGrid(client_app, 5, drop=lambda node, s: node == NODE0 + 2 and s == stage)
    result = secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT, reconstruction_threshold=3)
    _check_sum(result, merged, [NODE0 + p for p in merged])


def test_too_many_losses_halt_without_a_sum():
    grid = LoopbackGrid(client_app, 4, drop=lambda node, s: node >= NODE0 + 2 and s == Stage.SHARE_KEYS)
    assert secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT, reconstruction_threshold=3) is None


def test_bad_configuration_is_one_clear_error():
    grid = LoopbackGrid(client_app, 3)
    with pytest.raises(ValueError, match="reconstruction threshold 4 is larger than the number of clients"):
        secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT, reconstruction_threshold=4)
    with pytest.raises(ValueError, match="at least 2 clients"):
        secure_sum(grid, _context(), [NODE0], LAYOUT)
    with pytest.raises(ValueError, match="the sum would wrap"):
        secure_sum(grid, _context(), grid.get_node_ids(), LAYOUT, word_bits=30, modulus_bits=31)
    bare = LoopbackGrid(bare_app, 3)
    reply = bare.send_and_receive(
        [
            Message(
                RecordDict({RECORD_KEY_CONFIGS: ConfigRecord({Key.STAGE: Stage.SETUP})}),
                dst_node_id=NODE0,
                message_type="train",
            )
        ]
    )[0]
    assert reply.has_error() and "needs optional_secaggplus_mod" in reply.error.reason
    assert secure_sum(bare, _context(), bare.get_node_ids(), LAYOUT) is None


def test_secure_reply_rejects_words_outside_the_layout():
    message = Message(
        RecordDict(
            {
                RECORD_KEY_CONFIGS: ConfigRecord({}),
                "fitins.config": ConfigRecord(
                    {"fedlorm-secure-layout": '{"x": [2]}', "fedlorm-secure-word-bits": 8}
                ),
            }
        ),
        dst_node_id=NODE0,
        message_type="train",
    )
    with pytest.raises(ValueError, match=r"outside \[0, 2\^8\)"):
        secure_reply(message, {"x": np.array([0, 256])})
    with pytest.raises(ValueError, match="expects"):
        secure_reply(message, {"y": np.array([0, 1])})


# -- Flower's simulation runtime ------------------------------------------------------------------------
SIM_NODES = 3
_results: list[SecureSum | None] = []

server_app = ServerApp()


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """Wait for the virtual SuperNodes, securely sum their encoded summands once."""
    import time

    # Generous limits: Ray workers import torch before they answer, slow on a loaded 2-core machine.
    deadline = time.monotonic() + 300
    while len(grid.get_node_ids()) < SIM_NODES and time.monotonic() < deadline:
        time.sleep(0.2)
    _results.append(secure_sum(grid, context, list(grid.get_node_ids()), LAYOUT, timeout=600))


def test_secure_sum_in_flower_simulation(monkeypatch):
    """The same apps in ``flwr.simulation.run_simulation``: 3 virtual SuperNodes, Ray workers."""
    for key, value in {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }.items():
        monkeypatch.setenv(key, value)
    ray = pytest.importorskip("ray")
    from flwr.simulation import run_simulation

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers need not import tests/
    _results.clear()
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=SIM_NODES,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": 2}},
    )
    assert len(_results) == 1
    _check_sum(_results[0], list(range(SIM_NODES)))
