"""Which client a SuperNode serves: the query exchange that maps SuperNode ids to partitions.

Flower gives each SuperNode its ``node_config`` (``partition-id``, ``num-partitions``), which only the
node sees. Before a node takes part in a step, the server asks it once (a query message) and keeps the
answer, so every later reply, drop or absence is named by its client index. Imports no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flwr.app import ConfigRecord, RecordDict

__all__ = ["IDENTITY", "Identity", "decode_identity", "encode_identity", "identity_of"]

IDENTITY = "identity"
PARTITION, PARTITIONS = "partition-id", "num-partitions"


@dataclass(frozen=True)
class Identity:
    """A SuperNode's client index and the number of clients it was configured for."""

    partition: int
    partitions: int


def identity_of(node_config: Mapping[str, Any]) -> Identity:
    """This SuperNode's identity from its ``node_config`` (ValueError if it is missing or not integer)."""
    try:
        partition, partitions = int(node_config[PARTITION]), int(node_config[PARTITIONS])
    except (KeyError, TypeError, ValueError):
        raise ValueError(
            "this SuperNode needs --node-config 'partition-id=K num-partitions=N' (integers), "
            f"got {dict(node_config)!r}"
        ) from None
    return Identity(partition=partition, partitions=partitions)


def encode_identity(identity: Identity) -> RecordDict:
    """Reply content for the identity query."""
    return RecordDict(
        {IDENTITY: ConfigRecord({PARTITION: identity.partition, PARTITIONS: identity.partitions})}
    )


def decode_identity(content: RecordDict) -> Identity:
    """Inverse of :func:`encode_identity`; ValueError for anything malformed."""
    try:
        record = content.config_records[IDENTITY]
        partition, partitions = record[PARTITION], record[PARTITIONS]
    except (KeyError, TypeError) as err:
        raise ValueError(f"malformed identity reply: {type(err).__name__}: {err}") from None
    if not (isinstance(partition, int) and isinstance(partitions, int)):
        raise ValueError(f"identity reply {partition!r}/{partitions!r} is not integer")
    return Identity(partition=partition, partitions=partitions)
