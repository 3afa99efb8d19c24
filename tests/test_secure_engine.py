"""Secure aggregation wired into the engine: in process and over Flower's SecAgg+ (loopback grid).

The loopback grid runs the real ClientApp (with Flower's ``secaggplus_mod``) in this process, copies
every message as serialisation would, turns a ClientApp exception into an error reply as Flower does,
and records every reply that reaches the server, so the tests can assert what the server saw.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from reference_runs import results_of

pytest.importorskip("flwr")

from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedlorm.config import ConfigError, apply_overrides, validate_config
from fedlorm.flower import client, clientapp, strategy
from fedlorm.flower.federation import run_federation
from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.secure_step import run_secure_step
from fedlorm.flower.settings import FlowerSettings, run_config_for
from fedlorm.flower.strategy import FedlormStrategy
from fedlorm.runtime import engine
from fedlorm.runtime.engine import fold_secure_replies
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import InProcess, run_simulation
from fedlorm.secure.contribution import FLOWER, IN_PROCESS, encoding_spec
from fedlorm.seeding import torch_generator

NODE0 = 301
TOLERANCE = 1e-6
"""Relative Frobenius error allowed on every merged factor against the run without secure aggregation."""


@pytest.fixture(autouse=True)
def _flower_process(flower_process):
    """Every test here runs as in a Flower process (conftest.flower_process)."""


class SecureLoopbackGrid(LocalGrid):
    """SuperNodes NODE0.. serving clients 0..n-1; ``drop(step, partition, stage)`` withholds a reply.

    ``step`` counts the SecAgg+ setups (one per protocol step); ``seen`` keeps every train reply that
    reached the server.
    """

    def __init__(self, run_config, partitions, drop=None):
        super().__init__(clientapp.app, run_config, range(partitions), first_node=NODE0)
        self.drop = drop
        self.step = 0
        self.seen: list[Message] = []

    def deliver(self, message, context):
        node = message.metadata.dst_node_id
        secure = message.content.config_records.get(RECORD_KEY_CONFIGS)
        stage = secure.get(Key.STAGE) if secure is not None else None
        self.step += stage == Stage.SETUP and node == min(self.contexts)
        if self.drop is not None and self.drop(self.step, node - NODE0, stage):
            return None
        reply = super().deliver(message, context)
        if message.metadata.message_type == "train":
            self.seen.append(reply)
        return reply


def _factors(state):
    return {k: v for k, v in state.items() if v.is_floating_point() and v.ndim >= 1}


def _relative(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / max(float(a.norm()), 1e-300))


@pytest.fixture(scope="module")
def plain_and_secure(reference_run):
    """The in-process run without and with secure aggregation (server states and results), from the
    session's shared reference runs."""
    out = {}
    for on in ("false", "true"):
        cfg = tiny_config("train.threads=1", f"secure.aggregation={on}")
        run = reference_run(cfg)
        out[on] = (cfg, dict(run.server_state), results_of(run))
    return out


def test_in_process_secure_run_matches_the_plain_run(plain_and_secure):
    _, plain, plain_results = plain_and_secure["false"]
    _, secure, results = plain_and_secure["true"]
    assert results["accuracy_matrix"] == plain_results["accuracy_matrix"]
    worst = max(_relative(plain[k], secure[k]) for k in _factors(plain))
    assert worst <= TOLERANCE, worst
    assert results["secure_aggregation"]["protocol"] == IN_PROCESS  # says that nothing is masked
    assert "nothing is masked" in IN_PROCESS
    assert "secure_aggregation" not in plain_results
    # 4 words of int64 per float64 summand entry, plus two encoded scalars per client.
    for row, plain_row in zip(results["rounds"], plain_results["rounds"], strict=True):
        assert row["upload_bytes"] == 4 * plain_row["upload_bytes"] + 2 * 4 * 8 * row["clients"]


