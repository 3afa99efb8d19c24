"""The local regularisers of the continual-learning baselines, on plain tensors: LwF's distillation
term, EWC's quadratic penalty, and the per-sample squared gradients EWC's diagonal Fisher sums."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.methods.arrays import HEAD, factor_key
from fedlorm.methods.base import ClientData

__all__ = ["ewc_penalty", "lwf_loss", "parameter_paths", "squared_gradient_sums"]


def lwf_loss(logits: Tensor, teacher_logits: Tensor, *, weight: float, temperature: float) -> Tensor:
    """λ·T²·KL(softmax(z_old/T) ‖ softmax(z/T)), averaged over the batch (rows of the old classes'
    logits); computed in at least float32, so half-precision logits do not round the softmax."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=1)
    log_q = F.log_softmax(logits.to(dtype) / temperature, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=1).mean()
    return weight * temperature**2 * kl


def ewc_penalty(
    params: Mapping[str, Tensor], anchor: Mapping[str, Tensor], fisher: Mapping[str, Tensor], *, weight: float
) -> Tensor:
    """(λ/2)·Σ_j F_j (θ_j − θ*_j)² over every array named in ``fisher`` (in its order)."""
    terms = [(fisher[key] * (params[key] - anchor[key]).square()).sum() for key in fisher]
    if not terms:
        raise ValueError("ewc_penalty needs at least one array")
    return 0.5 * weight * torch.stack(terms).sum()


def parameter_paths(model: nn.Module, layers: Mapping[str, LoRALayer]) -> dict[str, str]:
    """Array key (``{layer}.lora_A``, ``head.weight``, …) → that parameter's name in ``model``, for
    :func:`torch.func.functional_call` (a layer's name is relative to the module it was injected in)."""
    names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
    paths = {}
    for name, layer in layers.items():
        for factor in ("A", "B"):
            paths[factor_key(name, factor)] = names[id(getattr(layer, f"lora_{factor}"))]
    head = model.get_submodule(HEAD)
    paths[f"{HEAD}.weight"] = names[id(head.weight)]
    paths[f"{HEAD}.bias"] = names[id(head.bias)]
    return paths


def squared_gradient_sums(
    model: Backbone, params: Mapping[str, Tensor], data: ClientData, *, classes: range, batch_size: int
) -> dict[str, Tensor]:
    """Σ over the client's samples of g_j², with g the gradient of the sample's cross-entropy over
    ``classes``' logits (the local training loss) w.r.t. each named parameter: n_i times the client's
    empirical diagonal Fisher, float64. Per-sample gradients (``vmap`` over ``batch_size`` chunks),
    test-time inputs (no augmentation), the backbone in eval mode, float32 forward."""
    model.eval()
    model.requires_grad_(False)
    device = model.head.weight.device
    detached = {path: value.detach().to(device) for path, value in params.items()}
    start, stop = classes.start, classes.stop

    def sample_loss(p: dict[str, Tensor], image: Tensor, label: Tensor) -> Tensor:
        logits = functional_call(model, p, (image.unsqueeze(0),))[:, start:stop]
        return F.cross_entropy(logits.float(), (label - start).unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    sums = {path: torch.zeros(v.shape, dtype=torch.float64, device=device) for path, v in detached.items()}
    for batch in torch.arange(len(data)).split(batch_size):
        images = data.images[batch].to(device, non_blocking=True)
        if images.dtype == torch.uint8:  # the test-time transform, outside vmap (as Backbone.normalize)
            images = model.preprocessing.test_input(images)
        grads = per_sample(detached, images, data.labels[batch].to(device))
        for path, g in grads.items():
            sums[path] += g.to(torch.float64).square().sum(dim=0)
    return sums
