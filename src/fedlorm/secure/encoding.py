"""Multi-word fixed-point encoding of float64 summands for secure aggregation modulo 2^k.

Secure aggregation (Flower's SecAgg+) adds non-negative integers modulo 2^k and nothing else, while
fedlorm's summands are float64 with a wide dynamic range. Each array gets a public bound ``bound``
(every client's entries satisfy |x| <= bound) and, from it, a power-of-two scale 2^e >= bound. An
entry becomes the integer z = round(x · 2^(F−e)) with F = words·word_bits − 2 fraction bits, so
|z| <= 2^F, and z is written in base 2^word_bits as ``words`` digits, the top one shifted by
2^(word_bits−1) so that every digit is in [0, 2^word_bits). Digits are summed independently: with
n clients each digit sum is below n·2^word_bits, which must stay below the modulus 2^modulus_bits,
so no sum wraps and the modular sum *is* the integer sum. Decoding removes the n offsets,
propagates the carries exactly in int64 and rebuilds the float64 value.

The only error is the clients' rounding: at most n·2^(e−F−1) per entry (:func:`error_bound`), plus
float64's own rounding of the result. With the defaults (4 words of 24 bits, F = 94), a bound of
2^40 ≈ 1.1e12 resolves 2^−54 ≈ 5.6e−17 absolute, so a bound far above the data costs nothing in
practice and can be fixed before any client has seen its data.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["EncodingSpec", "decode", "encode", "error_bound", "modular_sum", "words_needed"]

_WORD_DTYPE = np.int64


@dataclass(frozen=True)
class EncodingSpec:
    """Public parameters every client and the server agree on before a secure sum."""

    bounds: Mapping[str, float] = field(default_factory=dict)
    """Per key: the bound on |x| of any one client's entry."""
    default_bound: float | None = None
    """The bound of keys not in ``bounds``; None makes such keys an error."""
    words: int = 4
    """Digits per entry."""
    word_bits: int = 24
    """Bits per digit; each client's digit is in [0, 2^word_bits)."""
    modulus_bits: int = 32
    """The secure sum works modulo 2^modulus_bits."""

    def __post_init__(self) -> None:
        """Reject parameters under which the encoding cannot be exact."""
        if not (isinstance(self.words, int) and self.words >= 1):
            raise ValueError(f"words = {self.words!r}; expected an integer >= 1")
        if not (isinstance(self.word_bits, int) and 2 <= self.word_bits <= 52):
            raise ValueError(f"word_bits = {self.word_bits!r}; expected an integer in [2, 52]")
        if not (isinstance(self.modulus_bits, int) and self.word_bits < self.modulus_bits <= 62):
            raise ValueError(f"modulus_bits = {self.modulus_bits!r}; expected an integer in (word_bits, 62]")
        for key, bound in {**self.bounds, "(default)": self.default_bound}.items():
            if key == "(default)" and bound is None:
                continue
            if not (isinstance(bound, int | float) and math.isfinite(bound) and bound > 0):
                raise ValueError(f"bound of {key!r} = {bound!r}; expected a finite number > 0")

    @property
    def frac_bits(self) -> int:
        """F: an entry equal to its bound's scale 2^e encodes as 2^F."""
        return self.words * self.word_bits - 2

    @property
    def max_clients(self) -> int:
        """The most clients whose digit sums stay below the modulus (n·2^word_bits < 2^modulus_bits)."""
        return (1 << (self.modulus_bits - self.word_bits)) - 1

    def bound(self, key: str) -> float:
        """The public bound of ``key``; ValueError if the spec has none."""
        if key in self.bounds:
            return float(self.bounds[key])
        if self.default_bound is None:
            raise ValueError(f"no bound for {key!r} in the encoding spec (and no default bound)")
        return float(self.default_bound)

    def exponent(self, key: str) -> int:
        """e, the smallest integer with 2^e >= bound(key)."""
        mantissa, exponent = math.frexp(self.bound(key))
        return exponent - 1 if mantissa == 0.5 else exponent

    def step(self, key: str) -> float:
        """The value of one unit of the encoded integer: 2^(e−F)."""
        return math.ldexp(1.0, self.exponent(key) - self.frac_bits)

    def check_clients(self, num_clients: int) -> None:
        """ValueError unless ``num_clients`` encodings can be summed without wrapping."""
        if not (isinstance(num_clients, int) and 1 <= num_clients <= self.max_clients):
            raise ValueError(
                f"num_clients = {num_clients!r}; this spec sums at most {self.max_clients} clients "
                f"(word_bits {self.word_bits}, modulus 2^{self.modulus_bits})"
            )