def test_flower_secure_run_sees_only_sums_and_equals_the_in_process_secure_run(
    plain_and_secure, tmp_path, monkeypatch
):
    cfg, secure_state, secure_results = plain_and_secure["true"]
    _, plain_state, plain_results = plain_and_secure["false"]

    def forbidden(*args, **kwargs):
        raise AssertionError("the server looked at a single client's reply")

    monkeypatch.setattr(strategy, "fold_replies", forbidden)
    monkeypatch.setattr(engine, "check_reply", forbidden)  # the one check of a plain reply
    monkeypatch.setattr(strategy, "decode_train_reply", forbidden)
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    grid = SecureLoopbackGrid(run_config, cfg.scenario.num_clients)
    exp = build_experiment(cfg)
    aggregated = []
    aggregate = exp.server.aggregate
    monkeypatch.setattr(
        exp.server, "aggregate", lambda i, sums, n: (aggregated.append(sorted(sums)), aggregate(i, sums, n))
    )
    settings = FlowerSettings(out=str(tmp_path), min_clients=2, reply_timeout=60.0, federated_eval=False)
    results = run_federation(grid, exp, settings, tmp_path)
    # What reached the server: SecAgg+ protocol records only; the handler's arrays were emptied.
    assert grid.seen and all(not m.has_error() for m in grid.seen)
    for message in grid.seen:
        assert all(len(record) == 0 for record in message.content.array_records.values())
        assert set(message.content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.status"}
        metrics = {k: dict(r) for k, r in message.content.metric_records.items()}
        assert metrics in ({}, {"fitres.num_examples": {"num_examples": 1}})  # the constant weight only
    assert len(aggregated) == len(results["rounds"])
    # Bit for bit the in-process secure run; within TOLERANCE of the plain run, same accuracies.
    state = exp.server.state_dict()
    for key, value in secure_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert results["accuracy_matrix"] == secure_results["accuracy_matrix"] == plain_results["accuracy_matrix"]
    assert max(_relative(plain_state[k], state[k]) for k in _factors(plain_state)) <= TOLERANCE
    steps = results["flower"]["steps"]
    assert all(s["secure"] and s["merged"] == [0, 1, 2] for s in steps)
    assert results["flower"]["secure_aggregation"]["words"] == 4
    assert results["flower"]["secure_aggregation"]["protocol"] == FLOWER
    assert [r["upload_bytes"] for r in results["rounds"]] == [
        r["upload_bytes"] for r in secure_results["rounds"]
    ]


def test_a_projected_analytic_head_sums_securely_in_process_and_over_flower(tmp_path, monkeypatch):
    """head-only with ``lorm.head_projection``: its (M + 1)-wide head sums fit the public bound; the
    secure run equals the plain one within TOLERANCE (same accuracies), and over Flower's SecAgg+
    the server sees only sums and holds the in-process secure state bit for bit."""
    projected = ["method=head-only", "lorm.head_merge=analytic", "lorm.head_projection=48"]
    runs = {}
    for on in ("false", "true"):
        cfg = tiny_config("train.threads=1", *projected, f"secure.aggregation={on}")
        exp = build_experiment(cfg)
        runs[on] = (run_simulation(cfg, experiment=exp), exp.server.state_dict())
    (plain, plain_state), (secure, secure_state) = runs["false"], runs["true"]
    assert secure_state["analytic.gram"].shape == (49, 49)
    assert secure["accuracy_matrix"] == plain["accuracy_matrix"]
    assert max(_relative(plain_state[k], secure_state[k]) for k in _factors(plain_state)) <= TOLERANCE
    assert [r["phase"] for r in secure["rounds"]] == ["head_stats", "head_stats"]

    monkeypatch.setattr(strategy, "fold_replies", lambda *a, **k: pytest.fail("a single reply was folded"))
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    grid = SecureLoopbackGrid(run_config, cfg.scenario.num_clients)
    exp = build_experiment(cfg)
    settings = FlowerSettings(out=str(tmp_path), min_clients=2, reply_timeout=60.0, federated_eval=False)
    results = run_federation(grid, exp, settings, tmp_path)
    assert grid.seen and all(not m.has_error() for m in grid.seen)
    for message in grid.seen:
        assert all(len(record) == 0 for record in message.content.array_records.values())
    state = exp.server.state_dict()
    for key, value in secure_state.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)
    assert results["accuracy_matrix"] == secure["accuracy_matrix"]


def _secure_first_step(cfg):
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    return exp, next(iter(exp.server.instructions(0, classes)))


