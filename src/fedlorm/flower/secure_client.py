"""The ClientApp's side of a secure sum: Flower's ``secaggplus_mod`` where needed, request and reply.

The masking stage of SecAgg+ hands the wrapped ``train`` handler the request in the legacy ``FitIns``
layout (``fitins.config``, ``fitins.parameters``); the handler answers in the ``FitRes`` layout with
integer arrays the mod masks (:func:`secure_reply`). The server side is :mod:`fedlorm.flower.secure`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import numpy as np
from flwr.app import Context, Message, MessageType
from flwr.client.mod import secaggplus_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import Code, FitRes, Scalar, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common.recorddict_compat import fitres_to_recorddict, recorddict_to_fitins

from fedlorm.flower.masks import use_full_secret_masks
from fedlorm.flower.policy import RefusalError, check_setup, refusal_reply, requires_secure

__all__ = [
    "BROADCAST",
    "CORRECT",
    "DELIVERY",
    "EVALUATE",
    "EXAMPLES",
    "FITINS_CONFIG",
    "LAYOUT",
    "REPLY_SPEC",
    "WORD_BITS",
    "is_secure_message",
    "optional_secaggplus_mod",
    "secure_broadcast",
    "secure_reply",
    "secure_request",
]

logger = logging.getLogger(__name__)

FITINS_CONFIG = "fitins.config"
"""The record of the masking-stage message that carries the request's config (legacy FitIns layout)."""
LAYOUT = "fedlorm-secure-layout"
"""Config key: JSON {array key: shape}; the client's arrays, in this key order, are what is summed."""
WORD_BITS = "fedlorm-secure-word-bits"
"""Config key: each client's entries must lie in [0, 2^word_bits)."""
REPLY_SPEC = "fedlorm-secure-reply-spec"
"""Config key: the step's reply spec as JSON (:func:`fedlorm.secure.contribution.spec_to_json`)."""
EVALUATE = "fedlorm-secure-evaluate"
"""Config key: present (the task just finished) when the secure sum is a federated evaluation."""
CORRECT = "secure:correct"
"""Layout key of a client's encoded number of correct predictions in a secure federated evaluation."""
EXAMPLES = "secure:examples"
"""Layout key of a client's encoded number of evaluated examples."""
BROADCAST = "fedlorm-secure-broadcast"
"""Config key: JSON list of the keys of the arrays in ``fitins.parameters``, in their order."""
DELIVERY = "fedlorm-secure-delivery"
"""Config key: how each key of the step's broadcast travels to this node (the parts of
:mod:`fedlorm.runtime.delivery`, as JSON); absent in a federated evaluation, whose arrays travel whole."""


def is_secure_message(message: Message) -> bool:
    """True for the messages of Flower's SecAgg+ workflow (they carry its config record)."""
    return RECORD_KEY_CONFIGS in message.content.config_records


def optional_secaggplus_mod(message: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's ``secaggplus_mod`` for SecAgg+ messages; every other message goes to the handler untouched.

    The mod itself rejects any ``train`` message without a SecAgg+ stage, so this lets one ``train``
    handler serve plain and secure steps. Before a SecAgg+ message it makes Flower draw masks from
    the whole shared secret (:func:`~fedlorm.flower.masks.use_full_secret_masks`); a node with
    ``require-secure=true`` refuses a setup under which the server could rebuild its masks
    (:func:`~fedlorm.flower.policy.check_setup`). Whatever goes wrong in the protocol or the handler
    answers with a one-word error reply (:data:`~fedlorm.flower.policy.REFUSALS`), never its text.
    """
    if message.metadata.message_type != MessageType.TRAIN or not is_secure_message(message):
        return call_next(message, context)
    try:
        use_full_secret_masks()
        stage = message.content.config_records[RECORD_KEY_CONFIGS]
        if stage.get(Key.STAGE) == Stage.SETUP and requires_secure(context.node_config):
            check_setup(int(stage[Key.SHARE_NUMBER]), int(stage[Key.THRESHOLD]))  # type: ignore[call-overload]
        return secaggplus_mod(message, context, call_next)
    except RefusalError as refusal:
        return refusal_reply(message, refusal)
    except Exception as err:  # the protocol parses what the server sent; no text of it may go back
        logger.debug("SecAgg+ message refused", exc_info=err)
        return refusal_reply(message, RefusalError("protocol", f"{type(err).__name__}: {err}"))


def secure_request(message: Message) -> tuple[dict[str, tuple[int, ...]], int, dict[str, Scalar]]:
    """The masking stage's request: (layout, word_bits, server config); ValueError without the mod."""
    stage_config = message.content.config_records[RECORD_KEY_CONFIGS]
    if Key.STAGE in stage_config:
        raise ValueError(
            f"SecAgg+ stage {stage_config[Key.STAGE]!r} reached the train handler: this ClientApp's train "
            "handler needs optional_secaggplus_mod (Flower's secaggplus_mod)"
        )
    config = dict(message.content.config_records[FITINS_CONFIG])
    layout = {key: tuple(shape) for key, shape in json.loads(str(config.pop(LAYOUT))).items()}
    word_bits = int(config.pop(WORD_BITS))  # type: ignore[arg-type]
    config.pop(BROADCAST, None)
    return layout, word_bits, config


def secure_broadcast(message: Message) -> dict[str, np.ndarray]:
    """The arrays the server sent with the masking stage's request (empty when it sent none)."""
    fitins = recorddict_to_fitins(message.content, keep_input=True)
    keys = json.loads(str(fitins.config.get(BROADCAST, "[]")))
    arrays = parameters_to_ndarrays(fitins.parameters)
    if len(arrays) != len(keys):
        raise ValueError(f"the request carries {len(arrays)} arrays for {len(keys)} broadcast keys")
    return dict(zip(keys, arrays, strict=True))


def secure_reply(message: Message, arrays: Mapping[str, np.ndarray]) -> Message:
    """The reply to the masking stage: ``arrays`` (exactly the layout's keys, shapes, integers in range)."""
    layout, word_bits, _ = secure_request(message)
    if set(arrays) != set(layout):
        raise ValueError(f"arrays have keys {sorted(arrays)}; the secure sum expects {sorted(layout)}")
    half = float(1 << (word_bits - 1))
    floats = []
    for key, shape in layout.items():
        array = np.asarray(arrays[key])
        if array.shape != shape or array.dtype.kind not in "iu":
            raise ValueError(
                f"{key!r}: {array.dtype} of shape {array.shape}; expected integers of shape {shape}"
            )
        if array.size and (array.min() < 0 or array.max() >= 1 << word_bits):
            raise ValueError(f"{key!r} has entries outside [0, 2^{word_bits})")
        floats.append(array.astype(np.float64) - half)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(floats), num_examples=1, metrics={})
    return Message(fitres_to_recorddict(fitres, keep_input=False), reply_to=message)
