"""Server-side reply validation: every rejection kind, and what a rejection does to the merge."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedlorm.methods import ClientReply, add_arrays
from fedlorm.methods.replies import Kind, Summand
from fedlorm.methods.validation import InvalidReplyError, check_reply
from fedlorm.runtime.engine import fold_replies, step_clients
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import InProcess
from fedlorm.seeding import torch_generator

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads per process cost 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _gram(d: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(3 * d, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x.T @ x


def _reply(**changes) -> ClientReply:
    summands = {
        "layer.M": torch.ones(4, 2, dtype=F64),
        "layer.H": _gram(2),
        "layer.G": _gram(3).diagonal().clone(),
        "head.G": _gram(5, seed=1),
        "head.n": torch.tensor(7.0, dtype=F64),
    }
    num_examples = changes.pop("num_examples", 7)
    for key, value in changes.items():
        key = key.replace("__", ".")
        if value is None:
            del summands[key]
        else:
            summands[key] = value
    return ClientReply(summands, num_examples)


SPEC = {
    "layer.M": Summand((4, 2)),
    "layer.H": Summand((2, 2), kind=Kind.GRAM),
    "layer.G": Summand((3,), kind=Kind.GRAM),
    "head.G": Summand((5, 5), kind=Kind.GRAM),
    "head.n": Summand((), kind=Kind.COUNT),
}


def _not_psd() -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(2), dtype=F64))
    return q @ torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0, -0.5], dtype=F64)) @ q.T


@pytest.mark.parametrize(
    ("reply", "fragment"),
    [
        (_reply(layer__M=torch.full((4, 2), float("nan"), dtype=F64)), "layer.M holds NaN or Inf"),
        (_reply(layer__H=torch.tensor([[1.0, 0.0], [0.0, float("inf")]], dtype=F64)), "layer.H holds NaN"),
        (_reply(layer__M=torch.ones(4, 3, dtype=F64)), "layer.M has shape (4, 3); expected (4, 2)"),
        (_reply(layer__M=torch.ones(4, 2)), "layer.M has dtype torch.float32; expected torch.float64"),
        (_reply(layer__M=None), "missing ['layer.M']"),
        (_reply(layer__X=torch.ones(1, dtype=F64)), "extra ['layer.X']"),
        (_reply(head__G=_not_psd()), "head.G is a Gram but not positive semi-definite"),
        (_reply(head__G=_gram(5) + torch.triu(torch.ones(5, 5, dtype=F64), 1)), "not symmetric"),
        (_reply(layer__G=torch.tensor([1.0, -2.0, 3.0], dtype=F64)), "diagonal Gram with negative"),
        (_reply(head__n=torch.tensor(0.0, dtype=F64)), "head.n is a sample count but is not positive"),
        (_reply(num_examples=0), "num_examples = 0"),
        (_reply(num_examples=True), "num_examples = True"),
        (_reply(num_examples=2.5), "num_examples = 2.5"),
        (_reply(layer__M=[[1.0, 2.0]]), "layer.M is a list, not a tensor"),
    ],
    ids=[
        "nan",
        "inf",
        "shape",
        "dtype",
        "missing-key",
        "extra-key",
        "gram-not-psd",
        "gram-not-symmetric",
        "diag-gram-negative",
        "count-zero",
        "num-examples-zero",
        "num-examples-bool",
        "num-examples-float",
        "not-a-tensor",
    ],
)
def test_each_kind_of_bad_reply_is_rejected_with_its_reason(reply, fragment):
    with pytest.raises(InvalidReplyError) as info:
        check_reply(reply, SPEC)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_the_spec_fixes_the_checks_and_values_are_checked_whatever_it_says():
    check_reply(_reply(), SPEC)
    integers = {**SPEC, "layer.M": Summand((4, 2), torch.int64)}
    with pytest.raises(InvalidReplyError, match="floating-point"):
        check_reply(_reply(layer__M=torch.ones(4, 2, dtype=torch.int64)), integers)
    wide = {**SPEC, "head.G": Summand((2, 3), kind=Kind.GRAM)}
    with pytest.raises(InvalidReplyError, match="expected a square matrix"):
        check_reply(_reply(head__G=torch.ones(2, 3, dtype=F64)), wide)
    # The kind comes from the spec, not from the key: a "value" named like a Gram is not PSD-checked.
    check_reply(_reply(head__G=_not_psd()), {**SPEC, "head.G": Summand((5, 5))})
    with pytest.raises(InvalidReplyError, match="not positive semi-definite"):
        check_reply(_reply(head__G=_not_psd()), SPEC)


def test_a_psd_gram_with_rounding_noise_and_a_zero_gram_pass():
    x = torch.randn(1000, 6, generator=torch.Generator().manual_seed(3), dtype=F64)
    x[:, 5] = x[:, 4]  # singular: one eigenvalue is 0 up to rounding
    check_reply(_reply(head__G=torch.zeros(5, 5, dtype=F64)), SPEC)
    check_reply(ClientReply({"a.G": x.T @ x}, 1), {"a.G": Summand((6, 6), kind=Kind.GRAM)})


# ----------------------------------------------------------------------------- in the engine


@pytest.fixture(scope="module", params=["lorm", "finetune"])
def first_round(request):
    """An experiment at the start of task 1 and the honest replies of its first round."""
    exp = build_experiment(tiny_config(f"method={request.param}", "train.rounds=1"))
    server, classes = exp.server, exp.scenario.task_classes(0)
    server.start_task(0, classes, torch_generator(0, "server"))
    instruction = next(iter(server.instructions(0, classes)))
    arrays, clients = exp.server.arrays(instruction), step_clients(exp.cfg, instruction)
    replies = list(InProcess.replies(exp, instruction, arrays, clients))
    return exp, instruction, replies, _copy(server.state_dict())


def _copy(state):
    return {k: v.clone() for k, v in state.items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _poison(reply: ClientReply, how: str) -> ClientReply:
    summands = dict(reply.summands)
    key = next(k for k in summands if k.endswith("lora_A") or k.endswith(".M"))
    value = summands[key].clone()
    if how == "nan":
        value.view(-1)[0] = float("nan")
    elif how == "inf":
        value.view(-1)[-1] = float("-inf")
    elif how == "shape":
        value = value[:, :-1]
    else:
        value = value.float()
    summands[key] = value
    return ClientReply(summands, reply.num_examples, reply.metrics)


@pytest.mark.parametrize("how", ["nan", "inf", "shape", "dtype"])
def test_a_rejected_client_is_left_out_of_the_merge(first_round, how):
    exp, instruction, replies, start = first_round
    server = exp.server
    server.load_state_dict(start)
    expected = server.expected_reply(instruction)
    for _, reply in replies:
        check_reply(reply, expected)  # honest replies always pass
    bad = [replies[0], (1, _poison(replies[1][1], how)), replies[2]]
    tally = fold_replies(server, instruction, bad)
    assert (tally.clients, tally.rejected) == (3, 1)
    assert tally.examples == replies[0][1].num_examples + replies[2][1].num_examples
    merged = _copy(server.state_dict())

    server.load_state_dict(start)
    sums = add_arrays(add_arrays(None, replies[0][1].summands), replies[2][1].summands)
    server.aggregate(instruction, sums, tally.examples)
    _assert_same_state(merged, server.state_dict())


def test_all_clients_rejected_keeps_the_previous_state(first_round):
    exp, instruction, replies, start = first_round
    server = exp.server
    server.load_state_dict(start)
    tally = fold_replies(server, instruction, [(k, _poison(r, "nan")) for k, r in replies])
    assert tally.rejected == 3 and tally.examples == 0
    _assert_same_state(server.state_dict(), start)


def test_the_simulator_drops_a_poisoned_client(first_round, monkeypatch, caplog):
    exp, instruction, replies, start = first_round
    server = exp.server
    server.load_state_dict(start)
    honest = exp.client.update
    calls = []

    def update(arrays, instr, data, generator):
        reply = honest(arrays, instr, data, generator)
        calls.append(len(calls))
        return _poison(reply, "nan") if len(calls) == 2 else reply

    monkeypatch.setattr(exp.client, "update", update)
    tally = InProcess().run_step(exp, instruction, step_clients(exp.cfg, instruction), _ignore)
    assert (tally.clients, tally.rejected) == (3, 1)
    assert "client 1 rejected" in caplog.text and "holds NaN or Inf" in caplog.text
    merged = _copy(server.state_dict())

    server.load_state_dict(start)
    sums = add_arrays(add_arrays(None, replies[0][1].summands), replies[2][1].summands)
    server.aggregate(instruction, sums, replies[0][1].num_examples + replies[2][1].num_examples)
    _assert_same_state(merged, server.state_dict())


def _ignore(finished: int) -> None:
    """A progress callback that shows nothing."""
