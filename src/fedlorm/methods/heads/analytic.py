"""``lorm.head_merge = analytic``: a ridge-regression classifier over every seen class, solved from
running sums of the clients' deployed features (docs/design.md, "The head").

Training rounds average the trained head, which serves local training only. At each task's end a
``head_stats`` step asks every client for F̂ᵀF̂ and F̂ᵀY of its pooled features (F̂ = [F, 1], Y one-hot
over the task's classes) through the deployed backbone; the server adds them into S and C and
deploys [W, b] = Cᵀ(S + λI)⁻¹, λ = ``lorm.head_ridge``·mean(diag S).

With ``lorm.head_projection = M`` the features are first expanded to H = σ(F R) by the model's
fixed random projection (:mod:`fedlorm.projection`, R drawn from the run's seed on every client and
the server alike): the same sums and solve on Ĥ = [H, 1], (M + 1)-wide, and the deployed model
applies the projection before this head (``head.projected.*``), while local training keeps the
trained head on F.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from fedlorm import merging
from fedlorm.backbones import Backbone
from fedlorm.config import LormConfig
from fedlorm.methods.arrays import HEAD, PROJECTED_HEAD
from fedlorm.methods.base import Arrays, ClientData, Instruction
from fedlorm.methods.heads.average import TrainedAverageHead
from fedlorm.methods.heads.base import Head
from fedlorm.methods.replies import ReplySpec, gram, value
from fedlorm.precision import autocast

__all__ = ["AnalyticHead"]

SUMMAND_ROWS = 1024
"""Rows per F̂ᵀF̂ product when a client forms its head summands."""


class AnalyticHead(TrainedAverageHead):
    """Trained heads averaged for local training; the deployed head is the ridge solve."""

    collects_features = True
    supports_frozen_backbone = True

    def __init__(self, lorm: LormConfig, classes: int, features: int) -> None:
        super().__init__(lorm, classes, features)
        self.width = lorm.head_projection or features
        """The ridge head's input width: M with a projection, else the pooled features' d."""
        self.gram: Tensor | None = None  # S, (width + 1)², allocated at the first fold
        self.cross: Tensor | None = None  # C, (width + 1) × classes
        self.solution: Head | None = None

    @torch.no_grad()
    def feature_summands(
        self, model: Backbone, data: ClientData, instruction: Instruction, *, batch_size: int, precision: str
    ) -> Arrays:
        """F̂ᵀF̂ and F̂ᵀY of the deployed model's pooled features (or of their projection Ĥ),
        test-time transform (the head is fitted to features as they are at test time, not to
        augmented ones)."""
        model.eval()
        device = model.head.weight.device
        projected = self.lorm.head_projection > 0
        if projected:
            found = 0 if model.projection is None else model.projection.out_features
            if found != self.width:
                raise ValueError(
                    f"lorm.head_projection = {self.width} but the model's projection is {found} wide: "
                    "build the model with fedlorm.runtime.experiment.build_model"
                )
        task_classes = len(instruction.classes)
        gram_sum, cross_sum = None, None
        # The summands are formed per chunk of SUMMAND_ROWS rows, not per batch: a (M + 1)² product
        # of a 32-row batch wastes most of a float64 GEMM, and adding a (M + 1)² sum per batch costs
        # as much again (8x slower at M = 4000 on the CPU).
        for chunk in torch.arange(len(data)).split(max(batch_size, SUMMAND_ROWS)):
            parts = []
            for batch in chunk.split(batch_size):
                with autocast(device, precision):
                    features = model.features(data.images[batch].to(device, non_blocking=True))
                # Projected sums are formed and kept where the model runs ((M + 1)² is GPU work);
                # the plain head's stay on the CPU as they always were.
                parts.append(model.project(features) if projected else features.float().cpu())
            inputs = torch.cat(parts)
            targets = nn.functional.one_hot(data.labels[chunk] - instruction.class_start, task_classes)
            g, c = merging.analytic_head_summands(inputs, targets.to(inputs.device, torch.float64))
            gram_sum, cross_sum = (g, c) if gram_sum is None else (gram_sum + g, cross_sum + c)
        assert gram_sum is not None and cross_sum is not None, "a client holds at least one sample"
        return {f"{HEAD}.features.G": gram_sum.cpu(), f"{HEAD}.features.Y": cross_sum.cpu()}

    def feature_spec(self, instruction: Instruction) -> ReplySpec:
        width = self.width + 1
        return {
            f"{HEAD}.features.G": gram(width, full=True),
            f"{HEAD}.features.Y": value(width, len(instruction.classes)),
        }

    def fold_features(self, sums: Arrays, classes: range, like: Head) -> None:
        if self.gram is None or self.cross is None:
            self.gram = torch.zeros(self.width + 1, self.width + 1, dtype=torch.float64)
            self.cross = torch.zeros(self.width + 1, self.classes, dtype=torch.float64)
        self.gram += sums[f"{HEAD}.features.G"]
        self.cross[:, classes.start : classes.stop] += sums[f"{HEAD}.features.Y"]
        seen = classes.stop
        weight, bias = merging.analytic_head_solve(
            self.gram, self.cross[:, :seen], ridge=self.lorm.head_ridge
        )
        full_weight = like[0].new_zeros(self.classes, self.width)
        full_bias = torch.zeros_like(like[1])
        full_weight[:seen] = weight.to(full_weight.device, full_weight.dtype)
        full_bias[:seen] = bias.to(full_bias.device, full_bias.dtype)
        self.solution = (full_weight, full_bias)

    def deployed(self) -> Head | None:
        return self.solution

    def deployed_arrays(self, trained: Head) -> Arrays:
        """With a projection, the solve goes out as ``head.projected.*`` beside the trained head
        (the model's ``head`` on F, which local training starts from)."""
        if self.solution is None or self.lorm.head_projection == 0:
            return super().deployed_arrays(trained)
        weight, bias = self.solution
        return {
            f"{HEAD}.weight": trained[0],
            f"{HEAD}.bias": trained[1],
            f"{PROJECTED_HEAD}.weight": weight,
            f"{PROJECTED_HEAD}.bias": bias,
        }

    def state_dict(self) -> Arrays:
        out: Arrays = {}
        if self.gram is not None and self.cross is not None:
            out["analytic.gram"], out["analytic.cross"] = self.gram, self.cross
        if self.solution is not None:
            out["analytic.weight"], out["analytic.bias"] = self.solution
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], device: object) -> None:
        self.gram = state["analytic.gram"].clone() if "analytic.gram" in state else None
        self.cross = state["analytic.cross"].clone() if "analytic.cross" in state else None
        self.solution = None
        if "analytic.weight" in state:
            self.solution = (
                state["analytic.weight"].to(device, copy=True),
                state["analytic.bias"].to(device, copy=True),
            )
