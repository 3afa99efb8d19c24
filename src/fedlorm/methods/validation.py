"""The server's check of one client's reply before it joins the sums (both runtimes use it).

A reply that is not finite, has the wrong keys, shapes or dtypes, carries a Gram that is not
positive semi-definite, or a sample count (a divisor on the server) that is not positive, would
poison the merge of every other client, so it is rejected with a one-line reason and the round goes
on with the rest. What each array is comes from the method's :class:`~fedlorm.methods.replies.Summand`
spec (:meth:`~fedlorm.methods.base.Server.expected_reply`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fedlorm.methods.base import ClientReply
from fedlorm.methods.replies import Kind, ReplySpec

__all__ = ["InvalidReplyError", "check_reply"]

# Relative tolerance of the PSD test: eigenvalues above -tol · d · max|G| count as >= 0, which absorbs
# float64 rounding of sums over millions of tokens.
_PSD_TOL = 1e-8


class InvalidReplyError(ValueError):
    """A client reply that must not be merged; the message names the array and the problem."""


def check_reply(reply: ClientReply, expected: ReplySpec) -> None:
    """Raise :class:`InvalidReplyError` unless ``reply`` is finite, well-formed and PSD where it must be.

    Args:
        reply: One client's reply.
        expected: The step's spec (:meth:`~fedlorm.methods.base.Server.expected_reply`): keys,
            shapes, dtypes and kinds.

    Raises:
        InvalidReplyError: Naming the first array that is wrong, and how.
    """
    n = reply.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InvalidReplyError(f"num_examples = {reply.num_examples!r}; expected an integer >= 1")
    summands = reply.summands
    missing = sorted(set(expected) - set(summands))
    extra = sorted(set(summands) - set(expected))
    if missing or extra:
        raise InvalidReplyError(
            f"reply keys differ from the protocol's: missing {missing[:3]}, extra {extra[:3]}"
        )
    for key, value in summands.items():
        if not isinstance(value, Tensor):
            raise InvalidReplyError(f"{key} is a {type(value).__name__}, not a tensor")
        spec = expected[key]
        if tuple(value.shape) != spec.shape:
            raise InvalidReplyError(f"{key} has shape {tuple(value.shape)}; expected {spec.shape}")
        if value.dtype != spec.dtype:
            raise InvalidReplyError(f"{key} has dtype {value.dtype}; expected {spec.dtype}")
        if not value.is_floating_point():
            raise InvalidReplyError(f"{key} has dtype {value.dtype}; expected a floating-point tensor")
        if not bool(torch.isfinite(value).all()):
            raise InvalidReplyError(f"{key} holds NaN or Inf")
        if spec.kind is Kind.GRAM:
            _check_gram(key, value)
        if spec.kind is Kind.COUNT and not bool((value > 0).all()):
            raise InvalidReplyError(f"{key} is a sample count but is not positive")


def _check_gram(key: str, value: Tensor) -> None:
    if value.ndim == 1:
        if bool((value < 0).any()):
            raise InvalidReplyError(f"{key} is a diagonal Gram with negative entries")
        return
    if value.ndim != 2 or value.shape[0] != value.shape[1]:
        raise InvalidReplyError(f"{key} is a Gram of shape {tuple(value.shape)}; expected a square matrix")
    gram = value.to(torch.float64)
    scale = float(gram.abs().max())
    if scale == 0:
        return
    if float((gram - gram.T).abs().max()) > 1e-6 * scale:
        raise InvalidReplyError(f"{key} is a Gram but is not symmetric")
    # A Cholesky factorisation of G + tol·max|G|·I exists iff no eigenvalue is below -tol·max|G|; it is
    # several times cheaper than an eigendecomposition of a 3072×3072 Gram.
    shifted = gram.clone()
    shifted.diagonal().add_(_PSD_TOL * gram.shape[0] * scale)
    if int(torch.linalg.cholesky_ex(shifted).info) != 0:
        raise InvalidReplyError(f"{key} is a Gram but not positive semi-definite")
