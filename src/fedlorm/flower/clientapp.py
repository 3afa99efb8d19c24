"""The Flower ClientApp: one fedlorm client per SuperNode, its data share named by ``node_config``.

Every SuperNode sets ``partition-id`` (0-based) and ``num-partitions`` (= the run's clients).
``query`` tells the server which client this node serves; ``train`` runs one protocol step with the
in-process simulator's client code and replies with the summands (under secure aggregation, Flower's
``secaggplus_mod`` wraps it and the summands go out encoded and masked); ``evaluate`` reports the broadcast
model's class-IL accuracy on the client's own training shares of the tasks seen so far.

A SuperNode may also set ``data-dir``: its own folder written by ``fedlorm partition``
(docs/partitions.md), which it then reads instead of loading the datasets. A node without
``data-dir`` reads ``client-K`` inside the run config's ``client-data`` folder when that is set
(simulation, where virtual SuperNodes get no node config of their own). A node that cannot set
up (a bad folder, a config or partition that does not fit) answers with an error reply carrying
the one-line reason, which the server logs and drops.

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
from pathlib import Path
from typing import TYPE_CHECKING

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode

from fedlorm.flower.identity import encode_identity, identity_of
from fedlorm.flower.logs import use_flower_logging
from fedlorm.flower.secure_client import (
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

app = ClientApp()


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Which client this SuperNode serves (from its node config)."""
    return Message(encode_identity(identity_of(context.node_config)), reply_to=message)


@app.train(mods=[optional_secaggplus_mod])
def train(message: Message, context: Context) -> Message:
    """One protocol step: load the broadcast, train or collect statistics, reply with the summands."""
    from fedlorm.flower import client
    from fedlorm.flower.messages import ARRAYS, CONFIG, encode_train_reply, from_array_record
    from fedlorm.methods import Instruction

    if is_secure_message(message):
        return _secure_train(message, context)
    try:
        exp, partition = _experiment(context)
    except ValueError as err:
        return _error_reply(message, err)
    instruction = Instruction.from_record(message.content.config_records[CONFIG])
    arrays = from_array_record(message.content.array_records[ARRAYS])
    reply = client.local_update(exp, partition, instruction, arrays)
    return Message(encode_train_reply(partition, instruction, reply), reply_to=message)


@app.evaluate()
def evaluate(message: Message, context: Context) -> Message:
    """Accuracy (class-IL, %) of the broadcast model on this client's shares of tasks 0..task."""
    from fedlorm.flower import client
    from fedlorm.flower.messages import ARRAYS, CONFIG, encode_evaluation_reply, from_array_record

    try:
        exp, partition = _experiment(context)
    except ValueError as err:
        return _error_reply(message, err)
    task = int(message.content.config_records[CONFIG]["task"])
    arrays = from_array_record(message.content.array_records[ARRAYS])
    accuracy, examples = client.local_accuracy(exp, partition, task, arrays)
    return Message(encode_evaluation_reply(partition, accuracy, examples), reply_to=message)


def _secure_train(message: Message, context: Context) -> Message:
    """A secure step's masking stage: check the own reply, encode it, let the mod mask it.

    Any failure (setup, the reply's checks, a value above the agreed bound) raises: Flower turns it
    into an error reply and SecAgg+ goes on without this client.
    """
    import torch

    from fedlorm.flower import client
    from fedlorm.methods import Instruction
    from fedlorm.secure.contribution import contribution, encoding_spec, spec_from_json

    _, _, config = secure_request(message)
    exp, partition = _experiment(context)
    instruction = Instruction.from_record(config)  # type: ignore[arg-type]
    expected = spec_from_json(str(config[REPLY_SPEC]))
    arrays = {key: torch.from_numpy(value) for key, value in secure_broadcast(message).items()}
    reply = client.local_update(exp, partition, instruction, arrays)
    return secure_reply(message, contribution(reply, expected, encoding_spec(exp.cfg.secure)))


def _experiment(context: Context) -> tuple[Experiment, int]:
    from fedlorm.flower import client

    _freeze_imports()
    use_flower_logging(logging.WARNING)
    cfg, settings = settings_from_run_config(context.run_config)
    identity = identity_of(context.node_config)
    data_dir = str(context.node_config.get(DATA_DIR) or "") or None
    if data_dir is None and settings.client_data:
        data_dir = str(Path(settings.client_data) / f"client-{identity.partition}")
    exp = client.client_experiment(cfg, data_dir, identity.partition)
    client.check_partition(exp, identity.partition, identity.partitions)
    return exp, identity.partition


_FROZEN: list[bool] = []


def _freeze_imports() -> None:
    """Once a process: exclude everything alive now (the imported modules) from garbage collection."""
    if not _FROZEN:
        gc.freeze()
        _FROZEN.append(True)


def _error_reply(message: Message, err: ValueError) -> Message:
    """An error reply whose reason is ``err``'s message on one line (the server logs it and drops the
    node's reply)."""
    reason = " ".join(str(err).split()) or type(err).__name__
    logger.error("this node cannot take part: %s", reason)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
