"""Where forgetting comes from: a stale head or damaged features (``train.forgetting_diagnostics``).

A class-incremental method can lose an old task's accuracy in two ways: the backbone's features for
the old classes change (damage), or they stay usable but the head, fitted to them as they were,
no longer matches them (staleness). Two in-process diagnostics tell them apart:

- **feature drift** of task j: ‖F_j(final) − F_j(end of j)‖_F / ‖F_j(end of j)‖_F, with F_j the
  deployed model's pooled features of task j's evaluation images;
- **oracle head**: class-IL accuracy of the final backbone under a ridge head re-solved from every
  task's training features recollected through that final backbone (the same solver, ridge and,
  with ``lorm.head_projection``, random projection as the analytic head). No federated client can
  compute it once its data is gone, so it is reported beside a method's accuracy, never as one.
  Oracle minus actual accuracy is what the stale head costs; a frozen backbone's oracle minus this
  one is what the features lost.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedlorm.merging import analytic_head_solve, analytic_head_summands
from fedlorm.precision import autocast
from fedlorm.runtime.experiment import Experiment

__all__ = ["ForgettingProbe"]

_PREFIX = "forgetting.features."


class ForgettingProbe:
    """Keeps each task's evaluation features from the end of that task; measures drift and the
    oracle head at the end of the run. Its tensors go into the run's checkpoint."""

    def __init__(self) -> None:
        self.reference: dict[int, Tensor] = {}

    def task_end(self, exp: Experiment, task: int) -> None:
        """Record the deployed model's features of ``task``'s evaluation images."""
        images, _ = _task_rows(exp.test.images, exp.test.labels, exp.scenario.task_classes(task))
        self.reference[task] = _features(exp, images)

    def state_dict(self) -> dict[str, Tensor]:
        return {f"{_PREFIX}{task}": f for task, f in self.reference.items()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self.reference = {
            int(key[len(_PREFIX) :]): value.clone() for key, value in state.items() if key.startswith(_PREFIX)
        }

    def report(self, exp: Experiment) -> dict[str, object]:
        """Drift per task and the oracle head's accuracies, for the deployed final model."""
        exp.server.deploy(exp.model, exp.layers)
        scenario = exp.scenario
        drift = []
        for task in range(scenario.num_tasks):
            images, _ = _task_rows(exp.test.images, exp.test.labels, scenario.task_classes(task))
            before, after = self.reference[task], _features(exp, images)
            drift.append(float((after - before).norm() / before.norm().clamp_min(1e-30)))
        gram = cross = None
        for task in range(scenario.num_tasks):
            for share in exp.client_data(task):
                targets = nn.functional.one_hot(share.labels, scenario.num_classes).double()
                g, c = analytic_head_summands(_head_inputs(exp, share.images), targets)
                gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        assert gram is not None and cross is not None
        weight, bias = analytic_head_solve(gram, cross, ridge=exp.cfg.lorm.head_ridge)
        per_task, sizes = [], []
        for task in range(scenario.num_tasks):
            images, labels = _task_rows(exp.test.images, exp.test.labels, scenario.task_classes(task))
            logits = _head_inputs(exp, images).double() @ weight.T + bias
            per_task.append(100.0 * float((logits.argmax(1) == labels).double().mean()))
            sizes.append(len(labels))
        overall = sum(a * n for a, n in zip(per_task, sizes, strict=True)) / sum(sizes)
        return {
            "feature_drift_per_task": drift,
            "mean_feature_drift": sum(drift[:-1]) / (len(drift) - 1) if len(drift) > 1 else None,
            "oracle_head_accuracy_per_task": per_task,
            "oracle_head_final_accuracy": overall,
        }


def _task_rows(images: Tensor, labels: Tensor, classes: range) -> tuple[Tensor, Tensor]:
    rows = (labels >= classes.start) & (labels < classes.stop)
    return images[rows], labels[rows]


@torch.no_grad()
def _features(exp: Experiment, images: Tensor) -> Tensor:
    """Pooled features of the model as it stands (eval mode, the run's precision), float32 on CPU."""
    model = exp.model
    model.eval()
    device = model.head.weight.device
    out = []
    for batch in images.split(exp.cfg.train.eval_batch_size):
        with autocast(device, exp.cfg.train.precision):
            out.append(model.features(batch.to(device, non_blocking=True)).float().cpu())
    return torch.cat(out)


def _head_inputs(exp: Experiment, images: Tensor) -> Tensor:
    """What the analytic head is solved on: the pooled features, or their projection σ(F R) when
    the model carries one (``lorm.head_projection``); float32 on CPU."""
    features = _features(exp, images)
    projection = exp.model.projection
    if projection is None:
        return features
    with torch.no_grad():
        return projection(features.to(projection.weight.device)).cpu()
