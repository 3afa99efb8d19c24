"""A Flower ``Grid`` whose SuperNodes are ClientApp calls in this process (tests, benchmarks).

Flower's own grids need a SuperLink; this one hands each message to a ClientApp with the node's
``Context`` (node config ``partition-id`` / ``num-partitions``, a state kept across messages as a
SuperNode keeps it) and returns the replies, so a ServerApp's code path (strategy, SecAgg+ workflow)
runs unchanged and deterministically. A ClientApp that raises answers with an error reply, as
Flower's runtime does. Subclasses override :meth:`LocalGrid.deliver` to drop, delay or change
messages.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

__all__ = ["LocalGrid"]


class LocalGrid(Grid):
    """SuperNodes ``first_node + k`` serving ``partitions[k]`` through ``app`` in this process."""

    def __init__(
        self,
        app: ClientApp,
        run_config: Mapping[str, Any],
        partitions: Iterable[int],
        num_partitions: int | None = None,
        first_node: int = 1,
    ) -> None:
        partitions = list(partitions)
        self.app = app
        self.contexts = {
            first_node + k: Context(
                run_id=1,
                node_id=first_node + k,
                node_config={"partition-id": p, "num-partitions": num_partitions or len(partitions)},
                state=RecordDict(),
                run_config=dict(run_config),
            )
            for k, p in enumerate(partitions)
        }

    def deliver(self, message: Message, context: Context) -> Message | None:
        """The node's reply to ``message`` (None: no reply comes back); the ClientApp by default."""
        try:
            # A copy, as over the wire: the ClientApp's mods may change what they are given.
            return self.app(copy.deepcopy(message), context)
        except Exception as err:  # Flower turns a ClientApp exception into an error reply
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=str(err))
            return Message(error, reply_to=message)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        """Every message's reply, in order; those :meth:`deliver` withholds are missing."""
        replies = []
        for message in messages:
            reply = self.deliver(message, self.contexts[message.metadata.dst_node_id])
            if reply is not None:
                replies.append(reply)
        return replies

    def get_node_ids(self) -> list[int]:
        """The connected SuperNodes."""
        return list(self.contexts)

    def set_run(self, run_id: int) -> None:
        raise NotImplementedError("a LocalGrid has no SuperLink run")

    @property
    def run(self) -> Any:
        raise NotImplementedError("a LocalGrid has no SuperLink run")

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError("build messages with flwr.app.Message")

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("a LocalGrid delivers through send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("a LocalGrid delivers through send_and_receive only")
