"""A Flower ``Strategy`` around any fedlorm method: configure one protocol step, merge its replies.

Before a SuperNode takes part, :meth:`FedlormStrategy.discover` asks it which client it serves (a
query message), so every reply, drop and absence is named by client index. ``configure_train`` sends
the step's broadcast and :class:`Instruction` to each identified SuperNode whose client the step asks
(``participants``: the simulator's :func:`step_clients`, so a training round with
``scenario.participation`` < 1 reaches only its sampled clients' SuperNodes); ``aggregate_train`` drops
replies that carry an error, did not come back within the reply timeout, or fail validation
(malformed, wrong step or partition, :func:`check_reply`: keys, shapes, dtypes, NaN, PSD), logs each
with its reason and, if at least ``min_clients`` survive, folds the survivors' summands in partition
order with the simulator's :func:`fold_replies`. Otherwise the global state stays as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedlorm.flower.identity import decode_identity
from fedlorm.flower.messages import (
    ARRAYS,
    CONFIG,
    EvaluationReply,
    TrainReply,
    decode_evaluation_reply,
    decode_train_reply,
    payload_bytes,
    to_array_record,
)
from fedlorm.methods import ClientReply, Instruction, Server
from fedlorm.methods.steps import Phase
from fedlorm.methods.validation import InvalidReplyError, check_reply, reply_spec
from fedlorm.runtime.engine import fold_replies
from fedlorm.runtime.report import StepTally, step_name

__all__ = ["Dropped", "FedlormStrategy", "StepReport", "error_reason"]

logger = logging.getLogger(__name__)

NO_NODE = -1
"""``Dropped.node_id`` of a client that no connected SuperNode serves."""


@dataclass(frozen=True)
class Dropped:
    """A client left out of a step, and why."""

    node_id: int
    partition: int
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
    """The broadcast's tensor payload times the SuperNodes it was sent to."""
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


class FedlormStrategy(Strategy):
    """Runs the steps of a fedlorm :class:`Server` over a Flower grid (one message per SuperNode).

    ``participants(instruction)``: the clients a step asks (ascending); None asks every client.
    """

    def __init__(
        self,
        server: Server,
        num_clients: int,
        min_clients: int,
        reply_timeout: float,
        participants: Callable[[Instruction], Sequence[int]] | None = None,
    ) -> None:
        self.server = server
        self.num_clients = num_clients
        self.min_clients = min_clients
        self.reply_timeout = reply_timeout
        self.participants = participants
        self.partitions: dict[int, int] = {}
        """SuperNode id → the client index it serves (from its answer to the identity query)."""
        self.ignored: dict[int, str] = {}
        """SuperNodes that cannot take part (bad node config, duplicate partition), with the reason."""
        self.report: StepReport | None = None
        self._instruction: Instruction | None = None

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
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """One train message per connected SuperNode whose client the step asks: ``arrays`` and ``config``."""
        report = self.begin_step(Instruction.from_record(config), grid)
        report.download_bytes = payload_bytes(arrays) * len(report.nodes)
        return self._messages(
            report.nodes, RecordDict({ARRAYS: arrays, CONFIG: config}), MessageType.TRAIN, server_round
        )

    def begin_step(self, instruction: Instruction, grid: Grid) -> StepReport:
        """The step's report: the connected SuperNodes whose clients ``instruction`` asks."""
        asked = self.asked(instruction)
        wanted = set(asked)
        nodes = {n: p for n, p in self.connected(grid).items() if p in wanted}
        self._instruction = instruction
        self.report = StepReport(step=step_name(instruction), nodes=nodes, asked=asked)
        return self.report

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate replies, fold the survivors (partition order) if enough; the deployed arrays or None."""
        if self._instruction is None or self.report is None:
            raise RuntimeError("aggregate_train called before configure_train")
        instruction, report = self._instruction, self.report
        accepted = self._accept(instruction, report, list(replies))
        if len(accepted) < self.min_clients:
            logger.warning(
                "%s: only %d valid replies (min_clients = %d); the previous global state stays",
                report.step,
                len(accepted),
                self.min_clients,
            )
            report.kept = "too-few"
            return None, self._train_metrics(report, instruction)
        tally = fold_replies(self.server, instruction, [(k, accepted[k]) for k in sorted(accepted)])
        nodes = {partition: node for node, partition in report.nodes.items()}
        for partition, reason in sorted(tally.dropped.items()):
            report.dropped.append(Dropped(node_id=nodes[partition], partition=partition, reason=reason))
        report.tally, report.kept = tally, tally.kept
        if tally.kept:
            return None, self._train_metrics(report, instruction)
        report.merged = sorted(set(accepted) - set(tally.dropped))
        return to_array_record(self.server.deployed_arrays()), self._train_metrics(report, instruction)

    def _accept(
        self, instruction: Instruction, report: StepReport, replies: list[Message]
    ) -> dict[int, ClientReply]:
        """The valid replies by client; every other reply (or missing one) goes to ``report.dropped``."""
        by_node = {m.metadata.src_node_id: m for m in replies if m.metadata.src_node_id in report.nodes}
        accepted: dict[int, ClientReply] = {}
        expected = self.server.expected_reply(instruction)
        for node, partition in sorted(report.nodes.items(), key=lambda item: item[1]):
            message = by_node.get(node)
            try:
                if message is None:
                    raise InvalidReplyError(f"no reply within the {self.reply_timeout:g} s reply timeout")
                if message.has_error():
                    raise InvalidReplyError(f"error reply: {error_reason(message)}")
                reply = decode_train_reply(message.content)
                report.upload_bytes += reply.reply.upload_bytes
                _check_identity(instruction, partition, reply)
                check_reply(reply.reply, expected)
            except InvalidReplyError as err:
                self.drop(report, node, partition, str(err))
                continue
            if expected is None:
                expected = reply_spec(reply.reply.summands)
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

    @staticmethod
    def _train_metrics(report: StepReport, instruction: Instruction) -> MetricRecord:
        metrics: dict[str, int | float] = {
            "merged": len(report.merged),
            "dropped": len(report.dropped),
            "upload-bytes": report.upload_bytes,
            "download-bytes": report.download_bytes,
        }
        tally = report.tally
        if tally is not None and instruction.phase is Phase.TRAIN and tally.examples:
            metrics["train-loss"] = tally.loss_sum / tally.examples
        return MetricRecord(metrics)

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
    def asked(self, instruction: Instruction) -> list[int]:
        """The clients ``instruction``'s step asks (ascending): ``participants``, else every client."""
        if self.participants is None:
            return list(range(self.num_clients))
        return sorted(int(k) for k in self.participants(instruction))

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
