"""``lorm.head_merge = ccvr``: classifier calibration with virtual representations (Luo et al. 2021).

Training rounds average the trained head (it serves local training). At each task's end a
``head_stats`` step asks every client for, per class of the task, the sum Σf, the count and the
second moment Σffᵀ of its pooled features through the deployed backbone (test-time transform); all
three are additive. The server keeps running sums over every seen class, forms each class's mean
μ_c and unbiased covariance Σ_c, draws ``lorm.ccvr_samples`` virtual features per class from
N(μ_c, Σ_c) with a generator seeded from the server's stream at the task's start, and retrains the
head rows of every seen class on them: ``lorm.ccvr_epochs`` epochs of plain SGD (learning rate
``lorm.ccvr_lr``, batches of :data:`BATCH`, seeded shuffles) on cross-entropy over the seen classes,
starting from the averaged trained head. The deployed head is the calibrated one. Earlier classes'
sums are features through the backbone as it was when their task ended, as for the analytic head.
A client sends a d×d matrix per class (d = feature width), as CCVR does.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fedlorm.backbones import Backbone
from fedlorm.config import LormConfig
from fedlorm.methods.arrays import HEAD
from fedlorm.methods.base import Arrays, ClientData, Instruction
from fedlorm.methods.heads.average import TrainedAverageHead
from fedlorm.methods.heads.base import Head
from fedlorm.methods.replies import ReplySpec, value
from fedlorm.precision import autocast

__all__ = ["BATCH", "CCVRHead", "calibrate", "class_statistics", "covariance_factor", "virtual_features"]

logger = logging.getLogger(__name__)

BATCH = 64
"""Virtual features per SGD step of the calibration."""

_KEYS = ("sum", "count", "moment")


def class_statistics(sums: Tensor, counts: Tensor, moments: Tensor) -> tuple[Tensor, Tensor]:
    """Per-class mean (C × d) and unbiased covariance (C × d × d) from Σf, n and Σffᵀ (0 where n ≤ 1)."""
    n = counts.to(torch.float64)
    mean = sums / n.clamp(min=1)[:, None]
    scatter = moments - n[:, None, None] * mean[:, :, None] * mean[:, None, :]
    cov = scatter / (n - 1).clamp(min=1)[:, None, None]
    cov = torch.where((n > 1)[:, None, None], cov, torch.zeros_like(cov))
    return mean, (cov + cov.transpose(1, 2)) / 2


def covariance_factor(cov: Tensor) -> Tensor:
    """The symmetric square root S = V √Λ Vᵀ of ``cov`` (S Sᵀ = cov), eigenvalues below round-off
    (d·eps·λ_max, which covers the negative ones) taken as 0.

    Unlike V √Λ it does not depend on the eigenvectors' signs, nor on the basis chosen within a
    repeated eigenvalue, so the virtual features drawn with it are the same whichever decomposition
    (or CPU) produced V.
    """
    try:
        eigenvalues, vectors = torch.linalg.eigh(cov)
    except torch.linalg.LinAlgError:
        # A covariance of a few clients' features has rank ≤ n - 1 and many equal (zero) eigenvalues,
        # on which some LAPACK builds' divide-and-conquer eigh stops unconverged (MKL, one thread, on
        # AVX-512 CPUs). For a symmetric PSD matrix the SVD is an eigendecomposition too.
        logger.debug("eigh did not converge on a %d × %d covariance; factoring it by SVD", *cov.shape)
        vectors, eigenvalues, _ = torch.linalg.svd(cov)
    round_off = eigenvalues.abs().max() * cov.shape[-1] * torch.finfo(cov.dtype).eps
    roots = torch.where(eigenvalues > round_off, eigenvalues, 0).sqrt()
    return (vectors * roots) @ vectors.T


def virtual_features(
    mean: Tensor, cov: Tensor, classes: Tensor, per_class: int, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """``per_class`` draws μ_c + z L_cᵀ, z ~ N(0, I), for each class index in ``classes`` in order."""
    features, labels = [], []
    for c in classes.tolist():
        z = torch.randn(per_class, mean.shape[1], generator=generator, dtype=torch.float64)
        features.append(mean[c] + z @ covariance_factor(cov[c]).T)
        labels.append(torch.full((per_class,), c, dtype=torch.long))
    return torch.cat(features), torch.cat(labels)


def calibrate(
    weight: Tensor,
    bias: Tensor,
    features: Tensor,
    labels: Tensor,
    *,
    epochs: int,
    lr: float,
    generator: torch.Generator,
) -> Head:
    """``(weight, bias)`` (float64 copies) after SGD on cross-entropy of the features' logits."""
    W = weight.detach().to(torch.float64).clone().requires_grad_(True)
    b = bias.detach().to(torch.float64).clone().requires_grad_(True)
    optimizer = torch.optim.SGD([W, b], lr=lr)
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(BATCH):
            loss = F.cross_entropy(features[batch] @ W.T + b, labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return W.detach(), b.detach()


class CCVRHead(TrainedAverageHead):
    """Trained heads averaged for local training; the deployed head is calibrated on virtual features."""

    collects_features = True

    def __init__(self, lorm: LormConfig, classes: int, features: int) -> None:
        super().__init__(lorm, classes, features)
        self.stats: dict[str, Tensor] = {}  # running Σf (C × d), n (C), Σffᵀ (C × d × d)
        self.seed = 0
        self.solution: Head | None = None

    def start_task(self, task: int, generator: torch.Generator) -> None:
        self.seed = int(torch.randint(0, 2**62, (), generator=generator))

    @torch.no_grad()
    def feature_summands(
        self, model: Backbone, data: ClientData, instruction: Instruction, *, batch_size: int, precision: str
    ) -> Arrays:
        """Per class of the task: Σf, the count and Σffᵀ of the deployed model's pooled features."""
        model.eval()
        device = model.head.weight.device
        width = len(instruction.classes)
        out = self._zeros(width)
        for batch in torch.arange(len(data)).split(batch_size):
            with autocast(device, precision):
                features = model.features(data.images[batch].to(device, non_blocking=True))
            f = features.to(torch.float64).cpu()
            onehot = F.one_hot(data.labels[batch] - instruction.class_start, width).to(torch.float64)
            out["sum"] += onehot.T @ f
            out["count"] += onehot.sum(dim=0)
            out["moment"] += torch.einsum("nc,ni,nj->cij", onehot, f, f)
        return {f"{HEAD}.ccvr.{k}": v for k, v in out.items()}

    def feature_spec(self, instruction: Instruction) -> ReplySpec:
        width, d = len(instruction.classes), self.features
        shapes = {"sum": (width, d), "count": (width,), "moment": (width, d, d)}
        return {f"{HEAD}.ccvr.{k}": value(*shapes[k]) for k in _KEYS}

    def fold_features(self, sums: Arrays, classes: range, like: Head) -> None:
        if not self.stats:
            self.stats = self._zeros(self.classes)
        for k in _KEYS:
            self.stats[k][classes.start : classes.stop] += sums[f"{HEAD}.ccvr.{k}"].cpu()
        seen = classes.stop
        counts = self.stats["count"][:seen]
        mean, cov = class_statistics(self.stats["sum"][:seen], counts, self.stats["moment"][:seen])
        generator = torch.Generator().manual_seed(self.seed)
        present = torch.nonzero(counts > 0).flatten()
        features, labels = virtual_features(mean, cov, present, self.lorm.ccvr_samples, generator)
        weight, bias = calibrate(
            like[0][:seen].cpu(),
            like[1][:seen].cpu(),
            features,
            labels,
            epochs=self.lorm.ccvr_epochs,
            lr=self.lorm.ccvr_lr,
            generator=generator,
        )
        full_weight, full_bias = like[0].detach().clone(), like[1].detach().clone()
        full_weight[:seen] = weight.to(full_weight.device, full_weight.dtype)
        full_bias[:seen] = bias.to(full_bias.device, full_bias.dtype)
        self.solution = (full_weight, full_bias)

    def deployed(self) -> Head | None:
        return self.solution

    def state_dict(self) -> Arrays:
        out: Arrays = {f"ccvr.{k}": v for k, v in self.stats.items()}
        out["ccvr.seed"] = torch.tensor(self.seed)
        if self.solution is not None:
            out["ccvr.weight"], out["ccvr.bias"] = self.solution
        return out

    def load_state_dict(self, state: Mapping[str, Tensor], device: object) -> None:
        self.stats = {k: state[f"ccvr.{k}"].clone() for k in _KEYS if f"ccvr.{k}" in state}
        self.seed = int(state["ccvr.seed"]) if "ccvr.seed" in state else 0
        self.solution = None
        if "ccvr.weight" in state:
            self.solution = (
                state["ccvr.weight"].to(device, copy=True),
                state["ccvr.bias"].to(device, copy=True),
            )

    def _zeros(self, width: int) -> dict[str, Tensor]:
        d = self.features
        return {
            "sum": torch.zeros(width, d, dtype=torch.float64),
            "count": torch.zeros(width, dtype=torch.float64),
            "moment": torch.zeros(width, d, d, dtype=torch.float64),
        }
