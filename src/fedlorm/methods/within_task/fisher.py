"""``fisher``: Fisher-weighted averaging (Matena & Raffel 2022) of the clients' LoRA factors.

After local training each client computes the diagonal empirical Fisher F_i of each trained factor:
the mean over its n_i samples of the squared *per-sample* gradient of the local loss (cross-entropy
over the task's logits, true labels, test-time transform, at the trained parameters). It sends
n_i·F_i ⊙ θ_i and n_i·F_i, both additive; the server sets, per entry,

    θ = (Σ n_i F_i θ_i + ε R) / (Σ n_i F_i + ε),   ε = ``lorm.ridge``·mean(Σ n_i F_i)

with R the round's broadcast value, so an entry no client's loss is sensitive to keeps R instead of
collapsing to 0. The model weights n_i (Matena & Raffel's per-model coefficients) make it FedAvg
when every F_i is the same. Both factors train every round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import ENCODER, Backbone
from fedlorm.methods.base import Arrays, ClientData, Instruction
from fedlorm.methods.replies import ReplySpec, Summand, value
from fedlorm.methods.steps import Factor
from fedlorm.methods.within_task.base import LayerShape, WithinTaskMerge

__all__ = ["FisherAverage", "empirical_fisher", "fisher_solve"]


def _identity(x: Tensor) -> Tensor:
    return x


def empirical_fisher(
    module: nn.Module,
    params: Mapping[str, Tensor],
    inputs: Tensor,
    targets: Tensor,
    *,
    readout: Callable[[Tensor], Tensor] = _identity,
    prepare: Callable[[Tensor], Tensor] = _identity,
    chunk_size: int = 64,
) -> dict[str, Tensor]:
    """Mean over samples of the squared per-sample gradient of CE(readout(module(x)), y) (float64).

    ``params``: the module's parameters (by ``named_parameters`` name) to differentiate; the others
    stay as they are. ``prepare`` maps a chunk of ``inputs`` to the module's input (no gradient).
    """
    detached = {k: v.detach() for k, v in params.items()}

    def loss(p: Mapping[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        logits = readout(functional_call(module, p, (x[None],)))
        return F.cross_entropy(logits, y[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in detached.items()}
    for chunk in torch.arange(len(targets)).split(chunk_size):
        with torch.no_grad():
            x = prepare(inputs[chunk])
        grads = per_sample(detached, x, targets[chunk].to(x.device))
        for k, g in grads.items():
            total[k] += g.detach().to(torch.float64).square().sum(dim=0)
    return {k: v / max(len(targets), 1) for k, v in total.items()}


def fisher_solve(weighted: Tensor, fisher: Tensor, reference: Tensor, *, ridge: float) -> Tensor:
    """(weighted + ε R) / (fisher + ε), ε = ridge·mean(fisher); R where the denominator is 0."""
    R = reference.to(torch.float64)
    eps = ridge * float(fisher.mean())
    denominator = fisher + eps
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    return torch.where(denominator > 0, (weighted + eps * R) / safe, R).to(reference.dtype)


@dataclass(frozen=True)
class FisherAverage(WithinTaskMerge):
    """θ = Σ n_i F_i θ_i / Σ n_i F_i per entry of each trained factor (F_i: diagonal empirical Fisher)."""

    schedule: tuple[Factor, ...] = (Factor.BOTH,)

    def summands(self, name: str, layer: LoRALayer, factor: Factor, gram: Tensor | None, n: int) -> Arrays:
        return {}  # everything needs the client's data: data_summands

    def data_summands(
        self,
        model: Backbone,
        layers: Mapping[str, LoRALayer],
        data: ClientData,
        instruction: Instruction,
        *,
        batch_size: int,
    ) -> Arrays:
        trained = Factor(instruction.factor).trained
        if not trained or len(data) == 0:
            return {}
        prefix = ENCODER + "."
        outside = [name for name in layers if not name.startswith(prefix)]
        if outside:
            raise ValueError(f"the Fisher merge needs LoRA layers inside the encoder, got {outside[:3]}")
        params = {
            f"{name.removeprefix(prefix)}.lora_{f}": getattr(layer, f"lora_{f}")
            for name, layer in layers.items()
            for f in trained
        }
        classes = instruction.classes
        model.eval()
        device = model.head.weight.device
        fisher = empirical_fisher(
            model.encoder,
            params,
            data.images,
            data.labels - classes.start,
            readout=lambda z: model.head(z)[:, classes.start : classes.stop],
            prepare=lambda x: model.normalize(x.to(device, non_blocking=True)),
            chunk_size=batch_size,
        )
        n = len(data)
        out: Arrays = {}
        for name, layer in layers.items():
            for f in trained:
                F_i = n * fisher[f"{name.removeprefix(prefix)}.lora_{f}"]
                theta = getattr(layer, f"lora_{f}").detach().to(torch.float64)
                out[f"{name}.fisher_{f}"] = F_i
                out[f"{name}.fisher_weighted_{f}"] = F_i * theta
        return out

    def spec(self, name: str, shape: LayerShape, factor: Factor, gram: Summand) -> ReplySpec:
        shapes = {"A": (shape.rank, shape.d_in), "B": (shape.d_out, shape.rank)}
        out: ReplySpec = {}
        for f in Factor(factor).trained:
            out[f"{name}.fisher_{f}"] = value(*shapes[f])
            out[f"{name}.fisher_weighted_{f}"] = value(*shapes[f])
        return out

    def solve(
        self,
        name: str,
        factor: Factor,
        sums: Arrays,
        n: Tensor,
        A: Tensor,
        B: Tensor,
        *,
        scaling: float,
        ridge: float,
    ) -> tuple[Tensor, Tensor]:
        current = {"A": A, "B": B}
        for f in Factor(factor).trained:
            current[f] = fisher_solve(
                sums[f"{name}.fisher_weighted_{f}"], sums[f"{name}.fisher_{f}"], current[f], ridge=ridge
            )
        return current["A"], current["B"]
