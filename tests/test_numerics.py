"""Numerics of the statistics and merges on awkward data, against float64 least squares on stacked data.

Every merge minimises Σ_i ‖(W − W_i) X_iᵀ‖² (or its diagonal-statistics version), so the answer can be
checked by ``torch.linalg.lstsq`` on the stacked inputs. The data here are the awkward cases of a
federated run: clients that hold one sample, input features that are always zero, inputs whose
features span four orders of magnitude, and statistics gathered under bfloat16 autocast.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from fedlorm import merging
from fedlorm.adapters import InputStatistics, inject_lora

F64 = torch.float64


def _stats(xs: list[Tensor], mode: str) -> list[Tensor]:
    """Each client's input statistic, gathered by InputStatistics on a Linear layer that reads X_i."""
    layer = nn.Linear(xs[0].shape[1], 3)
    out = []
    for x in xs:
        with InputStatistics({"layer": layer}, mode=mode) as stats, torch.no_grad():
            layer(x)
        out.append(stats.grams()["layer"])
    return out


def _rows(x: Tensor, g: Tensor, mode: str) -> Tensor:
    """The stacked-data rows that represent one client's statistic: X itself, or diag(√g)."""
    return x.to(F64) if mode == "full" else torch.diag(g.sqrt())


def _least_squares(rows: list[Tensor], modules: list[Tensor], reference: Tensor) -> Tensor:
    """R + argmin_Δ Σ_i ‖S_i (R + Δ − W_i)ᵀ‖² with the minimum-norm Δ (gelsd), in float64."""
    S = torch.cat(rows)
    T = torch.cat([s @ (m.to(F64) - reference).T for s, m in zip(rows, modules, strict=True)])
    return reference + torch.linalg.lstsq(S, T, driver="gelsd").solution.T


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).norm() / b.to(F64).norm().clamp_min(1e-300))


def _clients(k: int, n: int, d: int, seed: int, scales: Tensor | None = None) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, d, generator=g) for _ in range(k)]
    return xs if scales is None else [x * scales.float() for x in xs]


def _modules(k: int, rows: int, d: int, seed: int) -> tuple[list[Tensor], Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, d, generator=g, dtype=F64) for _ in range(k)], torch.randn(
        rows, d, generator=g, dtype=F64
    )


MERGES = {
    "regmean": merging.regmean,
    "merge_a": merging.merge_a,
    "merge_tasks": merging.merge_tasks,
}


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("kind", list(MERGES))
def test_one_sample_clients(kind, mode):
    xs = _clients(k=5, n=1, d=8, seed=1)  # five rank-1 statistics, 8 features: Q is singular
    grams = _stats(xs, mode)
    modules, reference = _modules(5, 4, 8, seed=2)
    ours = MERGES[kind](modules, grams, reference=reference)
    rows = [_rows(x, g, mode) for x, g in zip(xs, grams, strict=True)]
    best = _least_squares(rows, modules, reference)
    assert torch.isfinite(ours).all()
    S = torch.cat(rows)
    assert _rel(S @ ours.T, S @ best.T) < 1e-9  # the fitted responses agree
    # The solution is not unique; both are the reference-closest one, up to round-off leakage.
    assert _rel(ours, best) < 1e-5


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("kind", list(MERGES))
def test_always_zero_features_keep_the_reference(kind, mode):
    xs = _clients(k=4, n=20, d=8, seed=3)
    for x in xs:
        x[:, [2, 5]] = 0.0
    grams = _stats(xs, mode)
    modules, reference = _modules(4, 4, 8, seed=4)
    ours = MERGES[kind](modules, grams, reference=reference)
    best = _least_squares([_rows(x, g, mode) for x, g in zip(xs, grams, strict=True)], modules, reference)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours[:, [2, 5]], reference[:, [2, 5]])
    seen = [0, 1, 3, 4, 6, 7]
    assert _rel(ours[:, seen], best[:, seen]) < 1e-9


@pytest.mark.parametrize("mode", ["full", "diag"])
@pytest.mark.parametrize("kind", list(MERGES))
def test_features_spanning_four_orders_of_magnitude(kind, mode):
    scales = torch.logspace(0, 4, 8, dtype=F64)
    xs = _clients(k=4, n=30, d=8, seed=5, scales=scales)
    grams = _stats(xs, mode)
    modules, reference = _modules(4, 4, 8, seed=6)
    for ref in (None, reference):
        ours = MERGES[kind](modules, grams, reference=ref)
        start = torch.zeros_like(reference) if ref is None else ref
        best = _least_squares(
            [_rows(x, g, mode) for x, g in zip(xs, grams, strict=True)], modules, start
        )
        assert torch.isfinite(ours).all()
        # Column by column: the small features are fitted as exactly as the large ones.
        for j in range(8):
            assert _rel(ours[:, j], best[:, j]) < 1e-8, j


def test_merge_b_on_spanning_inputs_and_a_one_sample_client():
    scales = torch.logspace(0, 4, 6, dtype=F64)
    xs = _clients(k=3, n=25, d=6, seed=7, scales=scales) + _clients(k=1, n=1, d=6, seed=8)
    grams = _stats(xs, "full")
    g = torch.Generator().manual_seed(9)
    A = torch.randn(3, 6, generator=g, dtype=F64)
    Bs = [torch.randn(5, 3, generator=g, dtype=F64) for _ in xs]
    ours = merging.merge_b(Bs, A, grams)
    best = _least_squares([x.to(F64) @ A.T for x in xs], Bs, torch.zeros(5, 3, dtype=F64))
    assert torch.isfinite(ours).all() and _rel(ours, best) < 1e-8


def test_statistics_are_float64_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 4))
    layers = inject_lora(model, [r"2", r"4"], rank=2)
    seen: dict[str, list[Tensor]] = {name: [] for name in ("0", "2", "4")}
    for name in seen:
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach().clone())
        )
    modules = {"0": model[0], **layers}
    scales = torch.logspace(0, 4, 6)
    g = torch.Generator().manual_seed(1)
    modes = {"0": "full", "2": "full", "4": "diag"}
    with (
        InputStatistics(modules, mode=modes) as stats,
        torch.autocast("cpu", dtype=torch.bfloat16),
        torch.no_grad(),
    ):
        for _ in range(50):  # many batches: a float32 accumulator would drift by ~1e-6
            model(torch.randn(64, 6, generator=g) * scales)
    grams = stats.grams()
    assert seen["2"][0].dtype == torch.bfloat16  # the layer really ran in reduced precision
    for name, gram in grams.items():
        assert gram.dtype == F64 and torch.isfinite(gram).all(), name
        X = torch.cat(seen[name]).to(F64)
        expected = X.T @ X if gram.ndim == 2 else (X * X).sum(0)
        assert _rel(gram, expected) < 1e-12, name
    assert stats.rows() == {name: 50 * 64 for name in modules}
