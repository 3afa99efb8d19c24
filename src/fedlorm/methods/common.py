"""Client-side building blocks shared by the methods: local training and input statistics."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlorm.adapters import InputStatistics, LoRALayer, set_trainable_factor
from fedlorm.backbones import Backbone
from fedlorm.config import TrainConfig
from fedlorm.methods.base import ClientData, Factor
from fedlorm.precision import autocast, backward_and_step, grad_scaler

__all__ = ["Penalty", "collect_statistics", "train_locally", "train_with_config"]

Penalty = Callable[[Tensor, Tensor], Tensor]
"""A term added to the local loss: (batch inputs, logits over every class) → a scalar (LwF, EWC)."""


def train_locally(
    model: Backbone,
    layers: Mapping[str, LoRALayer],
    data: ClientData,
    *,
    factor: Factor,
    classes: range,
    epochs: int,
    batch_size: int,
    lr_a: float,
    lr_b: float,
    lr_head: float,
    weight_decay: float,
    generator: torch.Generator,
    train_head: bool = True,
    precision: str = "32",
    penalty: Penalty | None = None,
) -> float:
    """Train the chosen LoRA factor(s) and the current task's head rows; return the mean loss.

    The loss sees only the current task's logits (class-incremental local training). Batches go
    through the model's training augmentation (seeded by ``generator``) and run at ``precision``.
    The backbone stays in eval mode: its normalisation statistics are pretrained and frozen, and
    every client must see the same function. Head rows of other tasks are restored after training,
    so AdamW's decoupled weight decay cannot shrink them. ``penalty`` is added to each batch's
    loss (computed under the same autocast); the returned mean is the cross-entropy alone.
    """
    model.eval()
    model.requires_grad_(False)
    set_trainable_factor(layers, factor)
    groups = []
    if factor in ("A", "both"):
        groups.append({"params": [lay.lora_A for lay in layers.values()], "lr": lr_a})
    if factor in ("B", "both"):
        groups.append({"params": [lay.lora_B for lay in layers.values()], "lr": lr_b})
    head_before = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
    if train_head:
        model.head.requires_grad_(True)
        groups.append({"params": list(model.head.parameters()), "lr": lr_head})
    if not groups:
        return float("nan")
    optimizer = torch.optim.AdamW(groups, weight_decay=weight_decay)
    start, stop = classes.start, classes.stop
    device = model.head.weight.device
    scaler = grad_scaler(device, precision)
    total, count = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(len(data), generator=generator)
        for batch in order.split(batch_size):
            images = model.training_input(data.images[batch].to(device, non_blocking=True), generator)
            targets = data.labels[batch].to(device) - start
            with autocast(device, precision):
                logits = model(images)
                extra = None if penalty is None else penalty(images, logits).float()
            cross_entropy = F.cross_entropy(logits[:, start:stop].float(), targets)
            loss = cross_entropy if extra is None else cross_entropy + extra
            backward_and_step(loss, optimizer, scaler)
            total += float(cross_entropy.detach()) * len(batch)
            count += len(batch)
    model.requires_grad_(False)
    _restore_other_rows(model.head, head_before, classes)
    return total / max(count, 1)


def train_with_config(
    model: Backbone,
    layers: Mapping[str, LoRALayer],
    data: ClientData,
    train: TrainConfig,
    *,
    factor: Factor,
    classes: range,
    generator: torch.Generator,
    penalty: Penalty | None = None,
) -> float:
    """:func:`train_locally` with the run's training settings (per-factor lr default to ``lr``)."""
    return train_locally(
        model,
        layers,
        data,
        factor=factor,
        classes=classes,
        epochs=train.local_epochs,
        batch_size=train.batch_size,
        lr_a=train.lr_a or train.lr,
        lr_b=train.lr_b or train.lr,
        lr_head=train.lr_head or train.lr,
        weight_decay=train.weight_decay,
        generator=generator,
        precision=train.precision,
        penalty=penalty,
    )


def _restore_other_rows(head: nn.Linear, before: tuple[Tensor, Tensor], classes: range) -> None:
    keep = torch.ones(head.out_features, dtype=torch.bool, device=head.weight.device)
    keep[classes.start : classes.stop] = False
    with torch.no_grad():
        head.weight[keep] = before[0][keep]
        head.bias[keep] = before[1][keep]


@torch.no_grad()
def collect_statistics(
    model: Backbone,
    modules: Mapping[str, nn.Module],
    data: ClientData,
    *,
    modes: Mapping[str, str],
    batch_size: int,
    precision: str = "32",
    generator: torch.Generator | None = None,
) -> dict[str, Tensor]:
    """Input Grams (float64, full or diagonal per module) over every token of the client's data.

    With ``generator`` the batches go through the training augmentation (as the LoRM reference
    computes its statistics); without it, through the test-time transform. The network is in
    eval mode either way.
    """
    model.eval()
    device = model.head.weight.device
    with InputStatistics(modules, mode=dict(modes)) as stats, autocast(device, precision):
        for batch in torch.arange(len(data)).split(batch_size):
            images = data.images[batch].to(device, non_blocking=True)
            model(images if generator is None else model.training_input(images, generator))
    return stats.grams()
