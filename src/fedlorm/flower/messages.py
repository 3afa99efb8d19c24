"""What travels in Flower messages: the protocol's tensors, instruction and replies as records.

A train request holds what travels of the step's broadcast (``ArrayRecord`` "arrays": the arrays the
node does not hold, or the remainder of those that grew), how each broadcast key travels
(``ConfigRecord`` "delivery": the parts of :mod:`fedlorm.runtime.delivery`) and the
:class:`Instruction` (``ConfigRecord`` "config"). Its reply holds exactly the client's summands
(``ArrayRecord`` "summands"), ``num-examples`` and local metrics (``MetricRecord`` "metrics"), and who
answered what (``ConfigRecord`` "client": partition id and the instruction it answers); or, from a
node that lacks arrays the parts refer to, only the keys it asks for again (``ConfigRecord``
"resend"). A train request without "delivery" carries the whole broadcast. Tensors cross as numpy
arrays, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import Tensor

from fedlorm.methods import ClientReply, Instruction
from fedlorm.methods.validation import InvalidReplyError
from fedlorm.runtime.delivery import FULL, Delta, Part, digest, parts_from_json, parts_to_json

__all__ = [
    "ARRAYS",
    "CLIENT",
    "CONFIG",
    "DELIVERY",
    "METRICS",
    "NUM_EXAMPLES",
    "RESEND",
    "SUMMANDS",
    "EvaluationReply",
    "TrainReply",
    "TrainRequest",
    "decode_evaluation_reply",
    "decode_train_reply",
    "decode_train_request",
    "encode_evaluation_reply",
    "encode_resend_request",
    "encode_train_reply",
    "encode_train_request",
    "from_array_record",
    "payload_bytes",
    "resend_keys",
    "to_array_record",
]

ARRAYS, CONFIG, DELIVERY, RESEND = "arrays", "config", "delivery", "resend"
PARTS = "parts"
SUMMANDS, METRICS, CLIENT = "summands", "metrics", "client"
NUM_EXAMPLES = "num-examples"
PARTITION = "partition-id"
_ECHO = ("task", "round", "phase")


def to_array_record(arrays: Mapping[str, Tensor]) -> ArrayRecord:
    """Tensors → ``ArrayRecord`` (CPU numpy copies, dtype and shape kept)."""
    return ArrayRecord({key: Array(value.detach().cpu().numpy()) for key, value in arrays.items()})


def payload_bytes(record: ArrayRecord) -> int:
    """Tensor payload of a record, Σ numel·itemsize: the simulator's byte count of the same arrays.

    ``ArrayRecord.count_bytes`` also counts each array's serialisation header and the keys, so it
    is not used here.
    """
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in record.values())


def from_array_record(record: ArrayRecord) -> dict[str, Tensor]:
    """``ArrayRecord`` → CPU tensors; ValueError for arrays torch cannot hold."""
    out: dict[str, Tensor] = {}
    for key, array in record.items():
        values = np.array(array.numpy(), copy=True)
        out[key] = torch.from_numpy(values)
    return out


@dataclass
class TrainRequest:
    """A decoded train request: the step, how each broadcast key travels, and what travelled."""

    instruction: Instruction
    parts: dict[str, Part]
    arrays: dict[str, Tensor]


@dataclass
class TrainReply:
    """A decoded train reply: who sent it, which step it answers, and the protocol reply."""

    partition: int
    task: int
    round: int
    phase: str
    reply: ClientReply


@dataclass
class EvaluationReply:
    """A decoded evaluate reply: a client's accuracy on its own data of the tasks seen so far."""

    partition: int
    accuracy: float
    num_examples: int


def encode_train_request(instruction: Instruction, delta: Delta) -> RecordDict:
    """Request content for a train message.

    Args:
        instruction: The step.
        delta: What the node is sent of the step's broadcast.

    Returns:
        The records "arrays", "delivery" and "config".
    """
    return RecordDict(
        {
            ARRAYS: to_array_record(delta.arrays),
            DELIVERY: ConfigRecord({PARTS: parts_to_json(delta.parts)}),
            CONFIG: ConfigRecord(instruction.to_record()),
        }
    )


