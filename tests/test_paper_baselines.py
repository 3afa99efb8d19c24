"""The paper's merge baselines ``ties``, ``fisher`` and ``ccvr``, each against a brute-force float64
answer on random small inputs (numpy loops, per-sample autograd loops, stacked data), then run end
to end on the tiny MNIST config."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_config
from torch import nn

from fedlorm.adapters import LoRALinear
from fedlorm.adapters.peft_io import deployed_factors
from fedlorm.compare import check_methods, plan_comparison
from fedlorm.config import ConfigError, validate_config
from fedlorm.methods import METHODS, add_arrays
from fedlorm.methods.arrays import apply_arrays
from fedlorm.methods.base import ClientData, Instruction
from fedlorm.methods.cross_task.ties import TiesMerge, ties_merge
from fedlorm.methods.heads.ccvr import (
    BATCH,
    CCVRHead,
    calibrate,
    class_statistics,
    covariance_factor,
    virtual_features,
)
from fedlorm.methods.within_task import LayerShape
from fedlorm.methods.within_task.fisher import FisherAverage, empirical_fisher
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation

NEW = ("ties", "fisher", "ccvr")


# -- TIES --------------------------------------------------------------------------------------------
def _ties_brute_force(deltas: np.ndarray, density: float, scale: float) -> np.ndarray:
    """TIES by loops: per task keep the top-k |entries|, elect signs, average the agreeing entries."""
    T, size = deltas.shape[0], deltas[0].size
    k = max(1, round(density * size))
    trimmed = np.zeros_like(deltas)
    for t in range(T):
        flat = deltas[t].ravel()
        keep = np.argsort(-np.abs(flat))[:k]
        out = np.zeros(size)
        out[keep] = flat[keep]
        trimmed[t] = out.reshape(deltas[t].shape)
    merged = np.zeros(deltas.shape[1:])
    for index in np.ndindex(*deltas.shape[1:]):
        values = [trimmed[(t, *index)] for t in range(T)]
        elected = np.sign(sum(values))
        agree = [v for v in values if v != 0 and np.sign(v) == elected]
        merged[index] = scale * np.mean(agree) if agree else 0.0
    return merged


@pytest.mark.parametrize(("density", "scale"), [(0.2, 1.0), (0.5, 0.7), (1.0, 1.3)])
def test_ties_merge_is_trim_elect_disjoint_mean(density, scale):
    deltas = torch.randn(4, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = ties_merge(deltas, density, scale).numpy()
    np.testing.assert_allclose(got, _ties_brute_force(deltas.numpy(), density, scale), rtol=1e-13, atol=0)
    if density < 1:
        assert (got == 0).any()  # trimming and disagreement drop entries


def test_ties_rule_re_merges_every_task_and_survives_a_checkpoint():
    deltas = torch.randn(3, 5, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    rule = TiesMerge(1e-10, density=0.3, scale=0.9)
    for t in range(3):
        got = rule.fold("l", deltas[t], None, t + 1, None, dtype=torch.float64)
        want = _ties_brute_force(deltas[: t + 1].numpy(), 0.3, 0.9)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-13)
    restored = TiesMerge(1e-10, density=0.3, scale=0.9)
    restored.load_state_dict(rule.state_dict(), ["l"], torch.device("cpu"))
    assert torch.equal(restored.P["l"], deltas)


def test_ties_runs_end_to_end_and_deploys_an_exactly_exportable_dense_update():
    cfg = tiny_config("method=ties", "train.rounds=1", "scenario.tasks=[3,3,4]", "lorm.ties_density=0.3")
    exp = build_experiment(cfg)
    server, name = exp.server, next(iter(exp.layers))
    deltas = []
    original = server._fold_task

    def record(sums):
        deltas.append(server.scaling * server.B[name].double() @ server.A[name].double())
        original(sums)

    server._fold_task = record
    results = run_simulation(cfg, experiment=exp)
    assert [r["phase"] for r in results["rounds"]] == ["train"] * 3  # TIES needs no statistics
    expected = _ties_brute_force(torch.stack(deltas).numpy(), 0.3, 1.0)
    np.testing.assert_allclose(server.merged[name].double().numpy(), expected, rtol=1e-5, atol=1e-7)
    deployed = server.deployed_arrays()
    assert f"{name}.fixed_delta" in deployed and f"{name}.fixed_B" not in deployed
    apply_arrays(exp.model, exp.layers, deployed)
    for layer in exp.layers.values():  # model/ writes the dense update as exact identity factors
        B, A, s = deployed_factors(layer)
        assert torch.equal(s * (B @ A), layer.frozen_delta())


# -- Fisher ------------------------------------------------------------------------------------------
class _TinyBackbone(nn.Module):
    """What the Fisher merge and CCVR use of a backbone: encoder (LoRA inside), head, normalize."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        rng = torch.Generator().manual_seed(seed)
        self.encoder = nn.Sequential(
            LoRALinear(nn.Linear(6, 5, dtype=torch.float64), 2),
            nn.Tanh(),
            LoRALinear(nn.Linear(5, 4, dtype=torch.float64), 2),
        )
        self.head = nn.Linear(4, 7, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=rng, dtype=torch.float64))

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))

    def layers(self) -> dict[str, LoRALinear]:
        return {"encoder.0": self.encoder[0], "encoder.2": self.encoder[2]}


