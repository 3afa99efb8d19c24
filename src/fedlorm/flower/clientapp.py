"""The Flower ClientApp: one fedlorm client per SuperNode, its data share named by ``node_config``.

Every SuperNode sets ``partition-id`` (0-based) and ``num-partitions`` (= the run's clients).
``query`` tells the server which client this node serves; ``train`` runs one protocol step with the
in-process simulator's client code and replies with the summands (under secure aggregation, Flower's
``secaggplus_mod`` wraps it and the summands go out encoded and masked); ``evaluate`` reports the broadcast
model's class-IL accuracy on the client's own training shares of the tasks seen so far. Under secure
aggregation the evaluation arrives as a secure ``train`` message instead, and the node encodes only
(correct predictions, examples) into the secure sum.

A ``train`` message carries only what the node does not hold of the step's broadcast; the node
rebuilds the rest from what it kept of earlier steps (:mod:`fedlorm.flower.node_state`) and keeps the
step's broadcast once it has answered. A node that lacks what a message refers to (a fresh or
restarted node) answers a plain step with a resend request, and the server sends the arrays again;
in a secure step it refuses with ``protocol`` (SecAgg+ cannot wait), and the server sends it
everything in the next step.

A SuperNode may also set ``data-dir``: its own folder written by ``fedlorm partition``
(docs/partitions.md), which it then reads instead of loading the datasets. A node without
``data-dir`` reads ``client-K`` inside the run config's ``client-data`` folder when that is set
(simulation, where virtual SuperNodes get no node config of their own). A node that cannot set
up (a bad folder, a config or partition that does not fit) answers with an error reply saying
``setup`` and logs the one-line reason itself; the server logs and drops the node's reply. Every
error reply of this ClientApp carries one fixed word (:data:`fedlorm.flower.policy.REFUSALS`), and a
node whose node config sets ``require-secure=true`` refuses every plain ``train`` and ``evaluate``
message (``policy``).

In deployment each message runs in a fresh process, so torch and the experiment are loaded only by
the handlers that need them (:mod:`fedlorm.flower.client`), not by the identity query; a node without
``data-dir`` loads the dataset only for its first message and then reads its own shares from the
node cache (:mod:`fedlorm.flower.node_cache`, where it lives and how to clear it). Once imported,
the modules are moved out of the garbage collector's reach (``gc.freeze``): they live as long as
the process, and its exit no longer walks them (about a second a message with torch and timm).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedlorm.flower.identity import encode_identity, identity_of
from fedlorm.flower.logs import use_flower_logging
from fedlorm.flower.policy import REQUIRE_SECURE, RefusalError, refusal_reply, requires_secure
from fedlorm.flower.secure_client import (
    CORRECT,
    DELIVERY,
    EVALUATE,
    EXAMPLES,
    REPLY_SPEC,
    is_secure_message,
    optional_secaggplus_mod,
    secure_broadcast,
    secure_reply,
    secure_request,
)
from fedlorm.flower.settings import settings_from_run_config

if TYPE_CHECKING:
    from fedlorm.runtime.experiment import Experiment

__all__ = ["DATA_DIR", "app"]

DATA_DIR = "data-dir"

logger = logging.getLogger(__name__)

T = TypeVar("T")

app = ClientApp()


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Which client this SuperNode serves (from its node config); ``setup`` if the config lacks it."""
    try:
        identity = identity_of(context.node_config)
    except ValueError as err:
        return refusal_reply(message, RefusalError("setup", str(err)))
    return Message(encode_identity(identity), reply_to=message)


@app.train(mods=[optional_secaggplus_mod])
def train(message: Message, context: Context) -> Message:
    """One protocol step: load the broadcast, train or collect statistics, reply with the summands."""
    if is_secure_message(message):
        return _secure_train(message, context)
    try:
        _plain_allowed(context)
        return _plain_train(message, context)
    except RefusalError as refusal:
        return refusal_reply(message, refusal)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy (class-IL, %) of the broadcast model on this client's shares of tasks 0..task."""
    from fedlorm.flower import client
    from fedlorm.flower.messages import ARRAYS, CONFIG, encode_evaluation_reply, from_array_record

    try:
        _plain_allowed(context)
        exp, partition = _experiment(context)
        task = int(message.content.config_records[CONFIG]["task"])  # type: ignore[arg-type]
        arrays = from_array_record(message.content.array_records[ARRAYS])
        accuracy, examples = _guarded(lambda: client.local_accuracy(exp, partition, task, arrays))
    except RefusalError as refusal:
        return refusal_reply(message, refusal)
    return Message(encode_evaluation_reply(partition, accuracy, examples), reply_to=message)


def _plain_allowed(context: Context) -> None:
    """RefusalError("policy") on a node whose node config sets ``require-secure=true``."""
    if requires_secure(context.node_config):
        raise RefusalError("policy", f"a plain message, but this node sets {REQUIRE_SECURE}=true")


