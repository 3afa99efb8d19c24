"""The server's side of a secure step, for both runtimes: decode the digit sums, check them, merge.

Under secure aggregation the server never holds one client's reply, so nothing per client can be
checked there: each client checks its own reply (:func:`~fedlorm.secure.contribution.contribution`),
and the server checks what it does hold, the sums (:func:`check_sums`). The sums must decode as the
sum of exactly as many valid encodings as clients contributed; the total sample count must be an
integer of at least one per contributor, each count summand positive, every Gram diagonal
non-negative and every full Gram symmetric positive semi-definite within a tolerance that a single
large entry cannot widen. A sum that fails keeps the previous state; one that passes is merged by
:func:`~fedlorm.methods.guard.guarded_aggregate`, which also keeps the state if the merge fails.
So no value a client encodes can stop the server; within the public bound a hostile client can still
bias the sums (docs/security.md).

The in-process simulator (:func:`fedlorm.runtime.engine.fold_secure_replies`) and the Flower
ServerApp (:mod:`fedlorm.flower.secure_step`) both fold through :func:`fold_secure_sum`, so their
numbers are the same bits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from fedlorm.methods.base import Instruction, Server
from fedlorm.methods.guard import guarded_aggregate
from fedlorm.methods.replies import Kind, ReplySpec
from fedlorm.secure.contribution import LOSS_SUM, NUM_EXAMPLES, unpack
from fedlorm.secure.encoding import EncodingSpec, decode, error_bound

__all__ = ["GRAM_TOLERANCE", "SecureFold", "check_sums", "fold_secure_sum"]

GRAM_TOLERANCE = 1e-8
"""A summed full Gram counts as PSD if no eigenvalue is below −d·max(tol·median(diag), 1e-12·max|G|)."""

_ROUNDING = 1e-12
"""The tolerance's floor relative to the largest entry: float64 rounding of honest Gram sums."""


@dataclass(frozen=True)
class SecureFold:
    """What folding one secure sum did; ``kept`` names why the state stayed (None: merged)."""

    examples: int
    loss_sum: float
    merge_seconds: float
    kept: str | None
    reason: str = ""
    """With ``kept``: the one-line reason, about the sums only (never about one client)."""


def fold_secure_sum(
    server: Server,
    instruction: Instruction,
    digit_sums: Mapping[str, Any],
    spec: EncodingSpec,
    contributors: int,
) -> SecureFold:
    """Decode the digit sums of ``contributors`` encodings, check them, merge them into ``server``.

    ``kept`` is ``decode`` (the sums are not those of that many valid encodings), ``sums`` (they fail
    :func:`check_sums`) or ``merge`` (:func:`~fedlorm.methods.guard.guarded_aggregate` kept the
    state); the server's state is then as before.
    """
    expected = server.expected_reply(instruction)
    try:
        decoded = decode(digit_sums, spec, contributors)
        sums, examples, loss_sum = unpack(decoded)
    except (KeyError, ValueError) as err:
        return SecureFold(0, 0.0, 0.0, "decode", f"the secure sum does not decode: {err}")
    problem = check_sums(sums, expected, decoded, spec, contributors)
    if problem is not None:
        return SecureFold(0, 0.0, 0.0, "sums", f"the secure sums fail their checks: {problem}")
    outcome = guarded_aggregate(server, instruction, sums, examples)
    if not outcome.merged:
        return SecureFold(examples, loss_sum, outcome.seconds, "merge", str(outcome.failure))
    return SecureFold(examples, loss_sum, outcome.seconds, None)


def check_sums(
    sums: Mapping[str, Tensor],
    expected: ReplySpec,
    decoded: Mapping[str, Any],
    spec: EncodingSpec,
    contributors: int,
) -> str | None:
    """Why decoded secure sums cannot come from ``contributors`` honest clients, or None.

    ``sums``: the summands' sums (:func:`~fedlorm.secure.contribution.unpack`); ``decoded``: every
    decoded array, the encoded sample count and loss sum included.
    """
    count = float(decoded[NUM_EXAMPLES])
    slack = error_bound(spec, NUM_EXAMPLES, contributors)
    if abs(count - round(count)) > slack or round(count) < contributors:
        return f"the total sample count {count:.6g} is not an integer of at least {contributors}"
    if not math.isfinite(float(decoded[LOSS_SUM])):
        return "the loss sum is not finite"
    missing = sorted(set(expected) - set(sums))
    if missing:
        return f"no sum for {missing[:3]}"
    for key, summand in sorted(expected.items()):
        value = sums[key]
        if tuple(value.shape) != summand.shape:
            return f"{key} has shape {tuple(value.shape)}; expected {summand.shape}"
        if not bool(torch.isfinite(value).all()):
            return f"{key} is not finite"
        if summand.kind is Kind.COUNT and not bool((value > 0).all()):
            return f"{key} is a count but not positive"
        if summand.kind is Kind.GRAM:
            problem = _gram_problem(value)
            if problem is not None:
                return f"{key} {problem}"
    return None


def _gram_problem(gram: Tensor) -> str | None:
    """Why a summed Gram (a matrix, or its diagonal as a vector) is not PSD, or None."""
    diagonal = gram if gram.ndim == 1 else gram.diagonal()
    if bool((diagonal < 0).any()):
        return "has a negative diagonal entry"
    if gram.ndim == 1:
        return None
    gram = gram.to(torch.float64)
    scale = float(gram.abs().max())
    if scale == 0:
        return None
    if float((gram - gram.T).abs().max()) > 1e-6 * scale:
        return "is not symmetric"
    tolerance = gram.shape[0] * max(GRAM_TOLERANCE * float(diagonal.median()), _ROUNDING * scale)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    if int(torch.linalg.cholesky_ex(gram + tolerance * eye).info) != 0:
        return "is not positive semi-definite"
    return None
