"""``l2p``: Learning to Prompt (Wang et al., CVPR 2022) on a frozen ViT.

What is implemented: a pool of M prompts P_m (L_p tokens each) with learnable keys k_m
(``prompt.pool_size``, ``prompt.length``). The query q(x) is the frozen ViT's pooled [CLS] feature of
the image (a first forward pass without prompts). The N keys most cosine-similar to q
(``prompt.top_k``) select their prompts, whose N·L_p tokens are inserted after [CLS] at the input of
the first transformer block (prompt tuning), and the head reads the prompted [CLS] feature. The loss
adds λ·mean_batch Σ_selected (1 − cos(q, k_m)) (``prompt.key_weight``, l2p-pytorch's 0.1), which
pulls the selected keys towards their queries. Prompts and keys start uniform in [−1, 1], as in
l2p-pytorch; the whole pool trains on every task.

Simplified: the prompt tokens get no position embedding (the reference learns one for them); the
classifier reads the [CLS] output, not the mean of the prompt tokens' outputs (the paper's head);
no batch-wise prompt-frequency diversity term (the reference's option, off by default).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor

from fedlorm.config import RunConfig
from fedlorm.methods.prompts.pool import PREFIX, PromptPool
from fedlorm.methods.prompts.vit import token_prompt_features

__all__ = ["L2PPool", "select_prompts"]


def select_prompts(query: Tensor, keys: Tensor, top_k: int) -> tuple[Tensor, Tensor]:
    """Indices (batch, top_k) of the keys most cosine-similar to each query, best first, and
    those similarities (differentiable in the keys)."""
    similarity = F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T
    top = similarity.topk(top_k, dim=1)
    return top.indices, top.values


class L2PPool(PromptPool):
    """M prompts of L_p tokens with their keys; top-N selection by the frozen [CLS] query."""

    def __init__(self, cfg: RunConfig, vit: VisionTransformer) -> None:
        p, dim = cfg.prompt, vit.embed_dim
        super().__init__(cfg, vit, {"P": (p.pool_size, p.length, dim), "K": (p.pool_size, dim)})
        self.top_k, self.key_weight = p.top_k, p.key_weight

    def layout(self, task: int) -> tuple[int, slice]:
        size = self.arrays["K"].shape[0]
        return size, slice(0, size)

    def init_rows(self, state: dict[str, Tensor], task: int, generator: torch.Generator) -> None:
        if task > 0:
            return
        for name in self.arrays:
            key = PREFIX + name
            fresh = torch.rand(state[key].shape, generator=generator, dtype=torch.float64) * 2 - 1
            state[key] = fresh.to(device=state[key].device, dtype=state[key].dtype)

    def prompted(self, vit: VisionTransformer, x: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        index, similarity = select_prompts(query, self.view("K"), self.top_k)
        tokens = self.view("P")[index].flatten(1, 2)  # (batch, N·L_p, dim), best prompt first
        key_loss = self.key_weight * (1 - similarity).sum(dim=1).mean()
        return token_prompt_features(vit, x, tokens), key_loss
