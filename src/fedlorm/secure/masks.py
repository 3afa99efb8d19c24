"""SecAgg+'s masks drawn from the whole shared secret through ChaCha20.

In SecAgg+ every client hides its vector under a private mask (from a seed it secret-shares) and one
pairwise mask per neighbour (from an ECDH shared key), and the server removes them once the sum is
formed. Flower 1.42 expands each 32-byte seed or key with ``numpy.random.RandomState`` after folding
it to 32 bits by XOR, so a curious server that has the masked vectors can search the 2^32 seeds of
the masks it lacks. :func:`expand_secret` keys ChaCha20 (``cryptography``, which Flower depends on)
with SHA-256 of the whole secret instead: a mask is then as hard to guess as the secret itself.
Flower's ClientApp mod and ServerApp workflow both call it (:mod:`fedlorm.flower.secure`), so masks
still cancel exactly.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["MIN_SECRET_BYTES", "expand_secret"]

MIN_SECRET_BYTES = 16
"""The shortest secret accepted (128 bits); SecAgg+'s seeds and shared keys are 32 bytes or more."""

_DOMAIN = b"fedlorm secure aggregation mask v1\x00"
"""Prefix of the hashed secret, so a mask key is never the secret itself used elsewhere."""


def expand_secret(secret: bytes, num_range: int, shapes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
    """One int64 mask array per shape, entries uniform in [0, ``num_range``), from ``secret`` alone.

    The same secret gives the same masks (both ends of a pairwise mask agree); any other secret gives
    unrelated ones. The arrays are consecutive blocks of one ChaCha20 key stream (key: SHA-256 of a
    domain prefix and the secret; nonce 0), read as little-endian 64-bit words and reduced modulo
    ``num_range`` (exact for a power of two; otherwise biased by at most num_range / 2^64). The
    signature is Flower's ``pseudo_rand_gen``'s.
    """
    if not isinstance(secret, bytes) or len(secret) < MIN_SECRET_BYTES:
        raise ValueError(f"a mask secret of {len(secret)} bytes is too short; at least {MIN_SECRET_BYTES}")
    if not 2 <= num_range <= 1 << 62:
        raise ValueError(f"num_range = {num_range}; expected an integer in [2, 2^62]")
    key = hashlib.sha256(_DOMAIN + secret).digest()
    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor()
    out = []
    for shape in shapes:
        count = math.prod(shape)
        words = np.frombuffer(stream.update(bytes(8 * count)), dtype="<u8")
        if num_range & (num_range - 1) == 0:
            values = words & np.uint64(num_range - 1)
        else:
            values = words % np.uint64(num_range)
        out.append(values.astype(np.int64).reshape(shape))
    return out
