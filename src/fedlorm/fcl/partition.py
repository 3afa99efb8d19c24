"""Split one task's samples among K clients: Dirichlet non-IID (the paper's) or stratified IID.

Both return, per client, the sorted int64 indices into ``labels``; every index goes to exactly one
client. Randomness comes only from the given seed or ``numpy.random.Generator``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["client_label_counts", "dirichlet_partition", "iid_partition"]


def _labels_array(labels: Any) -> np.ndarray:
    if hasattr(labels, "detach"):  # torch.Tensor, without importing torch here
        labels = labels.detach().cpu().numpy()
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"labels must be integers, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _check_clients(num_clients: int) -> int:
    if isinstance(num_clients, bool) or int(num_clients) != num_clients or num_clients < 1:
        raise ValueError(f"num_clients must be an integer >= 1, got {num_clients!r}")
    return int(num_clients)


def _split(assign: np.ndarray, num_clients: int) -> list[np.ndarray]:
    order = np.argsort(assign, kind="stable").astype(np.int64)
    bounds = np.cumsum(np.bincount(assign, minlength=num_clients))[:-1]
    return [np.sort(part) for part in np.split(order, bounds)]


def dirichlet_partition(
    labels: Any,
    num_clients: int,
    beta: float,
    *,
    min_samples: int = 1,
    seed: int | np.random.Generator = 0,
    max_tries: int = 1000,
) -> list[np.ndarray]:
    """Non-IID split: per class c, p_c ~ Dir(beta·1_K); each sample of c goes to a client ~ p_c.

    The whole assignment is redrawn until every client holds >= ``min_samples`` samples
    (docs/design.md, "The job"); smaller ``beta`` means more skew. Returns sorted int64 indices per
    client.
    """
    y = _labels_array(labels)
    K = _check_clients(num_clients)
    beta = float(beta)
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be a finite number > 0, got {beta}")
    if int(min_samples) != min_samples or min_samples < 0:
        raise ValueError(f"min_samples must be an integer >= 0, got {min_samples!r}")
    if int(max_tries) != max_tries or max_tries < 1:
        raise ValueError(f"max_tries must be an integer >= 1, got {max_tries!r}")
    min_samples, max_tries = int(min_samples), int(max_tries)
    n = y.size
    if n < K * min_samples:
        raise ValueError(
            f"cannot give {K} clients at least {min_samples} samples each from only {n} samples "
            f"(needs {K * min_samples}); use fewer clients or a smaller min_samples"
        )
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    members = [np.flatnonzero(inverse == c) for c in range(classes.size)]
    alpha = np.full(K, beta)
    assign = np.empty(n, dtype=np.int64)
    counts = np.zeros(K, dtype=np.int64)
    for _ in range(max_tries):
        for idx in members:
            p = rng.dirichlet(alpha)
            total = p.sum()
            # Very small beta can underflow every component to 0: all mass on one client then.
            p = p / total if total > 0 and np.isfinite(total) else np.eye(K)[rng.integers(K)]
            assign[idx] = rng.choice(K, size=idx.size, p=p)
        counts = np.bincount(assign, minlength=K)
        if counts.min() >= min_samples:
            return _split(assign, K)
    raise ValueError(
        f"dirichlet_partition: after {max_tries} draws, no split of {n} samples "
        f"({classes.size} classes) among {K} clients gave every client >= {min_samples} samples "
        f"with beta={beta} (last draw's smallest client: {int(counts.min())}); increase beta, "
        "lower min_samples, use fewer clients, or raise max_tries"
    )


def iid_partition(
    labels: Any, num_clients: int, seed: int | np.random.Generator = 0
) -> list[np.ndarray]:
    """Stratified even split: each class is shuffled and dealt round-robin, so client sizes and
    per-class counts differ by at most one. Returns sorted int64 indices per client."""
    y = _labels_array(labels)
    K = _check_clients(num_clients)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    classes, inverse = np.unique(y, return_inverse=True)
    dealt = np.concatenate(
        [rng.permutation(np.flatnonzero(inverse == c)) for c in range(classes.size)]
        or [np.zeros(0, dtype=np.int64)]
    )
    assign = np.empty(y.size, dtype=np.int64)
    assign[dealt] = np.arange(y.size) % K
    return _split(assign, K)


def client_label_counts(
    labels: Any, parts: list[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """(K, C) matrix of per-client label counts, for logging and checking a partition's skew."""
    y = _labels_array(labels)
    C = int(num_classes) if num_classes is not None else (int(y.max()) + 1 if y.size else 0)
    out = np.zeros((len(parts), C), dtype=np.int64)
    for k, idx in enumerate(parts):
        if len(idx):
            out[k] = np.bincount(y[np.asarray(idx)], minlength=C)[:C]
    return out