def _per_sample_gradients(model: _TinyBackbone, x, y, classes: range) -> dict[str, np.ndarray]:
    """Every LoRA factor's gradient of each sample's loss, stacked (n × factor shape), by a loop."""
    params = {f"{n}.lora_{f}": getattr(lay, f"lora_{f}") for n, lay in model.layers().items() for f in "AB"}
    rows: dict[str, list[np.ndarray]] = {k: [] for k in params}
    for i in range(len(y)):
        for p in params.values():
            p.requires_grad_(True)
        logits = model(x[i : i + 1])[:, classes.start : classes.stop]
        loss = nn.functional.cross_entropy(logits, y[i : i + 1] - classes.start)
        for k, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            rows[k].append(g.numpy())
    return {k: np.stack(v) for k, v in rows.items()}


def _fisher_client(seed: int, zero_column: bool = False):
    model = _TinyBackbone(seed)
    rng = torch.Generator().manual_seed(100 + seed)
    n = 5 + seed
    x = torch.randn(n, 6, generator=rng, dtype=torch.float64)
    if zero_column:
        x[:, 0] = 0  # no client's input reaches A's column 0: its Fisher is 0
    y = torch.randint(2, 5, (n,), generator=rng)
    return model, ClientData(x, y)


def test_empirical_fisher_is_the_mean_squared_per_sample_gradient():
    model, data = _fisher_client(0)
    classes = range(2, 5)
    params = {f"{i}.lora_{f}": getattr(model.encoder[i], f"lora_{f}") for i in (0, 2) for f in "AB"}
    got = empirical_fisher(
        model.encoder,
        params,
        data.images,
        data.labels - classes.start,
        readout=lambda z: model.head(z)[:, classes.start : classes.stop],
        chunk_size=3,
    )
    stacked = _per_sample_gradients(model, data.images, data.labels, classes)
    for key, value in got.items():
        np.testing.assert_allclose(value.numpy(), (stacked[f"encoder.{key}"] ** 2).mean(axis=0), rtol=1e-12)


@pytest.mark.parametrize("ridge", [0.0, 1e-10])
def test_fisher_merge_is_the_fisher_weighted_mean_of_the_clients_factors(ridge):
    classes = range(2, 5)
    instruction = Instruction(0, 0, "train", "both", classes.start, classes.stop)
    merge = METHODS["fisher"].within_task
    assert isinstance(merge, FisherAverage)
    clients = [_fisher_client(seed, zero_column=True) for seed in range(3)]
    sums = None
    for model, data in clients:
        reply = merge.data_summands(model, model.layers(), data, instruction, batch_size=4)
        sums = add_arrays(sums, reply)
    A0, B0 = torch.randn(2, 6, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    total = torch.tensor(float(sum(len(d) for _, d in clients)), dtype=torch.float64)
    A, B = merge.solve("encoder.0", "both", sums, total, A0, B0, scaling=1.0, ridge=ridge)
    # Brute force: each client's Fisher from its stacked per-sample gradients, weighted by n_i.
    weighted = {"A": 0.0, "B": 0.0}
    fisher = {"A": 0.0, "B": 0.0}
    for model, data in clients:
        grads = _per_sample_gradients(model, data.images, data.labels, classes)
        for f in "AB":
            F_i = len(data) * (grads[f"encoder.0.lora_{f}"] ** 2).mean(axis=0)
            fisher[f] = fisher[f] + F_i
            weighted[f] = weighted[f] + F_i * getattr(model.encoder[0], f"lora_{f}").detach().numpy()
    for f, got, start in (("A", A, A0), ("B", B, B0)):
        eps = ridge * fisher[f].mean()  # relative, as every solve's ridge
        if ridge == 0:
            safe = np.where(fisher[f] > 0, fisher[f], 1)
            expected = np.where(fisher[f] > 0, weighted[f] / safe, start.numpy())
        else:
            expected = (weighted[f] + eps * start.numpy()) / (fisher[f] + eps)
        np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-13)
    assert (fisher["A"][:, 0] == 0).all() and torch.equal(A[:, 0], A0[:, 0])  # unseen entries keep R
    spec = merge.spec("encoder.0", LayerShape(5, 6, 2), "both", None)
    assert set(spec) <= set(sums) and all(tuple(sums[k].shape) == spec[k].shape for k in spec)


