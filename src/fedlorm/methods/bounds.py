"""Public bounds on a client's reply in plain mode: how large it may be, alone and against the others.

:func:`~fedlorm.methods.validation.check_reply` accepts any finite, well-formed reply whose Grams are
positive semi-definite. That is not enough against a hostile client: a Gram of 1e200·I with N = A_t·G
is finite and PSD, and makes the closed-form merge return the client's own A_t. Weighting by the
clients' statistics is what makes LoRM exact, so the server cannot simply ignore scale; what it can
check, on grounds that hold for every honest client whatever its data, is the size of a reply *per
sample*:

- every per-sample magnitude stays within the run's public bound (2^``secure.bound_exponent``, the
  bound secure aggregation encodes every entry against): :func:`check_bound`;
- no reply's per-sample magnitude exceeds a limit times the median of the step's other replies
  (:func:`outliers`). A per-sample magnitude is a Gram's trace per sample (for a diagonal Gram, its
  sum), a count per sample, a value's Frobenius norm per sample; the sample count itself is compared
  the same way, so a client cannot dodge the test by claiming a huge count and scaling its summands
  to match. The weights of a merge (Grams, counts, the sample count) are held to ``limit``
  (``secure.spread_limit``); values to the looser ``value_limit`` (``secure.value_spread_limit``),
  because what a client trained differs far more between honest clients than what it saw (a Fisher
  weight, a squared gradient, varies by 10^4 where a Gram's trace varies by a few times).

Honest non-IID clients differ in what they hold (Dirichlet β down to 0.05, shares 10× apart and
more), so the limits are set far above the spread measured on honest runs (docs/security.md,
``benchmarks/reply_spread.py``). The test is one-sided: a reply far *smaller* than the others only
lowers its own weight. It needs at least one other reply, and it cannot stop a hostile client from
biasing the merge within these bounds, nor a majority of hostile clients.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence

import torch

from fedlorm.methods.base import ClientReply
from fedlorm.methods.replies import Kind, ReplySpec

__all__ = ["NUM_EXAMPLES", "check_bound", "outliers", "sample_magnitudes", "spread"]

NUM_EXAMPLES = "num_examples"
"""The key of the sample count among a reply's magnitudes (no method key: methods use dotted names)."""


def sample_magnitudes(reply: ClientReply, expected: ReplySpec) -> dict[str, float]:
    """Per summand of ``reply``: its size per sample, by its kind in ``expected``; and its sample count.

    A Gram's trace (a diagonal Gram's sum), a value's Frobenius norm, a count's sum, each divided
    by ``reply.num_examples``; ``num_examples`` (:data:`NUM_EXAMPLES`) as it is. The reply must have
    passed :func:`~fedlorm.methods.validation.check_reply` against ``expected``.
    """
    n = float(reply.num_examples)
    out: dict[str, float] = {}
    for key, summand in sorted(expected.items()):
        value = reply.summands[key].detach().to(torch.float64)
        if summand.kind is Kind.GRAM:
            size = float(value.diagonal().sum() if value.ndim == 2 else value.sum())
        elif summand.kind is Kind.COUNT:
            size = float(value.sum())
        else:
            size = float(torch.linalg.vector_norm(value))
        out[key] = abs(size) / n
    out[NUM_EXAMPLES] = n
    return out


def check_bound(magnitudes: Mapping[str, float], bound: float) -> str | None:
    """Why a reply's per-sample magnitudes (:func:`sample_magnitudes`) exceed the public ``bound``."""
    for key, size in sorted(magnitudes.items()):
        if key != NUM_EXAMPLES and size > bound:
            return f"{key}'s size per sample is above the public bound {bound:.6g}"
    return None


def outliers(
    magnitudes: Sequence[Mapping[str, float]], expected: ReplySpec, limit: float, value_limit: float
) -> dict[int, str]:
    """Position → reason, for each reply with a magnitude above its limit × the median of the others'.

    ``magnitudes``: :func:`sample_magnitudes` of a step's replies against ``expected`` (same keys).
    Values (:attr:`Kind.VALUE`) are held to ``value_limit``, everything else (Grams, counts, the sample
    count) to ``limit``; an infinite limit switches the test off. A key whose median over the others
    is 0 is not compared; with fewer than two replies nothing is.
    """
    out: dict[int, str] = {}
    if len(magnitudes) < 2:
        return out
    for i, own in enumerate(magnitudes):
        for key, size in own.items():
            value = key != NUM_EXAMPLES and expected[key].kind is Kind.VALUE
            bound = value_limit if value else limit
            if math.isinf(bound):
                continue
            median = statistics.median(m[key] for j, m in enumerate(magnitudes) if j != i)
            if median > 0 and size > bound * median:
                what = "sample count" if key == NUM_EXAMPLES else f"{key}'s size per sample"
                out[i] = (
                    f"{what} is {size / median:.3g} times the median of the other replies (limit {bound:g})"
                )
                break
    return out


def spread(magnitudes: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Per key, the largest ratio of one reply's magnitude to the median of the others' (measurement)."""
    out: dict[str, float] = {}
    for i, own in enumerate(magnitudes):
        for key, size in own.items():
            median = statistics.median(m[key] for j, m in enumerate(magnitudes) if j != i)
            if median > 0:
                out[key] = max(out.get(key, 0.0), size / median)
    return out
