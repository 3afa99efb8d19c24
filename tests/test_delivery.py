"""Each step sends a client only what it does not hold: the delta codec, its ledger, and both runtimes.

The codec (:mod:`fedlorm.runtime.delivery`) is checked on hand-made broadcasts: every rebuilt array
is the broadcast's, bit for bit, whatever the client held; a client that lacks what a part refers to
is told which keys. Over a loopback Flower grid (the real strategy, federation loop and ClientApp),
runs equal the in-process run in accuracies, rows (download bytes included) and server state, also
when a client's SuperNode is replaced by a fresh one mid-run or loses its node state: the fresh node
gets the whole broadcast, the one that lost its state asks again, and both are reported apart.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config
from reference_runs import assert_equals_reference

pytest.importorskip("flwr")

from flwr.app import Context, MessageType, RecordDict

from fedlorm.flower import clientapp
from fedlorm.flower.delivery import ASKED, NEW_TO_NODE
from fedlorm.flower.federation import run_federation
from fedlorm.flower.local_grid import LocalGrid
from fedlorm.flower.messages import ARRAYS, DELIVERY, resend_keys
from fedlorm.flower.node_state import HELD_ARRAYS
from fedlorm.flower.settings import FlowerSettings, run_config_for
from fedlorm.runtime.delivery import (
    EXTEND,
    FULL,
    HELD,
    Broadcast,
    Ledger,
    MissingBaseError,
    assemble,
    digest,
    parts_from_json,
    parts_to_json,
)
from fedlorm.runtime.experiment import build_experiment

F32, F64 = torch.float32, torch.float64
NODE0 = 301


def _rand(*shape: int, seed: int, dtype: torch.dtype = F32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _steps() -> list[dict[str, torch.Tensor]]:
    """Four broadcasts: B and A alternate, the earlier factors grow (B by columns, A by rows), a key
    comes and goes, one array changes dtype and one shrinks."""
    a0, a1, b1 = _rand(2, 6, seed=1), _rand(2, 6, seed=2), _rand(5, 2, seed=3)
    eb, ea = _rand(5, 2, seed=4), _rand(2, 6, seed=5)
    eb2, ea2 = torch.cat([eb, _rand(5, 2, seed=6)], 1), torch.cat([ea, _rand(2, 6, seed=7)], 0)
    return [
        {"l.lora_A": a0, "l.lora_B": torch.zeros(5, 2), "head": _rand(3, seed=8)},
        {"l.lora_A": a0, "l.lora_B": b1, "head": _rand(3, seed=9), "l.earlier_B": eb, "l.earlier_A": ea},
        {"l.lora_A": a1, "l.lora_B": b1, "head": _rand(3, seed=9, dtype=F64), "l.earlier_B": eb2,
         "l.earlier_A": ea2},
        {"l.lora_A": a1[:1], "l.lora_B": b1, "l.earlier_B": eb2, "l.earlier_A": ea2},
    ]  # fmt: skip


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def test_the_rebuilt_broadcast_is_the_sent_one_bit_for_bit_and_only_what_changed_travels():
    ledger = Ledger()
    held: dict[str, torch.Tensor] = {}
    digests: dict[str, str] = {}
    forms = []
    for step, arrays in enumerate(_steps()):
        broadcast = Broadcast(arrays)
        delta = ledger.plan(0, broadcast)
        parts = parts_from_json(parts_to_json(delta.parts))  # as a message carries them
        rebuilt = assemble(parts, delta.arrays, held, digests)
        assert rebuilt.keys() == arrays.keys()
        for key, value in arrays.items():
            assert rebuilt[key].dtype == value.dtype and torch.equal(rebuilt[key], value), (step, key)
        assert delta.payload_bytes == sum(_bytes(t) for t in delta.arrays.values())
        forms.append({key: part.form for key, part in parts.items()})
        ledger.delivered(0, broadcast)
        held.update(rebuilt)
        digests.update({key: part.digest for key, part in parts.items()})
    assert forms[0] == dict.fromkeys(_steps()[0], FULL)
    assert forms[1] == {
        "l.lora_A": HELD,
        "l.lora_B": FULL,
        "head": FULL,
        "l.earlier_B": FULL,
        "l.earlier_A": FULL,
    }
    # The earlier factors grew: only the new column block of B and row block of A travel; the head
    # changed dtype (float64 now): it travels whole.
    assert forms[2] == {
        "l.lora_A": FULL,
        "l.lora_B": HELD,
        "head": FULL,
        "l.earlier_B": EXTEND,
        "l.earlier_A": EXTEND,
    }
    # A shrunk array is no extension; what a client holds under a key the step does not carry stays.
    assert forms[3] == {"l.lora_A": FULL, "l.lora_B": HELD, "l.earlier_B": HELD, "l.earlier_A": HELD}
    assert "head" in ledger.holdings(0)
    steps = _steps()
    grown = ledger.plan(1, Broadcast(steps[1]))  # another client, which holds nothing
    assert grown.payload_bytes == sum(_bytes(t) for t in steps[1].values())


def test_an_extension_sends_exactly_the_new_block():
    old, new = _steps()[1], _steps()[2]
    ledger = Ledger()
    ledger.delivered(0, Broadcast(old))
    delta = ledger.plan(0, Broadcast(new))
    assert delta.parts["l.earlier_B"].dim == 1 and delta.parts["l.earlier_A"].dim == 0
    assert torch.equal(delta.arrays["l.earlier_B"], new["l.earlier_B"][:, 2:])
    assert torch.equal(delta.arrays["l.earlier_A"], new["l.earlier_A"][2:])
    assert delta.parts["l.earlier_B"].base == digest(old["l.earlier_B"])


def test_a_client_that_lacks_a_base_is_told_which_keys_and_a_resend_of_them_rebuilds_the_broadcast():
    old, new = _steps()[1], _steps()[2]
    ledger = Ledger()
    ledger.delivered(0, Broadcast(old))
    broadcast = Broadcast(new)
    delta = ledger.plan(0, broadcast)
    with pytest.raises(MissingBaseError) as lacking:  # a fresh client holds nothing
        assemble(delta.parts, delta.arrays, {}, {})
    assert lacking.value.keys == ["l.earlier_A", "l.earlier_B", "l.lora_B"]
    # It holds something else under those keys (another run's arrays): the same answer.
    other = {key: value + 1 for key, value in old.items()}
    with pytest.raises(MissingBaseError) as stale:
        assemble(delta.parts, delta.arrays, other, {key: digest(v) for key, v in other.items()})
    assert stale.value.keys == lacking.value.keys
    again = ledger.plan(0, broadcast, lacking=lacking.value.keys)
    assert {again.parts[key].form for key in lacking.value.keys} == {FULL}
    rebuilt = assemble(again.parts, again.arrays, {}, {})
    assert all(torch.equal(rebuilt[key], value) for key, value in new.items())
    # A held array whose bits differ from what its recorded digest says is caught when it is extended.
    corrupt = {**old, "l.earlier_B": old["l.earlier_B"].clone()}
    corrupt["l.earlier_B"][0, 0] += 1
    with pytest.raises(MissingBaseError, match=r"l\.earlier_B"):
        assemble(delta.parts, delta.arrays, corrupt, {key: digest(v) for key, v in old.items()})


def test_a_malformed_delta_is_a_value_error():
    ledger, broadcast = Ledger(), Broadcast(_steps()[0])
    delta = ledger.plan(0, broadcast)
    with pytest.raises(ValueError, match="did not travel"):
        assemble(delta.parts, {}, {}, {})
    forged = {**delta.arrays, "head": delta.arrays["head"] + 1}
    with pytest.raises(ValueError, match="does not match its digest"):
        assemble(delta.parts, forged, {}, {})
    with pytest.raises(ValueError, match="without a part"):
        assemble(delta.parts, {**delta.arrays, "x": torch.ones(1)}, {}, {})
    with pytest.raises(ValueError, match="malformed broadcast parts"):
        parts_from_json('{"a": [1, 2]}')
    with pytest.raises(ValueError, match="unknown part form"):
        parts_from_json('{"a": ["maybe", "d", [1], "", -1]}')


def test_digests_tell_dtype_shape_and_bits_apart():
    x = torch.zeros(2, 3)
    assert digest(x) == digest(torch.zeros(2, 3)) and len(digest(x)) == 32
    assert len({digest(x), digest(x.reshape(3, 2)), digest(x.double()), digest(x.int())}) == 4
    y = x.clone()
    y[1, 2] = -0.0  # the same value, another bit pattern
    assert digest(y) != digest(x)
    assert digest(torch.ones(2, 4)[:, 1:3]) == digest(torch.ones(2, 2))  # a view counts by its values


def test_the_ledger_survives_its_record_and_a_forgotten_client_gets_everything():
    steps = _steps()
    ledger = Ledger()
    for k in (0, 1, 2):
        ledger.delivered(k, Broadcast(steps[0]))
    ledger.delivered(2, Broadcast(steps[1]))
    record = ledger.to_record()
    assert len(record["holdings"]) == 2 and record["clients"] == {"0": 0, "1": 0, "2": 1}
    restored = Ledger.from_record(record)
    for k in (0, 1, 2, 3):
        assert restored.holdings(k) == ledger.holdings(k)
        assert restored.plan(k, Broadcast(steps[2])).parts == ledger.plan(k, Broadcast(steps[2])).parts
    restored.forget(2)
    assert restored.plan(2, Broadcast(steps[1])).payload_bytes == sum(_bytes(t) for t in steps[1].values())
    assert Ledger.from_record({}).holdings(0) == {}
    with pytest.raises(ValueError, match="not a delivery ledger"):
        Ledger.from_record({"holdings": [], "clients": {"0": 3}})


# -- over Flower ------------------------------------------------------------------------------------
@pytest.fixture(autouse=True)
def _flower_process(flower_process):
    """Every test here runs as in a Flower process (conftest.flower_process)."""


class ChangingGrid(LocalGrid):
    """SuperNodes NODE0.. in process; once step ``at - 1`` (1-based, Flower's message group) has sent
    its train messages, the next look at the connected nodes (the start of step ``at``) runs
    ``change(grid)`` first. Records every train request and reply as (step, node, request, reply)."""

    def __init__(self, run_config, partitions, at, change):
        super().__init__(clientapp.app, run_config, partitions, first_node=NODE0)
        self.at, self.change, self.trains, self.last, self.changed = at, change, [], 0, False

    def get_node_ids(self):
        if self.last == self.at - 1 and not self.changed:
            self.changed = True
            self.change(self)
        return super().get_node_ids()

    def deliver(self, message, context):
        reply = super().deliver(message, context)
        if message.metadata.message_type == MessageType.TRAIN:
            self.last = int(message.metadata.group_id)
            self.trains.append((self.last, context.node_id, message, reply))
        return reply


def _replace_node(grid, old=NODE0 + 1, new=NODE0 + 7):
    """Client 1's SuperNode goes away; a fresh one (new id, empty node state) serves it instead."""
    context = grid.contexts.pop(old)
    config, run_config = dict(context.node_config), dict(context.run_config)
    grid.contexts[new] = Context(
        run_id=1, node_id=new, node_config=config, state=RecordDict(), run_config=run_config
    )


def _wipe_state(grid, node=NODE0 + 1):
    """Client 1's SuperNode keeps its id but loses everything it held (its node state)."""
    grid.contexts[node].state = RecordDict()


RUN = ("train.threads=1", "scenario.tasks=5", "train.batch_size=4")
"""Five tasks: the earlier tasks' factors grow four times, so they travel as extensions (batches of 4
give B several steps a round: with one, it gets no gradient through the new, zero head rows)."""


def _flower_run(cfg, grid, tmp_path):
    exp = build_experiment(cfg)
    settings = FlowerSettings(out=str(tmp_path), min_clients=3, reply_timeout=30.0, federated_eval=False)
    return exp, run_federation(grid, exp, settings, tmp_path)


def _travelled(request) -> int:
    """Bytes of the arrays a train request carries."""
    return sum(a.numpy().nbytes for a in request.content.array_records[ARRAYS].values())


def _sent_keys(request) -> dict[str, str]:
    parts = parts_from_json(str(request.content.config_records[DELIVERY]["parts"]))
    return {key: part.form for key, part in parts.items()}


@pytest.mark.parametrize("change", ["fresh-node", "lost-state", "none"])
def test_a_flower_run_sends_deltas_and_equals_the_in_process_run_whatever_a_node_lost(
    change, tmp_path, reference_run
):
    cfg = tiny_config(*RUN)
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    at = 7  # task 2's first round: the earlier factors grow
    how = {"fresh-node": _replace_node, "lost-state": _wipe_state, "none": lambda grid: None}[change]
    grid = ChangingGrid(run_config, range(3), at, how)
    exp, flower = _flower_run(cfg, grid, tmp_path)
    reference = reference_run(cfg)

    assert flower["flower"]["dropped"] == [] and all(
        s["merged"] == [0, 1, 2] for s in flower["flower"]["steps"]
    )
    assert_equals_reference(flower, exp.server.state_dict(), reference, exact_accuracy=True, traffic=True)
    rows = flower["rounds"]
    assert [(r["task"], r["phase"]) for r in rows][at - 1] == (2, "train")
    # Nodes are sent deltas: the earlier tasks' factors grow by extension once a task.
    first = {node: _sent_keys(request) for group, node, request, _ in grid.trains if group == at}
    earlier = {form for key, form in first[NODE0].items() if ".earlier_" in key}
    assert EXTEND in earlier and HELD not in earlier
    resent = flower["flower"]["resent"]
    if change == "none":
        assert resent == []
        return
    (record,) = resent
    assert (record["task"], record["phase"], record["partition"]) == (2, "train", 1)
    client_1 = [(node, request, reply) for group, node, request, reply in grid.trains if group == at]
    client_1 = [(node, request, reply) for node, request, reply in client_1 if node in (NODE0 + 1, NODE0 + 7)]
    if change == "fresh-node":
        # The server knows the new node holds nothing: one message, the whole broadcast.
        assert record["node_id"] == NODE0 + 7 and record["reason"] == NEW_TO_NODE
        ((_, request, reply),) = client_1
        assert set(_sent_keys(request).values()) == {FULL} and resend_keys(reply) is None
        node_0 = next(r for group, node, r, _ in grid.trains if group == at and node == NODE0)
        assert record["bytes"] == _travelled(request) - _travelled(node_0) > 0
    else:
        # The node asks again for what it lacks, and gets it.
        assert record["node_id"] == NODE0 + 1 and record["reason"] == ASKED
        (_, asked, asking), (_, again, answer) = client_1
        lacking = resend_keys(asking)
        assert lacking and all(_sent_keys(asked)[key] in (HELD, EXTEND) for key in lacking)
        assert {_sent_keys(again)[key] for key in lacking} == {FULL} and resend_keys(answer) is None
        assert record["bytes"] == _travelled(again) > 0
    # From then on the node holds what the others hold: no more extra traffic, same deltas.
    later = [(node, _sent_keys(request)) for group, node, request, _ in grid.trains if group > at]
    forms = {}
    for node, keys in later:
        forms.setdefault(node, []).append(keys)
    assert len({str(v) for v in forms.values()}) == 1
    assert HELD_ARRAYS in grid.contexts[NODE0 + (7 if change == "fresh-node" else 1)].state.array_records


def test_a_secure_flower_run_sends_a_fresh_node_everything_and_equals_the_in_process_secure_run(
    tmp_path, reference_run
):
    """Under secure aggregation a node cannot ask again (SecAgg+ does not wait); the server knows a
    fresh node holds nothing and sends it the whole broadcast, so the sums stay the in-process ones."""
    cfg = tiny_config(*RUN, "secure.aggregation=true")
    run_config = run_config_for(cfg, FlowerSettings(out="", federated_eval=False))
    at = 7
    grid = ChangingGrid(run_config, range(3), at, _replace_node)
    exp, flower = _flower_run(cfg, grid, tmp_path)

    assert all(s["secure"] and s["merged"] == [0, 1, 2] for s in flower["flower"]["steps"])
    assert_equals_reference(
        flower, exp.server.state_dict(), reference_run(cfg), exact_accuracy=True, traffic=True
    )
    (record,) = flower["flower"]["resent"]
    assert (record["task"], record["partition"], record["node_id"]) == (2, 1, NODE0 + 7)
    assert record["reason"] == NEW_TO_NODE and record["bytes"] > 0
    assert not any(reply.has_error() for *_, reply in grid.trains)
