"""One protocol step of any fedlorm method over a Flower grid, in the shape of a Flower strategy.

Before a SuperNode takes part, :meth:`FedlormStrategy.discover` asks it which client it serves (a
query message), so every reply, drop and absence is named by client index. A step starts with
:meth:`~FedlormStrategy.begin_step` (the identified SuperNodes of the clients the step asks, as the
transport passes them), :meth:`~FedlormStrategy.configure_train` builds each such SuperNode's message
(the step's :class:`Instruction` and that node's share of the broadcast,
:mod:`fedlorm.runtime.delivery`), and :meth:`~FedlormStrategy.aggregate_train` drops replies that
carry an error, did not come back within the reply timeout, are malformed, or answer another step or
name another client, then folds the rest with the engine's :func:`fold_replies`: the one place a
reply's content is checked (keys, shapes, dtypes, NaN, PSD, bound, spread), which merges if at least
``min_clients`` replies pass. Otherwise the global state stays as it was.

The step's state travels in the :class:`StepReport` these methods take and return, not in the
strategy. The class keeps Flower's strategy shape (configure / aggregate, for training and for
evaluation) but is no subclass of ``flwr.serverapp.strategy.Strategy``: Flower's ``configure_train``
takes one ``ArrayRecord`` for every node and the step as a ``ConfigRecord``, while a fedlorm step
sends each node only what it lacks and hands the :class:`Instruction` itself through.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedlorm.flower.identity import decode_identity
from fedlorm.flower.messages import (
    ARRAYS,
    CONFIG,
    EvaluationReply,
    TrainReply,
    decode_evaluation_reply,
    decode_train_reply,
    encode_train_request,
    resend_keys,
)
from fedlorm.methods import ClientReply, Instruction, Server
from fedlorm.methods.validation import InvalidReplyError
from fedlorm.runtime.delivery import Delta
from fedlorm.runtime.engine import fold_replies
from fedlorm.runtime.report import StepTally, step_name

__all__ = ["Dropped", "FedlormStrategy", "Resent", "StepReport", "error_reason"]

logger = logging.getLogger(__name__)

NO_NODE = -1
"""``Dropped.node_id`` of a client that no connected SuperNode serves."""


@dataclass(frozen=True)
class Dropped:
    """A client left out of a step, and why."""

    node_id: int
    partition: int
    reason: str


@dataclass(frozen=True)
class Resent:
    """Bytes a step sent one SuperNode beyond its share of the broadcast, and why.

    The download a step reports is each asked client's delta, as the in-process runtime counts it;
    a node that lacks what its client was sent before (a new node, a resumed ServerApp, a node
    that lost its state) gets those arrays on top.
    """

    node_id: int
    partition: int
    bytes: int
    reason: str


@dataclass
class StepReport:
    """What happened in one step: which SuperNodes were asked, whose summands merged, who was dropped."""

    step: str
    nodes: dict[int, int]
    """SuperNode id → client index, for the SuperNodes asked."""
    asked: list[int] = field(default_factory=list)
    """The clients the step asks (ascending), whether or not a connected SuperNode serves them."""
    merged: list[int] = field(default_factory=list)
    dropped: list[Dropped] = field(default_factory=list)
    tally: StepTally | None = None
    upload_bytes: int = 0
    download_bytes: int = 0
    """The asked clients' deltas of the broadcast, summed (:mod:`fedlorm.runtime.delivery`)."""
    resent: list[Resent] = field(default_factory=list)
    """What went to nodes beyond their clients' deltas (not in :attr:`download_bytes`)."""
    secure: bool = False
    """The step ran as a SecAgg+ secure sum: the server saw only the sum of ``merged``'s replies."""
    kept: str = ""
    """Why nothing was merged (a word of :data:`fedlorm.runtime.report.KEPT_WORDS`); "" if merged."""

    def to_record(self) -> dict[str, Any]:
        """Plain form for results.json (``secure`` only for a secure step)."""
        record = {
            "step": self.step,
            "nodes": len(self.nodes),
            "asked": self.asked,
            "merged": self.merged,
            "dropped": [asdict(d) for d in self.dropped],
            "state_kept": bool(self.kept) or self.tally is None,
        }
        return {**record, "secure": True} if self.secure else record


