"""The export hook of a method whose deployed model holds more than backbone, LoRA adapters and head.

A method that adds something of its own to the model it evaluates (the prompt methods' prompt pool)
names a :class:`ModelExtra` in its registry entry. The model writer (:mod:`fedlorm.export`) asks
that hook to check, write and later rebuild the extra, and so knows nothing of any particular method.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig

__all__ = ["ModelExtra"]


class ModelExtra(ABC):
    """How ``model/`` stores one kind of extra a method's deployed model carries, and rebuilds it.

    The extra is described in ``model.json`` under :attr:`key` (an entry :meth:`save` returns) and
    kept in files of the model folder that the entry names (:meth:`files`).
    """

    key: ClassVar[str]
    """The ``model.json`` key of the extra's entry, e.g. ``prompts``."""
    noun: ClassVar[str]
    """What the extra is called in messages, e.g. ``prompt pool``."""

    @abstractmethod
    def carried_by(self, model: Backbone) -> str | None:
        """What extra of this kind ``model`` carries now, e.g. ``L2PPool``; None if it carries none.

        The model writer uses it to refuse a model whose method would not rebuild the extra.
        """

    @abstractmethod
    def check(self, model: Backbone, method: str) -> None:
        """Refuse to export ``model`` if the extra it carries is not one that ``method`` rebuilds.

        Args:
            model: The model about to be written.
            method: The run's method name (for the message).

        Raises:
            ValueError: One line saying what is wrong with the extra.
        """

    @abstractmethod
    def save(self, model: Backbone, folder: Path) -> dict[str, Any] | None:
        """Write the extra ``model`` carries into ``folder``.

        Args:
            model: The model being written; :meth:`check` accepted it.
            folder: The model folder being written (not yet in place).

        Returns:
            The ``model.json`` entry that describes the extra, or None if the model carries none.
        """

    @abstractmethod
    def files(self, entry: Any, where: str) -> list[str]:
        """The files of the model folder that a ``model.json`` entry names, after checking it.

        Args:
            entry: The value under :attr:`key` in ``model.json``.
            where: The ``model.json`` path, for the message.

        Returns:
            File names inside the model folder.

        Raises:
            ValueError: One line naming ``where`` if the entry is malformed.
        """

    @abstractmethod
    def load(self, model: Backbone, folder: Path, entry: Any, cfg: RunConfig) -> None:
        """Rebuild the extra on a freshly loaded ``model`` from ``folder``.

        Args:
            model: The model :func:`fedlorm.export.load_model` rebuilt (backbone, adapters, head).
            folder: The model folder.
            entry: The checked ``model.json`` entry.
            cfg: The run's config, as ``model.json`` records it.

        Raises:
            ValueError: One line if the files do not fit the extra.
        """
