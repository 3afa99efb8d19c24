"""Secure aggregation support: encoding float64 summands as integers that can be summed modulo 2^k."""

from fedlorm.secure.encoding import (
    EncodingSpec,
    decode,
    encode,
    error_bound,
    modular_sum,
    words_needed,
)

__all__ = ["EncodingSpec", "decode", "encode", "error_bound", "modular_sum", "words_needed"]
