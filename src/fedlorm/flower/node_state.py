"""What a SuperNode keeps between messages of a run: the broadcast arrays it was last sent.

Each train message carries only the arrays of the step's broadcast the node does not hold
(:mod:`fedlorm.runtime.delivery`); the node rebuilds the whole broadcast from the message and this
store, and, once it has answered the step, keeps the rebuilt arrays for the next one. The store
lives in Flower's node state (``Context.state``), which Flower keeps per run and node between
messages, in simulation and in deployment alike: one array per broadcast key (for ViT-B/16 with
rank-16 LoRA and the earlier tasks' factors, up to about 100 MiB per node) and its digest. A node
that restarts starts empty; the server then sends it what it lacks (the node asks again, or the
server knows it never sent this node anything).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass

from flwr.app import ArrayRecord, ConfigRecord, Context
from torch import Tensor

from fedlorm.flower.messages import from_array_record, to_array_record
from fedlorm.runtime.delivery import Part

__all__ = ["HELD_ARRAYS", "HELD_DIGESTS", "Holding", "after_step", "held", "keep"]

HELD_ARRAYS = "fedlorm.held-arrays"
"""Node-state record of the held arrays, by broadcast key."""
HELD_DIGESTS = "fedlorm.held-digests"
"""Node-state record of their digests (JSON under ``digests``)."""


def held(context: Context) -> tuple[dict[str, Tensor], dict[str, str]]:
    """The arrays this node holds and their digests (both empty for a node that holds nothing).

    Args:
        context: The ClientApp's context.

    Returns:
        Key → array, and key → digest.
    """
    state = context.state
    if HELD_ARRAYS not in state.array_records or HELD_DIGESTS not in state.config_records:
        return {}, {}
    try:
        arrays = from_array_record(state.array_records[HELD_ARRAYS])
        digests = json.loads(str(state.config_records[HELD_DIGESTS]["digests"]))
    except (KeyError, TypeError, ValueError):
        return {}, {}
    if not isinstance(digests, dict) or set(digests) != set(arrays):
        return {}, {}
    return arrays, {str(k): str(v) for k, v in digests.items()}


@dataclass(frozen=True)
class Holding:
    """What the node will hold once it has answered a step, as node-state records (copies)."""

    arrays: ArrayRecord
    digests: ConfigRecord


def after_step(
    arrays: Mapping[str, Tensor],
    digests: Mapping[str, str],
    broadcast: Mapping[str, Tensor],
    parts: Mapping[str, Part],
) -> Holding:
    """What the node holds after answering a step: what it held, with the step's broadcast on top.

    Taken before the node computes anything, so that nothing the computation does to the arrays
    reaches the store.

    Args:
        arrays: What the node held before the step (:func:`held`).
        digests: Their digests.
        broadcast: The step's whole broadcast, as the node rebuilt it.
        parts: The step's parts (they carry each array's digest).

    Returns:
        The records :func:`keep` stores.
    """
    kept = {**arrays, **broadcast}
    kept_digests = {**digests, **{key: part.digest for key, part in parts.items()}}
    return Holding(to_array_record(kept), ConfigRecord({"digests": json.dumps(kept_digests, sort_keys=True)}))


def keep(context: Context, holding: Holding) -> None:
    """Store ``holding`` in the node state: the node answered its step.

    Args:
        context: The ClientApp's context.
        holding: :func:`after_step`'s records.
    """
    context.state[HELD_ARRAYS] = holding.arrays
    context.state[HELD_DIGESTS] = holding.digests
