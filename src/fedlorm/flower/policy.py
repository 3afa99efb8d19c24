"""A SuperNode's own rules, and how it refuses: a node-config policy and one-word error replies.

Every fedlorm setting reaches a SuperNode in the server's run config, so without a rule of its own a
node does whatever the server asks, a plain (unmasked) run included. A node whose node config sets
``require-secure=true`` refuses every plain ``train`` and ``evaluate`` message, and any SecAgg+ setup
under which the server could rebuild one node's mask on its own: fewer than 3 shares, or a
reconstruction threshold at most half the shares (a server that tells some neighbours the node is
alive and the others that it dropped would then collect enough shares of both its secrets).

A refusal, and any failure on the node, answers with an error reply whose reason is one fixed word
of :data:`REFUSALS`: no number, path or value of the node's leaves it. The node logs the word; the
full reason goes to its debug log only.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from flwr.app import Error, Message
from flwr.common.constant import ErrorCode

__all__ = ["REFUSALS", "REQUIRE_SECURE", "RefusalError", "check_setup", "refusal_reply", "requires_secure"]

logger = logging.getLogger(__name__)

REQUIRE_SECURE = "require-secure"
"""Node-config key: ``true`` makes the SuperNode take part in secure aggregation only."""

REFUSALS = {
    "setup": "the node cannot build its run (node config, data folder, run config)",
    "policy": "the request breaks the node's policy (require-secure)",
    "nan": "the node's reply holds NaN or Inf",
    "invalid": "the node's reply fails its own checks (keys, shapes, a Gram not PSD, a count)",
    "bound": "an entry of the node's reply is above the run's public bound",
    "protocol": "a SecAgg+ message the node cannot follow",
    "error": "anything else went wrong on the node (its log has the details)",
}
"""The only reasons a fedlorm SuperNode gives in an error reply, and what each means."""


class RefusalError(Exception):
    """A node refuses a message; ``word`` (of :data:`REFUSALS`) is all the server will learn."""

    def __init__(self, word: str, detail: str = "") -> None:
        if word not in REFUSALS:
            raise ValueError(f"refusal word {word!r} is not one of {sorted(REFUSALS)}")
        super().__init__(word)
        self.word = word
        self.detail = detail


def requires_secure(node_config: Mapping[str, Any]) -> bool:
    """The node's ``require-secure`` setting (false when unset); RefusalError("setup") for a bad value."""
    value = node_config.get(REQUIRE_SECURE, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RefusalError("setup", f"{REQUIRE_SECURE} = {value!r} is not true or false")


def check_setup(share_number: int, threshold: int) -> None:
    """RefusalError("policy") unless SecAgg+'s shares and threshold keep the node's mask from the server."""
    if share_number < 3 or 2 * threshold <= share_number:
        raise RefusalError(
            "policy",
            f"SecAgg+ with {share_number} shares and threshold {threshold}: the server could rebuild a "
            "node's masks (require-secure needs at least 3 shares and a threshold above half of them)",
        )


def refusal_reply(message: Message, refusal: RefusalError) -> Message:
    """The error reply to ``message``: the refusal's word only; the node logs the word (and the
    detail at the debug level)."""
    logger.warning("this node refuses the message: %s", refusal.word)
    if refusal.detail:
        logger.debug("refusal detail: %s", refusal.detail)
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=refusal.word), reply_to=message)
