"""Closed-form response-matching merges (LoRM, RegMean) on plain tensors.

Layer 1 of fedlorm: no ``nn.Module``, no data, no I/O. For a linear layer y = W x and a client (or
task) i with stacked layer inputs X_i (n_i x d_in), the statistic is G_i = X_iᵀX_i, shrunk as
G̃_i = α·G_i + (1−α)·diag(G_i) (:func:`shrink_gram`; α = 0 keeps a d_in vector). Every merge here
minimises Σ_i w_i‖(W − W_i) X_iᵀ‖² (with G̃_i in place of X_iᵀX_i) and is one right-solve
X = P Q⁻¹ of additive sums, so a server only ever needs Σ_i over clients:

    B-round (A shared)  M_i = B_i H_i,   H_i = w_i A G̃_i Aᵀ   B  = (Σ M_i)(Σ H_i)⁻¹
    A-round (B shared)  N_i = w_i A_i G̃_i,   w_i G̃_i        A  = (Σ N_i)(Σ w_i G̃_i)⁻¹
    head (RegMean)      w_i W_i G̃_i,     w_i G̃_i            W  = (Σ ·)(Σ ·)⁻¹
    task merge          w_t ΔW_t G_t,    w_t G_t             ΔW = (Σ ·)(Σ ·)⁻¹

The ``*_summands`` functions give one client's (P_i, Q_i) in float64; the ``*_solve`` functions take
the sums; ``merge_b``, ``merge_a``, ``regmean`` and ``merge_tasks`` do both for lists. A statistic
may be a full (d_in, d_in) Gram or a (d_in,) diagonal; mixing both in one call is an error.

Solve, with reference R (default 0) and Q = Σ Q_i:

    X = R + (P − R·Q)(Q + λI)⁻¹,   λ = ridge · mean(diag Q)   (Cholesky; lstsq only if it fails)

followed by up to ``_REFINE_STEPS`` steps of iterative refinement against the unridged Q (reusing the
Cholesky factor), which remove the ridge's bias where features span orders of magnitude (a feature
1e4 times smaller than the largest is otherwise biased by ~1e-3; after refinement by < 1e-8).
The ridge is relative (scale-free) and shrinks toward R, not toward 0. Where Q is singular the
answer tends to the R-closest minimiser; in particular **a feature (column) whose total weight is
zero keeps R's value**, and an all-zero Q returns R. The federated protocol passes the previous
global value as ``reference``, so directions that no client saw stay where they were. With a
diagonal Q the solve is a column-wise division (a weighted average: no ridge, no solve): column
j = P_j / q_j where q_j > 0, R_j where q_j = 0. ``DEFAULT_RIDGE`` = 1e-10 (see its comment).
``pinv`` is never used.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "DEFAULT_RIDGE",
    "analytic_head_solve",
    "analytic_head_summands",
    "low_rank_factors",
    "merge_a",
    "merge_a_solve",
    "merge_a_summands",
    "merge_b",
    "merge_b_solve",
    "merge_b_summands",
    "merge_tasks",
    "merge_tasks_solve",
    "merge_tasks_summands",
    "regmean",
    "regmean_solve",
    "regmean_summands",
    "shrink_gram",
]

# Relative ridge λ = DEFAULT_RIDGE · mean(diag Q). It biases a full-rank solution by about
# ridge · mean(diag Q)/λ_min(Q): <= 1e-8 relative while mean(diag Q)/λ_min(Q) <= 1e2 (the tests'
# well-conditioned data: <= 1e-9), and the fitted responses by less. It stays well above float64
# round-off in Q (~d·eps·‖Q‖, 1e-13..1e-12 relative for d <= 3072), so Cholesky succeeds on singular
# Grams; the round-off "null space" of a singular Q then leaks ~eps/ridge·‖Q‖/mean(diag Q) (<= 1e-5
# relative in the tests) away from the reference-closest solution. 1e-12 would leak ~1e-3; 1e-8
# would bias well-conditioned solutions by ~1e-7.
DEFAULT_RIDGE = 1e-10

# Refinement Δ ← Δ + (rhs − Δ·Q)(Q + λI)⁻¹ multiplies the ridge's relative bias λ/(μ + λ) in an
# eigendirection μ of Q by itself each step, and leaves directions with μ = 0 (never seen) at 0; in
# round-off null directions it adds one more leak of the size above per step, hence few steps.
_REFINE_STEPS = 3

_F64 = torch.float64


# --------------------------------------------------------------------------------------- checks


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _all_finite(x: Tensor) -> bool:
    """True iff every entry is finite: one float64 sum (NaN/Inf propagate), exact check if not."""
    if bool(torch.isfinite(x.sum(dtype=_F64))):
        return True
    return bool(torch.isfinite(x).all())  # the sum may only have overflowed


def _check_tensor(x: object, name: str, ndims: tuple[int, ...]) -> Tensor:
    """Tensor of a floating dtype, ``ndim`` in ``ndims``, all finite; else ValueError."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor; got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} has dtype {x.dtype}; expected a floating-point dtype")
    if x.ndim not in ndims:
        allowed = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name} has shape {_shape(x)} ({x.ndim}-D); expected {allowed}")
    if not _all_finite(x):
        raise ValueError(f"{name} contains NaN or Inf values; all entries must be finite")
    return x


