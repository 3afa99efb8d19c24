"""Federated methods behind one client/server protocol (see :mod:`fedlorm.methods.base`)."""

from fedlorm.methods.base import (
    Arrays,
    Client,
    ClientData,
    ClientReply,
    Instruction,
    Server,
    add_arrays,
    payload_bytes,
)
from fedlorm.methods.client_merge import CLIENT_MERGES
from fedlorm.methods.finetune import FinetuneClient, FinetuneServer
from fedlorm.methods.joint import JOINT, joint_config
from fedlorm.methods.lorm import LoRMClient, LoRMServer

METHODS: dict[str, tuple[type[Server], type[Client]]] = {
    **{name: (LoRMServer, LoRMClient) for name in CLIENT_MERGES},
    "finetune": (FinetuneServer, FinetuneClient),
    JOINT: (FinetuneServer, FinetuneClient),
}
"""Method name → (server, client) classes. ``joint`` runs on :func:`joint_config`'s scenario."""

__all__ = [
    "JOINT",
    "METHODS",
    "Arrays",
    "Client",
    "ClientData",
    "ClientReply",
    "Instruction",
    "Server",
    "add_arrays",
    "joint_config",
    "payload_bytes",
]
