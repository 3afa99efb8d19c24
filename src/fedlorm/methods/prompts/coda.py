"""``coda-p``: CODA-Prompt (Smith et al., CVPR 2023) on a frozen ViT.

What is implemented: in each block l of ``prompt.coda_layers`` (the paper's 0–4), prompt components
P_m ∈ ℝ^(L×D) with keys K_m and attention vectors A_m ∈ ℝ^D. The query q is the frozen ViT's
pooled [CLS] feature (a first pass without prompts); the block's prompt is p = Σ_m α_m P_m with
α_m = cos(q ⊙ A_m, K_m), and its first L/2 tokens are prepended to the attention's keys, the last
L/2 to its values, after the qkv projection (prefix tuning; ``prompt.coda_length`` = L). Each task
adds ``prompt.coda_components`` components per layer; a task uses the components of every task so
far and trains only its own, the earlier ones frozen. New components start as unit vectors
orthogonal to the earlier ones and to each other (Gram–Schmidt, as the reference does at each task
start) when they fit in the dimension, else as random unit vectors. The loss is cross-entropy alone.

Simplified: no orthogonality penalty (the reference's default weight is 0 as well); the component
pool is sized for the configured number of tasks up front.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from fedlorm.config import RunConfig
from fedlorm.methods.prompts.pool import PREFIX, PromptPool
from fedlorm.methods.prompts.vit import Prefix, check_prefix_blocks, prefix_features

__all__ = ["CodaPool", "coda_prompt", "orthonormal_rows"]


def coda_prompt(query: Tensor, P: Tensor, K: Tensor, A: Tensor) -> Tensor:
    """Σ_m α_m P_m per image, α_m = cos(q ⊙ A_m, K_m): (batch, L, D) from q (batch, D), P (M, L, D)."""
    attended = F.normalize(query[:, None, :] * A[None], dim=-1)
    alpha = (attended * F.normalize(K, dim=-1)[None]).sum(-1)
    return torch.einsum("bm,mld->bld", alpha, P)


def orthonormal_rows(old: Tensor, count: int, generator: torch.Generator) -> Tensor:
    """``count`` float64 unit rows orthogonal to each other and to ``old``'s rows where they fit."""
    dim = old.shape[1]
    fresh = torch.randn(count, dim, generator=generator, dtype=torch.float64)
    if old.shape[0] + count <= dim:
        q, _ = torch.linalg.qr(torch.cat([old.to(torch.float64).cpu(), fresh]).T)
        fresh = q[:, old.shape[0] :].T
    return F.normalize(fresh, dim=1)


class CodaPool(PromptPool):
    """Per prefixed block: components P, keys K and attention vectors A for every task."""

    def __init__(self, cfg: RunConfig, vit: VisionTransformer) -> None:
        p, dim = cfg.prompt, vit.embed_dim
        check_prefix_blocks(vit, p.coda_layers, cfg)
        tasks = cfg.scenario.tasks if isinstance(cfg.scenario.tasks, int) else len(cfg.scenario.tasks)
        total = p.coda_components * tasks
        shapes: dict[str, tuple[int, ...]] = {}
        for layer in p.coda_layers:
            shapes[f"P{layer}"] = (total, p.coda_length, dim)
            shapes[f"K{layer}"] = shapes[f"A{layer}"] = (total, dim)
        super().__init__(cfg, vit, shapes)
        self.layers, self.per_task = list(p.coda_layers), p.coda_components

    def layout(self, task: int) -> tuple[int, slice]:
        return (task + 1) * self.per_task, slice(task * self.per_task, (task + 1) * self.per_task)

    def init_rows(self, state: dict[str, Tensor], task: int, generator: torch.Generator) -> None:
        _, rows = self.layout(task)
        for name in self.arrays:
            array = state[PREFIX + name]
            old = array[: rows.start].flatten(1)
            fresh = orthonormal_rows(old, rows.stop - rows.start, generator)
            array[rows] = fresh.view(-1, *array.shape[1:]).to(device=array.device, dtype=array.dtype)

    def prompted(self, vit: VisionTransformer, x: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        prefixes: dict[int, Prefix] = {}
        for layer in self.layers:
            p = coda_prompt(query, self.view(f"P{layer}"), self.view(f"K{layer}"), self.view(f"A{layer}"))
            half = p.shape[1] // 2
            prefixes[layer] = (p[:, :half], p[:, half:])
        return prefix_features(vit, x, prefixes), query.new_zeros(())
