"""``lwf``: sequential FedAvg fine-tuning (``finetune``) plus Learning without Forgetting (Li & Hoiem).

On task t > 0 each client adds λ·T²·KL(softmax(z_old/T) ‖ softmax(z/T)) over the logits of the
classes of tasks < t to its local loss, with z_old the logits of the *teacher*: the global model as
the task started (the previous task's final model), frozen. Clients keep no state, so the server
broadcasts the teacher's arrays with every training round of the task (twice finetune's download).
λ = ``train.lwf_lambda``, T = ``train.lwf_temperature``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor
from torch.func import functional_call

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.base import Arrays, Instruction
from fedlorm.methods.common import Penalty
from fedlorm.methods.finetune import FinetuneClient, FinetuneServer
from fedlorm.methods.regularisers import lwf_loss, parameter_paths

__all__ = ["TEACHER", "LwFClient", "LwFServer"]

TEACHER = "lwf.teacher."
"""Prefix of the teacher's arrays in the broadcast and in the server's state."""


class LwFClient(FinetuneClient):
    """Finetune's client with the distillation term towards the broadcast teacher on old classes."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.paths = parameter_paths(model, self.layers)

    def penalty(self, arrays: Mapping[str, Tensor], instruction: Instruction) -> Penalty | None:
        """The LwF term on classes [0, class_start); none on the first task (no old classes)."""
        old = instruction.class_start
        teacher = {k.removeprefix(TEACHER): v for k, v in arrays.items() if k.startswith(TEACHER)}
        if old == 0 or not teacher:
            return None
        device = self.model.head.weight.device
        params = {self.paths[key]: value.to(device) for key, value in teacher.items()}
        weight, temperature = self.cfg.train.lwf_lambda, self.cfg.train.lwf_temperature

        def distill(inputs: Tensor, logits: Tensor) -> Tensor:
            with torch.no_grad():
                old_logits = functional_call(self.model, params, (inputs,))
            return lwf_loss(logits[:, :old], old_logits[:, :old], weight=weight, temperature=temperature)

        return distill


class LwFServer(FinetuneServer):
    """Finetune's server that keeps the model each task started from and broadcasts it as teacher."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.teacher: Arrays = {}

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        super().start_task(task, classes, generator)
        if task > 0:
            self.teacher = {key: value.clone() for key, value in self.state.items()}

    def arrays(self, instruction: Instruction) -> Arrays:
        return {**self.state, **{TEACHER + key: value for key, value in self.teacher.items()}}

    def state_dict(self) -> Arrays:
        return {**super().state_dict(), **{TEACHER + key: value for key, value in self.teacher.items()}}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.teacher = {
            key: state[TEACHER + key].to(value.device, copy=True)
            for key, value in self.state.items()
            if TEACHER + key in state
        }
