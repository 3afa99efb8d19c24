"""Secure sums of integer arrays over a Flower grid with Flower's own SecAgg+ (a prototype for issue 15).

Flower 1.42 ships SecAgg+ as :class:`flwr.server.workflow.SecAggPlusWorkflow` (server) and
:func:`flwr.client.mod.secaggplus_mod` (client). The workflow only accepts a ``LegacyContext`` and talks to
a legacy ``Strategy`` (``configure_fit`` / ``aggregate_fit``), and the mod only wraps plain ``train``
messages whose handler replies in the legacy ``FitRes`` layout. Both are usable from a Message-API
ServerApp: :func:`secure_sum` builds a private ``LegacyContext`` around a one-shot adapter strategy and
runs the workflow's four stages over the ServerApp's ``Grid``; the ClientApp puts
:func:`optional_secaggplus_mod` on its plain ``train`` handler and answers the masking stage with
:func:`secure_reply`.

The workflow computes a weighted average of clipped, stochastically rounded floats. Chosen parameters
make that pipeline carry non-negative integers below 2^word_bits exactly: every client reports weight
1 and ``max_weight`` is 1 (so nothing is rescaled), the quantization range is 2^word_bits and the
clipping range half of it (so the quantizer is the identity on integers, and stochastic rounding of an
integer is that integer). The server receives the average over the c contributing clients; times c
it is the exact integer sum, provided c·2^word_bits < modulus. ``fedlorm.secure.encoding`` turns
float64 summands into such integers and back.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.compat.legacy_context import LegacyContext
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD
from flwr.server.workflow.constant import Key as WorkflowKey
from flwr.server.workflow.secure_aggregation.secaggplus_workflow import WorkflowState
from flwr.serverapp import Grid

from fedlorm.flower.masks import use_full_secret_masks
from fedlorm.flower.secure_client import (
    BROADCAST,
    FITINS_CONFIG,
    LAYOUT,
    WORD_BITS,
    is_secure_message,
    optional_secaggplus_mod,
    secure_broadcast,
    secure_reply,
    secure_request,
)

__all__ = [
    "FITINS_CONFIG",
    "LAYOUT",
    "WORD_BITS",
    "NodeRequest",
    "SecureSum",
    "SecureSumError",
    "is_secure_message",
    "optional_secaggplus_mod",
    "secure_broadcast",
    "secure_reply",
    "secure_request",
    "secure_sum",
]


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SecureSum:
    """What the server learns: the key-wise integer sums and how many clients they include."""

    sums: dict[str, np.ndarray]
    """int64 arrays of the layout's shapes: Σ over the contributing clients, exact."""
    contributors: list[int]
    """Node ids whose masked arrays entered the sum (those that replied in the masking stage), ascending."""


@dataclass(frozen=True)
class NodeRequest:
    """What the masking stage's request carries to one node besides the sum's common config."""

    arrays: Mapping[str, np.ndarray]
    """The arrays the node's handler gets (:func:`secure_broadcast`): its share of the broadcast."""
    config: Mapping[str, Scalar] = field(default_factory=dict)
    """Config entries for this node alone."""


class _OneShotSum(Strategy):
    """The legacy strategy the workflow needs: one fit round to fixed nodes; keeps the unmasked sum."""

    def __init__(self, grid: Grid, run_id: int, requests: Mapping[int, FitIns]) -> None:
        self.proxies = [GridClientProxy(node_id, grid, run_id) for node_id in sorted(requests)]
        self.requests = dict(requests)
        self.average: list[np.ndarray] | None = None
        self.contributors: list[int] = []

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        """Nothing to initialise: the sum has no global model."""
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        """Every given node, with its own request (config and arrays)."""
        return [(proxy, self.requests[int(proxy.node_id)]) for proxy in self.proxies]

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        """Keep the workflow's dequantized average (the same array in every result) and the count."""
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
            self.contributors = sorted(int(proxy.node_id) for proxy, _ in results)  # type: ignore[attr-defined]
        return None, {}

    def configure_evaluate(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, Any]]:
        """No evaluation."""
        return []

    def aggregate_evaluate(
        self, server_round: int, results: list[Any], failures: list[Any]
    ) -> tuple[float | None, dict[str, Scalar]]:
        """No evaluation."""
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple[float, dict[str, Scalar]] | None:
        """No evaluation."""
        return None


class SecureSumError(ValueError):
    """SecAgg+ broke on what a client sent (a malformed masked vector, key or share): no sum."""


