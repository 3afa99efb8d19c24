"""Class-incremental scenario: the order in which classes are learned and how they split into tasks.

Models and metrics work on *positions* in the class order (position p is the p-th class learned), so
task t always owns the contiguous block of logits ``task_classes(t)``; datasets keep their own label
ids, and :meth:`Scenario.to_positions` translates between the two.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, TypeVar

import numpy as np
import torch

__all__ = ["Scenario", "make_scenario"]

_Labels = TypeVar("_Labels", torch.Tensor, np.ndarray)


@dataclass(frozen=True)
class Scenario:
    """Class order (original label ids, in learning order) and per-task class counts."""

    class_order: tuple[int, ...]
    task_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        order = tuple(int(c) for c in self.class_order)
        sizes = tuple(int(s) for s in self.task_sizes)
        object.__setattr__(self, "class_order", order)
        object.__setattr__(self, "task_sizes", sizes)
        if not sizes:
            raise ValueError("Scenario needs at least one task (task_sizes is empty)")
        bad = [s for s in sizes if s < 1]
        if bad:
            raise ValueError(f"task sizes must be positive, got {list(sizes)}")
        if sum(sizes) != len(order):
            raise ValueError(
                f"task sizes {list(sizes)} sum to {sum(sizes)}, but class_order has "
                f"{len(order)} classes"
            )
        if any(c < 0 for c in order):
            raise ValueError(f"class ids must be non-negative, got {min(order)}")
        if len(set(order)) != len(order):
            dup = sorted({c for c in order if order.count(c) > 1})
            raise ValueError(f"class_order repeats class ids {dup}")

    # Derived data, cached outside the dataclass fields (so eq/hash/asdict see only the two fields).
    @cached_property
    def _offsets(self) -> tuple[int, ...]:
        return (0, *(int(o) for o in np.cumsum(self.task_sizes)))

    @cached_property
    def _lookup(self) -> np.ndarray:
        lookup = np.full(max(self.class_order) + 1, -1, dtype=np.int64)
        lookup[list(self.class_order)] = np.arange(self.num_classes, dtype=np.int64)
        return lookup

    @property
    def num_tasks(self) -> int:
        """Number of tasks T."""
        return len(self.task_sizes)

    @property
    def num_classes(self) -> int:
        """Total number of classes over all tasks."""
        return len(self.class_order)

    def _check_task(self, t: int) -> int:
        if not 0 <= t < self.num_tasks:
            raise ValueError(f"task index {t} out of range [0, {self.num_tasks})")
        return int(t)

    def task_classes(self, t: int) -> range:
        """Positions (in class order) owned by task ``t``: ``[offset_t, offset_t + size_t)``."""
        t = self._check_task(t)
        return range(self._offsets[t], self._offsets[t + 1])

    def seen_classes(self, t: int) -> range:
        """Positions of every class learned up to and including task ``t``."""
        t = self._check_task(t)
        return range(0, self._offsets[t + 1])

    def task_of_position(self, p: int) -> int:
        """Task that owns class position ``p``."""
        if not 0 <= p < self.num_classes:
            raise ValueError(f"class position {p} out of range [0, {self.num_classes})")
        return bisect.bisect_right(self._offsets, p) - 1

    def task_label_ids(self, t: int) -> tuple[int, ...]:
        """Original dataset label ids of task ``t``'s classes (to select its samples)."""
        r = self.task_classes(t)
        return self.class_order[r.start : r.stop]

    def to_positions(self, labels: _Labels) -> _Labels:
        """Map original label ids to positions in the class order (same container type, int64)."""
        lookup = self._lookup
        if isinstance(labels, torch.Tensor):
            arr = labels.detach().cpu().numpy()
            pos = self._map(arr, lookup)
            return torch.from_numpy(pos).to(labels.device)
        return self._map(np.asarray(labels), lookup)

    @staticmethod
    def _map(arr: np.ndarray, lookup: np.ndarray) -> np.ndarray:
        if arr.size == 0:
            return np.zeros(arr.shape, dtype=np.int64)
        if arr.dtype.kind not in "iub":
            raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
        arr = arr.astype(np.int64, copy=False)
        inside = (arr >= 0) & (arr < lookup.size)
        pos = np.full(arr.shape, -1, dtype=np.int64)
        pos[inside] = lookup[arr[inside]]
        if (pos < 0).any():
            missing = np.unique(arr[pos < 0])[:10].tolist()
            raise ValueError(f"labels {missing} are not in the scenario's class order")
        return pos

    def to_dict(self) -> dict[str, list[int]]:
        """JSON-friendly form for results files."""
        return {"class_order": list(self.class_order), "task_sizes": list(self.task_sizes)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Scenario:
        """Inverse of :meth:`to_dict`."""
        return cls(class_order=tuple(d["class_order"]), task_sizes=tuple(d["task_sizes"]))


def make_scenario(
    num_classes: int,
    tasks: int | Sequence[int],
    class_order: Literal["natural", "random"] | Sequence[int] = "natural",
    seed: int = 0,
) -> Scenario:
    """Split ``num_classes`` classes into tasks (equal count or explicit sizes) in a given order.

    ``"random"`` permutes with ``numpy.random.default_rng(seed)``, so an order is reproducible from
    its seed alone; an explicit order must be a permutation of ``range(num_classes)``.
    """
    if int(num_classes) != num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    num_classes = int(num_classes)
    if isinstance(tasks, (int, np.integer)):
        n_tasks = int(tasks)
        if n_tasks < 1:
            raise ValueError(f"number of tasks must be >= 1, got {n_tasks}")
        if num_classes % n_tasks:
            raise ValueError(
                f"{num_classes} classes do not split into {n_tasks} equal tasks; "
                "pass explicit task sizes instead (e.g. [20] * 9 + [16])"
            )
        sizes = (num_classes // n_tasks,) * n_tasks
    else:
        sizes = tuple(int(s) for s in tasks)
        if not sizes:
            raise ValueError("tasks is an empty sequence; give at least one task size")
        if any(s < 1 for s in sizes):
            raise ValueError(f"task sizes must be positive, got {list(sizes)}")
        if sum(sizes) != num_classes:
            raise ValueError(
                f"task sizes {list(sizes)} sum to {sum(sizes)}, expected num_classes={num_classes}"
            )

    if isinstance(class_order, str):
        if class_order == "natural":
            order = tuple(range(num_classes))
        elif class_order == "random":
            order = tuple(int(c) for c in np.random.default_rng(seed).permutation(num_classes))
        else:
            raise ValueError(
                f"class_order must be 'natural', 'random' or a sequence, got {class_order!r}"
            )
    else:
        order = tuple(int(c) for c in class_order)
        if sorted(order) != list(range(num_classes)):
            dup = sorted({c for c in order if order.count(c) > 1})
            out = sorted({c for c in order if not 0 <= c < num_classes})
            raise ValueError(
                f"explicit class_order must be a permutation of range({num_classes}); got "
                f"{len(order)} ids (duplicates: {dup or 'none'}, out of range: {out or 'none'})"
            )
    return Scenario(class_order=order, task_sizes=sizes)