# -- CCVR --------------------------------------------------------------------------------------------
def _ccvr_brute_force_training(W, b, features, labels, *, epochs, lr, generator):
    """Plain SGD on mean cross-entropy with the gradient written out, in numpy float64."""
    W, b, X = W.numpy().copy(), b.numpy().copy(), features.numpy()
    onehot = np.eye(W.shape[0])[labels.numpy()]
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=generator).split(BATCH):
            idx = batch.numpy()
            logits = X[idx] @ W.T + b
            p = np.exp(logits - logits.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            g = (p - onehot[idx]) / len(idx)
            W -= lr * g.T @ X[idx]
            b -= lr * g.sum(axis=0)
    return W, b


def test_covariance_factor_reproduces_singular_covariances():
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    cov = torch.from_numpy(np.cov(x.numpy(), rowvar=False))  # rank 2 < 6
    L = covariance_factor(cov)
    np.testing.assert_allclose((L @ L.T).numpy(), cov.numpy(), atol=1e-12)


def test_covariance_factor_falls_back_to_svd_when_eigh_does_not_converge(monkeypatch):
    # MKL's eigh, one thread, stops unconverged on some low-rank feature covariances (seen with a
    # rank-5 1280 × 1280 one on an AVX-512 CPU); the SVD fallback must give the same factor.
    x = torch.randn(6, 40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    cov = torch.from_numpy(np.cov(x.numpy(), rowvar=False))  # rank 5 < 40

    def unconverged(matrix):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    by_eigh = covariance_factor(cov)
    monkeypatch.setattr(torch.linalg, "eigh", unconverged)
    L = covariance_factor(cov)
    np.testing.assert_allclose((L @ L.T).numpy(), cov.numpy(), atol=1e-12)
    # the symmetric square root: the same factor, hence the same virtual features, either way
    np.testing.assert_allclose(L.numpy(), L.T.numpy(), atol=1e-12)
    np.testing.assert_allclose(L.numpy(), by_eigh.numpy(), atol=1e-10)


def test_ccvr_calibration_is_sgd_on_cross_entropy():
    rng = torch.Generator().manual_seed(3)
    features = torch.randn(150, 4, generator=rng, dtype=torch.float64)
    labels = torch.randint(0, 5, (150,), generator=rng)
    W = torch.randn(5, 4, generator=rng, dtype=torch.float64)
    b = torch.randn(5, generator=rng, dtype=torch.float64)
    got = calibrate(W, b, features, labels, epochs=3, lr=0.1, generator=torch.Generator().manual_seed(9))
    want = _ccvr_brute_force_training(
        W, b, features, labels, epochs=3, lr=0.1, generator=torch.Generator().manual_seed(9)
    )
    np.testing.assert_allclose(got[0].numpy(), want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1].numpy(), want[1], rtol=1e-10, atol=1e-12)


def test_ccvr_statistics_and_head_equal_the_stacked_computation():
    lorm = tiny_config("lorm.ccvr_samples=40", "lorm.ccvr_epochs=2", "lorm.ccvr_lr=0.05").lorm
    head = CCVRHead(lorm, classes=7, features=4)
    stacked_f, stacked_y = [], []
    like = (torch.randn(7, 4, dtype=torch.float64), torch.randn(7, dtype=torch.float64))
    for task, classes in enumerate((range(0, 3), range(3, 6))):
        head.start_task(task, torch.Generator().manual_seed(task))
        instruction = Instruction(task, -1, "head_stats", "none", classes.start, classes.stop)
        sums = None
        for seed in range(3):
            model, _ = _fisher_client(seed)
            rng = torch.Generator().manual_seed(10 * task + seed)
            x = torch.randn(6 + seed, 6, generator=rng, dtype=torch.float64)
            y = torch.randint(classes.start, classes.stop, (len(x),), generator=rng)
            reply = head.feature_summands(model, ClientData(x, y), instruction, batch_size=4, precision="32")
            spec = head.feature_spec(instruction)
            assert {k: tuple(v.shape) for k, v in reply.items()} == {k: s.shape for k, s in spec.items()}
            sums = add_arrays(sums, reply)
            with torch.no_grad():
                stacked_f.append(model.features(x))
            stacked_y.append(y)
        head.fold_features(sums, classes, like)
    seen = 6
    X, Y = torch.cat(stacked_f).numpy(), torch.cat(stacked_y).numpy()
    means = np.stack([X[np.equal(Y, c)].mean(axis=0) for c in range(seen)])
    covs = np.stack([np.cov(X[np.equal(Y, c)], rowvar=False) for c in range(seen)])
    stats = head.stats
    mean, cov = class_statistics(stats["sum"][:seen], stats["count"][:seen], stats["moment"][:seen])
    np.testing.assert_allclose(mean.numpy(), means, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(cov.numpy(), covs, rtol=1e-10, atol=1e-12)
    # The deployed head: brute-force SGD on the same virtual samples, from the trained head's rows.
    generator = torch.Generator().manual_seed(head.seed)
    samples, labels = virtual_features(
        torch.from_numpy(means), torch.from_numpy(covs), torch.arange(seen), 40, generator
    )
    W, b = _ccvr_brute_force_training(
        like[0][:seen], like[1][:seen], samples, labels, epochs=2, lr=0.05, generator=generator
    )
    weight, bias = head.deployed()
    np.testing.assert_allclose(weight[:seen].numpy(), W, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(bias[:seen].numpy(), b, rtol=1e-8, atol=1e-10)
    assert torch.equal(weight[seen:], like[0][seen:]) and torch.equal(bias[seen:], like[1][seen:])
    restored = CCVRHead(lorm, classes=7, features=4)
    restored.load_state_dict(head.state_dict(), "cpu")
    assert restored.seed == head.seed and torch.equal(restored.deployed()[0], weight)


def test_virtual_features_follow_the_class_statistics():
    mean = torch.tensor([[1.0, -2.0], [0.0, 3.0]], dtype=torch.float64)
    cov = torch.tensor([[[2.0, 0.5], [0.5, 1.0]], [[0.3, 0.0], [0.0, 0.1]]], dtype=torch.float64)
    x, y = virtual_features(mean, cov, torch.arange(2), 20000, torch.Generator().manual_seed(0))
    for c in range(2):
        np.testing.assert_allclose(x[y == c].mean(0).numpy(), mean[c].numpy(), atol=0.05)
        np.testing.assert_allclose(np.cov(x[y == c].numpy(), rowvar=False), cov[c].numpy(), atol=0.05)


# -- registration, config, end to end ----------------------------------------------------------------
@pytest.mark.parametrize("method", NEW)
def test_new_methods_run_end_to_end_on_the_tiny_config(method):
    cfg = tiny_config(f"method={method}", "lorm.ccvr_samples=20")
    exp = build_experiment(cfg)
    results = run_simulation(cfg, experiment=exp)
    matrix = results["accuracy_matrix"]
    assert [len(row) for row in matrix] == [1, 2]
    assert all(0 <= a <= 100 for row in matrix for a in row)
    phases = [r["phase"] for r in results["rounds"]]
    assert ("head_stats" in phases) == (method == "ccvr")
    assert ("task_stats" in phases) == (method != "ties")
    if method == "ccvr":
        assert results["config"]["lorm"]["head_merge"] == "ccvr"
        assert torch.equal(exp.server.deployed_arrays()["head.weight"], exp.server.head.deployed()[0])
    # A checkpoint restores the whole server: its own state and the model it deploys.
    state = exp.server.state_dict()
    fresh = build_experiment(exp.cfg).server
    fresh.load_state_dict(state)
    assert fresh.state_dict().keys() == state.keys()
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    deployed, restored = exp.server.deployed_arrays(), fresh.deployed_arrays()
    assert deployed.keys() == restored.keys()
    assert all(torch.equal(restored[k], v) for k, v in deployed.items())


def test_compare_accepts_the_new_methods(tmp_path):
    assert check_methods(list(NEW)) == list(NEW)
    plan = plan_comparison(tiny_config(), list(NEW), [0], tmp_path)
    assert [p.method for p in plan] == list(NEW)
    assert plan[2].cfg.lorm.head_merge == "ccvr"
    assert all(METHODS[m].summary for m in NEW)


@pytest.mark.parametrize(
    ("override", "allowed"),
    [
        ("lorm.ties_density=0", "(0, 1]"),
        ("lorm.ties_density=1.5", "(0, 1]"),
        ("lorm.ties_scale=0", "> 0"),
        ("lorm.ccvr_samples=0", ">= 1"),
        ("lorm.ccvr_epochs=0", ">= 1"),
        ("lorm.ccvr_lr=-1", "> 0"),
    ],
)
def test_new_config_keys_are_validated_in_one_line(override, allowed):
    key, bad = override.split("=")
    with pytest.raises(ConfigError) as error:
        validate_config(tiny_config(override))
    message = str(error.value)
    assert "\n" not in message and key in message and bad in message and allowed in message
