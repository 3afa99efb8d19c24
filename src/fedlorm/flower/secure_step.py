"""One engine step, or one federated evaluation, as a SecAgg+ secure sum over the Flower grid.

Each node's share of the step's broadcast (what it does not hold, :mod:`fedlorm.flower.delivery`)
and the :class:`Instruction` travel with SecAgg+'s masking-stage request, with the reply spec every
client checks its own reply against (:mod:`fedlorm.flower.clientapp`). The server
gets the digit sums of the contributing clients (:func:`fedlorm.flower.secure.secure_sum`) and folds
them with :func:`~fedlorm.secure.fold.fold_secure_sum`, the in-process runtime's fold: decode, check
the sums, merge guarded. A client that refuses (its own checks failed, a value above the bound) or
vanishes after sharing keys is left out, as SecAgg+ defines; if SecAgg+ halts or breaks, or the sums
fail their checks or the merge, the global state stays as it was and the run goes on.

Nothing about one client is logged or recorded but whether it is in the sum: no reason from its
error reply, no count, no value. A step never sums two different sets of clients: before any mask is
removed the contributors are journaled (``pin``), and a step re-run after a crash must have exactly
the journaled contributors, or it halts before unmasking and keeps the state.

A federated evaluation (:func:`run_secure_evaluation`) is a secure sum of (correct predictions,
examples): the server learns the clients' overall accuracy and nothing per client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
from flwr.app import Context
from flwr.serverapp import Grid

from fedlorm.config import SecureConfig
from fedlorm.flower.delivery import FlowerDelivery
from fedlorm.flower.secure import NodeRequest, SecureSum, secure_sum
from fedlorm.flower.secure_client import CORRECT, DELIVERY, EVALUATE, EXAMPLES, REPLY_SPEC
from fedlorm.flower.strategy import FedlormStrategy, StepReport
from fedlorm.methods import Instruction, Server
from fedlorm.runtime.delivery import Broadcast, parts_to_json
from fedlorm.runtime.report import secure_tally
from fedlorm.secure.contribution import digit_layout, encoding_spec, secure_upload_bytes, spec_to_json
from fedlorm.secure.encoding import EncodingSpec, decode
from fedlorm.secure.fold import fold_secure_sum

__all__ = ["NOT_IN_SUM", "evaluation_layout", "run_secure_evaluation", "run_secure_step"]

logger = logging.getLogger(__name__)

NOT_IN_SUM = "not in the secure sum (no masked vector: it refused, or sent none within the timeout)"
"""The only reason recorded for a client left out of a secure step."""


def run_secure_step(
    strategy: FedlormStrategy,
    grid: Grid,
    context: Context,
    server: Server,
    instruction: Instruction,
    secure: SecureConfig,
    *,
    server_round: int,
    timeout: float,
    clients: Iterable[int] | None = None,
    delivery: FlowerDelivery | None = None,
    pinned: Sequence[int] | None = None,
    pin: Callable[[list[int]], None] | None = None,
) -> StepReport:
    """Run ``instruction``'s step as one secure sum over the asked clients' SuperNodes; its report.

    It halts before unmasking when fewer than ``strategy.min_clients`` send masked vectors, so no
    sum over fewer is ever revealed.

    Args:
        strategy: The run's strategy (which SuperNode serves which client).
        grid: The ServerApp's grid.
        context: The ServerApp's context (SecAgg+ runs in a private copy).
        server: The method's server, which folds the sum.
        instruction: The step.
        secure: The run's secure-aggregation settings.
        server_round: Flower's round number of the step's messages.
        timeout: Seconds each SecAgg+ stage waits for replies.
        clients: The clients the step asks; None: every client.
        delivery: What the nodes hold of earlier broadcasts (updated here); None: nothing, so every
            node is sent the whole broadcast.
        pinned: The clients a first run of this step summed (a resumed run); the step then asks
            only them and halts before unmasking unless exactly they contribute.
        pin: Called with the contributing clients before any mask is removed (the run journals
            them).

    Returns:
        The step's report: merged and dropped clients, tally, bytes up and down.
    """
    asked = range(strategy.num_clients) if clients is None else clients
    report = strategy.begin_step(instruction, asked, grid)
    report.secure = True
    if pinned is not None:
        missing = sorted(set(pinned) - set(report.nodes.values()))
        for node, k in sorted(report.nodes.items()):
            if k not in set(pinned):
                strategy.drop(report, node, k, "not in this step's first run (a resumed secure step)")
        report.nodes = {node: k for node, k in report.nodes.items() if k in set(pinned)}
        if missing:
            return _kept(
                strategy,
                report,
                "contributors",
                f"clients {missing} of this step's first run are not connected",
            )
    strategy.drop_unreached(report)
    spec = encoding_spec(secure)
    expected = server.expected_reply(instruction)
    layout = digit_layout(expected, spec)
    delivery = delivery or FlowerDelivery()
    broadcast = Broadcast(server.arrays(instruction))
    deltas, report.download_bytes, report.resent = delivery.plan(report.nodes, broadcast)
    requests = {
        node: NodeRequest(_numpy(delta.arrays), {DELIVERY: parts_to_json(delta.parts)})
        for node, delta in deltas.items()
    }
    config = {**instruction.to_record(), REPLY_SPEC: spec_to_json(expected)}
    halted: list[tuple[str, str]] = []
    masked: list[int] = []

    def before_unmask(nodes: list[int]) -> bool:
        masked.extend(nodes)
        clients = sorted(report.nodes[node] for node in nodes)
        if pinned is not None and clients != sorted(pinned):
            halted.append(("contributors", "other clients than in this step's first run contributed"))
            return False
        if len(clients) < strategy.min_clients:
            few = f"only {len(clients)} clients sent masked vectors (min_clients = {strategy.min_clients})"
            halted.append(("too-few", few))
            return False
        if pin is not None:
            pin(clients)
        return True

    result = _sum(
        grid, context, report, layout, spec, secure, server_round, timeout, config, requests, before_unmask
    )
    delivery.settle(report.nodes, broadcast, masked)
    if halted:  # stopped before unmasking: the server learnt no sum
        return _kept(strategy, report, *halted[0])
    if isinstance(result, str):
        return _kept(strategy, report, "halted", result)
    _drop_absent(strategy, report, result)
    merged = sorted(report.nodes[node] for node in result.contributors)
    upload = len(merged) * secure_upload_bytes(layout)
    fold = fold_secure_sum(server, instruction, result.sums, spec, len(merged))
    report.upload_bytes = upload
    report.tally = secure_tally(
        fold, instruction, clients=len(report.asked), contributors=len(merged), upload_bytes=upload
    )
    if fold.kept is not None:
        report.kept = fold.kept
        return report
    report.merged = merged
    return report


def _numpy(arrays: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tensors as the CPU numpy arrays SecAgg+'s request carries."""
    return {key: value.detach().cpu().numpy() for key, value in arrays.items()}


