"""Class-incremental evaluation: one forward, no task id, logits over every class seen so far."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from fedlorm.backbones import Backbone
from fedlorm.fcl import Scenario
from fedlorm.precision import autocast

__all__ = ["Evaluation", "evaluate", "predict_logits"]


@dataclass
class Evaluation:
    """Accuracy (%) per seen task, class-IL and task-aware, plus where predictions fall."""

    class_il: list[float]
    task_aware: list[float]
    seen_accuracy: float
    newest_task_fraction: float
    logit_norm_per_task: list[float]


@torch.no_grad()
def predict_logits(model: Backbone, images: Tensor, batch_size: int, precision: str = "32") -> Tensor:
    """Logits for ``images`` in batches (eval mode, forward at ``precision``, CPU float32 result)."""
    model.eval()
    device = model.head.weight.device
    with autocast(device, precision):
        outputs = [
            model(batch.to(device, non_blocking=True)).float().cpu()
            for batch in images.split(batch_size)
        ]
    return torch.cat(outputs) if outputs else torch.empty(0, model.num_classes)


def evaluate(
    model: Backbone,
    images: Tensor,
    labels: Tensor,
    scenario: Scenario,
    task: int,
    batch_size: int,
    precision: str = "32",
) -> Evaluation:
    """Evaluate after ``task`` on the test samples of tasks 0..task (labels are class positions)."""
    seen = scenario.seen_classes(task)
    mask = labels < seen.stop
    logits = predict_logits(model, images[mask], batch_size, precision)
    targets = labels[mask]
    seen_logits = logits[:, : seen.stop]
    predictions = seen_logits.argmax(dim=1)
    class_il, task_aware, norms = [], [], []
    for j in range(task + 1):
        classes = scenario.task_classes(j)
        rows = (targets >= classes.start) & (targets < classes.stop)
        class_il.append(_percent(predictions[rows] == targets[rows]))
        local = seen_logits[rows, classes.start : classes.stop].argmax(dim=1) + classes.start
        task_aware.append(_percent(local == targets[rows]))
        norms.append(float(seen_logits[:, classes.start : classes.stop].norm(dim=1).mean()))
    newest = scenario.task_classes(task)
    newest_fraction = _percent((predictions >= newest.start) & (predictions < newest.stop))
    return Evaluation(
        class_il=class_il,
        task_aware=task_aware,
        seen_accuracy=_percent(predictions == targets),
        newest_task_fraction=newest_fraction,
        logit_norm_per_task=norms,
    )


def _percent(hits: Tensor) -> float:
    return 100.0 * float(hits.float().mean()) if hits.numel() else 0.0