def _plain_train(message: Message, context: Context) -> Message:
    from fedlorm.flower import client
    from fedlorm.flower.messages import decode_train_request, encode_resend_request, encode_train_reply
    from fedlorm.flower.node_state import after_step, held, keep
    from fedlorm.runtime.delivery import MissingBaseError, assemble

    exp, partition = _experiment(context)
    try:
        request = decode_train_request(message.content)
    except (KeyError, TypeError, ValueError) as err:
        raise RefusalError("protocol", f"malformed train message: {err}") from None
    arrays, digests = held(context)
    try:
        broadcast = assemble(request.parts, request.arrays, arrays, digests)
    except MissingBaseError as missing:
        return Message(encode_resend_request(missing.keys), reply_to=message)
    except ValueError as err:
        raise RefusalError("protocol", f"malformed train message: {err}") from None
    instruction = request.instruction
    holding = after_step(arrays, digests, broadcast, request.parts)
    reply = _guarded(lambda: client.local_update(exp, partition, instruction, dict(broadcast)))
    keep(context, holding)
    return Message(encode_train_reply(partition, instruction, reply), reply_to=message)


def _secure_train(message: Message, context: Context) -> Message:
    """A secure message's masking stage: a step (check the own reply, encode it) or a federated
    evaluation (encode the correct predictions and the examples); the mod masks what this returns.

    Every failure raises :class:`RefusalError` with a fixed word, which the mod wrapper
    (:func:`~fedlorm.flower.secure_client.optional_secaggplus_mod`) turns into a one-word error
    reply: SecAgg+ then goes on without this client.
    """
    import numpy as np
    import torch

    from fedlorm.flower import client
    from fedlorm.flower.node_state import after_step, held, keep
    from fedlorm.methods import Instruction
    from fedlorm.runtime.delivery import assemble, parts_from_json
    from fedlorm.secure.contribution import ContributionError, contribution, encoding_spec, spec_from_json
    from fedlorm.secure.encoding import encode

    try:
        _, _, config = secure_request(message)
        travelled = {key: torch.from_numpy(value) for key, value in secure_broadcast(message).items()}
    except (KeyError, TypeError, ValueError) as err:
        raise RefusalError("protocol", f"malformed secure request: {err}") from None
    exp, partition = _experiment(context)
    spec = encoding_spec(exp.cfg.secure)
    if EVALUATE in config:
        task = int(config[EVALUATE])  # type: ignore[call-overload]
        accuracy, examples = _guarded(lambda: client.local_accuracy(exp, partition, task, travelled))
        correct = round(accuracy * examples / 100.0)
        counts = {CORRECT: np.array(float(correct)), EXAMPLES: np.array(float(examples))}
        try:
            return secure_reply(message, encode(counts, spec))
        except ValueError as err:
            raise RefusalError("bound", str(err)) from None
    arrays, digests = held(context)
    try:
        instruction = Instruction.from_record(config)  # type: ignore[arg-type]
        expected = spec_from_json(str(config[REPLY_SPEC]))
        parts = parts_from_json(str(config[DELIVERY]))
        broadcast = assemble(parts, travelled, arrays, digests)
    except (KeyError, TypeError, ValueError) as err:  # a missing base too: SecAgg+ cannot wait for it
        raise RefusalError("protocol", f"malformed secure request: {err}") from None
    holding = after_step(arrays, digests, broadcast, parts)
    reply = _guarded(lambda: client.local_update(exp, partition, instruction, dict(broadcast)))
    try:
        masked = secure_reply(message, contribution(reply, expected, spec))
    except ContributionError as refused:
        raise RefusalError(refused.word, str(refused)) from None
    keep(context, holding)
    return masked


def _guarded(work: Callable[[], T]) -> T:
    """``work()``; an unexpected failure of the node's own computation becomes RefusalError("error")."""
    try:
        return work()
    except RefusalError:
        raise
    except Exception as err:  # the node logs the whole error; the server learns only the word
        logger.error("this node's computation failed", exc_info=err)
        raise RefusalError("error", f"{type(err).__name__}: {err}") from None


def _experiment(context: Context) -> tuple[Experiment, int]:
    """This node's experiment and client index; RefusalError("setup") if it cannot be built."""
    from fedlorm.flower import client

    _freeze_imports()
    use_flower_logging(logging.WARNING)
    try:
        cfg, settings = settings_from_run_config(context.run_config)
        identity = identity_of(context.node_config)
        data_dir = str(context.node_config.get(DATA_DIR) or "") or None
        if data_dir is None and settings.client_data:
            data_dir = str(Path(settings.client_data) / f"client-{identity.partition}")
        exp = client.client_experiment(cfg, data_dir, identity.partition)
        client.check_partition(exp, identity.partition, identity.partitions)
    except ValueError as err:
        logger.error("this node cannot take part: %s", " ".join(str(err).split()))
        raise RefusalError("setup", str(err)) from None
    return exp, identity.partition


_FROZEN: list[bool] = []


def _freeze_imports() -> None:
    """Once a process: exclude everything alive now (the imported modules) from garbage collection."""
    if not _FROZEN:
        gc.freeze()
        _FROZEN.append(True)
