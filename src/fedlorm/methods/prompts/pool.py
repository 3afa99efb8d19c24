"""A prompt pool attached to a backbone: its learnable arrays, which rows a task uses and trains,
and the forward hook that makes ``model(images)`` the prompted model.

The pool lives beside the model, not inside it (a weak map from the model to its pool), so the
encoder's state dict keeps timm's key names and the frozen backbone exports as before. A forward
hook on the encoder replaces its output, the frozen ViT's pooled feature, by the prompted feature
computed with that output as the query; the runtime's evaluation therefore sees the prompts that
were last loaded into the pool (the server loads the deployed ones in ``deploy``).

Every array has the component (prompt) index as its first axis. A task uses rows ``[0, active)``
and clients train rows ``trained`` (:meth:`PromptPool.layout`); rows outside ``trained`` enter the
forward pass detached, so their gradient is zero and Adam leaves them where they are.
"""

from __future__ import annotations

import weakref
from abc import abstractmethod
from collections.abc import Mapping

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.prompts.vit import plain_features

__all__ = ["PREFIX", "PromptPool", "attach_pool", "model_pool"]

PREFIX = "prompt."
"""Prefix of the pool's arrays in broadcasts, replies and the server's state."""

_POOLS: weakref.WeakKeyDictionary[Backbone, PromptPool] = weakref.WeakKeyDictionary()


class PromptPool(nn.Module):
    """Learnable prompt arrays (all rows of all tasks) and the prompted forward pass."""

    def __init__(self, cfg: RunConfig, vit: VisionTransformer, shapes: Mapping[str, tuple[int, ...]]) -> None:
        super().__init__()
        self.cfg = cfg
        self.arrays = nn.ParameterDict(
            {name: nn.Parameter(torch.zeros(shape), requires_grad=False) for name, shape in shapes.items()}
        )
        self.active = 0
        self.trained = slice(0, 0)
        self.task: int | None = None
        """The task whose layout :meth:`load` set last (None: nothing loaded yet)."""

    @abstractmethod
    def layout(self, task: int) -> tuple[int, slice]:
        """Rows task ``task`` uses (``[0, active)``) and the rows its clients train."""

    @abstractmethod
    def init_rows(self, state: dict[str, Tensor], task: int, generator: torch.Generator) -> None:
        """Initialise, in the server's ``state``, the rows task ``task`` starts to train."""

    @abstractmethod
    def prompted(self, vit: VisionTransformer, x: Tensor, query: Tensor) -> tuple[Tensor, Tensor]:
        """Pooled prompted features of normalised images ``x`` and the extra loss term (a scalar)."""

    def view(self, name: str) -> Tensor:
        """Rows ``[0, active)`` of array ``name``; those outside ``trained`` detached."""
        array, start, stop = self.arrays[name], self.trained.start, self.trained.stop
        if start == 0 and stop >= self.active:
            return array[: self.active]
        return torch.cat([array[:start].detach(), array[start:stop], array[stop : self.active].detach()])

    def load(self, arrays: Mapping[str, Tensor], task: int) -> None:
        """Copy the broadcast rows ``[0, active)`` of every array and set task ``task``'s layout."""
        self.active, self.trained = self.layout(task)
        self.task = task
        with torch.no_grad():
            for name, array in self.arrays.items():
                array[: self.active].copy_(arrays[PREFIX + name][: self.active])

    def trained_rows(self) -> dict[str, Tensor]:
        """The trained rows of every array (detached copies), keyed as in the broadcast."""
        return {PREFIX + name: array[self.trained].detach().clone() for name, array in self.arrays.items()}

    def features(self, vit: VisionTransformer, x: Tensor) -> tuple[Tensor, Tensor]:
        """Prompted features and extra loss of normalised images; the query is the frozen ViT's feature."""
        return self.prompted(vit, x, plain_features(vit, x))


def model_pool(model: Backbone) -> PromptPool | None:
    """The pool attached to ``model`` (:func:`attach_pool`), or None: a model without prompts."""
    return _POOLS.get(model)


def attach_pool(
    model: Backbone, vit: VisionTransformer, build: type[PromptPool], cfg: RunConfig
) -> PromptPool:
    """The pool of ``model`` (built by ``build(cfg, vit)`` and hooked in on first use)."""
    pool = _POOLS.get(model)
    if pool is None:
        pool = build(cfg, vit).to(model.head.weight.device)  # type: ignore[call-arg]
        _POOLS[model] = pool

        def prompted_output(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
            return pool.prompted(vit, args[0], output.detach())[0]

        vit.register_forward_hook(prompted_output)
    elif not isinstance(pool, build):
        raise ValueError(f"{type(model).__name__} already carries a {type(pool).__name__}")
    return pool