def words_needed(dynamic_range: float, relative_precision: float, word_bits: int = 24) -> int:
    """Digits per entry so that an entry ``dynamic_range`` times below the bound keeps the precision.

    With a bound 2^e, the step is 2^(e−F); an entry of size bound/dynamic_range then has relative
    rounding error at most dynamic_range·2^(1−F)/2 per client, at most ``relative_precision``.
    """
    if not (dynamic_range >= 1 and 0 < relative_precision < 1):
        raise ValueError(
            f"dynamic_range = {dynamic_range!r}, relative_precision = {relative_precision!r}; "
            "expected >= 1 and in (0, 1)"
        )
    frac_bits = math.ceil(math.log2(dynamic_range / relative_precision)) + 1
    return max(1, math.ceil((frac_bits + 2) / word_bits))


def error_bound(spec: EncodingSpec, key: str, num_clients: int) -> float:
    """Worst-case absolute error of a decoded sum entry from the clients' rounding: n·step/2."""
    return num_clients * spec.step(key) / 2


def _as_float64(value: Any, key: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array; ValueError for non-numeric input."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().to(torch.float64).numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(f"{key!r} has dtype {array.dtype}; expected a real number array")
    return array.astype(np.float64)


def encode(arrays: Mapping[str, Any], spec: EncodingSpec) -> dict[str, np.ndarray]:
    """Each array (tensor or ndarray) → int64 digits of shape (words, *shape), each in [0, 2^word_bits).

    ValueError for a key without a bound, a non-finite entry, or an entry with |x| > bound.
    """
    out: dict[str, np.ndarray] = {}
    base = spec.word_bits
    for key, value in arrays.items():
        x = _as_float64(value, key)
        bound = spec.bound(key)
        if not np.isfinite(x).all():
            raise ValueError(f"{key!r} has non-finite entries; it cannot be encoded")
        peak = float(np.abs(x).max()) if x.size else 0.0
        if peak > bound:
            raise ValueError(
                f"{key!r} has an entry of magnitude {peak:.6g} above the agreed bound {bound:.6g}"
            )
        rest = np.rint(np.ldexp(x, spec.frac_bits - spec.exponent(key)))
        digits = np.empty((spec.words, *x.shape), dtype=_WORD_DTYPE)
        for level in range(spec.words - 1):
            high = np.floor(np.ldexp(rest, -base))
            digits[level] = (rest - np.ldexp(high, base)).astype(_WORD_DTYPE)
            rest = high
        digits[-1] = (rest + (1 << (base - 1))).astype(_WORD_DTYPE)
        out[key] = digits
    return out


def modular_sum(encodings: Iterable[Mapping[str, np.ndarray]], spec: EncodingSpec) -> dict[str, np.ndarray]:
    """Key-wise sum of encodings modulo 2^modulus_bits: what a secure sum returns (tests, baselines)."""
    mask = (1 << spec.modulus_bits) - 1
    total: dict[str, np.ndarray] = {}
    for encoding in encodings:
        for key, digits in encoding.items():
            total[key] = (total[key] + digits) & mask if key in total else digits & mask
    return total


def decode(sums: Mapping[str, Any], spec: EncodingSpec, num_clients: int) -> dict[str, np.ndarray]:
    """Digit sums (mod 2^modulus_bits) of exactly ``num_clients`` encodings → the float64 sums.

    ValueError when ``num_clients`` exceeds :attr:`EncodingSpec.max_clients`, when a digit sum is
    larger than ``num_clients`` digits can add up to, or when a decoded entry exceeds
    ``num_clients``·bound: the sum does not come from ``num_clients`` valid encodings.
    """
    spec.check_clients(num_clients)
    base = spec.word_bits
    digit_mask = (1 << base) - 1
    largest = num_clients * digit_mask
    out: dict[str, np.ndarray] = {}
    for key, value in sums.items():
        digits = np.asarray(value)
        if digits.dtype.kind not in "iu" or digits.ndim < 1 or digits.shape[0] != spec.words:
            raise ValueError(
                f"{key!r}: digit sums of dtype {digits.dtype}, shape {digits.shape}; "
                f"expected integers of shape ({spec.words}, ...)"
            )
        digits = digits.astype(_WORD_DTYPE) & ((1 << spec.modulus_bits) - 1)
        if (digits > largest).any():
            raise ValueError(
                f"{key!r}: a digit sum exceeds what {num_clients} clients can add up to; "
                "an encoding was out of range or more clients contributed"
            )
        carry = np.zeros(digits.shape[1:], dtype=_WORD_DTYPE)
        low = []
        for level in range(spec.words - 1):
            total = digits[level] + carry
            low.append(total & digit_mask)
            carry = total >> base
        top = digits[-1] - num_clients * (1 << (base - 1)) + carry
        value64 = top.astype(np.float64)
        for level in reversed(range(spec.words - 1)):
            value64 = np.ldexp(value64, base) + low[level].astype(np.float64)
        result = np.ldexp(value64, spec.exponent(key) - spec.frac_bits)
        limit = num_clients * spec.bound(key) + error_bound(spec, key, num_clients)
        if result.size and float(np.abs(result).max()) > limit:
            raise ValueError(
                f"{key!r}: a decoded entry exceeds {num_clients} × the bound {spec.bound(key):.6g}; "
                "an encoding was out of range"
            )
        out[key] = result
    return out