def decode_train_request(content: RecordDict) -> TrainRequest:
    """Inverse of :func:`encode_train_request`.

    A request without a "delivery" record carries the whole broadcast, every array in full.

    Args:
        content: A train message's content.

    Returns:
        The step, every broadcast key's part and the arrays that travelled.

    Raises:
        ValueError: Or KeyError, TypeError, if the content is malformed.
    """
    instruction = Instruction.from_record(content.config_records[CONFIG])  # type: ignore[arg-type]
    arrays = from_array_record(content.array_records[ARRAYS])
    if DELIVERY not in content.config_records:
        whole = {key: Part(FULL, digest(value), tuple(value.shape)) for key, value in arrays.items()}
        return TrainRequest(instruction, whole, arrays)
    parts = parts_from_json(str(content.config_records[DELIVERY][PARTS]))
    return TrainRequest(instruction, parts, arrays)


def encode_resend_request(keys: list[str]) -> RecordDict:
    """Reply content of a node that lacks arrays a train message refers to.

    Args:
        keys: The broadcast keys it lacks (to be sent again in full).

    Returns:
        The record "resend".
    """
    return RecordDict({RESEND: ConfigRecord({"keys": sorted(keys)})})


def resend_keys(message: Message) -> list[str] | None:
    """The keys a train reply asks for again.

    Args:
        message: A reply to a train message.

    Returns:
        The keys, or None if the reply is no resend request (an error reply is none).
    """
    if message.has_error():
        return None
    record = message.content.config_records.get(RESEND)
    if record is None:
        return None
    keys = record.get("keys", [])
    return [str(k) for k in keys] if isinstance(keys, list) else []


def encode_train_reply(partition: int, instruction: Instruction, reply: ClientReply) -> RecordDict:
    """Reply content for a train message."""
    metrics: dict[str, int | float] = {NUM_EXAMPLES: int(reply.num_examples)}
    metrics.update({key: float(value) for key, value in reply.metrics.items()})
    client = ConfigRecord({PARTITION: int(partition), **{k: instruction.to_record()[k] for k in _ECHO}})
    return RecordDict(
        {SUMMANDS: to_array_record(reply.summands), METRICS: MetricRecord(metrics), CLIENT: client}
    )


def decode_train_reply(content: RecordDict) -> TrainReply:
    """Inverse of :func:`encode_train_reply`; :class:`InvalidReplyError` for anything malformed."""
    try:
        summands = from_array_record(content.array_records[SUMMANDS])
        metrics = dict(content.metric_records[METRICS])
        client = content.config_records[CLIENT]
        partition, task, rnd, phase = (client[PARTITION], client["task"], client["round"], client["phase"])
    except (KeyError, TypeError, ValueError) as err:
        raise InvalidReplyError(f"malformed train reply: {type(err).__name__}: {err}") from None
    num_examples = metrics.pop(NUM_EXAMPLES, None)
    if not isinstance(num_examples, int) or isinstance(num_examples, bool):
        raise InvalidReplyError(f"{NUM_EXAMPLES} = {num_examples!r}; expected an integer")
    if not all(isinstance(v, int) for v in (partition, task, rnd)) or not isinstance(phase, str):
        raise InvalidReplyError("malformed train reply: partition/task/round/phase have wrong types")
    try:
        scalars = {k: float(v) for k, v in metrics.items()}  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise InvalidReplyError("malformed train reply: a metric is not a number") from None
    reply = ClientReply(summands=summands, num_examples=num_examples, metrics=scalars)
    return TrainReply(partition=partition, task=task, round=rnd, phase=phase, reply=reply)


def encode_evaluation_reply(partition: int, accuracy: float, num_examples: int) -> RecordDict:
    """Reply content for an evaluate message."""
    return RecordDict(
        {
            METRICS: MetricRecord({"accuracy": float(accuracy), NUM_EXAMPLES: int(num_examples)}),
            CLIENT: ConfigRecord({PARTITION: int(partition)}),
        }
    )


def decode_evaluation_reply(content: RecordDict) -> EvaluationReply:
    """Inverse of :func:`encode_evaluation_reply`; :class:`InvalidReplyError` for anything malformed."""
    try:
        metrics = content.metric_records[METRICS]
        partition = content.config_records[CLIENT][PARTITION]
        accuracy, num_examples = metrics["accuracy"], metrics[NUM_EXAMPLES]
    except (KeyError, TypeError) as err:
        raise InvalidReplyError(f"malformed evaluate reply: {type(err).__name__}: {err}") from None
    if not isinstance(partition, int) or not isinstance(num_examples, int):
        raise InvalidReplyError("malformed evaluate reply: partition or num-examples is not an integer")
    if not (isinstance(accuracy, int | float) and 0.0 <= float(accuracy) <= 100.0):
        raise InvalidReplyError(f"evaluate reply: accuracy {accuracy!r} is not a percentage")
    return EvaluationReply(partition=partition, accuracy=float(accuracy), num_examples=num_examples)
