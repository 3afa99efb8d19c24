"""Federated methods behind one client/server protocol (see :mod:`fedlorm.methods.base`)."""

from fedlorm.methods.base import (
    Arrays,
    Client,
    ClientData,
    ClientReply,
    Instruction,
    Server,
    add_arrays,
)
from fedlorm.methods.finetune import FinetuneClient, FinetuneServer
from fedlorm.methods.lorm import LoRMClient, LoRMServer

METHODS: dict[str, tuple[type[Server], type[Client]]] = {
    "lorm": (LoRMServer, LoRMClient),
    "finetune": (FinetuneServer, FinetuneClient),
}

__all__ = [
    "METHODS",
    "Arrays",
    "Client",
    "ClientData",
    "ClientReply",
    "Instruction",
    "Server",
    "add_arrays",
]
