"""The frozen timm ViT's forward pass, with prompt tokens (L2P) or attention prefixes (CODA-P) put in.

Both passes reuse the ViT's own modules in timm's order (patch embedding, position embedding,
``norm_pre``, blocks, ``norm``, ``forward_head``), so with no prompt tokens and no prefixes they are
the plain forward. Prompt tokens are dropped again before the final norm and pooling: the pooled
feature is the one the backbone's pooling defines (the [CLS] output for ViTs), and the head stays
the backbone's linear head on it.
"""

from __future__ import annotations

import timm
import torch
import torch.nn.functional as F
from timm.models import model_entrypoint
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import Tensor

from fedlorm.backbones import DEFAULT_BACKBONE
from fedlorm.config import ConfigError, RunConfig

__all__ = [
    "EXAMPLE_VIT",
    "Prefix",
    "check_prefix_blocks",
    "plain_features",
    "prefix_features",
    "require_vit",
    "token_prompt_features",
    "vit_encoder",
]

EXAMPLE_VIT = "vit_base_patch16_224.augreg_in21k"
"""The ViT the refusal suggests (the paper's backbone)."""

_VIT_MODULES = ("timm.models.vision_transformer", "timm.models.deit")

Prefix = tuple[Tensor, Tensor]
"""Per-image key and value prefixes of one block, each (batch, tokens, dim)."""


def _refusal(method: str, backbone: str) -> ConfigError:
    return ConfigError(
        f"method {method!r} needs a ViT backbone (its prompts go into a vision transformer's tokens); "
        f"model.backbone = {backbone!r} is not one: use e.g. model.backbone={EXAMPLE_VIT}"
    )


def require_vit(cfg: RunConfig) -> RunConfig:
    """``cfg`` unchanged if ``model.backbone`` names a timm ViT; else a one-line ConfigError.

    A registry ``run_config``: it runs before any data is loaded. Names timm does not know are left
    to the backbone factory, which reports them; :func:`vit_encoder` checks the built model.
    """
    name = cfg.model.backbone
    if name == DEFAULT_BACKBONE:
        raise _refusal(cfg.method, name)
    if timm.is_model(name) and model_entrypoint(name.split(".", 1)[0]).__module__ not in _VIT_MODULES:
        raise _refusal(cfg.method, name)
    return cfg


def vit_encoder(encoder: torch.nn.Module, cfg: RunConfig) -> VisionTransformer:
    """The backbone's encoder as a timm ``VisionTransformer``; a one-line ConfigError otherwise."""
    if not isinstance(encoder, VisionTransformer):
        raise _refusal(cfg.method, cfg.model.backbone)
    return encoder


def _tokens(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The token sequence at the input of the first block (prefix tokens first)."""
    return vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))


def _pool(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The pooled feature of the last block's tokens (timm's final norm and pooling)."""
    return vit.forward_head(vit.norm(x), pre_logits=True)


@torch.no_grad()
def plain_features(vit: VisionTransformer, x: Tensor) -> Tensor:
    """The frozen ViT's pooled feature of normalised images: the query of both prompt methods."""
    return _pool(vit, vit.blocks(_tokens(vit, x)))


def token_prompt_features(vit: VisionTransformer, x: Tensor, prompts: Tensor) -> Tensor:
    """Pooled features with ``prompts`` (batch, tokens, dim) inserted after the prefix tokens
    ([CLS]) at the input of the first block, without position embeddings (prompt tuning)."""
    tokens = _tokens(vit, x)
    start = vit.num_prefix_tokens
    tokens = torch.cat([tokens[:, :start], prompts.to(tokens.dtype), tokens[:, start:]], dim=1)
    tokens = vit.blocks(tokens)
    count = prompts.shape[1]
    return _pool(vit, torch.cat([tokens[:, :start], tokens[:, start + count :]], dim=1))


def prefix_features(vit: VisionTransformer, x: Tensor, prefixes: dict[int, Prefix]) -> Tensor:
    """Pooled features with key/value prefixes in the attention of the blocks ``prefixes`` names."""
    tokens = _tokens(vit, x)
    for index, block in enumerate(vit.blocks):
        prefix = prefixes.get(index)
        tokens = block(tokens) if prefix is None else _prefix_block(block, tokens, prefix)
    return _pool(vit, tokens)


def check_prefix_blocks(vit: VisionTransformer, layers: list[int], cfg: RunConfig) -> None:
    """ConfigError unless every layer in ``layers`` is a plain timm ``Block`` of ``vit``."""
    depth = len(vit.blocks)
    bad = [i for i in layers if i >= depth]
    if bad:
        raise ConfigError(
            f"prompt.coda_layers = {layers} is not allowed; {cfg.model.backbone} has blocks 0..{depth - 1}"
        )
    odd = [i for i in layers if type(vit.blocks[i]) is not Block or type(vit.blocks[i].attn) is not Attention]
    if odd:
        raise ConfigError(
            f"{cfg.method} puts prefixes into timm's plain ViT blocks only; {cfg.model.backbone}'s "
            f"block {odd[0]} is a {type(vit.blocks[odd[0]]).__name__}"
        )


def _prefix_block(block: Block, x: Tensor, prefix: Prefix) -> Tensor:
    """timm ``Block.forward`` with the prefix in its attention."""
    x = x + block.drop_path1(block.ls1(_prefix_attention(block.attn, block.norm1(x), prefix)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def _prefix_attention(attn: Attention, x: Tensor, prefix: Prefix) -> Tensor:
    """timm ``Attention.forward`` with the prefix's keys and values put before the tokens' own
    (after the qkv projection, as the CODA-P reference does); queries are the tokens' only."""
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
    qkv = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    pk, pv = (p.to(k.dtype).reshape(B, -1, heads, head_dim).transpose(1, 2) for p in prefix)
    k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p if attn.training else 0.0)
    out = out.transpose(1, 2).reshape(B, N, heads * head_dim)
    out = attn.norm(out) if hasattr(attn, "norm") else out
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))
