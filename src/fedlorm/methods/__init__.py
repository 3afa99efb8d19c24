"""Federated methods behind one client/server protocol (see :mod:`fedlorm.methods.base`) and their
registry (:mod:`fedlorm.methods.registry`; docs/methods.md shows how to add one)."""

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
from fedlorm.methods.joint import JOINT, joint_config
from fedlorm.methods.registry import METHODS, Method
from fedlorm.methods.replies import Kind, ReplySpec, Summand
from fedlorm.methods.steps import Factor, Phase, step_label

__all__ = [
    "JOINT",
    "METHODS",
    "Arrays",
    "Client",
    "ClientData",
    "ClientReply",
    "Factor",
    "Instruction",
    "Kind",
    "Method",
    "Phase",
    "ReplySpec",
    "Server",
    "Summand",
    "add_arrays",
    "joint_config",
    "payload_bytes",
    "step_label",
]
