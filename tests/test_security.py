"""Secure mode holds (docs/security.md): what each threat-model claim rests on, asserted in numbers.

- masks: ChaCha20 from the whole shared secret on both SecAgg+ ends, not a 32-bit fold;
- a SuperNode's own policy (``require-secure``) and one-word error replies;
- plain mode: hostile replies (scaled summands, forged counts, an inflated Gram) are rejected by the
  public per-sample bounds, or merge within bounds; the state equals the fold of the honest replies;
- secure mode: a hostile contribution inside the public bound (a negative Gram diagonal, a forged
  count) fails the checks on the sums or the guarded merge; the state is kept and the run goes on;
- a secure step never sums two different sets of clients (resume after a crash);
- federated evaluation under secure aggregation is one secure sum of (correct, examples).

Flower tests drive the real ClientApp (and Flower's SecAgg+ mod and workflow) through an in-process
loopback grid that records what reaches the server.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

pytest.importorskip("flwr")

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.common.secure_aggregation.secaggplus_utils import pseudo_rand_gen

from fedlorm.backbones import create_backbone
from fedlorm.config import ConfigError, apply_overrides, validate_config
from fedlorm.flower import client, clientapp, masks, secure_step
from fedlorm.flower.delivery import FlowerDelivery
from fedlorm.flower.federation import SECURE_JOURNAL, run_federation
from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.messages import ARRAYS, CONFIG, to_array_record
from fedlorm.flower.policy import REFUSALS, REQUIRE_SECURE
from fedlorm.flower.secure import secure_sum
from fedlorm.flower.secure_client import optional_secaggplus_mod, secure_reply
from fedlorm.flower.secure_step import run_secure_step
from fedlorm.flower.settings import FlowerSettings, run_config_for
from fedlorm.flower.strategy import FedlormStrategy
from fedlorm.methods import add_arrays
from fedlorm.methods.guard import guarded_aggregate
from fedlorm.runtime.delivery import Broadcast
from fedlorm.runtime.engine import fold_replies, fold_secure_replies
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import InProcess, run_simulation
from fedlorm.secure import contribution as contribution_module
from fedlorm.secure import fold as fold_module
from fedlorm.secure.contribution import encoding_spec
from fedlorm.secure.encoding import EncodingSpec, encode
from fedlorm.secure.masks import expand_secret
from fedlorm.seeding import torch_generator

NODE0 = 501


@pytest.fixture(autouse=True)
def _flower_process(flower_process):
    """Every test here runs as in a Flower process (conftest.flower_process)."""


# -- masks -----------------------------------------------------------------------------------------
def _fold32(secret: bytes) -> int:
    """Flower's XOR fold of a secret to the 32-bit seed of its numpy generator."""
    return int(np.bitwise_xor.reduce(np.frombuffer(secret, dtype="<u4")))


def test_secrets_that_agree_in_their_32_bit_fold_give_unrelated_masks():
    rng = np.random.default_rng(7)
    first = rng.bytes(32)
    flip = rng.bytes(4)
    # XOR the same 4 bytes into two of the eight words: the fold cancels them, the secret differs.
    second = bytearray(first)
    for word in (1, 5):
        for i in range(4):
            second[4 * word + i] ^= flip[i]
    second = bytes(second)
    assert second != first and _fold32(first) == _fold32(second)
    modulus, shapes = 1 << 32, [(4000,), (3, 5)]
    # Flower's generator: the two secrets give the very same masks, so 2^32 guesses cover all secrets.
    theirs = [pseudo_rand_gen(s, modulus, shapes) for s in (first, second)]
    assert all(np.array_equal(a, b) for a, b in zip(*theirs, strict=True))
    # fedlorm's: unrelated. Two independent uniform masks agree in an entry with probability 2^-32,
    # and their difference is uniform too (mean (M-1)/2, within 5 standard errors).
    ours = [expand_secret(s, modulus, shapes) for s in (first, second)]
    a, b = (np.concatenate([m.ravel() for m in masks_]) for masks_ in ours)
    assert int((a == b).sum()) == 0
    difference = ((a - b) % modulus).astype(np.float64)
    standard_error = modulus / math.sqrt(12 * difference.size)
    assert abs(difference.mean() - (modulus - 1) / 2) < 5 * standard_error
    assert abs(np.corrcoef(a.astype(np.float64), b.astype(np.float64))[0, 1]) < 5 / math.sqrt(a.size)


