"""One engine step as a SecAgg+ secure sum over the Flower grid: the server sees only the sum.

The step's broadcast and :class:`Instruction` travel with SecAgg+'s masking-stage request, with the
reply spec every client checks its own reply against (:mod:`fedlorm.flower.clientapp`). The server
gets the digit sums of the contributing clients (:func:`fedlorm.flower.secure.secure_sum`), decodes
them with n = the number of contributors and folds the sums with the engine's :func:`fold_sums`. A
client that errors out (its own checks failed, a value above the bound) or vanishes after sharing
keys is left out, as SecAgg+ defines; if SecAgg+ halts or the sum does not decode, the global state
stays as it was and the run goes on.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid

from fedlorm.config import SecureConfig
from fedlorm.flower.secure import secure_sum
from fedlorm.flower.secure_client import REPLY_SPEC
from fedlorm.flower.strategy import FedlormStrategy, StepReport
from fedlorm.methods import Instruction, Server
from fedlorm.runtime.engine import fold_sums, secure_upload_bytes
from fedlorm.secure.contribution import digit_layout, encoding_spec, secure_expected, spec_to_json
from fedlorm.secure.encoding import decode

__all__ = ["run_secure_step"]

logger = logging.getLogger(__name__)


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
) -> StepReport:
    """Run ``instruction``'s step as one secure sum over the asked clients' SuperNodes; its report."""
    report = strategy.begin_step(instruction, grid)
    report.secure = True
    strategy.drop_unreached(report)
    spec = encoding_spec(secure)
    expected = secure_expected(server, instruction)
    layout = digit_layout(expected, spec)
    broadcast = {key: value.detach().cpu().numpy() for key, value in server.arrays(instruction).items()}
    report.download_bytes = sum(array.nbytes for array in broadcast.values()) * len(report.nodes)
    config = {**instruction.to_record(), REPLY_SPEC: spec_to_json(expected)}
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
            arrays=broadcast,
        )
    except ValueError as err:  # too few SuperNodes left for SecAgg+ in this step
        return _kept(strategy, report, list(report.nodes), f"no secure sum: {err}")
    if result is None:
        halted = "SecAgg+ halted: too few clients left for the reconstruction threshold"
        return _kept(strategy, report, list(report.nodes), halted)
    merged = sorted(report.nodes[node] for node in result.contributors)
    for node in sorted(set(report.nodes) - set(result.contributors)):
        reason = "not in the secure sum: no masked vector (an error reply, or none within the timeout)"
        strategy.drop(report, node, report.nodes[node], reason)
    if len(merged) < strategy.min_clients:
        logger.warning(
            "%s: only %d clients in the secure sum (min_clients = %d); the previous global state stays",
            report.step,
            len(merged),
            strategy.min_clients,
        )
        return report
    try:
        decoded = decode(result.sums, spec, len(merged))
    except ValueError as err:  # a contribution was out of range: the sum is not n valid encodings
        return _kept(strategy, report, result.contributors, f"the secure sum does not decode: {err}")
    report.merged = merged
    report.upload_bytes = len(merged) * secure_upload_bytes(layout)
    report.tally = fold_sums(
        server,
        instruction,
        decoded,
        clients=len(report.asked),
        contributors=len(merged),
        upload_bytes=report.upload_bytes,
    )
    return report


def _kept(strategy: FedlormStrategy, report: StepReport, nodes: list[int], reason: str) -> StepReport:
    """Nothing merged: each of ``nodes`` dropped with ``reason``; the global state stays."""
    logger.warning("%s: %s; the previous global state stays", report.step, reason)
    for node in sorted(nodes):
        strategy.drop(report, node, report.nodes[node], reason)
    return report