def _check_stat(g: object, name: str, d_in: int, match: str) -> Tensor:
    """A full (d_in, d_in) Gram or a (d_in,) diagonal with a non-negative diagonal."""
    g = _check_tensor(g, name, (1, 2))
    expected = (d_in,) * g.ndim
    if tuple(g.shape) != expected:
        square = "" if g.ndim == 1 or g.shape[0] == g.shape[1] else " (not square)"
        raise ValueError(
            f"{name} has shape {_shape(g)}{square}; expected ({d_in}, {d_in}) or ({d_in},) "
            f"to match {match}"
        )
    diag = g if g.ndim == 1 else g.diagonal()
    if bool((diag < 0).any()):
        raise ValueError(
            f"{name} has a negative diagonal entry (min {float(diag.min()):.3g}); "
            "a Gram's diagonal holds sums of squares and must be >= 0"
        )
    return g


def _check_real(x: object, name: str) -> float:
    """A finite real number (Python number or 0-d tensor); else ValueError."""
    try:
        value = float(x)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} = {x!r} is not a real number") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} = {value!r} is not allowed; expected a finite number")
    return value


def _check_weight(w: object, name: str) -> float:
    value = _check_real(w, name)
    if value < 0:
        raise ValueError(f"{name} = {value!r} is negative; weights must be finite and >= 0")
    return value