def test_masks_are_deterministic_in_range_and_depend_on_every_bit_of_the_secret():
    secret = bytes(range(32))
    shapes = [(), (2, 3), (0,), (5,)]
    masks_ = expand_secret(secret, 1 << 24, shapes)
    assert [m.shape for m in masks_] == shapes and all(m.dtype == np.int64 for m in masks_)
    again = expand_secret(secret, 1 << 24, shapes)
    assert all(np.array_equal(x, y) for x, y in zip(masks_, again, strict=True))
    flat = np.concatenate([m.ravel() for m in expand_secret(secret, 1 << 24, [(10000,)])])
    assert flat.min() >= 0 and flat.max() < 1 << 24 and flat.max() > (1 << 24) * 0.99
    odd = expand_secret(secret, 1000, [(10000,)])[0]
    assert odd.min() >= 0 and odd.max() < 1000
    for bit in (0, 7, 100, 255):
        flipped = bytearray(secret)
        flipped[bit // 8] ^= 1 << (bit % 8)
        other = expand_secret(bytes(flipped), 1 << 24, [(10000,)])[0]
        assert int((other == flat).sum()) < 5  # 10000 entries, each equal with probability 2^-24
    with pytest.raises(ValueError, match="at least 16"):
        expand_secret(bytes(8), 1 << 24, [(3,)])


SPEC = EncodingSpec(default_bound=2.0**40)


def _summands(partition: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(300 + partition)
    x = rng.standard_normal((20 + partition, 5))
    return {"gram": x.T @ x, "count": np.array(float(20 + partition))}


mask_app = ClientApp()


@mask_app.train(mods=[optional_secaggplus_mod])
def _mask_train(message: Message, context: Context) -> Message:
    return secure_reply(message, encode(_summands(int(context.node_config["partition-id"])), SPEC))


def test_both_ends_of_secagg_draw_every_mask_from_the_whole_secret(monkeypatch):
    """A secure sum over a loopback grid: the client mod's and the server workflow's masks all come
    from fedlorm's generator with 32-byte secrets; the masks cancel and the sum is exact."""
    calls: list[tuple[str, int]] = []

    def spy(secret, num_range, shapes):
        import sys

        calls.append((sys._getframe(1).f_globals["__name__"], len(secret)))
        return expand_secret(secret, num_range, shapes)

    monkeypatch.setattr("fedlorm.secure.masks.expand_secret", spy)
    grid = LocalGrid(mask_app, {}, range(4), first_node=NODE0)
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    layout = {key: (SPEC.words, *value.shape) for key, value in _summands(0).items()}
    result = secure_sum(grid, context, grid.get_node_ids(), layout, reconstruction_threshold=3)
    assert result is not None and result.contributors == [NODE0 + k for k in range(4)]
    from fedlorm.secure.encoding import decode

    decoded = decode(result.sums, SPEC, 4)
    exact = sum(_summands(k)["gram"] for k in range(4))
    assert np.allclose(decoded["gram"], exact, rtol=0, atol=1e-9)
    assert decoded["count"] == sum(20 + k for k in range(4))
    sides = {module for module, _ in calls}
    assert sides == set(masks.MASKED_MODULES), sides
    assert all(size >= 32 for _, size in calls)
    # Each client: a private mask and one pairwise mask per neighbour; the server: 4 private masks.
    client_side = [c for c in calls if c[0] == masks.MASKED_MODULES[0]]
    assert len(client_side) == 4 * 4 and len(calls) - len(client_side) == 4


# -- a node's own policy, one-word error replies ----------------------------------------------------
class RecordingGrid(LocalGrid):
    """The real ClientApp for ``partitions`` (SuperNodes NODE0..); keeps every reply and every SecAgg+
    stage that reaches a node; ``fault(partition, message, reply)`` may replace a reply (None: lost)."""

    def __init__(self, run_config, partitions, node_config=None, fault=None, num_partitions=3):
        super().__init__(clientapp.app, run_config, range(partitions), num_partitions, first_node=NODE0)
        for context in self.contexts.values():
            context.node_config.update(node_config or {})
        self.fault = fault
        self.replies: list[Message] = []
        self.stages: list[tuple[int, str]] = []

    def deliver(self, message, context):
        secure = message.content.config_records.get(RECORD_KEY_CONFIGS)
        if secure is not None:
            self.stages.append((context.node_config["partition-id"], secure.get(Key.STAGE)))
        reply = super().deliver(message, context)
        if self.fault is not None and message.metadata.message_type != MessageType.QUERY:
            reply = self.fault(context.node_config["partition-id"], message, reply)
        if reply is not None:
            self.replies.append(reply)
        return reply


def _plain_messages(cfg):
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    instruction = next(iter(exp.server.instructions(0, classes)))
    train = RecordDict(
        {
            ARRAYS: to_array_record(exp.server.arrays(instruction)),
            CONFIG: ConfigRecord(instruction.to_record()),
        }
    )
    evaluate = RecordDict(
        {ARRAYS: to_array_record(exp.server.deployed_arrays()), CONFIG: ConfigRecord({"task": 0})}
    )
    return [
        Message(train, dst_node_id=NODE0, message_type=MessageType.TRAIN),
        Message(evaluate, dst_node_id=NODE0, message_type=MessageType.EVALUATE),
    ]


@pytest.mark.parametrize("setting", [True, "true"])
def test_a_require_secure_node_refuses_plain_train_and_evaluate(setting):
    cfg = tiny_config("train.threads=1")
    run_config = run_config_for(cfg, FlowerSettings(out=""))
    strict = RecordingGrid(run_config, 1, node_config={REQUIRE_SECURE: setting})
    for message in _plain_messages(cfg):
        (reply,) = strict.send_and_receive([message])
        assert reply.has_error() and reply.error.reason == "policy"
    # The same messages to a node without the policy are answered.
    open_node = RecordingGrid(run_config, 1, node_config={REQUIRE_SECURE: "false"})
    for message in _plain_messages(cfg):
        (reply,) = open_node.send_and_receive([message])
        assert not reply.has_error()
    bad = RecordingGrid(run_config, 1, node_config={REQUIRE_SECURE: "yes"})
    (reply,) = bad.send_and_receive(_plain_messages(cfg)[:1])
    assert reply.has_error() and reply.error.reason == "setup"


def _setup_message(shares: int, threshold: int) -> Message:
    stage = {
        Key.STAGE: Stage.SETUP,
        Key.SAMPLE_NUMBER: shares,
        Key.SHARE_NUMBER: shares,
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: 8.0,
        Key.TARGET_RANGE: 1 << 22,
        Key.MOD_RANGE: 1 << 32,
        Key.MAX_WEIGHT: 1.0,
    }
    return Message(
        RecordDict({RECORD_KEY_CONFIGS: ConfigRecord(stage)}),
        dst_node_id=NODE0,
        message_type=MessageType.TRAIN,
    )


@pytest.mark.parametrize(
    ("shares", "threshold", "refused"),
    [(4, 2, True), (2, 2, True), (10, 5, True), (4, 3, False), (3, 2, False)],
)
def test_a_require_secure_node_refuses_a_secagg_setup_the_server_could_unmask(shares, threshold, refused):
    """At most half the shares as threshold: a server that tells half the neighbours a node is alive
    and the other half that it dropped would collect shares of both of its secrets."""
    cfg = tiny_config("train.threads=1")
    grid = RecordingGrid(run_config_for(cfg, FlowerSettings(out="")), 1, node_config={REQUIRE_SECURE: True})
    (reply,) = grid.send_and_receive([_setup_message(shares, threshold)])
    if refused:
        assert reply.has_error() and reply.error.reason == "policy"
    else:
        assert not reply.has_error() and Key.PUBLIC_KEY_1 in reply.content.config_records[RECORD_KEY_CONFIGS]
    # Without the policy the node follows whatever setup it is sent.
    free = RecordingGrid(run_config_for(cfg, FlowerSettings(out="")), 1)
    (reply,) = free.send_and_receive([_setup_message(shares, threshold)])
    assert not reply.has_error()


def test_the_default_secure_settings_pass_the_node_policy():
    """The default threshold (0.67 of the shares) is above half the shares for every step size."""
    for clients in range(3, 60):
        shares = clients  # num_shares 1.0: every client is every other's neighbour
        threshold = max(round(0.67 * shares), 2)
        assert 2 * threshold > shares, clients
    assert tiny_config().secure.reconstruction_threshold == 0.67


def test_a_node_that_cannot_set_up_answers_setup_and_nothing_else(tmp_path):
    cfg = tiny_config("train.threads=1")
    missing = tmp_path / "nowhere" / "client-0"
    grid = RecordingGrid(
        run_config_for(cfg, FlowerSettings(out="")), 1, node_config={clientapp.DATA_DIR: str(missing)}
    )
    for message in _plain_messages(cfg):
        (reply,) = grid.send_and_receive([message])
        assert reply.has_error() and reply.error.reason == "setup"
        assert str(tmp_path) not in reply.error.reason


def test_a_node_without_its_identity_answers_the_query_with_setup():
    cfg = tiny_config("train.threads=1")
    grid = RecordingGrid(
        run_config_for(cfg, FlowerSettings(out="")), 1, node_config={clientapp.DATA_DIR: "/x/y"}
    )
    del grid.contexts[NODE0].node_config["partition-id"]
    (reply,) = grid.send_and_receive(
        [Message(RecordDict({}), dst_node_id=NODE0, message_type=MessageType.QUERY)]
    )
    assert reply.has_error() and reply.error.reason == "setup"


def test_refusal_words_are_fixed():
    assert set(REFUSALS) == {"setup", "policy", "nan", "invalid", "bound", "protocol", "error"}


# -- weights and config --------------------------------------------------------------------------------
class _Payload:
    def __reduce__(self):
        return (Path.touch, (Path(os.environ["FEDLORM_TEST_PWNED"]),))


def test_a_pickled_weights_file_is_read_weights_only_and_never_runs_code(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    monkeypatch.setenv("FEDLORM_TEST_PWNED", str(marker))
    weights = tmp_path / "weights.pth"
    torch.save({"conv_stem.weight": _Payload()}, weights)
    with pytest.raises(ValueError, match="cannot read weights file"):
        create_backbone("efficientnet_lite0", 4, pretrained=weights, img_size=32)
    assert not marker.exists()


@pytest.mark.parametrize("key", ["spread_limit", "value_spread_limit"])
def test_spread_limits_are_checked_in_one_line(key):
    for value in ("1", "0.5", "nan"):
        with pytest.raises(
            ConfigError, match=rf"secure.{key} = .* is not allowed; expected a number > 1, or inf"
        ):
            validate_config(apply_overrides(tiny_config(), [f"secure.{key}={value}"]))
    validate_config(apply_overrides(tiny_config(), [f"secure.{key}=inf"]))


# -- plain mode: hostile replies against the public bounds -----------------------------------------
def _copy(state):
    return {key: value.detach().clone() for key, value in state.items()}


def _same_state(state, reference):
    assert state.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def first_steps():
    """Task 0's B- and A-round on a fresh server: the start state and every client's honest replies."""
    cfg = tiny_config("train.threads=1")
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    steps = list(exp.server.instructions(0, classes))
    start = _copy(exp.server.state_dict())
    for step in steps[:2]:
        _SPEC_KINDS.update({key: s.kind.value for key, s in exp.server.expected_reply(step).items()})
    replies = {}
    for i in (0, 1):
        replies[i] = dict(InProcess.replies(exp, steps[i], exp.server.arrays(steps[i]), range(3)))
    yield exp, steps, start, replies
    torch.set_num_threads(1)


def _fold(first_steps, step, replies):
    exp, steps, start, _ = first_steps
    exp.server.load_state_dict(start)
    tally = fold_replies(exp.server, steps[step], sorted(replies.items()))
    return tally, _copy(exp.server.state_dict())


def _scaled(reply, factor, count_factor=1):
    return type(reply)(
        summands={key: value * factor for key, value in reply.summands.items()},
        num_examples=reply.num_examples * count_factor,
        metrics=dict(reply.metrics),
    )


def _values_scaled(reply, factor):
    """Only the value summands (N = A_i·G, the head's products) scaled: the weights stay honest."""
    summands = {k: v * factor if _SPEC_KINDS.get(k) == "value" else v for k, v in reply.summands.items()}
    return type(reply)(summands=summands, num_examples=reply.num_examples, metrics=dict(reply.metrics))


_SPEC_KINDS: dict[str, str] = {}


def _inflated_h(reply):
    """diag(1e12, -1e4) as the first H: finite, and PSD to check_reply's tolerance (relative to the
    largest entry), so only the per-sample bounds can refuse it."""
    summands = dict(reply.summands)
    key = next(k for k in sorted(summands) if k.endswith(".H"))
    summands[key] = torch.diag(torch.tensor([1e12, -1e4], dtype=torch.float64))
    return type(reply)(summands=summands, num_examples=reply.num_examples, metrics=dict(reply.metrics))


@pytest.mark.parametrize(
    ("step", "hostile", "reason"),
    [
        (1, lambda r: _scaled(r, 1e200), "above the public bound"),  # G = 1e200·G_t, N = A_t·G
        (1, lambda r: _scaled(r, 1e6), "times the median of the other replies"),
        (1, lambda r: _scaled(r, 1e6, 10**6), "sample count is"),  # a forged count, summands to match
        (0, _inflated_h, "times the median of the other replies"),
        (1, lambda r: _values_scaled(r, 1e7), "times the median of the other replies (limit 1e+06)"),
    ],
)
def test_plain_mode_rejects_a_hostile_reply_and_merges_the_honest_ones_exactly(
    first_steps, step, hostile, reason
):
    honest = first_steps[3][step]
    tally, state = _fold(first_steps, step, {**honest, 2: hostile(honest[2])})
    assert tally.rejected == 1 and list(tally.dropped) == [2] and reason in tally.dropped[2]
    assert tally.kept == "" and tally.examples == honest[0].num_examples + honest[1].num_examples
    _, reference = _fold(first_steps, step, {k: honest[k] for k in (0, 1)})
    _same_state(state, reference)


def test_honest_replies_are_all_merged(first_steps):
    for step in (0, 1):
        tally, _ = _fold(first_steps, step, first_steps[3][step])
        assert (tally.rejected, tally.dropped, tally.kept) == (0, {}, "")


@pytest.mark.parametrize(("factor", "count_factor"), [(100.0, 1), (100.0, 100)])
def test_a_scaled_reply_within_the_limit_merges_within_the_clients_own_factors(
    first_steps, factor, count_factor
):
    """Scaled summands (and counts) below the spread limit pass, but the A-round merge with diagonal
    Grams is a weighted mean of the clients' A_i = N_i / g_i: every entry stays between theirs."""
    honest = first_steps[3][1]
    tally, state = _fold(first_steps, 1, {**honest, 2: _scaled(honest[2], factor, count_factor)})
    assert tally.rejected == 0
    checked = 0
    for key, merged_a in state.items():
        if not key.endswith(".lora_A"):
            continue
        layer = key.removesuffix(".lora_A")
        own = []
        for reply in honest.values():
            n, g = reply.summands[f"{layer}.N"], reply.summands[f"{layer}.G"]
            own.append(torch.where(g > 0, n / torch.where(g > 0, g, 1), torch.nan))
        own = torch.stack(own).double()
        low, high = torch.nan_to_num(own, nan=math.inf).amin(0), torch.nan_to_num(own, nan=-math.inf).amax(0)
        seen = torch.isfinite(low)
        slack = 1e-9 * high.abs().clamp_min(1e-300)
        merged = merged_a.double()
        assert bool(((merged >= low - slack) | ~seen).all() and ((merged <= high + slack) | ~seen).all()), (
            layer
        )
        checked += 1
    assert checked > 0


def _hostile_scale(instruction):
    from fedlorm.flower.messages import decode_train_reply, encode_train_reply

    def scale(partition, message, reply):
        if partition != 2 or reply.has_error():
            return reply
        hostile = _scaled(decode_train_reply(reply.content).reply, 1e6)
        return Message(encode_train_reply(2, instruction, hostile), reply_to=message)

    return scale


def _list_metric(instruction):
    """A train reply whose loss metric is a list, which a MetricRecord allows."""
    from fedlorm.flower.messages import METRICS

    def listed(partition, message, reply):
        if partition == 2 and not reply.has_error():
            reply.content.metric_records[METRICS]["train_loss"] = [1.0, 2.0]
        return reply

    return listed


@pytest.mark.parametrize(
    ("fault", "reason"),
    [(_hostile_scale, "times the median of the other replies"), (_list_metric, "a metric is not a number")],
)
def test_a_plain_flower_step_drops_a_hostile_reply_and_names_it(first_steps, fault, reason):
    """Over Flower: the strategy's report drops the hostile client with the reason; the merge equals
    the in-process fold of the honest replies."""
    exp, steps, start, honest = first_steps
    instruction = steps[1]
    grid = RecordingGrid(run_config_for(exp.cfg, FlowerSettings(out="")), 3, fault=fault(instruction))
    exp.server.load_state_dict(start)
    strategy = FedlormStrategy(exp.server, 3, 1, reply_timeout=30.0)
    assert strategy.discover(grid) == [0, 1, 2]
    report = strategy.begin_step(instruction, range(3), grid)
    deltas, _, _ = FlowerDelivery().plan(report.nodes, Broadcast(exp.server.arrays(instruction)))
    messages = strategy.configure_train(instruction, deltas, 1)
    report = strategy.aggregate_train(report, instruction, grid.send_and_receive(messages))
    assert report.merged == [0, 1] and [d.partition for d in report.dropped] == [2]
    assert reason in report.dropped[0].reason
    state = _copy(exp.server.state_dict())
    _, reference = _fold(first_steps, 1, {k: honest[1][k] for k in (0, 1)})
    _same_state(state, reference)


# -- the guarded merge ------------------------------------------------------------------------------
def test_a_merge_that_raises_or_leaves_nan_keeps_the_state_as_it_was(first_steps, monkeypatch):
    exp, steps, start, honest = first_steps
    exp.server.load_state_dict(start)
    sums, examples = None, 0
    for reply in honest[1].values():
        sums = add_arrays(sums, reply.summands)
        examples += reply.num_examples
    real = type(exp.server).aggregate

    def half_then_raise(self, instruction, sums_, n):
        real(self, instruction, sums_, n)  # the state has changed by now
        raise ValueError("a solve failed")

    monkeypatch.setattr(type(exp.server), "aggregate", half_then_raise)
    outcome = guarded_aggregate(exp.server, steps[1], sums, examples)
    assert not outcome.merged and "ValueError: a solve failed" in outcome.failure
    _same_state(_copy(exp.server.state_dict()), start)

    def nan_result(self, instruction, sums_, n):
        real(self, instruction, sums_, n)
        self.head_weight = self.head_weight * float("nan")

    monkeypatch.setattr(type(exp.server), "aggregate", nan_result)
    outcome = guarded_aggregate(exp.server, steps[1], sums, examples)
    assert not outcome.merged and "non-finite" in outcome.failure
    _same_state(_copy(exp.server.state_dict()), start)
    monkeypatch.setattr(type(exp.server), "aggregate", real)
    assert guarded_aggregate(exp.server, steps[1], sums, examples).merged


# -- secure mode: hostile contributions inside the public bound -------------------------------------
def _negative_diagonal(reply):
    """The first diagonal Gram with one entry -2^39: inside the public bound 2^40, so it encodes."""
    summands = dict(reply.summands)
    key = next(k for k in sorted(summands) if k.endswith(".G"))
    bad = summands[key].clone()
    bad[0] = -(2.0**39)
    summands[key] = bad
    return type(reply)(summands=summands, num_examples=reply.num_examples, metrics=dict(reply.metrics))


def _forged_count(reply):
    return type(reply)(summands=dict(reply.summands), num_examples=-(10**6), metrics=dict(reply.metrics))


def _forged_count_summand(reply):
    summands = dict(reply.summands)
    summands["head.n"] = torch.tensor(-1e6, dtype=torch.float64)
    return type(reply)(summands=summands, num_examples=reply.num_examples, metrics=dict(reply.metrics))


@pytest.fixture
def skipping_its_checks(monkeypatch):
    """A hostile client does not run its own reply checks (in this process: nobody does)."""
    monkeypatch.setattr(contribution_module, "check_reply", lambda reply, expected: None)


@pytest.mark.parametrize(
    ("hostile", "problem"),
    [
        (_negative_diagonal, "has a negative diagonal entry"),
        (_forged_count, "the total sample count"),
        (_forged_count_summand, "head.n is a count but not positive"),
    ],
)
def test_secure_in_process_a_hostile_sum_is_refused_and_the_state_kept(
    first_steps, skipping_its_checks, caplog, hostile, problem
):
    exp, steps, start, honest = first_steps
    spec = encoding_spec(apply_overrides(exp.cfg, ["secure.aggregation=true"]).secure)
    exp.server.load_state_dict(start)
    replies = {**honest[1], 2: hostile(honest[1][2])}
    with caplog.at_level(logging.WARNING, logger="fedlorm"):
        tally, contributors = fold_secure_replies(exp.server, steps[1], sorted(replies.items()), spec)
    assert contributors == [0, 1, 2] and tally.kept == "sums"
    assert any(
        problem in r.getMessage() and "previous global state stays" in r.getMessage() for r in caplog.records
    )
    _same_state(_copy(exp.server.state_dict()), start)


def test_secure_in_process_a_merge_that_fails_on_checked_sums_keeps_the_state(
    first_steps, skipping_its_checks, monkeypatch
):
    """The second line: sums that pass their checks (here: the checks switched off) and make the
    merge raise (a negative Gram diagonal) leave the state as it was."""
    exp, steps, start, honest = first_steps
    spec = encoding_spec(apply_overrides(exp.cfg, ["secure.aggregation=true"]).secure)
    monkeypatch.setattr(fold_module, "check_sums", lambda *args: None)
    exp.server.load_state_dict(start)
    replies = {**honest[1], 2: _negative_diagonal(honest[1][2])}
    tally, _ = fold_secure_replies(exp.server, steps[1], sorted(replies.items()), spec)
    assert tally.kept == "merge" and tally.examples == sum(r.num_examples for r in replies.values())
    _same_state(_copy(exp.server.state_dict()), start)


def test_secure_in_process_run_with_a_hostile_client_in_every_step_finishes(skipping_its_checks, monkeypatch):
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    exp = build_experiment(cfg)
    honest_update = type(exp.client).update

    def update(self, arrays, instruction, data, generator):
        reply = honest_update(self, arrays, instruction, data, generator)
        return _forged_count(reply) if len(data) == len(exp.client_share(instruction.task, 2)) else reply

    monkeypatch.setattr(type(exp.client), "update", update)
    results = run_simulation(cfg, experiment=exp)
    assert results["tasks_completed"] == 2
    kept = [row["state_kept"] for row in results["rounds"]]
    assert kept and all(word == "sums" for word in kept), kept


def _secure_run_config(cfg, **settings):
    return run_config_for(cfg, FlowerSettings(out="", **settings))


def _hostile_node(monkeypatch, partition, hostile, when=lambda instruction: True):
    honest = client.local_update

    def local_update(exp, k, instruction, arrays):
        reply = honest(exp, k, instruction, arrays)
        return hostile(reply) if k == partition and when(instruction) else reply

    monkeypatch.setattr(client, "local_update", local_update)


def test_secure_flower_run_with_a_negative_gram_diagonal_finishes_with_that_step_kept(
    skipping_its_checks, monkeypatch, tmp_path
):
    """Over Flower's SecAgg+: client 2 sends -2^39 on a Gram diagonal in task 1's A-round; the sum
    fails its checks, the step keeps the state (recorded in metrics and results), the run goes on."""
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    _hostile_node(monkeypatch, 2, _negative_diagonal, lambda i: (i.task, i.round) == (0, 1))
    grid = RecordingGrid(_secure_run_config(cfg), 3)
    settings = FlowerSettings(out=str(tmp_path), min_clients=2, reply_timeout=60.0, federated_eval=False)
    exp = build_experiment(cfg)
    results = run_federation(grid, exp, settings, tmp_path)
    assert results["tasks_completed"] == 2
    kept = [(row["task"], row["round"], row["state_kept"]) for row in results["rounds"]]
    assert kept[1] == (0, 1, "sums") and all(word == "" for i, (_, _, word) in enumerate(kept) if i != 1)
    assert (
        results["flower"]["steps"][1]["state_kept"] is True and results["flower"]["steps"][1]["merged"] == []
    )
    assert (tmp_path / "metrics.csv").read_text().splitlines()[2].endswith(",sums")


# -- a secure step never sums two sets of clients -------------------------------------------------------
class _Crash(BaseException):
    """The server process dies (not an Exception: nothing in the run may catch it)."""


def _crash_before_the_second_steps_checkpoint(monkeypatch, cfg, settings, out):
    """Run ``cfg`` securely until the server has folded task 1 round 2's sum, then kill it (before
    that step's checkpoint)."""
    fold = secure_step.fold_secure_sum

    def crash_at_second_step(server, instruction, *args, **kwargs):
        if (instruction.task, instruction.round) == (0, 1):
            raise _Crash
        return fold(server, instruction, *args, **kwargs)

    monkeypatch.setattr(secure_step, "fold_secure_sum", crash_at_second_step)
    with pytest.raises(_Crash):
        run_federation(RecordingGrid(_secure_run_config(cfg), 3), build_experiment(cfg), settings, out)
    monkeypatch.setattr(secure_step, "fold_secure_sum", fold)


def test_a_resumed_secure_step_sums_its_first_contributors_or_keeps_the_state(monkeypatch, tmp_path):
    """The server learns task 1 round 2's sum over clients 0-2 and dies before its checkpoint. Resumed
    with client 2 gone at masking, the step halts before any mask is removed (no unmask stage, no
    merge): the server never holds a sum over 0-1 that, with the first, would give client 2's reply."""
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    settings = FlowerSettings(out=str(tmp_path), min_clients=1, reply_timeout=60.0, federated_eval=False)
    _crash_before_the_second_steps_checkpoint(monkeypatch, cfg, settings, tmp_path)
    assert json.loads((tmp_path / SECURE_JOURNAL).read_text())["task0.round1"] == [0, 1, 2]

    first_resumed_step = []

    def lose_client_2(partition, message, reply):
        stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if stage == Stage.SETUP and partition == 0:
            first_resumed_step.append(True)
        if partition == 2 and stage == Stage.COLLECT_MASKED_VECTORS and len(first_resumed_step) == 1:
            return None
        return reply

    grid = RecordingGrid(_secure_run_config(cfg), 3, fault=lose_client_2)
    resumed = build_experiment(cfg)
    merges = []
    aggregate = resumed.server.aggregate
    monkeypatch.setattr(
        resumed.server,
        "aggregate",
        lambda i, sums, n: (merges.append((i.task, i.round)), aggregate(i, sums, n)),
    )
    results = run_federation(grid, resumed, settings, tmp_path, resume=True)
    assert results["tasks_completed"] == 2
    step = results["rounds"][1]
    assert (step["task"], step["round"], step["state_kept"]) == (0, 1, "contributors")
    assert (0, 1) not in merges
    stages = [stage for _, stage in grid.stages]
    second_setup = [i for i, s in enumerate(stages) if s == Stage.SETUP][1]
    assert Stage.UNMASK not in stages[:second_setup]  # halted before unmasking
    assert results["flower"]["steps"][1]["merged"] == [] and not (tmp_path / SECURE_JOURNAL).exists()


def test_a_resumed_secure_step_with_its_first_contributors_equals_an_uninterrupted_run(monkeypatch, tmp_path):
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    settings = FlowerSettings(
        out=str(tmp_path / "a"), min_clients=1, reply_timeout=60.0, federated_eval=False
    )
    _crash_before_the_second_steps_checkpoint(monkeypatch, cfg, settings, tmp_path / "a")
    resumed_exp = build_experiment(cfg)
    resumed = run_federation(
        RecordingGrid(_secure_run_config(cfg), 3), resumed_exp, settings, tmp_path / "a", resume=True
    )
    whole_exp = build_experiment(cfg)
    whole = run_federation(
        RecordingGrid(_secure_run_config(cfg), 3),
        whole_exp,
        FlowerSettings(out=str(tmp_path / "b"), min_clients=1, reply_timeout=60.0, federated_eval=False),
        tmp_path / "b",
    )
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert [s["merged"] for s in resumed["flower"]["steps"]] == [[0, 1, 2]] * len(resumed["flower"]["steps"])
    _same_state(_copy(resumed_exp.server.state_dict()), _copy(whole_exp.server.state_dict()))


# -- federated evaluation as a secure sum -----------------------------------------------------------
def test_secure_federated_evaluation_is_one_sum_and_nothing_per_client_reaches_the_server(
    monkeypatch, tmp_path, caplog
):
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")
    scored: dict[int, list[tuple[int, float, int]]] = {}
    honest = client.local_accuracy

    def local_accuracy(exp, partition, task, arrays):
        accuracy, examples = honest(exp, partition, task, arrays)
        scored.setdefault(task, []).append((partition, accuracy, examples))
        return accuracy, examples

    monkeypatch.setattr(client, "local_accuracy", local_accuracy)
    grid = RecordingGrid(_secure_run_config(cfg), 3)
    settings = FlowerSettings(out=str(tmp_path), min_clients=1, reply_timeout=60.0, federated_eval=True)
    with caplog.at_level(logging.DEBUG):
        results = run_federation(grid, build_experiment(cfg), settings, tmp_path)
    evaluations = results["flower"]["federated_evaluation"]
    assert [e["task"] for e in evaluations] == [0, 1]
    for evaluation in evaluations:
        clients = scored[evaluation["task"]]
        assert sorted(k for k, _, _ in clients) == [0, 1, 2]
        correct = sum(round(a * n / 100) for _, a, n in clients)
        examples = sum(n for _, _, n in clients)
        assert evaluation == {
            "task": evaluation["task"],
            "accuracy": pytest.approx(100 * correct / examples, abs=1e-12),
            "num_examples": examples,
            "partitions": [0, 1, 2],
            "secure": True,
        }
    # What reached the server: SecAgg+'s records, emptied arrays, the constant weight 1, no error.
    assert grid.replies and not any(m.has_error() for m in grid.replies)
    for message in grid.replies:
        if message.metadata.message_type == MessageType.QUERY:
            continue
        assert all(len(record) == 0 for record in message.content.array_records.values())
        assert set(message.content.config_records) <= {RECORD_KEY_CONFIGS, "fitres.metrics", "fitres.status"}
        metrics = {k: dict(r) for k, r in message.content.metric_records.items()}
        assert metrics in ({}, {"fitres.num_examples": {"num_examples": 1}})
    # Nothing per client in results.json or in the server's log: no client's own accuracy or count.
    text = (tmp_path / "results.json").read_text() + "\n".join(
        r.getMessage() for r in caplog.records if not r.name.startswith("fedlorm.flower.client")
    )
    distinct = {a for clients in scored.values() for _, a, _ in clients if abs(a - round(a)) > 1e-3}
    assert distinct  # the clients' own accuracies are not round numbers: the search below can fail
    overall = {e["accuracy"] for e in evaluations}
    forms = {form for a in distinct - overall for form in (repr(a), f"{a:.4f}", f"{a:.3f}", f"{a:.2f}")}
    assert not [form for form in forms if form in text]
    assert "accuracies" not in text


# -- done when: a Flower simulation of the smoke preset under secure aggregation ---------------------
class _Witness(InProcess):
    """The in-process secure run (the same bits as Flower's), noting every client's own values: its
    training loss and sample count per step, and its accuracy on its own data after each task."""

    def __init__(self) -> None:
        super().__init__()
        self.losses: list[float] = []
        self.accuracies: list[float] = []
        self.overall: list[float] = []

    def replies(self, exp, instruction, arrays, clients, advance=lambda n: None):
        for k, reply in InProcess.replies(exp, instruction, arrays, clients, advance):
            if "train_loss" in reply.metrics:
                self.losses.append(float(reply.metrics["train_loss"]))
            yield k, reply

    def task_end(self, exp, task):
        arrays = exp.server.deployed_arrays()
        scores = [client.local_accuracy(exp, k, task, arrays) for k in range(exp.cfg.scenario.num_clients)]
        self.accuracies += [accuracy for accuracy, _ in scores]
        correct = sum(round(accuracy * n / 100) for accuracy, n in scores)
        self.overall.append(100 * correct / sum(n for _, n in scores))


def _forms(values, *, exclude=()):
    """The ways a log or JSON file could write each value that is not a round number (4 decimals or more:
    shorter forms occur by chance in any long text)."""
    out = set()
    for value in values:
        if abs(value - round(value)) < 1e-3 or any(abs(value - other) < 1e-9 for other in exclude):
            continue
        out |= {repr(value), f"{value:.6f}", f"{value:.5f}", f"{value:.4f}", str(round(value, 6))}
    return out


def _written(form: str, text: str) -> bool:
    """``form`` appears in ``text`` as a number of its own (not inside a longer one)."""
    return re.search(rf"(?<![\d.]){re.escape(form)}(?![\d])", text) is not None


def test_a_secure_flower_simulation_of_the_smoke_preset_leaves_nothing_per_client_at_the_server(tmp_path):
    """``fedlorm flower simulate --preset smoke secure.aggregation=true`` (SuperLink, Ray, 4 SuperNodes,
    federated evaluation on) finishes, and neither results.json nor any log or output of the run holds
    a client's own accuracy or loss; the results record sums and who was in them only."""
    import subprocess
    import sys

    from fedlorm.presets import preset_config
    from fedlorm.runtime.engine import run

    out = tmp_path / "flower"
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "flwr-home"), "HF_HUB_OFFLINE": "1"}
    overrides = ["train.threads=1", "secure.aggregation=true"]
    command = [sys.executable, "-m", "fedlorm.flower", "simulate", "--preset", "smoke", "--seed", "0"]
    done = subprocess.run(
        [*command, "--out", str(out), *overrides], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    flower = results["flower"]
    assert results["tasks_completed"] == 2 and flower["dropped"] == []
    assert flower["secure_aggregation"]["protocol"].startswith("SecAgg+")
    assert all(
        set(step) == {"step", "nodes", "asked", "merged", "dropped", "state_kept", "secure"}
        for step in flower["steps"]
    )
    assert all(step["merged"] == [0, 1, 2, 3] and step["secure"] for step in flower["steps"])
    evaluations = flower["federated_evaluation"]
    assert [set(e) for e in evaluations] == [{"task", "accuracy", "num_examples", "partitions", "secure"}] * 2
    assert all(row["state_kept"] == "" for row in results["rounds"])

    # The same run in process gives the same bits, and shows what each client holds on its own.
    cfg = apply_overrides(preset_config("smoke"), overrides)
    witness = _Witness()
    local = run(build_experiment(cfg), witness)
    assert local["accuracy_matrix"] == results["accuracy_matrix"]
    assert [e["accuracy"] for e in evaluations] == pytest.approx(witness.overall, abs=1e-12)
    text = "\n".join(
        [(out / "results.json").read_text(), (out / "metrics.csv").read_text(), done.stdout, done.stderr]
        + [p.read_text(errors="replace") for p in (out / "flower-logs").glob("*")]
    )
    means = [float(r["train_loss"]) for r in results["rounds"] if r["train_loss"] != ""]
    own = _forms(witness.losses, exclude=means) | _forms(
        witness.accuracies, exclude=[e["accuracy"] for e in evaluations]
    )
    assert len(own) > 20  # the clients' values are distinctive: the search can fail
    assert not sorted(form for form in own if _written(form, text))


def _first_secure_step(cfg, fault, *, min_clients):
    """Task 0's first step as a SecAgg+ sum over 3 SuperNodes whose replies pass through ``fault``:
    the experiment, its server state before the step, the grid and the step's report."""
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    instruction = next(iter(exp.server.instructions(0, classes)))
    start = _copy(exp.server.state_dict())
    grid = RecordingGrid(_secure_run_config(cfg), 3, fault=fault)
    strategy = FedlormStrategy(exp.server, 3, min_clients, reply_timeout=30.0)
    assert strategy.discover(grid) == [0, 1, 2]
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
    report = run_secure_step(
        strategy, grid, context, exp.server, instruction, cfg.secure, server_round=1, timeout=30.0
    )
    return exp, start, grid, report


def test_a_malformed_masked_vector_stops_the_secure_sum_not_the_server(monkeypatch):
    """Client 2 answers the masking stage with bytes that are no array: SecAgg+ breaks on it, the step
    keeps the state (``halted``) and says nothing about the client but that the sum failed."""
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")

    def garbage(partition, message, reply):
        stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        if partition == 2 and stage == Stage.COLLECT_MASKED_VECTORS and not reply.has_error():
            record = reply.content.config_records[RECORD_KEY_CONFIGS]
            record[Key.MASKED_PARAMETERS] = [b"not an array"] * len(record[Key.MASKED_PARAMETERS])
        return reply

    exp, start, _, report = _first_secure_step(cfg, garbage, min_clients=1)
    assert report.kept == "halted" and report.merged == [] and report.tally is None
    assert {d.reason for d in report.dropped} == {
        "no secure sum: SecAgg+ failed on a client's message (ValueError)"
    }
    _same_state(_copy(exp.server.state_dict()), start)


def test_a_secure_step_with_fewer_contributors_than_min_clients_reveals_no_sum():
    """min-clients 3, client 2 gone at masking: the step halts before unmasking (no unmask stage, no
    merge), so the server never learns a sum over fewer clients than the run allows."""
    cfg = tiny_config("train.threads=1", "secure.aggregation=true")

    def lose_2(partition, message, reply):
        stage = message.content.config_records.get(RECORD_KEY_CONFIGS, {}).get(Key.STAGE)
        return None if partition == 2 and stage == Stage.COLLECT_MASKED_VECTORS else reply

    exp, start, grid, report = _first_secure_step(cfg, lose_2, min_clients=3)
    assert report.kept == "too-few" and report.merged == [] and report.tally is None
    assert Stage.UNMASK not in {stage for _, stage in grid.stages}
    _same_state(_copy(exp.server.state_dict()), start)


def test_the_spread_benchmark_runs_and_honest_replies_stay_100_times_inside_the_limits():
    """``benchmarks/reply_spread.py`` on the smoke preset at beta 0.05 (the measurement docs/security.md
    quotes): the largest honest ratio to the median stays a hundredth of each limit or less."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, str(root / "benchmarks" / "reply_spread.py"), "--preset", "smoke"]
    overrides = ["--methods", "lorm,fedavg", "scenario.beta=0.05", "train.threads=1"]
    proc = subprocess.run(
        [*command, *overrides],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [line["method"] for line in lines] == ["lorm", "fedavg"]
    secure = tiny_config().secure
    for line in lines:
        ratios = {group: entry["ratio"] for group, entry in line["largest_ratio_to_median_of_others"].items()}
        assert {"gram", "num_examples", "value"} <= set(ratios)
        assert (
            max(ratios["gram"], ratios["num_examples"], ratios.get("count", 1)) * 100 <= secure.spread_limit
        )
        assert ratios["value"] * 100 <= secure.value_spread_limit
        assert line["largest_per_sample_magnitude"] * 1e6 <= 2.0**secure.bound_exponent
