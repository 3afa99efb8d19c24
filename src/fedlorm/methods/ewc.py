"""``ewc``: sequential FedAvg fine-tuning (``finetune``) plus Elastic Weight Consolidation
(Kirkpatrick et al.) on the adapter's factors.

On task t > 0 each client adds (λ/2)·Σ_j F_j (θ_j − θ*_j)² to its local loss, over every entry of
every LoRA factor A and B. θ* is the global model at the end of task t − 1, F = Σ_{s<t} F_s the
diagonal Fisher accumulated over the earlier tasks. F_s is the sample-weighted mean over clients of
each client's empirical Fisher: at the end of every task but the last, a ``fisher_stats`` step asks
every client for Σ_x g(x)² (g: the per-sample gradient of its training cross-entropy, the forward
under ``train.precision``'s autocast as in training, g² summed in float64) and n_i, and the server
adds (Σ_i Σ_x g²) / Σ_i n_i to F. Both reach the clients with the broadcast (clients keep no
state). The head is not penalised: its rows outside the current task are restored after local
training, and the current task's rows get no gradient from earlier tasks' losses (their Fisher is 0).
λ = ``train.ewc_lambda``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.arrays import apply_arrays, factor_key
from fedlorm.methods.base import Arrays, ClientData, ClientReply, Instruction
from fedlorm.methods.common import Penalty
from fedlorm.methods.finetune import FinetuneClient, FinetuneServer
from fedlorm.methods.regularisers import ewc_penalty, parameter_paths, squared_gradient_sums
from fedlorm.methods.replies import ReplySpec, count, gram
from fedlorm.methods.steps import Factor, Phase
from fedlorm.precision import autocast

__all__ = [
    "ANCHOR",
    "FISHER",
    "FP16_LOSS_SCALE",
    "EWCClient",
    "EWCServer",
    "autocast_squared_gradient_sums",
    "fisher_key",
]

ANCHOR = "ewc.anchor."
"""Prefix of θ* (the previous task's final factors) in the broadcast and the server's state."""
FISHER = "ewc.fisher."
"""Prefix of the accumulated diagonal Fisher in the broadcast and the server's state."""
FP16_LOSS_SCALE = 2.0**16
"""The first loss scale of a ``16-mixed`` Fisher step (torch's GradScaler starts there too)."""


def fisher_key(key: str) -> str:
    """Reply key of one factor's Σ_x g(x)², flattened (a diagonal Gram of per-sample gradients)."""
    return f"{key}.fisher"


def autocast_squared_gradient_sums(
    model: Backbone,
    factors: Mapping[str, Tensor],
    data: ClientData,
    *,
    classes: range,
    batch_size: int,
    precision: str,
) -> dict[str, Tensor]:
    """Σ over the client's samples of g_j² for each of ``factors`` (live parameters, by key), g the
    gradient of the sample's cross-entropy over ``classes``' logits, its forward under ``precision``'s
    autocast as training runs it; float64 sums of the float32 gradients.

    One forward and backward per sample (test-time inputs, eval mode) instead of
    :func:`~fedlorm.methods.regularisers.squared_gradient_sums`' ``vmap``: ``vmap`` over ``grad``
    fails on normalisation layers under autocast (pytorch/pytorch#184890). Under ``16-mixed`` the
    loss is scaled against float16 underflow, as training's gradient scaler does: from
    :data:`FP16_LOSS_SCALE`, halved (and the sample redone) whenever a gradient overflows.
    """
    model.eval()
    model.requires_grad_(False)
    device = model.head.weight.device
    params = list(factors.values())
    sums = {key: torch.zeros(p.shape, dtype=torch.float64, device=device) for key, p in factors.items()}
    start, stop = classes.start, classes.stop
    scale = FP16_LOSS_SCALE if precision == "16-mixed" else 1.0
    try:
        for p in params:
            p.requires_grad_(True)
        for batch in torch.arange(len(data)).split(batch_size):
            images = data.images[batch].to(device, non_blocking=True)
            if images.dtype == torch.uint8:  # the test-time transform, per batch as squared_gradient_sums
                images = model.preprocessing.test_input(images)
            labels = data.labels[batch].to(device) - start
            for image, label in zip(images, labels, strict=True):
                while True:
                    with autocast(device, precision):
                        logits = model(image.unsqueeze(0))
                    loss = F.cross_entropy(logits[:, start:stop].float(), label.unsqueeze(0))
                    grads = torch.autograd.grad(loss * scale, params)
                    if scale == 1 or all(bool(torch.isfinite(g).all()) for g in grads):
                        break
                    scale /= 2
                for total, g in zip(sums.values(), grads, strict=True):
                    total += (g.to(torch.float64) / scale).square()
    finally:
        model.requires_grad_(False)
    return sums


def _factors(layers: Mapping[str, LoRALayer]) -> dict[str, Tensor]:
    """Array key → the live LoRA factor parameter, for every layer's A and B."""
    return {
        factor_key(name, factor): getattr(layer, f"lora_{factor}")
        for name, layer in layers.items()
        for factor in ("A", "B")
    }


class EWCClient(FinetuneClient):
    """Finetune's client with the EWC penalty; answers ``fisher_stats`` steps with squared gradients."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.paths = parameter_paths(model, self.layers)
        self.factors = _factors(self.layers)

    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        if instruction.phase is not Phase.FISHER_STATS:
            return super().update(arrays, instruction, data, generator)
        apply_arrays(self.model, self.layers, arrays)
        precision, batch_size = self.cfg.train.precision, self.cfg.train.batch_size
        if precision == "32":
            by_path = squared_gradient_sums(
                self.model,
                {self.paths[key]: factor for key, factor in self.factors.items()},
                data,
                classes=instruction.classes,
                batch_size=batch_size,
            )
            sums = {key: by_path[self.paths[key]] for key in self.factors}
        else:
            sums = autocast_squared_gradient_sums(
                self.model,
                self.factors,
                data,
                classes=instruction.classes,
                batch_size=batch_size,
                precision=precision,
            )
        n = len(data)
        summands = {fisher_key(key): sums[key].flatten() for key in self.factors}
        summands["n"] = torch.tensor(float(n), dtype=torch.float64)
        return ClientReply(summands=summands, num_examples=n)

    def penalty(self, arrays: Mapping[str, Tensor], instruction: Instruction) -> Penalty | None:
        """The EWC penalty once an anchor and a Fisher were broadcast (tasks after the first)."""
        if any(ANCHOR + key not in arrays or FISHER + key not in arrays for key in self.factors):
            return None
        device = self.model.head.weight.device
        anchor = {key: arrays[ANCHOR + key].to(device) for key in self.factors}
        fisher = {key: arrays[FISHER + key].to(device) for key in self.factors}
        weight = self.cfg.train.ewc_lambda

        def consolidate(inputs: Tensor, logits: Tensor) -> Tensor:
            return ewc_penalty(self.factors, anchor, fisher, weight=weight)

        return consolidate


class EWCServer(FinetuneServer):
    """Finetune's server plus the end-of-task Fisher step, the anchor θ* and the accumulated Fisher."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        self.num_classes = model.head.out_features
        self.keys = list(_factors(layers))
        self.anchor: Arrays = {}
        self.fisher: Arrays = {}

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        super().start_task(task, classes, generator)
        if task > 0:
            self.anchor = {key: self.state[key].clone() for key in self.keys}

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        yield from super().instructions(task, classes)
        if classes.stop < self.num_classes:  # a later task will need this one's Fisher
            yield Instruction(task, -1, Phase.FISHER_STATS, Factor.NONE, classes.start, classes.stop)

    def arrays(self, instruction: Instruction) -> Arrays:
        if instruction.phase is Phase.FISHER_STATS or not (self.anchor and self.fisher):
            return dict(self.state)
        return {
            **self.state,
            **{ANCHOR + key: value for key, value in self.anchor.items()},
            **{FISHER + key: value.to(self.dtype) for key, value in self.fisher.items()},
        }

    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        if instruction.phase is not Phase.FISHER_STATS:
            super().aggregate(instruction, sums, num_examples)
            return
        n = sums["n"]
        for key in self.keys:
            like = self.state[key]
            task_fisher = (sums[fisher_key(key)] / n).reshape(like.shape).to(like.device)
            self.fisher[key] = self.fisher[key] + task_fisher if key in self.fisher else task_fisher

    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        if instruction.phase is not Phase.FISHER_STATS:
            return super().expected_reply(instruction)
        spec = {fisher_key(key): gram(self.state[key].numel(), full=False) for key in self.keys}
        spec["n"] = count()
        return spec

    def state_dict(self) -> Arrays:
        return {
            **super().state_dict(),
            **{ANCHOR + key: value for key, value in self.anchor.items()},
            **{FISHER + key: value for key, value in self.fisher.items()},
        }

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        super().load_state_dict(state)
        self.anchor = self._restore(state, ANCHOR)
        self.fisher = self._restore(state, FISHER)

    def _restore(self, state: Mapping[str, Tensor], prefix: str) -> Arrays:
        """Copies of ``state``'s arrays under ``prefix`` (none before the first task's end)."""
        return {
            key: state[prefix + key].to(self.state[key].device, copy=True)
            for key in self.keys
            if prefix + key in state
        }
