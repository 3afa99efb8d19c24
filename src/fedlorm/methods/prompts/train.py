"""A client's local training of a prompt pool and the current task's head rows (AdamW)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fedlorm.backbones import Backbone
from fedlorm.config import TrainConfig
from fedlorm.methods.base import ClientData
from fedlorm.methods.prompts.pool import PromptPool
from fedlorm.precision import autocast, backward_and_step, grad_scaler

__all__ = ["train_prompts"]


def train_prompts(
    model: Backbone,
    vit: VisionTransformer,
    pool: PromptPool,
    data: ClientData,
    train: TrainConfig,
    *,
    classes: range,
    generator: torch.Generator,
) -> float:
    """Train the pool's arrays (lr ``train.lr``, no weight decay, as the references' Adam) and the
    head (``train.lr_head``, ``train.weight_decay``) on cross-entropy over the task's logits plus
    the pool's extra term; return the mean cross-entropy.

    The backbone stays frozen and in eval mode; head rows of other tasks are restored afterwards.
    """
    model.eval()
    model.requires_grad_(False)
    pool.requires_grad_(True)
    model.head.requires_grad_(True)
    before = (model.head.weight.detach().clone(), model.head.bias.detach().clone())
    optimizer = torch.optim.AdamW(
        [
            {"params": list(pool.parameters()), "lr": train.lr, "weight_decay": 0.0},
            {"params": list(model.head.parameters()), "lr": train.lr_head or train.lr},
        ],
        weight_decay=train.weight_decay,
    )
    device = model.head.weight.device
    scaler = grad_scaler(device, train.precision)
    total, seen = 0.0, 0
    for _ in range(train.local_epochs):
        for batch in torch.randperm(len(data), generator=generator).split(train.batch_size):
            images = model.training_input(data.images[batch].to(device, non_blocking=True), generator)
            targets = data.labels[batch].to(device) - classes.start
            with autocast(device, train.precision):
                features, extra = pool.features(vit, model.normalize(images))
                logits = model.head(features)
            cross_entropy = F.cross_entropy(logits[:, classes.start : classes.stop].float(), targets)
            loss = cross_entropy + extra.float()
            backward_and_step(loss, optimizer, scaler)
            total += float(cross_entropy.detach()) * len(batch)
            seen += len(batch)
    model.requires_grad_(False)
    pool.requires_grad_(False)
    keep = torch.ones(model.head.out_features, dtype=torch.bool, device=device)
    keep[classes.start : classes.stop] = False
    with torch.no_grad():
        model.head.weight[keep] = before[0][keep]
        model.head.bias[keep] = before[1][keep]
    return total / max(seen, 1)
