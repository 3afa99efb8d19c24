"""Prompt methods on a frozen ViT: ``l2p`` (Learning to Prompt) and ``coda-p`` (CODA-Prompt), federated
by sample-weighted averaging of the prompts, keys and head rows (docs/methods.md)."""

from fedlorm.methods.prompts.coda import CodaPool, coda_prompt
from fedlorm.methods.prompts.federated import CodaClient, CodaServer, L2PClient, L2PServer, PromptServer
from fedlorm.methods.prompts.l2p import L2PPool, select_prompts
from fedlorm.methods.prompts.pool import PREFIX, PromptPool, attach_pool, model_pool
from fedlorm.methods.prompts.saved import PROMPT_WEIGHTS, SavedPromptPool
from fedlorm.methods.prompts.vit import require_vit

__all__ = [
    "PREFIX",
    "PROMPT_WEIGHTS",
    "CodaClient",
    "CodaPool",
    "CodaServer",
    "L2PClient",
    "L2PPool",
    "L2PServer",
    "PromptPool",
    "PromptServer",
    "SavedPromptPool",
    "attach_pool",
    "coda_prompt",
    "model_pool",
    "require_vit",
    "select_prompts",
]
