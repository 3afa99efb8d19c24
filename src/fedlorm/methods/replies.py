"""Reply specs: what each array of a client's reply is, so the server can check it before summing.

A method declares every summand of a step as a :class:`Summand`: its shape, dtype and kind. The kind
says which value checks apply: a Gram must be symmetric positive semi-definite (or, as a vector, a
non-negative diagonal), a count must be positive, a value only finite.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

import torch

__all__ = ["Kind", "ReplySpec", "Summand", "count", "gram", "value"]


class Kind(StrEnum):
    """What a summand is, which fixes the checks on its values."""

    VALUE = "value"
    """Any finite numbers (weighted factors, products, cross-moments)."""
    GRAM = "gram"
    """XᵀX-type statistic: symmetric PSD matrix, or its diagonal (non-negative)."""
    COUNT = "count"
    """A sample count (a divisor on the server): positive."""


@dataclass(frozen=True)
class Summand:
    """One array of a valid reply: shape, dtype and kind."""

    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float64
    kind: Kind = Kind.VALUE


ReplySpec = dict[str, Summand]
"""Keys of a valid client reply, each with what its array must be."""


def value(*shape: int) -> Summand:
    """A float64 value summand of ``shape``."""
    return Summand(tuple(shape))


def gram(size: int, *, full: bool) -> Summand:
    """A float64 Gram of ``size`` features: the full matrix, or its diagonal."""
    return Summand((size, size) if full else (size,), kind=Kind.GRAM)


def count() -> Summand:
    """A float64 scalar sample count."""
    return Summand((), kind=Kind.COUNT)
