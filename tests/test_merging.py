"""Tests for fedlorm.merging: every closed form against a brute-force float64 least squares."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
from torch import Tensor

from fedlorm import merging as mg

F64 = torch.float64
RIGHT_MERGES = {"merge_a": mg.merge_a, "regmean": mg.regmean, "merge_tasks": mg.merge_tasks}
RIGHT_PARTS = {
    "merge_a": (mg.merge_a_summands, mg.merge_a_solve),
    "regmean": (mg.regmean_summands, mg.regmean_solve),
    "merge_tasks": (mg.merge_tasks_summands, mg.merge_tasks_solve),
}
ALL_MERGES = ["merge_b", *RIGHT_MERGES]


def rel(a: Tensor, b: Tensor) -> float:
    """Relative Frobenius distance ‖a − b‖ / ‖b‖ (absolute when b is zero)."""
    a, b = a.to(F64), b.to(F64)
    den = float(b.norm())
    return float((a - b).norm()) / (den if den > 0 else 1.0)


def randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def randn(g: torch.Generator, *shape: int) -> Tensor:
    return torch.randn(*shape, generator=g, dtype=F64)


# ------------------------------------------------------------------------ problem generation


class Problem:
    """A random merge problem with explicit client inputs X_i and its brute-force designs."""

    def __init__(self, kind: str, stat: str, weighted: bool, rank_def: bool, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.kind, self.stat = kind, stat
        d_in = randint(g, 3, 20)
        d_out = randint(g, 1, 7)
        r = randint(g, 1, min(8, d_in))
        K = randint(g, 1, 10)
        self.weights = [float(w) for w in torch.rand(K, generator=g, dtype=F64) * 2 + 0.1]
        if not weighted:
            self.weights = [1.0] * K
        # Per-client sample counts, both below and above d_in; the stacked problem gets at least
        # 3·d_in rows so that the full-rank variant is well conditioned.
        ns = [randint(g, 1, 2 * d_in) for _ in range(K)]
        ns[-1] += max(0, 3 * d_in - sum(ns))
        # rank-deficient variant: inputs live in a k-dimensional subspace (full stats) or some
        # features are never active (diagonal stats; a zero feature has zero Gram weight).
        # rank-deficient variant: inputs live in a k-dimensional subspace (full stats) or some
        # features are never active (diagonal stats; a zero feature has zero Gram weight); for
        # merge_b it comes from A instead (H = A G Aᵀ singular) and the inputs stay generic.
        data_def = rank_def and kind != "merge_b"
        k = randint(g, 1, d_in - 1)
        basis = torch.linalg.qr(randn(g, d_in, k)).Q.T  # k × d_in, orthonormal rows
        self.Xs = []
        for n in ns:
            scale = float(torch.rand(1, generator=g, dtype=F64)) + 0.5
            if data_def and stat == "full":
                X = randn(g, n, k) @ basis * scale
            else:
                X = randn(g, n, d_in) * scale + 0.3 * randn(g, 1, d_in)
            self.Xs.append(X)
        if data_def and stat == "diag":
            dead = torch.randperm(d_in, generator=g)[: d_in - k]
            for X in self.Xs:
                X[:, dead] = 0.0
        if stat == "full":
            self.grams = [X.T @ X for X in self.Xs]
            self.designs = list(self.Xs)
        else:
            self.grams = [(X * X).sum(0) for X in self.Xs]
            self.designs = [torch.diag(gv.sqrt()) for gv in self.grams]  # DᵀD = diag(g)
        if kind == "merge_b":
            # well-conditioned A: orthonormal rows with scales in [0.5, 1.5]
            A = torch.linalg.qr(randn(g, d_in, r)).Q.T * (torch.rand(r, 1, generator=g) + 0.5)
            if rank_def:  # the last row repeats a multiple of the first (a zero row if r == 1)
                A[-1] = 2.0 * A[0] if r > 1 else 0.0
            self.A = A
            self.modules = [randn(g, d_out, r) for _ in range(K)]
            # B's response on client i: B A D_iᵀ; design for Bᵀ is D_i Aᵀ.
            self.b_designs = [D @ A.T for D in self.designs]
        else:
            rows = r if kind == "merge_a" else d_out
            self.modules = [randn(g, rows, d_in) for _ in range(K)]
            self.b_designs = self.designs
        self.reference = randn(g, *self.modules[0].shape)

    def merge(self, weights: list[float] | None, reference: Tensor | None = None, **kw) -> Tensor:
        if self.kind == "merge_b":
            return mg.merge_b(self.modules, self.A, self.grams, weights, reference=reference, **kw)
        return RIGHT_MERGES[self.kind](self.modules, self.grams, weights, reference=reference, **kw)

    def stacked(self) -> tuple[Tensor, Tensor]:
        """Design S (rows sqrt(w_i)·D_i) and targets T (rows sqrt(w_i)·D_i·M_iᵀ)."""
        S = torch.cat([math.sqrt(w) * D for w, D in zip(self.weights, self.b_designs, strict=True)])
        T = torch.cat(
            [
                math.sqrt(w) * D @ M.T
                for w, D, M in zip(self.weights, self.b_designs, self.modules, strict=True)
            ]
        )
        return S, T

    def brute(self, reference: Tensor | None = None) -> Tensor:
        """The reference-closest minimiser, by float64 least squares on the stacked data."""
        S, T = self.stacked()
        R = torch.zeros_like(self.modules[0]) if reference is None else reference
        return R + torch.linalg.lstsq(S, T - S @ R.T, driver="gelsd").solution.T

    def objective(self, M: Tensor) -> float:
        S, T = self.stacked()
        return float(((S @ M.to(F64).T - T) ** 2).sum())


CASES = [
    (kind, stat, weighted, rank_def, seed)
    for kind in ALL_MERGES
    for stat in ("full", "diag")
    for weighted in (False, True)
    for rank_def in (False, True)
    for seed in range(3)
]


@pytest.mark.parametrize(("kind", "stat", "weighted", "rank_def", "seed"), CASES)
def test_matches_brute_force(kind: str, stat: str, weighted: bool, rank_def: bool, seed: int):
    p = Problem(kind, stat, weighted, rank_def, seed=1000 * seed + 17 * len(kind) + int(weighted))
    weights = p.weights if weighted else None
    S, _ = p.stacked()
    cols = S.shape[1]
    ev = torch.linalg.eigvalsh(S.T @ S)
    rank = int(torch.linalg.matrix_rank(S))
    for reference in (None, p.reference):
        ours = p.merge(weights, reference)
        best = p.brute(reference)
        assert ours.dtype == F64 and torch.isfinite(ours).all()
        # fitted responses and the objective always agree
        assert rel(S @ ours.T, S @ best.T) < 1e-8
        assert p.objective(ours) <= p.objective(best) * (1 + 1e-8) + 1e-12
        if rank == cols:
            # well-conditioned by construction: the minimiser is unique and must match
            assert float(ev[0]) > 0 and float(ev.mean() / ev[0]) < 100, "test data not well posed"
            assert rel(ours, best) < 1e-8
        else:
            # not unique: ours is the reference-closest minimiser up to the ridge's round-off
            # leakage (~eps/ridge·‖Q‖/mean diag Q in never-seen directions)
            assert rank < cols
            assert rel(ours, best) < 1e-4


@pytest.mark.parametrize("kind", ALL_MERGES)
@pytest.mark.parametrize("stat", ["full", "diag"])
def test_identical_clients_give_back_their_module(kind: str, stat: str):
    p = Problem(kind, stat, weighted=True, rank_def=False, seed=5)
    p.modules = [p.modules[0].clone() for _ in p.modules]
    assert rel(p.merge(p.weights), p.modules[0]) < 1e-8
    assert rel(p.merge(None, p.reference), p.modules[0]) < 1e-8


@pytest.mark.parametrize("kind", ALL_MERGES)
@pytest.mark.parametrize("stat", ["full", "diag"])
def test_permuting_clients_changes_nothing(kind: str, stat: str):
    p = Problem(kind, stat, weighted=True, rank_def=False, seed=6)
    before = p.merge(p.weights, p.reference)
    perm = torch.randperm(len(p.modules), generator=torch.Generator().manual_seed(0)).tolist()
    p.modules = [p.modules[i] for i in perm]
    p.grams = [p.grams[i] for i in perm]
    after = p.merge([p.weights[i] for i in perm], p.reference)
    assert rel(after, before) < 1e-12


@pytest.mark.parametrize("kind", ALL_MERGES)
@pytest.mark.parametrize("stat", ["full", "diag"])
def test_additive_form_equals_convenience_form(kind: str, stat: str):
    p = Problem(kind, stat, weighted=True, rank_def=False, seed=7)
    if kind == "merge_b":
        parts = [
            mg.merge_b_summands(B, p.A, G, w)
            for B, G, w in zip(p.modules, p.grams, p.weights, strict=True)
        ]
        solve = mg.merge_b_solve
    else:
        summands, solve = RIGHT_PARTS[kind]
        parts = [summands(M, G, w) for M, G, w in zip(p.modules, p.grams, p.weights, strict=True)]
    assert all(x.dtype == F64 for part in parts for x in part)
    P = sum(part[0] for part in parts)
    Q = sum(part[1] for part in parts)
    assert Q.ndim == (1 if stat == "diag" and kind != "merge_b" else 2)
    got = solve(P, Q, reference=p.reference)
    assert got.dtype == F64
    assert rel(got, p.merge(p.weights, p.reference)) < 1e-12
    assert solve(P, Q, dtype=torch.float32).dtype == torch.float32


def test_b_summands_are_the_papers_formula():
    g = torch.Generator().manual_seed(8)
    A, B, X = randn(g, 4, 9), randn(g, 6, 4), randn(g, 30, 9)
    G = X.T @ X
    M, H = mg.merge_b_summands(B, A, G, weight=2.5)
    assert rel(H, 2.5 * A @ G @ A.T) < 1e-14
    assert rel(M, 2.5 * B @ A @ G @ A.T) < 1e-14
    # the paper's B = (Σ B_i A G_i) Aᵀ (A ΣG_i Aᵀ)⁻¹ for one client is B itself
    assert rel(mg.merge_b_solve(M, H), B) < 1e-8


@pytest.mark.parametrize("kind", ALL_MERGES)
def test_diagonal_path_equals_full_path_with_alpha_zero(kind: str):
    p = Problem(kind, "full", weighted=True, rank_def=False, seed=9)
    vectors = [mg.shrink_gram(G, 0.0) for G in p.grams]
    assert all(v.shape == (G.shape[0],) for v, G in zip(vectors, p.grams, strict=True))
    p.grams = vectors
    diag = p.merge(p.weights, p.reference)
    p.grams = [torch.diag(v) for v in vectors]
    dense = p.merge(p.weights, p.reference)
    assert rel(diag, dense) < 1e-8


def test_shrink_gram():
    g = torch.Generator().manual_seed(10)
    X = randn(g, 20, 6)
    G = X.T @ X
    for alpha in (0.0, 0.3, 0.5, 1.0):
        want = alpha * G + (1 - alpha) * torch.diag(G.diagonal())
        got = mg.shrink_gram(G, alpha)
        if alpha == 0:
            assert got.shape == (6,) and torch.equal(got, G.diagonal())
        else:
            assert got.shape == (6, 6) and rel(got, want) < 1e-15
    v = G.diagonal().clone()
    for alpha in (0.0, 0.5, 1.0):
        assert torch.equal(mg.shrink_gram(v, alpha), v)
    assert mg.shrink_gram(G.float(), 0.5).dtype == torch.float32


# ------------------------------------------------------------------- degenerate statistics


@pytest.mark.parametrize("kind", ALL_MERGES)
@pytest.mark.parametrize("stat", ["full", "diag"])
def test_all_zero_statistics_give_back_the_reference(kind: str, stat: str):
    p = Problem(kind, stat, weighted=False, rank_def=False, seed=11)
    p.grams = [torch.zeros_like(G) for G in p.grams]
    assert torch.equal(p.merge(None, p.reference), p.reference)
    assert torch.equal(p.merge(None), torch.zeros_like(p.reference))
    # zero weights are the same as zero statistics
    p2 = Problem(kind, stat, weighted=False, rank_def=False, seed=11)
    assert torch.equal(p2.merge([0.0] * len(p2.modules), p2.reference), p2.reference)


@pytest.mark.parametrize("kind", ALL_MERGES)
@pytest.mark.parametrize("stat", ["full", "diag"])
@pytest.mark.parametrize("ridge", [mg.DEFAULT_RIDGE, 0.0])
def test_rank_deficient_statistics_are_finite(kind: str, stat: str, ridge: float):
    # ridge=0 makes Cholesky fail on the singular Q: the lstsq fallback must still fit the data
    p = Problem(kind, stat, weighted=True, rank_def=True, seed=12)
    out = p.merge(p.weights, p.reference, ridge=ridge)
    assert torch.isfinite(out).all()
    S, _ = p.stacked()
    assert rel(S @ out.T, S @ p.brute(p.reference).T) < 1e-8


@pytest.mark.parametrize("kind", list(RIGHT_MERGES))
@pytest.mark.parametrize("stat", ["full", "diag"])
def test_zero_weight_feature_keeps_the_reference_column(kind: str, stat: str):
    p = Problem(kind, stat, weighted=True, rank_def=False, seed=13)
    for X in p.Xs:
        X[:, 2] = 0.0
    p.grams = [X.T @ X if stat == "full" else (X * X).sum(0) for X in p.Xs]
    out = p.merge(p.weights, p.reference)
    assert torch.equal(out[:, 2], p.reference[:, 2])
    assert not torch.allclose(out[:, 3], p.reference[:, 3])


@pytest.mark.parametrize("stat", ["full", "diag"])
def test_merge_b_unseen_rank_direction_keeps_the_reference(stat: str):
    p = Problem("merge_b", stat, weighted=False, rank_def=False, seed=14)
    if p.A.shape[0] < 2:
        p.A = torch.cat([p.A, p.A])
        p.modules = [torch.cat([B, B], dim=1) for B in p.modules]
        p.reference = torch.cat([p.reference, p.reference], dim=1)
    p.A[1] = 0.0  # H's row and column 1 are zero: no client constrains B's column 1
    out = p.merge(None, p.reference)
    assert torch.equal(out[:, 1], p.reference[:, 1])
    M, H = mg.merge_b_summands(p.modules[0], p.A, p.grams[0])
    ref = p.reference
    assert torch.equal(mg.merge_b_solve(M * 0, H * 0, reference=ref), ref)


# ----------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ALL_MERGES)
def test_low_precision_inputs(dtype: torch.dtype, kind: str):
    p = Problem(kind, "full", weighted=True, rank_def=False, seed=15)
    want = p.merge(p.weights)
    p.modules = [M.to(dtype) for M in p.modules]
    p.grams = [G.to(dtype) for G in p.grams]
    if kind == "merge_b":
        p.A = p.A.to(dtype)
    got = p.merge(p.weights)
    assert got.dtype == dtype
    tol = {torch.float16: 0.2, torch.bfloat16: 0.5, torch.float32: 1e-4}[dtype]
    assert rel(got, want) < tol
    # the float64 internals see exactly the rounded inputs: compare against those too
    p64 = [M.to(F64) for M in p.modules]
    if kind == "merge_b":
        exact = mg.merge_b(p64, p.A.to(F64), [G.to(F64) for G in p.grams], p.weights)
    else:
        exact = RIGHT_MERGES[kind](p64, [G.to(F64) for G in p.grams], p.weights)
    assert torch.equal(got, exact.to(dtype))


# ----------------------------------------------------------------------------------- errors


def _errors() -> list[tuple[str, Callable[[], object], str]]:
    g = torch.Generator().manual_seed(16)
    A, B = randn(g, 3, 8), randn(g, 5, 3)
    G, v = torch.eye(8, dtype=F64), torch.ones(8, dtype=F64)
    nan_B = B.clone()
    nan_B[0, 0] = math.nan
    inf_G = G.clone()
    inf_G[1, 1] = math.inf
    neg_G = G.clone()
    neg_G[2, 2] = -1.0
    W = randn(g, 4, 8)
    return [
        ("empty Bs", lambda: mg.merge_b([], A, []), r"Bs is empty"),
        ("empty As", lambda: mg.merge_a([], []), r"As is empty"),
        ("empty Ws", lambda: mg.regmean([], []), r"Ws is empty"),
        ("empty deltas", lambda: mg.merge_tasks([], []), r"deltas is empty"),
        ("Bs vs grams", lambda: mg.merge_b([B, B], A, [G]), r"grams has 1 entries; expected 2"),
        ("As vs grams", lambda: mg.merge_a([A], [G, G]), r"grams has 2 entries; expected 1"),
        (
            "weights length",
            lambda: mg.regmean([W, W], [G, G], [1.0]),
            r"weights has 1 entries; expected 2",
        ),
        (
            "gram shape",
            lambda: mg.merge_b([B] * 4, A, [G, G, G, torch.eye(5, dtype=F64)]),
            r"grams[3] has shape (5, 5); expected (8, 8) or (8,) to match A's d_in=8",
        ),
        (
            "diag gram shape",
            lambda: mg.merge_a([A], [torch.ones(7)]),
            r"grams[0] has shape (7,); expected (8, 8) or (8,) to match As[0]'s d_in=8",
        ),
        ("mixed", lambda: mg.merge_a([A, A], [G, v]), r"grams mixes full and diagonal"),
        ("mixed b", lambda: mg.merge_b([B, B], A, [v, G]), r"grams[1] has shape (8, 8)"),
        ("NaN B", lambda: mg.merge_b([B, nan_B], A, [G, G]), r"Bs[1] contains NaN or Inf"),
        ("Inf gram", lambda: mg.regmean([W], [inf_G]), r"grams[0] contains NaN or Inf"),
        ("NaN A", lambda: mg.merge_b([B], A * math.nan, [G]), r"A contains NaN or Inf"),
        (
            "NaN reference",
            lambda: mg.merge_a([A], [G], reference=A * math.nan),
            r"reference contains NaN or Inf",
        ),
        ("NaN summand", lambda: mg.merge_a_summands(A, v * math.nan), r"gram contains NaN"),
        ("NaN solve", lambda: mg.merge_b_solve(B, G[:3, :3] * math.inf), r"H_sum contains NaN"),
        ("negative weight", lambda: mg.merge_a([A, A], [G, G], [1.0, -1.0]), r"weights[1] = -1.0"),
        ("NaN weight", lambda: mg.merge_a([A], [G], [math.nan]), r"weights[0] = nan"),
        ("summand weight", lambda: mg.regmean_summands(W, G, -2.0), r"weight = -2.0"),
        ("b summand weight", lambda: mg.merge_b_summands(B, A, G, math.inf), r"weight = inf"),
        (
            "non-square gram",
            lambda: mg.merge_tasks([W], [torch.ones(8, 5, dtype=F64)]),
            r"grams[0] has shape (8, 5) (not square); expected (8, 8)",
        ),
        ("3-D gram", lambda: mg.regmean([W], [G[None]]), r"grams[0] has shape (1, 8, 8) (3-D)"),
        ("1-D module", lambda: mg.merge_a([v], [G]), r"As[0] has shape (8,) (1-D); expected 2-D"),
        ("1-D A", lambda: mg.merge_b([B], v, [G]), r"A has shape (8,) (1-D)"),
        ("module shapes", lambda: mg.regmean([W, A], [G, G]), r"Ws[1] has shape (3, 8)"),
        ("B vs A rank", lambda: mg.merge_b([W.T], A, [G]), r"Bs[0] has shape (8, 4)"),
        ("b summand rank", lambda: mg.merge_b_summands(W.T, A, G), r"B_i has shape (8, 4)"),
        (
            "reference shape",
            lambda: mg.merge_tasks([W], [G], reference=A),
            r"reference has shape (3, 8); expected (4, 8)",
        ),
        (
            "solve Q shape",
            lambda: mg.merge_a_solve(A, torch.eye(7, dtype=F64)),
            r"G_sum has shape (7, 7); expected (8, 8) or (8,) to match N_sum's 8 columns",
        ),
        ("solve P ndim", lambda: mg.regmean_solve(v, G), r"P has shape (8,) (1-D)"),
        ("summand gram", lambda: mg.merge_tasks_summands(W, v[:3]), r"gram_t has shape (3,)"),
        ("negative ridge", lambda: mg.merge_a([A], [G], ridge=-1.0), r"ridge = -1.0"),
        ("negative diagonal", lambda: mg.regmean([W], [neg_G]), r"grams[0] has a negative"),
        ("not a tensor", lambda: mg.merge_a([A.tolist()], [G]), r"As[0] must be a torch.Tensor"),
        ("not a list", lambda: mg.merge_a(A, [G]), r"As must be a list of tensors"),
        ("integer", lambda: mg.merge_a([A.long()], [G]), r"As[0] has dtype torch.int64"),
        ("alpha low", lambda: mg.shrink_gram(G, -0.1), r"alpha = -0.1"),
        ("alpha high", lambda: mg.shrink_gram(G, 1.5), r"alpha = 1.5"),
        ("alpha nan", lambda: mg.shrink_gram(G, math.nan), r"alpha = nan"),
        ("alpha text", lambda: mg.shrink_gram(G, "half"), r"alpha = 'half' is not a real number"),
        ("ridge nan", lambda: mg.merge_a([A], [G], ridge=math.nan), r"ridge = nan"),
        ("weight text", lambda: mg.merge_a([A], [G], ["x"]), r"weights[0] = 'x'"),
        ("shrink non-square", lambda: mg.shrink_gram(G[:3], 0.5), r"G has shape (3, 8)"),
        ("shrink 3-D", lambda: mg.shrink_gram(G[None], 0.5), r"G has shape (1, 8, 8)"),
    ]


ERRORS = _errors()


@pytest.mark.parametrize(("call", "message"), [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_errors_name_the_argument(call: Callable[[], object], message: str):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_low_rank_factors_give_the_best_rank_r_approximation():
    rng = np.random.default_rng(5)
    delta = rng.standard_normal((8, 11))
    B, A = mg.low_rank_factors(torch.from_numpy(delta), 3)
    u, s, vh = np.linalg.svd(delta, full_matrices=False)
    np.testing.assert_allclose((B @ A).numpy(), (u[:, :3] * s[:3]) @ vh[:3], atol=1e-12)
    assert B.shape == (8, 3) and A.shape == (3, 11)


def test_low_rank_factors_pad_when_the_rank_exceeds_the_shape():
    delta = torch.randn(2, 5, dtype=torch.float64)
    B, A = mg.low_rank_factors(delta, 4)
    assert B.shape == (2, 4) and A.shape == (4, 5)
    torch.testing.assert_close(B @ A, delta, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("rank", [0, -1, 1.5, True])
def test_low_rank_factors_reject_bad_ranks(rank):
    with pytest.raises(ValueError, match="rank"):
        mg.low_rank_factors(torch.ones(3, 3), rank)


def test_analytic_head_is_ridge_regression_on_stacked_features():
    rng = np.random.default_rng(7)
    chunks = [rng.standard_normal((n, 6)) * np.array([1e-2, 1, 3, 10, 1, 0.5]) + 2 for n in (5, 1, 9)]
    labels = [rng.integers(0, 4, len(c)) for c in chunks]
    gram, cross = None, None
    for x, y in zip(chunks, labels, strict=True):
        g, c = mg.analytic_head_summands(torch.from_numpy(x), torch.eye(4, dtype=torch.float64)[y])
        gram, cross = (g, c) if gram is None else (gram + g, cross + c)
    weight, bias = mg.analytic_head_solve(gram, cross, ridge=1e-2)
    # Brute force: least squares on [F̂; √λ I] against [Y; 0], F̂ = [F, 1], λ = ridge · mean diag(F̂ᵀF̂).
    features = np.hstack([np.vstack(chunks), np.ones((15, 1))])
    targets = np.eye(4)[np.concatenate(labels)]
    lam = 1e-2 * np.mean(np.sum(features**2, axis=0))
    stacked = np.vstack([features, np.sqrt(lam) * np.eye(7)])
    solution = np.linalg.lstsq(stacked, np.vstack([targets, np.zeros((7, 4))]), rcond=None)[0].T
    np.testing.assert_allclose(weight.numpy(), solution[:, :6], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(bias.numpy(), solution[:, 6], rtol=1e-9, atol=1e-12)


def test_analytic_head_rejects_a_zero_ridge_and_mismatched_shapes():
    g, c = mg.analytic_head_summands(torch.ones(3, 2), torch.ones(3, 2))
    with pytest.raises(ValueError, match="λ > 0"):
        mg.analytic_head_solve(g, c, ridge=0.0)
    with pytest.raises(ValueError, match=r"expected \(d\+1, d\+1\) and \(d\+1, K\)"):
        mg.analytic_head_solve(g, c[:2], ridge=1e-3)
    with pytest.raises(ValueError, match="targets has 2 rows but features has 3"):
        mg.analytic_head_summands(torch.ones(3, 2), torch.ones(2, 2))
