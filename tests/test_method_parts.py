"""The method layer's typed parts: step phases and their one label, reply specs by kind, registry."""

from __future__ import annotations

import pytest
import torch

from fedlorm.methods import METHODS, ClientReply, Factor, Instruction, Kind, Phase, Summand, step_label
from fedlorm.methods.registry import CROSS_TASK_RULES, HEADS
from fedlorm.methods.validation import InvalidReplyError, check_reply

F64 = torch.float64


@pytest.mark.parametrize(
    ("phase", "round_", "factor", "label", "stable"),
    [
        ("train", 1, "A", "round 2 (A)", "task0.round1"),
        ("train", 0, "both", "round 1 (A+B)", "task0.round0"),
        ("train", 0, "none", "round 1 (head)", "task0.round0"),
        ("task_stats", -1, "none", "layer statistics", "task0.stats"),
        ("head_stats", -1, "none", "head statistics", "task0.head"),
    ],
)
def test_every_step_is_labelled_by_what_it_is(phase, round_, factor, label, stable):
    step = Instruction(0, round_, phase, factor, 0, 5)
    assert step_label(step) == label
    assert step_label(step, stable=True) == stable


def test_instruction_phases_are_enums_that_travel_as_their_strings():
    step = Instruction(1, -1, "head_stats", "none", 5, 10)
    assert step.phase is Phase.HEAD_STATS and step.factor is Factor.NONE
    assert step.phase == "head_stats"  # runtime code compares with the plain strings
    record = step.to_record()
    assert record["phase"] == "head_stats" and type(record["phase"]) is str
    assert Instruction.from_record(record) == step
    with pytest.raises(ValueError):
        Instruction(0, 0, "warmup", "A", 0, 5)


def test_the_spec_says_what_an_array_is_whatever_its_name():
    not_psd = torch.diag(torch.tensor([1.0, -1.0], dtype=F64))
    reply = ClientReply({"x": not_psd, "y.G": not_psd}, 3)
    spec = {"x": Summand((2, 2), F64, Kind.GRAM), "y.G": Summand((2, 2), F64, Kind.VALUE)}
    with pytest.raises(InvalidReplyError, match="x is a Gram but not positive semi-definite"):
        check_reply(reply, spec)
    check_reply(ClientReply({"y.G": not_psd}, 3), {"y.G": spec["y.G"]})
    with pytest.raises(InvalidReplyError, match="c is a sample count"):
        check_reply(ClientReply({"c": torch.tensor(0.0, dtype=F64)}, 3), {"c": Summand((), F64, Kind.COUNT)})


def test_registry_entries_name_their_parts():
    task_lora = {name for name, m in METHODS.items() if m.within_task is not None}
    assert task_lora == set(METHODS) - {"finetune", "joint", "lwf", "ewc", "l2p", "coda-p"}
    assert METHODS["head-only"].within_task is not None
    assert not METHODS["head-only"].within_task.trains_adapters
    assert METHODS["lorm-fsa"].adapt_tasks == 1
    assert set(HEADS) == {"fedavg", "regmean", "analytic", "ccvr"}
    assert set(CROSS_TASK_RULES) == {"closed_form", "simple_mean", "task_arithmetic", "ties"}
