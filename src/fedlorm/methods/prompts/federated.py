"""The prompt methods' client and server: FedAvg of the trained prompt rows and the task's head rows.

Each training round every client loads the broadcast (the rows ``[0, active)`` of the pool's arrays
and the whole head), trains the pool's trained rows and the current task's head rows, and replies
n_i·θ_i for each of them and n_i. The server sets θ = Σ n_i θ_i / Σ n_i: additive summands, so the
in-process, Flower and secure-aggregation runtimes give the same result.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import ClassVar

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.arrays import HEAD, apply_arrays
from fedlorm.methods.base import Arrays, Client, ClientData, ClientReply, Instruction, Server
from fedlorm.methods.prompts.coda import CodaPool
from fedlorm.methods.prompts.l2p import L2PPool
from fedlorm.methods.prompts.pool import PREFIX, PromptPool, attach_pool
from fedlorm.methods.prompts.train import train_prompts
from fedlorm.methods.prompts.vit import vit_encoder
from fedlorm.methods.replies import ReplySpec, count, value
from fedlorm.methods.steps import Factor, Phase

__all__ = ["CodaClient", "CodaServer", "L2PClient", "L2PServer", "PromptClient", "PromptServer"]

WEIGHT, BIAS = f"{HEAD}.weight", f"{HEAD}.bias"


class PromptClient(Client):
    """Trains the pool's trained rows and the task's head rows; replies n·θ and n."""

    pool_type: ClassVar[type[PromptPool]]

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.vit = vit_encoder(model.encoder, cfg)
        self.pool = attach_pool(model, self.vit, self.pool_type, cfg)

    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        self.pool.load(arrays, instruction.task)
        with torch.no_grad():
            self.model.head.weight.copy_(arrays[WEIGHT])
            self.model.head.bias.copy_(arrays[BIAS])
        loss = train_prompts(
            self.model, self.vit, self.pool, data, self.cfg.train, classes=instruction.classes,
            generator=generator,
        )
        n = len(data)
        rows = slice(instruction.class_start, instruction.class_stop)
        trained = {
            **self.pool.trained_rows(),
            WEIGHT: self.model.head.weight[rows].detach(),
            BIAS: self.model.head.bias[rows].detach(),
        }
        summands = {key: n * array.to(torch.float64) for key, array in trained.items()}
        summands["n"] = torch.tensor(float(n), dtype=torch.float64)
        return ClientReply(summands=summands, num_examples=n, metrics={"train_loss": loss})

    def deploy(self, arrays: Mapping[str, Tensor], task: int) -> None:
        """The head as every method loads it, and the prompt rows into the pool with ``task``'s layout."""
        super().deploy(arrays, task)
        self.pool.load(arrays, task)


class PromptServer(Server):
    """Holds every row of the pool and the head; averages the clients' trained rows by n_i."""

    pool_type: ClassVar[type[PromptPool]]

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.pool = attach_pool(model, vit_encoder(model.encoder, cfg), self.pool_type, cfg)
        self.dtype = model.head.weight.dtype
        self.state: Arrays = {PREFIX + name: a.detach().clone() for name, a in self.pool.arrays.items()}
        self.state[WEIGHT] = model.head.weight.detach().clone()  # as model.head_init made it
        self.state[BIAS] = model.head.bias.detach().clone()
        self.task = 0

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        self.task = task
        self.pool.init_rows(self.state, task, generator)

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        for r in range(self.cfg.train.rounds):
            yield Instruction(task, r, Phase.TRAIN, Factor.PROMPTS, classes.start, classes.stop)

    def arrays(self, instruction: Instruction) -> Arrays:
        return self._rows_in_use(instruction.task)

    def _rows_in_use(self, task: int) -> Arrays:
        """Copies of the rows ``[0, active)`` task ``task`` uses of every pool array, and the whole head."""
        active, _ = self.pool.layout(task)
        return {key: (a[:active] if key.startswith(PREFIX) else a).clone() for key, a in self.state.items()}

    def _rows(self, instruction: Instruction) -> dict[str, slice]:
        _, trained = self.pool.layout(instruction.task)
        head = slice(instruction.class_start, instruction.class_stop)
        return {key: trained if key.startswith(PREFIX) else head for key in self.state}

    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        n = sums["n"]
        for key, rows in self._rows(instruction).items():
            self.state[key][rows] = (sums[key] / n).to(self.state[key])

    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        spec = {}
        for key, rows in self._rows(instruction).items():
            array = self.state[key]
            spec[key] = value(len(range(array.shape[0])[rows]), *array.shape[1:])
        spec["n"] = count()
        return spec

    def deployed_arrays(self) -> Arrays:
        """The global prompt rows the current task uses and the head (copies; nothing is loaded)."""
        return self._rows_in_use(self.task)

    def deploy(self, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        """The head as every method loads it, and the global prompt rows into ``model``'s pool with
        the current task's layout (the pool's forward hook then makes ``model`` the prompted model)."""
        deployed = self.deployed_arrays()
        apply_arrays(model, layers, deployed)
        pool = attach_pool(model, vit_encoder(model.encoder, self.cfg), self.pool_type, self.cfg)
        pool.load(deployed, self.task)

    def state_dict(self) -> Arrays:
        return {**self.state, "task": torch.tensor(self.task)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = {key: state[key].to(a.device, copy=True) for key, a in self.state.items()}
        self.task = int(state["task"])


class L2PClient(PromptClient):
    """``l2p``'s client."""

    pool_type = L2PPool


class L2PServer(PromptServer):
    """``l2p``'s server."""

    pool_type = L2PPool


class CodaClient(PromptClient):
    """``coda-p``'s client."""

    pool_type = CodaPool


class CodaServer(PromptServer):
    """``coda-p``'s server."""

    pool_type = CodaPool