class FedlormStrategy:
    """Runs the steps of a fedlorm :class:`Server` over a Flower grid (one message per SuperNode).

    Args:
        server: The method's server, which folds the steps.
        num_clients: The run's clients.
        min_clients: Fewest valid replies a plain step merges.
        reply_timeout: Seconds a step waits for its replies.
    """

    def __init__(self, server: Server, num_clients: int, min_clients: int, reply_timeout: float) -> None:
        self.server = server
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.reply_timeout = reply_timeout
        self.partitions: dict[int, int] = {}
        """SuperNode id → the client index it serves (from its answer to the identity query)."""
        self.ignored: dict[int, str] = {}
        """SuperNodes that cannot take part (bad node config, duplicate partition), with the reason."""

    def summary(self) -> None:
        """Log what this strategy runs."""
        logger.info(
            "fedlorm strategy: %s, %d clients, merge with >= %d valid replies, reply timeout %g s",
            type(self.server).__name__,
            self.num_clients,
            self.min_clients,
            self.reply_timeout,
        )

    # -- which SuperNode serves which client --------------------------------------------------------
    def discover(self, grid: Grid, wait: float = 0.0, poll: float = 0.5) -> list[int]:
        """Identify newly connected SuperNodes; with ``wait`` > 0, until every client is served.

        Returns the client indices served by connected SuperNodes. After ``wait`` seconds, a run with
        fewer than ``min_clients`` served clients cannot start: RuntimeError.
        """
        deadline = time.monotonic() + wait
        while True:
            connected = set(grid.get_node_ids())
            new = sorted(connected - set(self.partitions) - set(self.ignored))
            if new:
                self._identify(grid, new)
            served = sorted({p for n, p in self.partitions.items() if n in connected})
            if wait <= 0 or len(served) == self.num_clients:
                return served
            if time.monotonic() >= deadline:
                if len(served) >= self.min_clients:
                    logger.warning(
                        "%d of %d clients have a SuperNode after %g s; going on",
                        len(served),
                        self.num_clients,
                        wait,
                    )
                    return served
                raise RuntimeError(
                    f"{len(served)} of {self.num_clients} clients have a SuperNode after {wait:g} s; "
                    f"the run needs at least min-clients = {self.min_clients}"
                )
            time.sleep(poll)

    def _identify(self, grid: Grid, nodes: list[int]) -> None:
        content = RecordDict({})
        messages = [
            Message(content=content, message_type=MessageType.QUERY, dst_node_id=node) for node in nodes
        ]
        replies = list(grid.send_and_receive(messages, timeout=self.reply_timeout))
        for node in sorted(set(nodes) - {m.metadata.src_node_id for m in replies}):
            self.ignored[node] = f"no answer to the identity query within {self.reply_timeout:g} s"
            logger.warning("SuperNode %d is left out of the run: %s", node, self.ignored[node])
        for message in sorted(replies, key=lambda m: m.metadata.src_node_id):
            node = message.metadata.src_node_id
            try:
                if message.has_error():
                    raise ValueError(f"error reply: {error_reason(message)}")
                identity = decode_identity(message.content)
                if identity.partitions != self.num_clients or not 0 <= identity.partition < self.num_clients:
                    raise ValueError(
                        f"it serves partition {identity.partition} of {identity.partitions}, "
                        f"but the run has {self.num_clients} clients"
                    )
                owner = next((n for n, p in self.partitions.items() if p == identity.partition), None)
                if owner is not None and owner in set(grid.get_node_ids()):
                    raise ValueError(f"partition {identity.partition} is already served by node {owner}")
            except ValueError as err:
                self.ignored[node] = str(err)
                logger.warning("SuperNode %d is left out of the run: %s", node, err)
                continue
            if owner is not None:
                del self.partitions[owner]
            self.partitions[node] = identity.partition
            logger.info("SuperNode %d serves client %d", node, identity.partition)

    # -- training steps -----------------------------------------------------------------------------
    def begin_step(self, instruction: Instruction, clients: Iterable[int], grid: Grid) -> StepReport:
        """The step's report: the connected SuperNodes whose clients ``instruction`` asks.

        Args:
            instruction: The step.
            clients: The clients it asks (:func:`~fedlorm.runtime.engine.step_clients`).
            grid: The grid whose connected nodes are looked up.

        Returns:
            A report with ``nodes`` (node → client) and ``asked``, nothing dropped or merged yet.
        """
        asked = sorted(int(k) for k in clients)
        wanted = set(asked)
        nodes = {n: p for n, p in self.connected(grid).items() if p in wanted}
        return StepReport(step=step_name(instruction), nodes=nodes, asked=asked)

    def configure_train(
        self, instruction: Instruction, deltas: Mapping[int, Delta], server_round: int
    ) -> list[Message]:
        """One train message per SuperNode of ``deltas``: the step and that node's share of the broadcast.

        Args:
            instruction: The step.
            deltas: SuperNode id → what it is sent of the broadcast.
            server_round: Flower's round number (the messages' group).

        Returns:
            The messages, in node order.
        """
        return [
            Message(
                content=encode_train_request(instruction, deltas[node]),
                message_type=MessageType.TRAIN,
                dst_node_id=node,
                group_id=str(server_round),
            )
            for node in sorted(deltas)
        ]

    def aggregate_train(
        self, report: StepReport, instruction: Instruction, replies: Iterable[Message]
    ) -> StepReport:
        """Take the step's replies, drop what cannot be one, fold the rest (partition order).

        Args:
            report: The step's report from :meth:`begin_step` (updated and returned).
            instruction: The step.
            replies: The replies that came back.

        Returns:
            ``report`` with what was merged, dropped (and why), the tally and the upload.
        """
        accepted = self._accept(instruction, report, list(replies))
        tally = fold_replies(
            self.server, instruction, [(k, accepted[k]) for k in sorted(accepted)], self.min_clients
        )
        nodes = {partition: node for node, partition in report.nodes.items()}
        for partition, reason in sorted(tally.dropped.items()):
            report.dropped.append(Dropped(node_id=nodes[partition], partition=partition, reason=reason))
        report.tally, report.kept = tally, tally.kept
        if not tally.kept:
            report.merged = sorted(set(accepted) - set(tally.dropped))
        return report

    def _accept(
        self, instruction: Instruction, report: StepReport, replies: list[Message]
    ) -> dict[int, ClientReply]:
        """The decoded replies by client, for the engine to check; every reply that cannot be one (or
        a missing one) goes to ``report.dropped``."""
        by_node = {m.metadata.src_node_id: m for m in replies if m.metadata.src_node_id in report.nodes}
        accepted: dict[int, ClientReply] = {}
        for node, partition in sorted(report.nodes.items(), key=lambda item: item[1]):
            message = by_node.get(node)
            try:
                if message is None:
                    raise InvalidReplyError(f"no reply within the {self.reply_timeout:g} s reply timeout")
                if message.has_error():
                    raise InvalidReplyError(f"error reply: {error_reason(message)}")
                if resend_keys(message) is not None:
                    raise InvalidReplyError("it lacks broadcast arrays even after they were sent again")
                reply = decode_train_reply(message.content)
                report.upload_bytes += reply.reply.upload_bytes
                _check_identity(instruction, partition, reply)
            except InvalidReplyError as err:
                self.drop(report, node, partition, str(err))
                continue
            accepted[partition] = reply.reply
        self.drop_unreached(report)
        return accepted

    def drop_unreached(self, report: StepReport) -> None:
        """Every asked client without a connected SuperNode goes to ``report.dropped``."""
        reached = set(report.nodes.values())
        last_node = {p: n for n, p in self.partitions.items()}
        for partition in report.asked:
            if partition not in reached:
                node = last_node.get(partition, NO_NODE)
                gone = f"its SuperNode (node {node}) is no longer connected"
                self.drop(report, node, partition, gone if node != NO_NODE else "no SuperNode serves it")

    def drop(self, report: StepReport, node: int, partition: int, reason: str) -> None:
        """Record (and log) that ``partition``'s reply is not in the step's merge, and why."""
        report.dropped.append(Dropped(node_id=node, partition=partition, reason=reason))
        logger.warning("%s: client %d (node %d) dropped: %s", report.step, partition, node, reason)

    # -- federated evaluation -----------------------------------------------------------------------
    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One evaluate message per identified SuperNode (``config`` holds the task just finished)."""
        content = RecordDict({ARRAYS: arrays, CONFIG: config})
        return self._messages(self.connected(grid), content, MessageType.EVALUATE, server_round)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sample-weighted mean of the clients' local accuracies (failed replies are logged and left out)."""
        results: list[EvaluationReply] = []
        for message in replies:
            node = message.metadata.src_node_id
            try:
                if message.has_error():
                    raise InvalidReplyError(f"error reply: {error_reason(message)}")
                result = decode_evaluation_reply(message.content)
                if self.partitions.get(node) != result.partition:
                    raise InvalidReplyError(f"reply names client {result.partition}")
                results.append(result)
            except InvalidReplyError as err:
                logger.warning("evaluation: node %d left out: %s", node, err)
        total = sum(r.num_examples for r in results)
        if not total:
            return None
        results.sort(key=lambda r: r.partition)
        return MetricRecord(
            {
                "accuracy": sum(r.accuracy * r.num_examples for r in results) / total,
                "num-examples": total,
                "partitions": [r.partition for r in results],
                "accuracies": [r.accuracy for r in results],
            }
        )

    # -- helpers ------------------------------------------------------------------------------------
    def connected(self, grid: Grid) -> dict[int, int]:
        """Connected, identified SuperNodes → the client each serves."""
        connected = set(grid.get_node_ids())
        return {n: p for n, p in sorted(self.partitions.items()) if n in connected}

    @staticmethod
    def _messages(nodes: Iterable[int], content: RecordDict, kind: str, server_round: int) -> list[Message]:
        return [
            Message(content=content, message_type=kind, dst_node_id=node, group_id=str(server_round))
            for node in nodes
        ]


def error_reason(message: Message, limit: int = 200) -> str:
    """An error reply's reason as the server records it: one line, at most ``limit`` characters.

    fedlorm's ClientApp answers with one word (:data:`fedlorm.flower.policy.REFUSALS`); anything else
    (Flower's own errors, another ClientApp) is cut so that no client can flood the log.
    """
    text = " ".join(str(message.error.reason).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _check_identity(instruction: Instruction, partition: int, reply: TrainReply) -> None:
    if reply.partition != partition:
        raise InvalidReplyError(f"reply names client {reply.partition}, but the node serves {partition}")
    sent = (instruction.task, instruction.round, instruction.phase.value)
    answered = (reply.task, reply.round, str(reply.phase))
    if answered != sent:
        raise InvalidReplyError(f"reply answers step {answered}, not {sent}")
