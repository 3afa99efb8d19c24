"""What one client contributes to a secure sum, and what the server gets back from the sum.

Under secure aggregation the server never holds a single reply, so each client checks its own reply
against the step's :class:`~fedlorm.methods.replies.ReplySpec` (published by the server with the
request) and encodes its summands *and* the scalars the server adds up (sample count, loss sum) with
the run's :class:`EncodingSpec`; metrics would otherwise travel in the clear. The server decodes the
digit sums into float64 sums, the total count and the loss sum (:func:`unpack`). Both runtimes use
these functions, so an in-process run and a Flower run give the same bits.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from fedlorm.config import RunConfig, SecureConfig
from fedlorm.methods.base import Arrays, ClientReply
from fedlorm.methods.replies import Kind, ReplySpec, Summand
from fedlorm.methods.validation import InvalidReplyError, check_reply
from fedlorm.secure.encoding import EncodingSpec, encode

__all__ = [
    "FLOWER",
    "IN_PROCESS",
    "LOSS_SUM",
    "NUM_EXAMPLES",
    "ContributionError",
    "contribution",
    "digit_layout",
    "encoding_spec",
    "secure_record",
    "secure_upload_bytes",
    "spec_from_json",
    "spec_to_json",
    "unpack",
]

NUM_EXAMPLES = "secure:num_examples"
"""Key of the encoded sample count (not a method key: methods use dotted names)."""
LOSS_SUM = "secure:loss_sum"
"""Key of the encoded training-loss sum, loss × num_examples (metrics must not travel in the clear)."""


def encoding_spec(secure: SecureConfig) -> EncodingSpec:
    """The run's public encoding: one bound 2^bound_exponent for every summand and scalar."""
    return EncodingSpec(
        default_bound=math.ldexp(1.0, secure.bound_exponent),
        words=secure.words,
        word_bits=secure.word_bits,
        modulus_bits=secure.modulus_bits,
    )


IN_PROCESS = "encoding only (in-process simulation: the replies are encoded and summed, nothing is masked)"
"""results.json's ``protocol`` of an in-process secure run."""
FLOWER = "SecAgg+ (Flower), masks from ChaCha20 keyed by the whole shared secret"
"""results.json's ``protocol`` of a secure run over Flower."""


def secure_record(cfg: RunConfig, *, masked: bool) -> dict[str, Any]:
    """What results.json says about a secure run: the protocol (``masked``: SecAgg+ over Flower, else
    the in-process encoding only), SecAgg+'s settings and the encoding's precision."""
    spec = encoding_spec(cfg.secure)
    return {
        "protocol": FLOWER if masked else IN_PROCESS,
        "words": spec.words,
        "word_bits": spec.word_bits,
        "modulus_bits": spec.modulus_bits,
        "bound": spec.bound("any"),
        "step": spec.step("any"),
        "num_shares": cfg.secure.num_shares,
        "reconstruction_threshold": cfg.secure.reconstruction_threshold,
    }


def digit_layout(expected: ReplySpec, spec: EncodingSpec) -> dict[str, tuple[int, ...]]:
    """Key → shape of the digit arrays a client sends (summands, then count and loss sum), in order."""
    shapes = {key: summand.shape for key, summand in sorted(expected.items())}
    shapes[NUM_EXAMPLES] = ()
    shapes[LOSS_SUM] = ()
    return {key: (spec.words, *shape) for key, shape in shapes.items()}


def secure_upload_bytes(layout: Mapping[str, tuple[int, ...]]) -> int:
    """One client's masked upload in bytes: an int64 per digit of ``layout`` (:func:`digit_layout`)."""
    return 8 * sum(math.prod(shape) for shape in layout.values())


class ContributionError(ValueError):
    """A client will not contribute its reply; ``word`` says why in one fixed word, the message in full.

    ``nan`` (a non-finite value), ``invalid`` (the reply fails :func:`check_reply`: keys, shapes, a
    Gram not PSD, a count not positive), ``bound`` (an entry above the public bound). Only the word
    may leave the client: the message can hold its values.
    """

    def __init__(self, word: str, detail: str) -> None:
        super().__init__(detail)
        self.word = word


def contribution(reply: ClientReply, expected: ReplySpec, spec: EncodingSpec) -> dict[str, np.ndarray]:
    """The client's own checks (:func:`check_reply`), then its encoded summands, count and loss sum.

    :class:`ContributionError` for a reply that is not finite, fails the checks or has an entry above
    the bound: the client then contributes nothing (Flower's protocol treats it as a dropped client).
    """
    loss = float(reply.metrics.get("train_loss", 0.0)) * reply.num_examples
    values = [value for value in reply.summands.values() if isinstance(value, torch.Tensor)]
    if not math.isfinite(loss) or not all(bool(torch.isfinite(value).all()) for value in values):
        raise ContributionError("nan", "the reply holds NaN or Inf")
    try:
        check_reply(reply, expected)
    except InvalidReplyError as err:
        raise ContributionError("invalid", str(err)) from None
    scalars = {NUM_EXAMPLES: np.array(float(reply.num_examples)), LOSS_SUM: np.array(loss)}
    try:
        return encode({**dict(sorted(reply.summands.items())), **scalars}, spec)
    except ValueError as err:
        raise ContributionError("bound", str(err)) from None


def unpack(decoded: Mapping[str, np.ndarray]) -> tuple[Arrays, int, float]:
    """Decoded sums → (the summands' float64 sums, the total sample count, the loss sum)."""
    sums = {
        key: torch.from_numpy(np.array(value, dtype=np.float64))
        for key, value in decoded.items()
        if key not in (NUM_EXAMPLES, LOSS_SUM)
    }
    return sums, round(float(decoded[NUM_EXAMPLES])), float(decoded[LOSS_SUM])


def spec_to_json(expected: ReplySpec) -> str:
    """A reply spec as JSON, to publish with a secure step's request."""
    plain = {
        key: [list(s.shape), str(s.dtype).removeprefix("torch."), s.kind.value]
        for key, s in sorted(expected.items())
    }
    return json.dumps(plain)


def spec_from_json(text: str) -> ReplySpec:
    """Inverse of :func:`spec_to_json`; ValueError for an unknown dtype or kind."""
    out: ReplySpec = {}
    for key, (shape, dtype, kind) in json.loads(text).items():
        torch_dtype = getattr(torch, str(dtype), None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"{key!r}: unknown dtype {dtype!r} in the published reply spec")
        out[key] = Summand(tuple(int(n) for n in shape), torch_dtype, Kind(kind))
    return out