def evaluation_layout(spec: EncodingSpec) -> dict[str, tuple[int, ...]]:
    """The digit layout of a secure federated evaluation: two encoded scalars per client."""
    return {CORRECT: (spec.words,), EXAMPLES: (spec.words,)}


def run_secure_evaluation(
    strategy: FedlormStrategy,
    grid: Grid,
    context: Context,
    server: Server,
    task: int,
    secure: SecureConfig,
    *,
    server_round: int,
    timeout: float,
) -> dict[str, Any]:
    """Every identified SuperNode scores the deployed model on its own data of tasks 0..``task``; one
    secure sum of (correct, examples) gives the overall accuracy. The record holds the task, the
    accuracy (None if no sum came back or it fails its checks), the total examples and the clients in
    the sum; nothing per client."""
    nodes = strategy.connected(grid)
    spec = encoding_spec(secure)
    layout = evaluation_layout(spec)
    broadcast = _numpy(server.deployed_arrays())
    report = StepReport(
        step=f"task {task + 1} federated evaluation", nodes=nodes, asked=sorted(nodes.values())
    )
    record: dict[str, Any] = {
        "task": task,
        "accuracy": None,
        "num_examples": 0,
        "partitions": [],
        "secure": True,
    }
    requests = {node: NodeRequest(broadcast) for node in nodes}
    result = _sum(
        grid, context, report, layout, spec, secure, server_round, timeout, {EVALUATE: task}, requests, None
    )
    if isinstance(result, str):
        logger.warning("%s: %s", report.step, result)
        return record
    clients = sorted(nodes[node] for node in result.contributors)
    try:
        decoded = decode(result.sums, spec, len(clients))
    except ValueError as err:
        logger.warning("%s: the secure sum does not decode: %s", report.step, err)
        return record
    correct, examples = float(decoded[CORRECT]), float(decoded[EXAMPLES])
    if not (examples >= len(clients) and 0 <= correct <= examples) or correct != round(correct):
        logger.warning(
            "%s: the secure sums fail their checks (correct %g of %g)", report.step, correct, examples
        )
        return record
    accuracy = 100.0 * correct / examples
    logger.info("%s: clients' accuracy on their own data %.2f%%", report.step, accuracy)
    return {**record, "accuracy": accuracy, "num_examples": round(examples), "partitions": clients}


def _sum(
    grid: Grid,
    context: Context,
    report: StepReport,
    layout: dict[str, tuple[int, ...]],
    spec: EncodingSpec,
    secure: SecureConfig,
    server_round: int,
    timeout: float,
    config: dict[str, Any],
    requests: Mapping[int, NodeRequest],
    before_unmask: Callable[[list[int]], bool] | None,
) -> SecureSum | str:
    """One secure sum over ``report.nodes``, or why there is none (SecAgg+ cannot run, halts or breaks)."""
    try:
        result = secure_sum(
            grid,
            context,
            list(report.nodes),
            layout,
            word_bits=spec.word_bits,
            modulus_bits=spec.modulus_bits,
            num_shares=secure.num_shares,
            reconstruction_threshold=secure.reconstruction_threshold,
            timeout=timeout,
            config=config,
            server_round=server_round,
            requests=requests,
            before_unmask=before_unmask,
        )
    except ValueError as err:  # too few SuperNodes left for SecAgg+ (settings), or the protocol broke
        return f"no secure sum: {err}"
    if result is None:
        return "SecAgg+ halted: too few clients left for the reconstruction threshold"
    return result


def _drop_absent(strategy: FedlormStrategy, report: StepReport, result: SecureSum) -> None:
    """Every asked node whose masked vector is not in the sum is dropped with :data:`NOT_IN_SUM`."""
    for node in sorted(set(report.nodes) - set(result.contributors)):
        strategy.drop(report, node, report.nodes[node], NOT_IN_SUM)


def _kept(strategy: FedlormStrategy, report: StepReport, word: str, reason: str) -> StepReport:
    """Nothing merged: ``report.kept`` = ``word``, every asked node not yet dropped is dropped with
    ``reason``; the global state stays."""
    logger.warning("%s: %s; the previous global state stays", report.step, reason)
    report.kept = word
    dropped = {d.partition for d in report.dropped}
    for node, partition in sorted(report.nodes.items()):
        if partition not in dropped:
            strategy.drop(report, node, partition, reason)
    return report
