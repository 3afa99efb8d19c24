"""Dirichlet and IID client partitions: coverage, constraints, determinism, skew."""

import time

import numpy as np
import pytest
import torch

from fedlorm.fcl import client_label_counts, dirichlet_partition, iid_partition

LABELS = np.repeat(np.arange(10), 100)  # 10 classes × 100 samples
K = 10


def _check_cover(parts, n):
    assert len(parts) == K
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)  # sorted, no duplicates
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def _mean_label_entropy(parts):
    counts = client_label_counts(LABELS, parts, num_classes=10).astype(float)
    prob = counts / counts.sum(1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nansum(np.where(prob > 0, prob * np.log(prob), 0.0), axis=1)
    return ent.mean()


def test_dirichlet_covers_and_respects_min_samples():
    parts = dirichlet_partition(LABELS, K, beta=0.1, min_samples=6, seed=0)
    _check_cover(parts, LABELS.size)
    assert min(len(p) for p in parts) >= 6


def test_dirichlet_deterministic_per_seed():
    a = dirichlet_partition(LABELS, K, 0.5, seed=3)
    b = dirichlet_partition(LABELS, K, 0.5, seed=3)
    c = dirichlet_partition(LABELS, K, 0.5, seed=4)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))
    g1 = dirichlet_partition(LABELS, K, 0.5, seed=np.random.default_rng(3))
    assert all(np.array_equal(x, y) for x, y in zip(a, g1, strict=True))


def test_dirichlet_accepts_torch_labels():
    a = dirichlet_partition(torch.from_numpy(LABELS), K, 0.5, seed=1)
    b = dirichlet_partition(LABELS, K, 0.5, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_small_beta_is_more_skewed():
    # Uniform labels over 10 classes have entropy ln 10 ≈ 2.303 per client.
    skewed = np.mean([_mean_label_entropy(dirichlet_partition(LABELS, K, 0.05, seed=s))
                      for s in range(3)])
    mild = np.mean([_mean_label_entropy(dirichlet_partition(LABELS, K, 100.0, seed=s))
                    for s in range(3)])
    assert skewed < 1.2
    assert mild > 2.2
    assert skewed < mild


def test_huge_beta_is_near_uniform():
    parts = dirichlet_partition(LABELS, K, beta=1e4, seed=0)
    counts = client_label_counts(LABELS, parts)
    sizes = counts.sum(1)
    # Multinomial(1000, 0.1) per client: mean 100, sd ≈ 9.5.
    assert sizes.min() > 65 and sizes.max() < 135
    assert counts.min() >= 1  # every client sees every class


def test_class_proportions_follow_dirichlet_variance():
    # Per class, client proportions are one Dirichlet(β·1_K) draw (up to sampling noise, tiny at
    # 2000 samples per class): Var(p_k) = (1/K)(1 − 1/K) / (Kβ + 1).
    labels = np.repeat(np.arange(50), 2000)
    for beta in (1.0, 0.1):
        parts = dirichlet_partition(labels, K, beta, min_samples=0, seed=0)
        prop = client_label_counts(labels, parts) / 2000.0
        expected = (1 / K) * (1 - 1 / K) / (K * beta + 1)
        assert prop.var(axis=0).mean() / expected == pytest.approx(1.0, abs=0.3)


def test_impossible_raises_at_once():
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match=r"10 clients at least 6 samples each from only 50"):
        dirichlet_partition(np.zeros(50, dtype=int), 10, 0.5, min_samples=6)
    assert time.perf_counter() - t0 < 0.5


def test_infeasible_after_max_tries_names_everything():
    with pytest.raises(ValueError) as err:
        dirichlet_partition(np.zeros(25, dtype=int), 5, 0.01, min_samples=5, max_tries=50)
    msg = str(err.value)
    for part in ("50 draws", "25 samples", "5 clients", ">= 5 samples", "beta=0.01"):
        assert part in msg
    assert "increase beta" in msg


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"beta": 0.0}, "beta must be"),
        ({"beta": -1.0}, "beta must be"),
        ({"beta": float("nan")}, "beta must be"),
        ({"num_clients": 0}, "num_clients must be"),
        ({"min_samples": -1}, "min_samples must be"),
        ({"max_tries": 0}, "max_tries must be"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = {"num_clients": K, "beta": 0.5} | kwargs
    with pytest.raises(ValueError, match=match):
        dirichlet_partition(LABELS, **args)


def test_min_samples_zero_allows_empty_clients():
    parts = dirichlet_partition(np.arange(3) % 2, 5, 0.5, min_samples=0, seed=0)
    assert sum(len(p) for p in parts) == 3 and len(parts) == 5


def test_iid_partition_stratified_and_balanced():
    labels = np.repeat(np.arange(7), [13, 20, 5, 9, 30, 1, 22])
    parts = iid_partition(labels, 4, seed=0)
    assert len(parts) == 4
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(labels.size))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    counts = client_label_counts(labels, parts)
    assert (counts.max(0) - counts.min(0)).max() <= 1
    again = iid_partition(labels, 4, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(parts, again, strict=True))
