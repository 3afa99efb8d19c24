"""Route fedlorm's log records through Flower's handlers, so ``flwr run --stream`` shows them."""

from __future__ import annotations

import logging

__all__ = ["use_flower_logging"]


def use_flower_logging(level: int = logging.INFO) -> None:
    """Give the ``fedlorm`` logger the ``flwr`` logger's handlers (once per process)."""
    ours, theirs = logging.getLogger("fedlorm"), logging.getLogger("flwr")
    if ours.handlers or not theirs.handlers:
        return
    for handler in theirs.handlers:
        ours.addHandler(handler)
    ours.setLevel(level)
    ours.propagate = False