def _assert_survivors_merged(cfg, exp, survivors):
    """``exp``'s server state equals the in-process secure fold of ``survivors``' replies, bit for bit."""
    reference, instruction = _secure_first_step(cfg)
    arrays = reference.server.arrays(instruction)
    replies = InProcess.replies(reference, instruction, arrays, survivors)
    _, contributors = fold_secure_replies(reference.server, instruction, replies, encoding_spec(cfg.secure))
    assert contributors == survivors
    for key, value in reference.server.state_dict().items():
        torch.testing.assert_close(exp.server.state_dict()[key], value, rtol=0, atol=0)


def _run_first_secure_step(cfg, exp, instruction, grid):
    """The step ``instruction`` over ``grid``'s 3 nodes as one SecAgg+ sum; its report."""
    strat = FedlormStrategy(exp.server, 3, 1, reply_timeout=30.0)
    assert strat.discover(grid) == [0, 1, 2]
    return run_secure_step(
        strat,
        grid,
        Context(1, 0, {}, RecordDict(), {}),
        exp.server,
        instruction,
        cfg.secure,
        server_round=1,
        timeout=30.0,
    )


@pytest.mark.parametrize("fault", ["nan", "out-of-range"])
def test_a_malformed_contribution_is_refused_by_its_client_and_the_others_merge(fault, monkeypatch):
    """A client whose reply holds NaN, or a value beyond the public bound, cannot encode it: it answers
    the masking stage with an error, SecAgg+ treats it as dropped, the run goes on with the others."""
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    honest = client.local_update

    def poisoned(exp, partition, instruction, arrays):
        reply = honest(exp, partition, instruction, arrays)
        if partition == 2:
            key = sorted(reply.summands)[0]
            bad = float("nan") if fault == "nan" else 2.0**60
            reply.summands[key] = torch.full_like(reply.summands[key], bad)
        return reply

    monkeypatch.setattr(client, "local_update", poisoned)
    exp, instruction = _secure_first_step(cfg)
    grid = SecureLoopbackGrid(run_config, 3)
    report = _run_first_secure_step(cfg, exp, instruction, grid)
    assert report.merged == [0, 1] and [d.partition for d in report.dropped] == [2]
    # The refusal reaches the server as one word: no value, no key, no number.
    assert [m.error.reason for m in grid.seen if m.has_error()] == ["nan" if fault == "nan" else "bound"]
    monkeypatch.setattr(client, "local_update", honest)
    _assert_survivors_merged(cfg, exp, [0, 1])


def test_a_client_lost_after_key_sharing_is_left_out_and_the_survivors_merge_exactly():
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    exp, instruction = _secure_first_step(cfg)
    grid = SecureLoopbackGrid(
        run_config,
        3,
        drop=lambda step, partition, stage: partition == 2 and stage == Stage.COLLECT_MASKED_VECTORS,
    )
    report = _run_first_secure_step(cfg, exp, instruction, grid)
    assert report.merged == [0, 1] and [d.partition for d in report.dropped] == [2]
    assert "not in the secure sum" in report.dropped[0].reason
    _assert_survivors_merged(cfg, exp, [0, 1])  # the same step in process, over the survivors only


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["secure.reconstruction_threshold=4", "secure.num_shares=5"],
            "secure.num_shares = 5 is not allowed",
        ),
        (
            ["secure.reconstruction_threshold=4"],
            "secure.reconstruction_threshold = 4 is not allowed; expected at most the 3",
        ),
        (["scenario.num_clients=1"], "at least 2 clients in every step"),
        (["secure.word_bits=31"], r"secure.word_bits = 31 is not allowed; expected an integer in \[2, 30\]"),
        (["secure.modulus_bits=24"], "secure.modulus_bits = 24 is not allowed"),
        (["secure.num_shares=2"], "an integer >= 3 or a fraction"),
    ],
)
def test_bad_secure_configuration_is_one_clear_error(overrides, message):
    cfg = apply_overrides(tiny_config(), ["secure.aggregation=true", *overrides])
    with pytest.raises(ConfigError, match=message) as err:
        validate_config(cfg)
    assert "\n" not in str(err.value)


def test_joint_cannot_run_securely_and_says_why():
    cfg = tiny_config("train.threads=1", "secure.aggregation=true", "method=joint")
    with pytest.raises(ConfigError, match="at least 2 clients in every step"):
        run_simulation(cfg)
