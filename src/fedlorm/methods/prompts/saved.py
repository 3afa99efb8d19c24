"""How the prompt methods' deployed prompt pool is written to ``model/`` and rebuilt from it.

``prompts.safetensors`` holds the rows in use of every array of the pool, under the pool's array
names; ``model.json``'s ``prompts`` entry names that file and the task whose layout the pool had,
and the run's method and config say how to rebuild the pool.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.extras import ModelExtra
from fedlorm.methods.prompts.pool import PREFIX, PromptPool, attach_pool, model_pool
from fedlorm.methods.prompts.vit import vit_encoder

__all__ = ["PROMPT_WEIGHTS", "SavedPromptPool"]

PROMPT_WEIGHTS = "prompts.safetensors"
"""The file of the pool's rows inside ``model/``."""


class SavedPromptPool(ModelExtra):
    """The export hook of a prompt method: its pool's rows in use, and the task that set them."""

    key = "prompts"
    noun = "prompt pool"

    def __init__(self, pool_type: type[PromptPool]) -> None:
        self.pool_type = pool_type
        """The pool class the method's server attaches, which loading rebuilds."""

    def carried_by(self, model: Backbone) -> str | None:
        pool = model_pool(model)
        return None if pool is None else type(pool).__name__

    def check(self, model: Backbone, method: str) -> None:
        pool = model_pool(model)
        if pool is None:
            return
        if pool.task is None:
            raise ValueError(
                "the model's prompt pool holds no prompts: deploy the server's model into it first"
            )
        if type(pool) is not self.pool_type:
            raise ValueError(
                f"the model carries a {type(pool).__name__}; method {method!r} does not rebuild one"
            )

    def save(self, model: Backbone, folder: Path) -> dict[str, Any] | None:
        pool = model_pool(model)
        if pool is None:
            return None
        rows = {name: array[: pool.active] for name, array in pool.arrays.items()}
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in rows.items()}
        save_file(tensors, str(folder / PROMPT_WEIGHTS))
        return {"weights": PROMPT_WEIGHTS, "task": pool.task}

    def files(self, entry: Any, where: str) -> list[str]:
        fields = entry if isinstance(entry, dict) else {}
        weights, task = fields.get("weights"), fields.get("task")
        if not isinstance(weights, str) or Path(weights).name != weights or type(task) is not int or task < 0:
            raise ValueError(
                f"{where!r}: prompts must name a file in the folder and a task index, got {entry!r}"
            )
        return [weights]

    def load(self, model: Backbone, folder: Path, entry: Any, cfg: RunConfig) -> None:
        pool = attach_pool(model, vit_encoder(model.encoder, cfg), self.pool_type, cfg)
        path, task = folder / entry["weights"], entry["task"]
        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors' errors have no common base
            raise ValueError(f"cannot read {str(path)!r}: {' '.join(str(e).split())}") from None
        active, _ = pool.layout(task)
        expected = {name: (active, *array.shape[1:]) for name, array in pool.arrays.items()}
        found = {k: tuple(v.shape) for k, v in state.items()}
        if found != expected:
            raise ValueError(
                f"{str(path)!r} holds {found}; task {task}'s {type(pool).__name__} needs {expected}"
            )
        pool.load({PREFIX + name: array for name, array in state.items()}, task)
