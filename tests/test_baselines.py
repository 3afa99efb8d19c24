"""Baselines: each within-task client merge and cross-task rule against its closed-form answer.

Unit tests feed the within-task merges random per-client factors and compare the server's answer with a
brute-force float64 computation (weighted means, least squares on stacked data, numpy's SVD).
Engine tests run the real protocol on the tiny MNIST config and rebuild the answer from per-client
factors that the server never saw.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import run_recording_head_features, tiny_config
from torch import nn

from fedlorm.adapters import LoRALinear
from fedlorm.methods import METHODS, add_arrays
from fedlorm.methods.registry import WITHIN_TASK_MERGES
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation
from fedlorm.seeding import torch_generator

D_OUT, D_IN, RANK = 7, 9, 3


def _clients(seed: int, count: int = 4, scaling: float = 1.0):
    """Random per-client layers (float64), sample counts and stacked inputs X_i."""
    rng = torch.Generator().manual_seed(seed)
    layers, counts, inputs = [], [], []
    for _ in range(count):
        layer = LoRALinear(nn.Linear(D_IN, D_OUT, dtype=torch.float64), RANK, scaling)
        with torch.no_grad():
            layer.lora_A.copy_(torch.randn(RANK, D_IN, generator=rng, dtype=torch.float64))
            layer.lora_B.copy_(torch.randn(D_OUT, RANK, generator=rng, dtype=torch.float64))
        n = int(torch.randint(5, 30, (1,), generator=rng))
        layers.append(layer)
        counts.append(n)
        inputs.append(torch.randn(n, D_IN, generator=rng, dtype=torch.float64))
    return layers, counts, inputs


def _merge(rule: str, factor: str, layers, counts, inputs, A, B, scaling: float = 1.0):
    merge = WITHIN_TASK_MERGES[rule]
    sums = None
    for layer, n, x in zip(layers, counts, inputs, strict=True):
        sums = add_arrays(sums, merge.summands("l", layer, factor, x.T @ x, n))
    total = torch.tensor(float(sum(counts)), dtype=torch.float64)
    return merge.solve("l", factor, sums, total, A, B, scaling=scaling, ridge=1e-12)


def _best_rank(matrix: np.ndarray, rank: int) -> np.ndarray:
    u, s, vh = np.linalg.svd(matrix, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize(("rule", "factor"), [("fedavg", "both"), ("ffa", "B"), ("lorm-avg", "A")])
def test_averaging_rules_give_sample_weighted_means_of_the_trained_factors(rule, factor):
    layers, counts, inputs = _clients(0)
    A0 = torch.randn(RANK, D_IN, dtype=torch.float64)
    B0 = torch.randn(D_OUT, RANK, dtype=torch.float64)
    A, B = _merge(rule, factor, layers, counts, inputs, A0, B0)
    w = np.array(counts, dtype=np.float64) / sum(counts)
    mean_a = sum(wi * lay.lora_A.detach().numpy() for wi, lay in zip(w, layers, strict=True))
    mean_b = sum(wi * lay.lora_B.detach().numpy() for wi, lay in zip(w, layers, strict=True))
    np.testing.assert_allclose(A.numpy(), mean_a if factor in ("A", "both") else A0.numpy(), rtol=1e-12)
    np.testing.assert_allclose(B.numpy(), mean_b if factor in ("B", "both") else B0.numpy(), rtol=1e-12)


@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_fedavg_product_is_the_best_rank_r_approximation_of_the_mean_product(scaling):
    layers, counts, inputs = _clients(1, scaling=scaling)
    A, B = _merge("fedavg-product", "both", layers, counts, inputs, *_zeros(), scaling=scaling)
    mean = sum(
        n * scaling * (lay.lora_B.detach() @ lay.lora_A.detach()).numpy()
        for n, lay in zip(counts, layers, strict=True)
    ) / sum(counts)
    np.testing.assert_allclose(scaling * (B @ A).numpy(), _best_rank(mean, RANK), atol=1e-10)
    # The exact mean has rank up to 4·r = 12 > r: the truncation is real, not a no-op.
    assert np.linalg.matrix_rank(mean) > RANK
    # Balanced factors: B and A carry the same singular values.
    np.testing.assert_allclose(
        torch.linalg.norm(B, dim=0).numpy(), torch.linalg.norm(A, dim=1).numpy(), rtol=1e-10
    )


def test_regmean_is_least_squares_on_stacked_inputs_then_truncated():
    layers, counts, inputs = _clients(2)
    A, B = _merge("regmean", "both", layers, counts, inputs, *_zeros())
    # ΔW = argmin Σ_i ‖X_i ΔWᵀ − X_i ΔW_iᵀ‖²: one least-squares problem on stacked rows.
    X = torch.cat(inputs).numpy()
    Y = torch.cat(
        [x @ (lay.lora_B @ lay.lora_A).detach().T for x, lay in zip(inputs, layers, strict=True)]
    ).numpy()
    full = np.linalg.lstsq(X, Y, rcond=None)[0].T
    np.testing.assert_allclose((B @ A).numpy(), _best_rank(full, RANK), atol=1e-8)


def test_lorm_b_round_through_the_rule_is_least_squares_on_stacked_inputs():
    layers, counts, inputs = _clients(3)
    A_shared = torch.randn(RANK, D_IN, dtype=torch.float64)
    for layer in layers:
        layer.lora_A.data.copy_(A_shared)
    B_zero = torch.zeros(D_OUT, RANK, dtype=torch.float64)
    A, B = _merge("lorm", "B", layers, counts, inputs, A_shared, B_zero)
    assert torch.equal(A, A_shared)
    # B = argmin Σ_i ‖X_i Aᵀ Bᵀ − X_i Aᵀ B_iᵀ‖²
    Z = torch.cat([x @ A_shared.T for x in inputs]).numpy()
    Y = torch.cat(
        [x @ A_shared.T @ lay.lora_B.detach().T for x, lay in zip(inputs, layers, strict=True)]
    ).numpy()
    np.testing.assert_allclose(B.numpy(), np.linalg.lstsq(Z, Y, rcond=None)[0].T, atol=1e-8)


def _zeros():
    return torch.zeros(RANK, D_IN, dtype=torch.float64), torch.zeros(D_OUT, RANK, dtype=torch.float64)


@pytest.mark.parametrize(
    ("rule", "factors"),
    [
        ("lorm", ["B", "A"]),
        ("lorm-avg", ["B", "A"]),
        ("fedavg", ["both", "both"]),
        ("ffa", ["B", "B"]),
        ("fedavg-product", ["both", "both"]),
        ("regmean", ["both", "both"]),
    ],
)
def test_factor_schedules(rule, factors):
    assert [WITHIN_TASK_MERGES[rule].factor(r) for r in range(2)] == factors


def _run_task(exp):
    """Run task 0 through the protocol; return per-round (arrays, per-client factors, counts)."""
    server, classes = exp.server, exp.scenario.task_classes(0)
    server.start_task(0, classes, torch_generator(0, "server"))
    rounds = []
    for instruction in server.instructions(0, classes):
        arrays = {k: v.clone() for k, v in server.arrays(instruction).items()}
        sums, total, factors, counts = None, 0, [], []
        for k, data in enumerate(exp.client_data(0)):
            generator = torch_generator(0, "client", 0, instruction.round, k)
            reply = exp.client.update(arrays, instruction, data, generator)
            sums = add_arrays(sums, reply.summands)
            total += reply.num_examples
            counts.append(reply.num_examples)
            factors.append({n: (lay.lora_A.detach().clone(), lay.lora_B.detach().clone())
                            for n, lay in exp.layers.items()})
        server.aggregate(instruction, sums, total)
        rounds.append((instruction, arrays, factors, counts))
    return rounds


@pytest.mark.parametrize("method", ["fedavg", "ffa", "fedavg-product", "lorm-avg"])
def test_engine_averaging_baselines_match_their_closed_forms(method):
    exp = build_experiment(tiny_config(f"method={method}", "lorm.cross_task=simple_mean"))
    rounds = _run_task(exp)
    instruction, arrays, factors, counts = rounds[-1]
    w = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    name = next(iter(exp.layers))
    A_srv, B_srv = exp.server.A[name].double(), exp.server.B[name].double()
    As = torch.stack([f[name][0].double() for f in factors])
    Bs = torch.stack([f[name][1].double() for f in factors])
    mean_a, mean_b = torch.einsum("k,kij->ij", w, As), torch.einsum("k,kij->ij", w, Bs)
    if method == "fedavg-product":
        mean = torch.einsum("k,kij->ij", w, Bs @ As).numpy()
        np.testing.assert_allclose((B_srv @ A_srv).numpy(), _best_rank(mean, exp.cfg.model.rank), atol=1e-6)
        return
    trained = {"fedavg": "AB", "ffa": "B", "lorm-avg": instruction.factor}[method]
    expect_a = mean_a if "A" in trained else arrays[f"{name}.lora_A"].double()
    expect_b = mean_b if "B" in trained else arrays[f"{name}.lora_B"].double()
    torch.testing.assert_close(A_srv, expect_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(B_srv, expect_b, rtol=1e-5, atol=1e-7)
    if method == "ffa":
        # FFA-LoRA: A never moves from the task's random initialisation.
        assert torch.equal(exp.server.A[name], rounds[0][1][f"{name}.lora_A"])
        assert not torch.equal(exp.server.B[name], torch.zeros_like(exp.server.B[name]))


@pytest.mark.parametrize("rule", ["simple_mean", "task_arithmetic"])
def test_cross_task_rules_fold_the_task_deltas(rule):
    cfg = tiny_config("train.rounds=1", f"lorm.cross_task={rule}", "scenario.tasks=[3,3,4]")
    exp = build_experiment(cfg)
    server = exp.server
    name = next(iter(exp.layers))
    deltas = []
    original = server._fold_task

    def record(sums):
        deltas.append(server.scaling * server.B[name].double() @ server.A[name].double())
        original(sums)

    server._fold_task = record
    results = run_simulation(cfg, experiment=exp)
    assert [r["phase"] for r in results["rounds"]] == ["train"] * 3  # no statistics pass needed
    total = sum(deltas)
    expected = total / 3 if rule == "simple_mean" else total
    torch.testing.assert_close(server.merged[name].double(), expected, rtol=1e-5, atol=1e-7)


def test_joint_trains_one_client_on_all_classes_at_once():
    results = run_simulation(tiny_config("method=joint"))
    assert results["scenario"]["task_sizes"] == [10]
    assert len(results["accuracy_matrix"]) == 1 and len(results["accuracy_matrix"][0]) == 1
    assert results["config"]["scenario"]["num_clients"] == 1
    assert results["task_test_sizes"] == [50]
    assert results["method"] == "joint"


def test_every_method_is_registered():
    assert set(METHODS) == {*WITHIN_TASK_MERGES, "finetune", "joint", "lwf", "ewc", "l2p", "coda-p"}


@pytest.mark.parametrize("method", ["lorm", "head-only", "lorm-fsa"])
def test_analytic_head_is_ridge_regression_on_every_seen_task_s_deployed_features(method):
    cfg = tiny_config(
        f"method={method}", "train.rounds=1", "lorm.head_merge=analytic", "lorm.head_ridge=0.01"
    )
    exp, results, seen_features, seen_labels = run_recording_head_features(cfg)
    features = seen_features.numpy()
    features = np.hstack([features, np.ones((len(features), 1))])
    targets = np.eye(10)[seen_labels.numpy()]
    lam = 0.01 * np.mean(np.sum(features**2, axis=0))
    d = features.shape[1]
    solution = np.linalg.lstsq(
        np.vstack([features, np.sqrt(lam) * np.eye(d)]), np.vstack([targets, np.zeros((d, 10))]), rcond=None
    )[0].T
    weight, bias = exp.server.analytic_head
    np.testing.assert_allclose(weight.double().numpy(), solution[:, :-1], rtol=2e-3, atol=2e-6)
    np.testing.assert_allclose(bias.double().numpy(), solution[:, -1], rtol=2e-3, atol=2e-6)
    assert [r["phase"] for r in results["rounds"]].count("head_stats") == 2
    deployed = exp.server.deployed_arrays()
    assert torch.equal(deployed["head.weight"], weight)
