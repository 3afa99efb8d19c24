"""The client/server protocol every federated method implements.

A round is: the server publishes an :class:`Instruction` and a dict of arrays; every client loads the
arrays into the (one, shared) model, does its local work and replies with *summands* (a dict of
tensors); the runtime adds the replies up and hands only the sums to :meth:`Server.aggregate`. The
server therefore never sees one client's statistics, and the in-process simulator and the Flower app
are two transports of the same messages.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.arrays import apply_arrays
from fedlorm.methods.replies import ReplySpec
from fedlorm.methods.steps import Factor, Instruction, Phase

Arrays = dict[str, Tensor]

__all__ = [
    "Arrays",
    "Client",
    "ClientData",
    "ClientReply",
    "Factor",
    "Instruction",
    "Phase",
    "ReplySpec",
    "Server",
    "add_arrays",
    "payload_bytes",
]


@dataclass
class ClientData:
    """One client's share of the current task: preprocessed images and class positions."""

    images: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return int(self.labels.numel())


@dataclass
class ClientReply:
    """What a client sends back: additive summands, its sample count and local metrics."""

    summands: Arrays
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def upload_bytes(self) -> int:
        """Bytes on the wire for the summands (tensor payload only)."""
        return payload_bytes(self.summands)


def payload_bytes(arrays: Mapping[str, Tensor]) -> int:
    """The tensor payload of a set of arrays, as up- and download traffic counts it.

    Args:
        arrays: Named arrays; values that are not tensors count nothing.

    Returns:
        Σ numel · element_size in bytes.
    """
    return sum(t.numel() * t.element_size() for t in arrays.values() if isinstance(t, Tensor))


def add_arrays(total: Arrays | None, update: Mapping[str, Tensor]) -> Arrays:
    """Add one client's summands to a running sum, key by key, in float64.

    Args:
        total: The running sum, changed in place; None starts a new one.
        update: One client's summands.

    Returns:
        The running sum (``total``, or a new float64 copy of ``update``).

    Raises:
        ValueError: If the keys differ from the running sum's.
    """
    if total is None:
        return {k: v.detach().to(torch.float64).clone() for k, v in update.items()}
    if total.keys() != update.keys():
        missing = sorted(set(total) ^ set(update))[:3]
        raise ValueError(f"client reply keys differ from the others' (e.g. {missing})")
    for key, value in update.items():
        total[key] += value.detach().to(torch.float64)
    return total


class Client(ABC):
    """Client side of a method: stateless between rounds, everything arrives with the message.

    One object serves every client of a run in turn (the runtimes pass each client's data and
    random stream), so nothing a client learns may stay on it between steps.

    Args:
        cfg: The run's config, as the run uses it.
        model: The one model the clients train in turn.
        layers: The model's LoRA layers, name → layer.
    """

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        self.cfg = cfg
        self.model = model
        self.layers = dict(layers)

    @abstractmethod
    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        """Do one client's work for one step.

        Args:
            arrays: The step's broadcast (:meth:`Server.arrays`); the client loads it first.
            instruction: What the step asks: its phase, the factor to train, the task's classes.
            data: This client's share of the current task.
            generator: This client's random stream for this step (batch order, augmentation).

        Returns:
            The client's additive summands, its sample count and local metrics (e.g. the loss).
        """

    def deploy(self, arrays: Mapping[str, Tensor], task: int) -> None:
        """Load a deployed model into ``model``, e.g. to evaluate it on this client's data.

        The client's side of :meth:`Server.deploy`.

        Args:
            arrays: :meth:`Server.deployed_arrays` after a step of ``task``.
            task: The task the deployed model has finished or is in.
        """
        apply_arrays(self.model, self.layers, arrays)


class Server(ABC):
    """Server side of a method: global state, per-round instructions and the closed-form folds.

    The server only ever sees sums over clients (:meth:`aggregate`), never one client's reply.

    Args:
        cfg: The run's config, as the run uses it.
        model: The run's model; a server copies what it needs (initial factors, head) at start.
        layers: The model's LoRA layers, name → layer.
    """

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        self.cfg = cfg
        self.layer_names = list(layers)

    @abstractmethod
    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        """Prepare the global state for a new task (e.g. fresh adapters).

        Args:
            task: The task's index, from 0.
            classes: The task's class positions.
            generator: The server's seeded stream; a server that draws (new factors) draws here.
        """

    @abstractmethod
    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        """The steps of one task, in order.

        Args:
            task: The task's index.
            classes: The task's class positions.

        Returns:
            An iterator of instructions: the training rounds, then any end-of-task statistics step.
        """

    @abstractmethod
    def arrays(self, instruction: Instruction) -> Arrays:
        """The broadcast of one step: what every client it asks needs.

        Args:
            instruction: The step.

        Returns:
            Named arrays, the same for every client.
        """

    @abstractmethod
    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        """Fold the step's summed replies into the global state.

        Args:
            instruction: The step the replies answered.
            sums: The sum over the contributing clients of each summand, in float64.
            num_examples: The contributing clients' total sample count.
        """

    @abstractmethod
    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        """What each array of a valid reply is, so that both runtimes check every reply against it.

        Secure aggregation publishes it to the clients before any reply exists, so every method
        must know it in advance.

        Args:
            instruction: The step.

        Returns:
            Key → :class:`~fedlorm.methods.replies.Summand` (shape, dtype, kind) of every summand.
        """

    @abstractmethod
    def deployed_arrays(self) -> Arrays:
        """The model to evaluate now, with no task id at test time; a pure getter.

        Returns:
            Named arrays (factors, frozen updates, head) that :meth:`deploy` loads.
        """

    def deploy(self, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        """Load the deployed model into ``model``, which the runtime then evaluates and exports.

        The default loads :meth:`deployed_arrays` (LoRA factors, frozen updates, head); a method
        whose model holds more (e.g. a prompt pool) overrides it to load that too.

        Args:
            model: The run's model.
            layers: Its LoRA layers, name → layer.
        """
        apply_arrays(model, layers, self.deployed_arrays())

    @abstractmethod
    def state_dict(self) -> Arrays:
        """Everything the server holds, for checkpoints and equivalence tests.

        Contract (checkpoints rely on it): tensors only, and *everything* that later steps read,
        so that a freshly built server (same config and model) given
        ``load_state_dict(state_dict())`` continues bit for bit like this one. Non-tensor fields
        (task index, flags such as ``task_finished`` or ``started``, counters) go in as 0-d tensors
        under plain names (e.g. ``"task"``); the checkpoint stores the dict as it is (safetensors).

        Returns:
            Name → tensor, every piece of state later steps read.
        """

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (copies; resume after a crash).

        A method that does not override it cannot be resumed: its checkpoints are written, and
        ``--resume`` stops with this error.

        Args:
            state: What :meth:`state_dict` returned, e.g. read back from a checkpoint.

        Raises:
            NotImplementedError: If the method does not support resuming.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement load_state_dict")
