"""Sequential fine-tuning: the federated lower bound.

Clients train both LoRA factors and the head; the server averages A, B and the head weighted by
sample counts (FedAvg / FedIT). Nothing is merged across tasks: the same adapter keeps training on
each new task, so it forgets what it learned before.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.arrays import apply_arrays, factor_key, shared_model_arrays
from fedlorm.methods.base import Arrays, Client, ClientData, ClientReply, Instruction, Server
from fedlorm.methods.common import Penalty, train_with_config
from fedlorm.methods.replies import ReplySpec, count, value
from fedlorm.methods.steps import Factor, Phase

__all__ = ["FinetuneClient", "FinetuneServer"]


class FinetuneClient(Client):
    """Trains both factors and the head; replies with sample-weighted parameters."""

    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        train = self.cfg.train
        apply_arrays(self.model, self.layers, arrays)
        loss = train_with_config(
            self.model,
            self.layers,
            data,
            train,
            factor=Factor.BOTH,
            classes=instruction.classes,
            generator=generator,
            penalty=self.penalty(arrays, instruction),
        )
        n = len(data)
        summands = {
            key: n * value.to(torch.float64)
            for key, value in shared_model_arrays(self.model, self.layers).items()
        }
        summands["n"] = torch.tensor(float(n), dtype=torch.float64)
        return ClientReply(summands=summands, num_examples=n, metrics={"train_loss": loss})

    def penalty(self, arrays: Mapping[str, Tensor], instruction: Instruction) -> Penalty | None:
        """A term added to the local loss (none here; the regularised baselines add one)."""
        return None


class FinetuneServer(Server):
    """Sample-weighted averages of every trained array; one adapter for the whole sequence."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.dtype = model.head.weight.dtype
        self.state: Arrays = shared_model_arrays(model, layers)  # head as model.head_init made it
        self.started = False

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        if self.started:
            return
        self.started = True
        for name in self.layer_names:
            a = self.state[factor_key(name, "A")]
            fresh = torch.empty(a.shape, dtype=torch.float32)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            self.state[factor_key(name, "A")] = fresh.to(device=a.device, dtype=a.dtype)
            self.state[factor_key(name, "B")].zero_()

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        for r in range(self.cfg.train.rounds):
            yield Instruction(task, r, Phase.TRAIN, Factor.BOTH, classes.start, classes.stop)

    def arrays(self, instruction: Instruction) -> Arrays:
        return dict(self.state)

    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        n = sums["n"]
        self.state = {key: (sums[key] / n).to(self.dtype) for key in self.state}

    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        spec = {key: value(*array.shape) for key, array in self.state.items()}
        spec["n"] = count()
        return spec

    def deployed_arrays(self) -> Arrays:
        return dict(self.state)

    def state_dict(self) -> Arrays:
        return {**self.state, "started": torch.tensor(self.started)}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.state = {key: state[key].to(value.device, copy=True) for key, value in self.state.items()}
        self.started = bool(state["started"])
