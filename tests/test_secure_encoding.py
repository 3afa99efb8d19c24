"""The secure-aggregation encoding: exact modular sums of fixed-point digits decode to the float64 sums.

Clients' summands (Grams of activations whose features span 1e-3..1e3, products B_i H_i, counts)
are encoded, masked with random values modulo 2^k as SecAgg+ does, summed, unmasked and decoded.
Stated tolerances: every decoded entry is within n·step/2 (the clients' rounding, ``error_bound``)
plus two float64 ulps of the correctly rounded sum; with the default spec and a bound of 2^40 that is
better than 1e-12 relative on every Gram entry scaled by sqrt(G_jj·G_kk); merges solved from decoded
sums match those from exact sums to 1e-6 relative (measured: about 1e-13).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedlorm import merging
from fedlorm.secure import EncodingSpec, decode, encode, error_bound, modular_sum, words_needed

SPEC = EncodingSpec(bounds={"count": 2.0**31}, default_bound=2.0**40)


def _activations(rng: np.random.Generator, rows: int, d_in: int) -> np.ndarray:
    """Random activations whose feature scales span 1e-3..1e3."""
    return rng.standard_normal((rows, d_in)) * np.logspace(-3, 3, d_in)


def _grams(rng: np.random.Generator, clients: int, d_in: int) -> list[np.ndarray]:
    return [(x.T @ x) for x in (_activations(rng, int(rng.integers(20, 200)), d_in) for _ in range(clients))]


def _masked_secure_sum(
    encodings: list[dict[str, np.ndarray]], spec: EncodingSpec, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """SecAgg+ on the digits: each client adds a random mask mod 2^k, the server removes their total."""
    modulus = 1 << spec.modulus_bits
    masks = [{k: rng.integers(0, modulus, v.shape, dtype=np.int64) for k, v in e.items()} for e in encodings]
    masked = [{k: (e[k] + m[k]) % modulus for k in e} for e, m in zip(encodings, masks, strict=True)]
    total = modular_sum(masked, spec)
    mask_total = modular_sum(masks, spec)
    return {k: (total[k] - mask_total[k]) % modulus for k in total}


def _fsum(arrays: list[np.ndarray]) -> np.ndarray:
    """Correctly rounded float64 sum over clients, entry by entry."""
    stacked = np.stack(arrays).reshape(len(arrays), -1)
    return np.array([math.fsum(column) for column in stacked.T]).reshape(arrays[0].shape)


def _within_bound(decoded: np.ndarray, exact: np.ndarray, spec: EncodingSpec, key: str, n: int) -> None:
    allowed = error_bound(spec, key, n) + 2 * np.spacing(np.abs(exact))
    assert (np.abs(decoded - exact) <= allowed).all(), float(np.max(np.abs(decoded - exact) - allowed))


def test_one_client_round_trip_is_within_half_a_step():
    rng = np.random.default_rng(0)
    spec = EncodingSpec(default_bound=1.0, words=2, word_bits=24)  # F = 46: rounding is visible
    x = rng.uniform(-1, 1, (7, 5))
    x[0, 0], x[0, 1], x[0, 2] = 1.0, -1.0, 0.0
    digits = encode({"x": x}, spec)["x"]
    assert digits.shape == (2, 7, 5) and digits.dtype == np.int64
    assert ((digits >= 0) & (digits < 2**24)).all()
    decoded = decode(digits_sum := {"x": digits}, spec, 1)["x"]
    assert digits_sum["x"] is digits  # decode does not modify its input in place
    assert np.abs(decoded - x).max() <= spec.step("x") / 2
    assert np.abs(decoded - x).max() > 0
    assert decoded[0, 0] == 1.0 and decoded[0, 1] == -1.0 and decoded[0, 2] == 0.0


def test_grams_with_wide_dynamic_range_decode_to_the_float64_sum():
    rng = np.random.default_rng(1)
    clients, d_in = 8, 24
    grams = _grams(rng, clients, d_in)
    counts = [np.array(float(rng.integers(1, 10**6))) for _ in range(clients)]
    encodings = [encode({"gram": g, "count": c}, SPEC) for g, c in zip(grams, counts, strict=True)]
    decoded = decode(_masked_secure_sum(encodings, SPEC, rng), SPEC, clients)
    exact = _fsum(grams)
    _within_bound(decoded["gram"], exact, SPEC, "gram", clients)
    scale = np.sqrt(np.outer(np.diag(exact), np.diag(exact)))
    assert (np.abs(decoded["gram"] - exact) / scale).max() < 1e-12
    assert (np.abs(np.diag(decoded["gram"]) / np.diag(exact) - 1)).max() < 1e-12
    assert np.diag(exact).max() / np.diag(exact).min() > 1e10  # the range the test claims to cover
    assert decoded["count"] == sum(float(c) for c in counts)  # integers are exact


def test_torch_tensors_encode_like_arrays():
    x = torch.randn(3, 4, dtype=torch.float64)
    assert all(
        (a == b).all()
        for a, b in zip(encode({"x": x}, SPEC).values(), encode({"x": x.numpy()}, SPEC).values(), strict=True)
    )


def test_the_largest_client_count_at_the_bound_does_not_overflow():
    spec = EncodingSpec(default_bound=3.0, words=3, word_bits=8, modulus_bits=12)
    n = spec.max_clients
    assert n == 15
    x = np.array([3.0, -3.0, 0.0, 1e-3])
    total = modular_sum([encode({"x": x}, spec)] * n, spec)
    decoded = decode(total, spec, n)["x"]
    _within_bound(decoded, n * x, spec, "x", n)
    assert decoded[0] == 3.0 * n and decoded[1] == -3.0 * n


def test_more_clients_than_the_modulus_allows_are_refused():
    spec = EncodingSpec(default_bound=3.0, words=3, word_bits=8, modulus_bits=12)
    x = {"x": np.array([3.0])}
    total = modular_sum([encode(x, spec)] * 16, spec)  # the top digit sum wraps modulo 2^12
    with pytest.raises(ValueError, match="sums at most 15 clients"):
        decode(total, spec, 16)
    with pytest.raises(ValueError, match="num_clients"):
        spec.check_clients(0)


def test_out_of_range_values_raise():
    with pytest.raises(ValueError, match=r"'g' has an entry of magnitude 2.*above the agreed bound 1"):
        encode({"g": np.array([0.5, -2.0])}, EncodingSpec(default_bound=1.0))
    with pytest.raises(ValueError, match="non-finite"):
        encode({"g": np.array([np.nan])}, SPEC)
    with pytest.raises(ValueError, match="no bound for 'h'"):
        encode({"h": np.zeros(2)}, EncodingSpec(bounds={"g": 1.0}))
    with pytest.raises(ValueError, match="real number"):
        encode({"g": np.array(["a"])}, SPEC)


def test_a_contribution_outside_the_digit_range_is_detected():
    spec = EncodingSpec(default_bound=1.0, words=2, word_bits=8, modulus_bits=16)
    good = encode({"x": np.array([0.5, 0.25])}, spec)
    bad = {"x": good["x"].copy()}
    bad["x"][0, 0] += 40 * 2**8  # a digit far outside [0, 2^8): not a valid encoding
    with pytest.raises(ValueError, match="exceeds what 2 clients"):
        decode(modular_sum([good, bad], spec), spec, 2)
    top = {"x": good["x"].copy()}
    top["x"][1, 1] = 2**8 - 1  # a valid digit, but the value is about 2× the bound
    with pytest.raises(ValueError, match="exceeds 2 × the bound"):
        decode(modular_sum([top, top], spec), spec, 2)
    with pytest.raises(ValueError, match="expected integers of shape"):
        decode({"x": np.zeros((3, 2), dtype=np.int64)}, spec, 1)


def test_bad_specs_raise():
    for kwargs in (
        {"words": 0},
        {"word_bits": 1},
        {"word_bits": 32, "modulus_bits": 32},
        {"modulus_bits": 63},
        {"default_bound": 0.0},
        {"bounds": {"g": math.inf}},
    ):
        with pytest.raises(ValueError):
            EncodingSpec(**kwargs)


def test_words_needed_meets_its_precision():
    words = words_needed(1e12, 1e-12)
    spec = EncodingSpec(default_bound=1.0, words=words)
    assert 1e-12 * spec.step("x") < 1e-12 * 1e-12 * 2  # sanity of units
    assert spec.step("x") / 2 <= 1e-12 * 1e-12
    assert words_needed(1.0, 1e-3, word_bits=24) == 1
    with pytest.raises(ValueError):
        words_needed(0.5, 1e-3)


def _relative(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def test_closed_form_merges_from_decoded_sums_match_the_exact_ones():
    rng = np.random.default_rng(2)
    torch.manual_seed(2)
    clients, d_in, d_out, r = 6, 20, 12, 4
    grams = [torch.from_numpy(g) for g in _grams(rng, clients, d_in)]
    A = torch.randn(r, d_in, dtype=torch.float64) / math.sqrt(d_in)
    Bs = [torch.randn(d_out, r, dtype=torch.float64) for _ in range(clients)]
    As = [A + 0.1 * torch.randn(r, d_in, dtype=torch.float64) for _ in range(clients)]
    replies = []
    for g, B_i, A_i in zip(grams, Bs, As, strict=True):
        M, H = merging.merge_b_summands(B_i, A, g)
        N, G = merging.merge_a_summands(A_i, g)
        _, G_diag = merging.merge_a_summands(A_i, merging.shrink_gram(g, 0.0))
        replies.append({"M": M, "H": H, "N": N, "G": G, "G_diag": G_diag, "N_diag": A_i * G_diag})
    exact = {k: torch.from_numpy(_fsum([rep[k].numpy() for rep in replies])) for k in replies[0]}
    encodings = [encode(rep, SPEC) for rep in replies]
    sums = {
        k: torch.from_numpy(v)
        for k, v in decode(_masked_secure_sum(encodings, SPEC, rng), SPEC, clients).items()
    }
    B_exact = merging.merge_b_solve(exact["M"], exact["H"])
    B_secure = merging.merge_b_solve(sums["M"], sums["H"])
    A_exact = merging.merge_a_solve(exact["N"], exact["G"], reference=A)
    A_secure = merging.merge_a_solve(sums["N"], sums["G"], reference=A)
    D_exact = merging.merge_a_solve(exact["N_diag"], exact["G_diag"], reference=A)
    D_secure = merging.merge_a_solve(sums["N_diag"], sums["G_diag"], reference=A)
    assert torch.linalg.cond(exact["G"]) > 1e10  # the full A-round solve is badly conditioned
    for secure, reference in ((B_secure, B_exact), (A_secure, A_exact), (D_secure, D_exact)):
        assert _relative(secure, reference) < 1e-6
        assert _relative(secure, reference) < 1e-10  # what the default spec actually reaches