def _check_weights(weights: Sequence[float] | None, n: int, of: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    weights = list(weights)
    if len(weights) != n:
        raise ValueError(f"weights has {len(weights)} entries; expected {n}, one per entry of {of}")
    return [_check_weight(w, f"weights[{i}]") for i, w in enumerate(weights)]


def _check_list(xs: Sequence[Tensor], name: str) -> list[Tensor]:
    if isinstance(xs, Tensor) or not isinstance(xs, Sequence):
        raise ValueError(f"{name} must be a list of tensors; got {type(xs).__name__}")
    xs = list(xs)
    if not xs:
        raise ValueError(f"{name} is empty; expected at least one tensor")
    return xs


def _check_grams(grams: Sequence[Tensor], n: int, of: str, d_in: int, match: str) -> list[Tensor]:
    grams = _check_list(grams, "grams")
    if len(grams) != n:
        raise ValueError(f"grams has {len(grams)} entries; expected {n}, one per entry of {of}")
    grams = [_check_stat(g, f"grams[{i}]", d_in, match) for i, g in enumerate(grams)]
    kinds = {g.ndim for g in grams}
    if len(kinds) > 1:
        i_full = next(i for i, g in enumerate(grams) if g.ndim == 2)
        i_diag = next(i for i, g in enumerate(grams) if g.ndim == 1)
        raise ValueError(
            f"grams mixes full and diagonal statistics: grams[{i_full}] has shape "
            f"{_shape(grams[i_full])} but grams[{i_diag}] has shape {_shape(grams[i_diag])}; "
            "pass all full (d_in, d_in) Grams or all (d_in,) diagonals (shrink_gram(G, 0))"
        )
    return grams


def _check_same_shape(xs: list[Tensor], name: str) -> None:
    for i, x in enumerate(xs[1:], start=1):
        if x.shape != xs[0].shape:
            raise ValueError(
                f"{name}[{i}] has shape {_shape(x)}; expected {_shape(xs[0])} like {name}[0]"
            )


def _check_ridge(ridge: float) -> float:
    value = _check_real(ridge, "ridge")
    if value < 0:
        raise ValueError(f"ridge = {value!r} is negative; expected a finite float >= 0")
    return value


def _result_dtype(xs: list[Tensor]) -> torch.dtype:
    dtype = xs[0].dtype
    for x in xs[1:]:
        dtype = torch.promote_types(dtype, x.dtype)
    return dtype


# ------------------------------------------------------------------------------------------ math


def _times_stat(x: Tensor, g: Tensor) -> Tensor:
    """x·G̃ for a full Gram, or x·diag(g) by broadcasting for a diagonal."""
    return x * g if g.ndim == 1 else x @ g


def _b_summands(B: Tensor, A: Tensor, g: Tensor, w: float) -> tuple[Tensor, Tensor]:
    A64 = A.to(_F64)
    H = _times_stat(A64, g.to(_F64)) @ A64.T
    H = (H + H.T).mul_(0.5 * w)
    return B.to(_F64) @ H, H


def _right_summands(X: Tensor, g: Tensor, w: float) -> tuple[Tensor, Tensor]:
    g64 = g.to(_F64, copy=True)  # a copy: callers accumulate into it in place
    if w != 1.0:
        g64.mul_(w)
    return _times_stat(X.to(_F64), g64), g64


def _solve_right(P: Tensor, Q: Tensor, reference: Tensor | None, ridge: float) -> Tensor:
    """reference + (P − reference·Q)(Q + λI)⁻¹ in float64 (see the module docstring)."""
    P = P.to(_F64)
    Q = Q.to(_F64)
    R = torch.zeros_like(P) if reference is None else reference.to(_F64)
    if Q.ndim == 1:
        seen = Q > 0
        out = R.clone()
        out[:, seen] = P[:, seen] / Q[seen]
        return out
    scale = Q.diagonal().mean()
    if not bool(scale > 0):  # a PSD matrix with a zero diagonal is zero: nothing to fit
        return R.clone()
    Qr = Q.clone()
    Qr.diagonal().add_(ridge * scale)
    rhs = P if reference is None else P - R @ Q
    L, info = torch.linalg.cholesky_ex(Qr)
    if int(info) == 0:
        delta_t = torch.cholesky_solve(rhs.T, L)
        for _ in range(_REFINE_STEPS):
            step = torch.cholesky_solve(rhs.T - Q @ delta_t, L)
            delta_t += step
            if not bool(step.abs().max() > 1e-13 * delta_t.abs().max()):
                break
    else:  # not positive definite even with the ridge (e.g. ridge=0 on a singular Q)
        driver = "gelsd" if Qr.device.type == "cpu" else None
        delta_t = torch.linalg.lstsq(Qr, rhs.T, driver=driver).solution
    return R + delta_t.T


def _checked_solve(
    P: Tensor,
    Q: Tensor,
    reference: Tensor | None,
    dtype: torch.dtype | None,
    ridge: float,
    names: tuple[str, str],
) -> Tensor:
    p_name, q_name = names
    P = _check_tensor(P, p_name, (2,))
    d = P.shape[1]
    Q = _check_stat(Q, q_name, d, f"{p_name}'s {d} columns")
    if reference is not None:
        reference = _check_tensor(reference, "reference", (2,))
        if reference.shape != P.shape:
            raise ValueError(
                f"reference has shape {_shape(reference)}; expected {_shape(P)} like {p_name}"
            )
    out = _solve_right(P, Q, reference, _check_ridge(ridge))
    return out if dtype is None else out.to(dtype)


# ------------------------------------------------------------------------------------------- API


def shrink_gram(G: Tensor, alpha: float) -> Tensor:
    """RegMean's shrink of a Gram toward its diagonal: α·G + (1−α)·diag(G).

    Args:
        G: A full Gram (d_in, d_in), or its diagonal (d_in,), which is returned as a copy.
        alpha: The shrink α in [0, 1]; 0 keeps only the diagonal, 1 the exact Gram.

    Returns:
        The shrunk Gram: (d_in, d_in), or the (d_in,) diagonal when ``alpha`` is 0 or ``G`` is 1-D.

    Raises:
        ValueError: If ``G`` is not square or finite, or ``alpha`` is outside [0, 1].
    """
    G = _check_tensor(G, "G", (1, 2))
    if G.ndim == 2 and G.shape[0] != G.shape[1]:
        raise ValueError(f"G has shape {_shape(G)}; expected a square (d_in, d_in) Gram or (d_in,)")
    a = _check_real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise ValueError(f"alpha = {a!r} is not allowed; expected 0 <= alpha <= 1")
    if G.ndim == 1:
        return G.clone()
    if a == 0:
        return G.diagonal().clone()
    out = G * a
    out.diagonal().copy_(G.diagonal())  # α·G_jj + (1−α)·G_jj = G_jj, exactly
    return out


def merge_b_summands(
    B_i: Tensor, A: Tensor, gram: Tensor, weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One client's B-round summands: M_i = B_i H_i and H_i = w·A G̃_i Aᵀ.

    Args:
        B_i: The client's trained B (d_out, r).
        A: The shared A (r, d_in) every client trained against.
        gram: The client's (shrunk) input Gram G̃_i, (d_in, d_in) or its diagonal (d_in,).
        weight: The client's weight w (default 1; the Gram already counts its samples).

    Returns:
        ``(M_i, H_i)`` in float64, (d_out, r) and (r, r): what the client uploads.

    Raises:
        ValueError: If a shape does not fit or a value is not finite.
    """
    A = _check_tensor(A, "A", (2,))
    B_i = _check_tensor(B_i, "B_i", (2,))
    if B_i.shape[1] != A.shape[0]:
        raise ValueError(f"B_i has shape {_shape(B_i)}; expected (d_out, {A.shape[0]}) for A's r")
    gram = _check_stat(gram, "gram", A.shape[1], f"A's d_in={A.shape[1]}")
    return _b_summands(B_i, A, gram, _check_weight(weight, "weight"))


def merge_b_solve(
    M_sum: Tensor,
    H_sum: Tensor,
    *,
    reference: Tensor | None = None,
    dtype: torch.dtype | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The merged B from the summed B-round summands: B = R + (ΣM − R·ΣH)(ΣH + λI)⁻¹.

    Args:
        M_sum: Σ_i M_i over the clients (d_out, r).
        H_sum: Σ_i H_i over the clients (r, r).
        reference: R, the value directions no client saw keep (default 0); the protocol passes
            the previous global B.
        dtype: The result's dtype (default: ``M_sum``'s).
        ridge: The relative ridge λ / mean(diag ΣH); iterative refinement removes its bias.

    Returns:
        B (d_out, r); an all-zero ``H_sum`` returns the reference.

    Raises:
        ValueError: If the shapes do not fit or a value is not finite.
    """
    return _checked_solve(M_sum, H_sum, reference, dtype, ridge, ("M_sum", "H_sum"))


def merge_a_summands(A_i: Tensor, gram: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """One client's A-round summands: N_i = w·A_i G̃_i and w·G̃_i.

    Args:
        A_i: The client's trained A (r, d_in).
        gram: The client's (shrunk) input Gram G̃_i, (d_in, d_in) or its diagonal (d_in,).
        weight: The client's weight w (default 1).

    Returns:
        ``(N_i, w·G̃_i)`` in float64: what the client uploads.

    Raises:
        ValueError: If a shape does not fit or a value is not finite.
    """
    A_i = _check_tensor(A_i, "A_i", (2,))
    gram = _check_stat(gram, "gram", A_i.shape[1], f"A_i's d_in={A_i.shape[1]}")
    return _right_summands(A_i, gram, _check_weight(weight, "weight"))


def merge_a_solve(
    N_sum: Tensor,
    G_sum: Tensor,
    *,
    reference: Tensor | None = None,
    dtype: torch.dtype | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The merged A from the summed A-round summands: A = R + (ΣN − R·ΣG̃)(ΣG̃ + λI)⁻¹.

    With diagonal Grams this is a column-wise division, a weighted average with no solve.

    Args:
        N_sum: Σ_i N_i over the clients (r, d_in).
        G_sum: Σ_i w_i·G̃_i, (d_in, d_in) or (d_in,).
        reference: R, the value a feature no client saw keeps (default 0).
        dtype: The result's dtype (default: ``N_sum``'s).
        ridge: The relative ridge (full Grams only).

    Returns:
        A (r, d_in).

    Raises:
        ValueError: If the shapes do not fit or a value is not finite.
    """
    return _checked_solve(N_sum, G_sum, reference, dtype, ridge, ("N_sum", "G_sum"))


def regmean_summands(W_i: Tensor, gram: Tensor, weight: float = 1.0) -> tuple[Tensor, Tensor]:
    """One client's RegMean summands for a whole weight matrix (e.g. a head): w·W_i G̃_i and w·G̃_i.

    Args:
        W_i: The client's weight (d_out, d_in); a bias is merged separately.
        gram: The client's (shrunk) input Gram, (d_in, d_in) or (d_in,).
        weight: The client's weight w (default 1).

    Returns:
        ``(w·W_i G̃_i, w·G̃_i)`` in float64.

    Raises:
        ValueError: If a shape does not fit or a value is not finite.
    """
    W_i = _check_tensor(W_i, "W_i", (2,))
    gram = _check_stat(gram, "gram", W_i.shape[1], f"W_i's d_in={W_i.shape[1]}")
    return _right_summands(W_i, gram, _check_weight(weight, "weight"))


def regmean_solve(
    P: Tensor,
    Q: Tensor,
    *,
    reference: Tensor | None = None,
    dtype: torch.dtype | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The RegMean-merged weight from summed summands: W = R + (P − R·Q)(Q + λI)⁻¹.

    Args:
        P: Σ_i w_i W_i G̃_i (d_out, d_in).
        Q: Σ_i w_i G̃_i, (d_in, d_in) or (d_in,).
        reference: R, the value a feature no client saw keeps (default 0).
        dtype: The result's dtype (default: ``P``'s).
        ridge: The relative ridge (full Grams only).

    Returns:
        W (d_out, d_in).

    Raises:
        ValueError: If the shapes do not fit or a value is not finite.
    """
    return _checked_solve(P, Q, reference, dtype, ridge, ("P", "Q"))


def merge_tasks_summands(
    delta_t: Tensor, gram_t: Tensor, weight: float = 1.0
) -> tuple[Tensor, Tensor]:
    """One finished task's summands for the cross-task merge: w·ΔW_t G_t and w·G_t.

    Args:
        delta_t: The task's merged update ΔW_t (d_out, d_in).
        gram_t: The task's summed input Gram G_t, (d_in, d_in) or (d_in,).
        weight: The task's weight w (default 1).

    Returns:
        ``(w·ΔW_t G_t, w·G_t)`` in float64; the server keeps their running sums over tasks.

    Raises:
        ValueError: If a shape does not fit or a value is not finite.
    """
    delta_t = _check_tensor(delta_t, "delta_t", (2,))
    gram_t = _check_stat(gram_t, "gram_t", delta_t.shape[1], f"delta_t's d_in={delta_t.shape[1]}")
    return _right_summands(delta_t, gram_t, _check_weight(weight, "weight"))


def merge_tasks_solve(
    P: Tensor,
    Q: Tensor,
    *,
    reference: Tensor | None = None,
    dtype: torch.dtype | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The update merged over tasks: ΔW = R + (P − R·Q)(Q + λI)⁻¹.

    Args:
        P: Σ_t w_t ΔW_t G_t (d_out, d_in).
        Q: Σ_t w_t G_t, (d_in, d_in) or (d_in,).
        reference: R, the value a feature no task saw keeps (default 0).
        dtype: The result's dtype (default: ``P``'s).
        ridge: The relative ridge (full Grams only).

    Returns:
        ΔW (d_out, d_in).

    Raises:
        ValueError: If the shapes do not fit or a value is not finite.
    """
    return _checked_solve(P, Q, reference, dtype, ridge, ("P", "Q"))


def merge_b(
    Bs: Sequence[Tensor],
    A: Tensor,
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    reference: Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The B that best reproduces every client's responses for a shared A (summands and solve in one).

    Minimises Σ_i w_i‖(B A − B_i A) X_iᵀ‖², with G̃_i standing for X_iᵀX_i.

    Args:
        Bs: Each client's B_i (d_out, r), all the same shape.
        A: The shared A (r, d_in).
        grams: Each client's (shrunk) Gram, all full or all diagonal.
        weights: Each client's weight (default: all 1).
        reference: The value directions no client saw keep (default 0).
        ridge: The relative ridge.

    Returns:
        B (d_out, r) in the dtype of ``Bs``.

    Raises:
        ValueError: If the lists are empty or of different lengths, or a shape or value is bad.
    """
    A = _check_tensor(A, "A", (2,))
    Bs = [_check_tensor(B, f"Bs[{i}]", (2,)) for i, B in enumerate(_check_list(Bs, "Bs"))]
    _check_same_shape(Bs, "Bs")
    if Bs[0].shape[1] != A.shape[0]:
        raise ValueError(
            f"Bs[0] has shape {_shape(Bs[0])}; expected (d_out, {A.shape[0]}) for A's r"
        )
    grams = _check_grams(grams, len(Bs), "Bs", A.shape[1], f"A's d_in={A.shape[1]}")
    ws = _check_weights(weights, len(Bs), "Bs")
    M, H = _b_summands(Bs[0], A, grams[0], ws[0])
    for B, g, w in zip(Bs[1:], grams[1:], ws[1:], strict=True):
        M_i, H_i = _b_summands(B, A, g, w)
        M += M_i
        H += H_i
    return _checked_solve(M, H, reference, _result_dtype(Bs), ridge, ("M_sum", "H_sum"))


def _merge_right(
    Xs: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None,
    reference: Tensor | None,
    ridge: float,
    name: str,
) -> Tensor:
    """Shared body of merge_a / regmean / merge_tasks: Σ w X_i G̃_i, Σ w G̃_i, then solve."""
    Xs = [_check_tensor(X, f"{name}[{i}]", (2,)) for i, X in enumerate(_check_list(Xs, name))]
    _check_same_shape(Xs, name)
    d_in = Xs[0].shape[1]
    grams = _check_grams(grams, len(Xs), name, d_in, f"{name}[0]'s d_in={d_in}")
    ws = _check_weights(weights, len(Xs), name)
    P, Q = _right_summands(Xs[0], grams[0], ws[0])
    for X, g, w in zip(Xs[1:], grams[1:], ws[1:], strict=True):
        P_i, Q_i = _right_summands(X, g, w)
        P += P_i
        Q += Q_i
    return _checked_solve(P, Q, reference, _result_dtype(Xs), ridge, ("P", "Q"))


def merge_a(
    As: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    reference: Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The A that best reproduces every client's responses (summands and solve in one).

    Minimises Σ_i w_i‖(A − A_i) X_iᵀ‖², with G̃_i standing for X_iᵀX_i.

    Args:
        As: Each client's A_i (r, d_in), all the same shape.
        grams: Each client's (shrunk) Gram, all full or all diagonal.
        weights: Each client's weight (default: all 1).
        reference: The value a feature no client saw keeps (default 0).
        ridge: The relative ridge (full Grams only).

    Returns:
        A (r, d_in) in the dtype of ``As``.

    Raises:
        ValueError: If the lists are empty or of different lengths, or a shape or value is bad.
    """
    return _merge_right(As, grams, weights, reference, ridge, "As")


def regmean(
    Ws: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    reference: Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """RegMean of whole weight matrices (e.g. a head; a bias is merged separately).

    Minimises Σ_i w_i‖(W − W_i) X_iᵀ‖², with G̃_i standing for X_iᵀX_i.

    Args:
        Ws: Each client's W_i (d_out, d_in), all the same shape.
        grams: Each client's (shrunk) Gram, all full or all diagonal.
        weights: Each client's weight (default: all 1).
        reference: The value a feature no client saw keeps (default 0).
        ridge: The relative ridge (full Grams only).

    Returns:
        W (d_out, d_in) in the dtype of ``Ws``.

    Raises:
        ValueError: If the lists are empty or of different lengths, or a shape or value is bad.
    """
    return _merge_right(Ws, grams, weights, reference, ridge, "Ws")


def merge_tasks(
    deltas: Sequence[Tensor],
    grams: Sequence[Tensor],
    weights: Sequence[float] | None = None,
    *,
    reference: Tensor | None = None,
    ridge: float = DEFAULT_RIDGE,
) -> Tensor:
    """The cross-task merge of finished tasks' updates (summands and solve in one).

    Minimises Σ_t w_t‖(ΔW − ΔW_t) X_tᵀ‖², with G_t standing for X_tᵀX_t.

    Args:
        deltas: Each task's update ΔW_t (d_out, d_in), all the same shape.
        grams: Each task's Gram G_t, all full or all diagonal.
        weights: Each task's weight (default: all 1).
        reference: The value a feature no task saw keeps (default 0).
        ridge: The relative ridge (full Grams only).

    Returns:
        ΔW (d_out, d_in) in the dtype of ``deltas``.

    Raises:
        ValueError: If the lists are empty or of different lengths, or a shape or value is bad.
    """
    return _merge_right(deltas, grams, weights, reference, ridge, "deltas")


def low_rank_factors(delta: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """LoRA factors whose product is the best rank-r approximation of ``delta`` (truncated SVD).

    The singular values are split evenly, B = U_r·√S_r and A = √S_r·V_rᵀ, so both factors have the
    same scale; used to bring a merged full update back to LoRA's rank.

    Args:
        delta: The full update (d_out, d_in).
        rank: The rank r >= 1; a shape of lower rank is padded with zero directions.

    Returns:
        ``(B, A)`` in float64, (d_out, r) and (r, d_in).

    Raises:
        ValueError: If ``delta`` is not a finite matrix or ``rank`` is not an integer >= 1.
    """
    delta = _check_tensor(delta, "delta", (2,))
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank = {rank!r} is not allowed; expected an integer >= 1")
    U, S, Vh = torch.linalg.svd(delta.to(_F64), full_matrices=False)
    r = min(rank, S.numel())
    root = S[:r].sqrt()
    B = U[:, :r] * root
    A = root[:, None] * Vh[:r]
    if r < rank:  # a rank-deficient shape: pad with zero directions so the factor shapes stay (·, rank)
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - r)], dim=1)
        A = torch.cat([A, A.new_zeros(rank - r, A.shape[1])], dim=0)
    return B, A


def analytic_head_summands(features: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """One client's summands for the ridge-regression head: F̂ᵀF̂ and F̂ᵀY, with F̂ = [F, 1].

    Args:
        features: The client's features F (n, d).
        targets: The targets Y (n, K), one-hot rows for classification.

    Returns:
        ``(F̂ᵀF̂, F̂ᵀY)`` in float64, (d+1, d+1) and (d+1, K).

    Raises:
        ValueError: If the row counts differ or a value is not finite.
    """
    features = _check_tensor(features, "features", (2,))
    targets = _check_tensor(targets, "targets", (2,))
    if targets.shape[0] != features.shape[0]:
        raise ValueError(
            f"targets has {targets.shape[0]} rows but features has {features.shape[0]}; expected equal"
        )
    augmented = torch.cat([features.to(_F64), features.new_ones(features.shape[0], 1, dtype=_F64)], 1)
    return augmented.T @ augmented, augmented.T @ targets.to(_F64)


def analytic_head_solve(
    gram: Tensor, cross: Tensor, *, ridge: float, dtype: torch.dtype | None = None
) -> tuple[Tensor, Tensor]:
    """The ridge-regression classifier from summed statistics: [W, b] = crossᵀ(gram + λI)⁻¹.

    Minimises Σ‖W f + b − y‖² + λ‖[W, b]‖² with λ = ridge · mean(diag(gram)). Unlike the merges
    above, the ridge here is a real regulariser (chosen on validation data), so there is no
    refinement toward λ = 0.

    Args:
        gram: Σ F̂ᵀF̂ over clients (and tasks), (d+1, d+1).
        cross: Σ F̂ᵀY, (d+1, K).
        ridge: The relative ridge; λ must come out > 0.
        dtype: The result's dtype (default float64).

    Returns:
        ``(weight, bias)``: (K, d) and (K,).

    Raises:
        ValueError: If the shapes do not fit, a value is not finite or λ is not positive.
    """
    gram = _check_tensor(gram, "gram", (2,)).to(_F64)
    cross = _check_tensor(cross, "cross", (2,)).to(_F64)
    if gram.shape[0] != gram.shape[1] or cross.shape[0] != gram.shape[0]:
        raise ValueError(
            f"gram has shape {_shape(gram)} and cross {_shape(cross)}; expected (d+1, d+1) and (d+1, K)"
        )
    lam = _check_ridge(ridge) * float(gram.diagonal().mean())
    if not lam > 0:
        raise ValueError(f"ridge = {ridge!r} with this gram gives λ = {lam!r}; expected λ > 0")
    regularised = gram.clone()
    regularised.diagonal().add_(lam)
    solution = torch.cholesky_solve(cross, torch.linalg.cholesky(regularised)).T
    weight, bias = solution[:, :-1], solution[:, -1]
    return (weight, bias) if dtype is None else (weight.to(dtype), bias.to(dtype))