class _Workflow(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, with a last word before any mask is removed.

    ``before_unmask(node_ids)`` is called with the nodes whose masked vectors are in the sum, once
    they are known and before the unmask stage; False halts the protocol, so the server learns no
    sum at all (a re-run step must not sum other clients than its first run did).
    """

    def __init__(self, *args: Any, before_unmask: Callable[[list[int]], bool] | None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.before_unmask = before_unmask

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: WorkflowState) -> bool:
        """Flower's stage, then ``before_unmask`` on the nodes whose masked vectors came back."""
        if not super().collect_masked_vectors_stage(grid, context, state):
            return False
        return self.before_unmask is None or self.before_unmask(sorted(state.active_node_ids))


def _check_settings(
    num_nodes: int, num_shares: int | float, threshold: int | float, word_bits: int, modulus_bits: int
) -> None:
    """One clear ValueError for settings under which SecAgg+ cannot run or the sum could wrap."""
    if num_nodes < 2:
        raise ValueError(f"secure aggregation needs at least 2 clients; got {num_nodes}")
    shares = num_shares if isinstance(num_shares, int) else max(round(num_shares * num_nodes), 3)
    if isinstance(num_shares, int) and num_shares > num_nodes:
        raise ValueError(f"num_shares = {num_shares} is larger than the number of clients ({num_nodes})")
    if isinstance(threshold, int) and threshold > min(shares, num_nodes):
        raise ValueError(
            f"reconstruction threshold {threshold} is larger than the number of clients ({num_nodes}) "
            f"or of shares ({shares})"
        )
    if not 1 <= word_bits <= 30:
        raise ValueError(f"word_bits = {word_bits}; Flower's quantizer holds at most 30 bits per entry here")
    if num_nodes << word_bits >= 1 << modulus_bits:
        raise ValueError(
            f"{num_nodes} clients × 2^{word_bits} reach the modulus 2^{modulus_bits}: the sum would wrap"
        )


def _integer_sums(
    average: list[np.ndarray], count: int, layout: Mapping[str, Sequence[int]], word_bits: int
) -> dict[str, np.ndarray]:
    """The workflow's average over ``count`` clients back to the exact integer sums of the layout."""
    offset = float(count << (word_bits - 1))
    totals = [np.rint(np.asarray(a, dtype=np.float64) * count + offset).astype(np.int64) for a in average]
    if len(totals) != len(layout):
        raise ValueError(f"SecAgg+ returned {len(totals)} arrays for a layout of {len(layout)}")
    pairs = zip(layout.items(), totals, strict=True)
    return {key: total.reshape(tuple(shape)) for (key, shape), total in pairs}


def secure_sum(
    grid: Grid,
    context: Context,
    node_ids: Sequence[int],
    layout: Mapping[str, Sequence[int]],
    *,
    word_bits: int = 24,
    modulus_bits: int = 32,
    num_shares: int | float = 1.0,
    reconstruction_threshold: int | float = 0.67,
    timeout: float | None = None,
    config: Mapping[str, Scalar] | None = None,
    server_round: int = 1,
    requests: Mapping[int, NodeRequest] | None = None,
    before_unmask: Callable[[list[int]], bool] | None = None,
) -> SecureSum | None:
    """Sum the clients' integer arrays (``layout``: key → shape, entries in [0, 2^word_bits)) with SecAgg+.

    ``config`` reaches each client's handler with the layout (:func:`secure_request`), and a node's
    :class:`NodeRequest` (its arrays, :func:`secure_broadcast`, and its own config entries) with it;
    all only in the masking stage. A node without a request gets no arrays. Returns None
    when the protocol halts (too few clients left for the threshold); the server then has learnt nothing
    about the arrays. ``num_shares`` and ``reconstruction_threshold`` are SecAgg+'s (a float is a share
    of the clients, resp. of the shares). ``before_unmask`` sees the contributing node ids before any
    mask is removed and may halt the protocol (:class:`_Workflow`). Masks come from the whole shared
    secret (:func:`~fedlorm.flower.masks.use_full_secret_masks`). ValueError for settings SecAgg+
    cannot run with; :class:`SecureSumError` when the protocol breaks on a client's message.
    """
    use_full_secret_masks()
    nodes = sorted(set(node_ids))
    _check_settings(len(nodes), num_shares, reconstruction_threshold, word_bits, modulus_bits)
    common: dict[str, Scalar] = dict(config or {})
    common[LAYOUT] = json.dumps({key: [int(n) for n in shape] for key, shape in layout.items()})
    common[WORD_BITS] = word_bits
    fitins = {}
    for node in nodes:
        request = (requests or {}).get(node, NodeRequest({}))
        node_config = {**common, **request.config, BROADCAST: json.dumps(list(request.arrays))}
        parameters = ndarrays_to_parameters([np.asarray(a) for a in request.arrays.values()])
        fitins[node] = FitIns(parameters, node_config)
    strategy = _OneShotSum(grid, context.run_id, fitins)
    private = Context(
        run_id=context.run_id,
        node_id=context.node_id,
        node_config=dict(context.node_config),
        state=RecordDict(),
        run_config=dict(context.run_config),
    )
    legacy = LegacyContext(private, strategy=strategy)
    legacy.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({WorkflowKey.CURRENT_ROUND: server_round})
    legacy.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()
    workflow = _Workflow(
        num_shares,
        reconstruction_threshold,
        max_weight=1.0,
        clipping_range=float(1 << (word_bits - 1)),
        quantization_range=1 << word_bits,
        modulus_range=1 << modulus_bits,
        timeout=timeout,
        before_unmask=before_unmask,
    )
    try:
        workflow(grid, legacy)
        if strategy.average is None:
            return None
        sums = _integer_sums(strategy.average, len(strategy.contributors), layout, word_bits)
    except Exception as err:  # the workflow parses every client's keys, shares and vectors
        logger.debug("SecAgg+ failed", exc_info=err)
        raise SecureSumError(f"SecAgg+ failed on a client's message ({type(err).__name__})") from None
    return SecureSum(sums=sums, contributors=strategy.contributors)
