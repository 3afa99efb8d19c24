"""The random-projection analytic head (``lorm.head_projection``): R from the seed, sums and solve
against a float64 ridge on the stacked projected features, the deployed model, the oracle diagnostic,
and the offline selection tool (benchmarks/head_projection.py) against federated runs."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
import typing
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_recording_head_features, tiny_config
from torch import nn

from fedlorm.backbones import Backbone
from fedlorm.config import ConfigError, LormConfig, apply_overrides
from fedlorm.methods import Instruction, add_arrays
from fedlorm.methods.base import ClientData
from fedlorm.methods.heads import AnalyticHead
from fedlorm.presets import preset_config
from fedlorm.projection import ACTIVATIONS, RandomFeatures, projection_matrix
from fedlorm.runtime.experiment import build_experiment, build_model
from fedlorm.runtime.simulator import run_simulation

ROOT = Path(__file__).resolve().parents[1]
TOOL = ROOT / "benchmarks" / "head_projection.py"
PROJECTED = ["lorm.head_merge=analytic", "lorm.head_projection=96", "lorm.head_ridge=0.01"]

_BRUTE = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + np.vectorize(math.erf)(z / np.sqrt(2.0))),
    "tanh": np.tanh,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "identity": lambda z: z,
}
"""σ in float64 numpy, written out independently of torch's modules."""


def _ridge(h: np.ndarray, y: np.ndarray, ridge: float) -> tuple[np.ndarray, np.ndarray]:
    """[W, b] minimising ‖[H, 1][W, b]ᵀ − Y‖² + λ‖[W, b]‖², λ = ridge·mean(diag [H, 1]ᵀ[H, 1]), by
    least squares on the stacked system [Ĥ; √λ I] against [Y; 0] (float64)."""
    h = np.hstack([h, np.ones((len(h), 1))])
    lam = ridge * np.mean(np.sum(h**2, axis=0))
    d = h.shape[1]
    stacked = np.vstack([h, np.sqrt(lam) * np.eye(d)])
    solution = np.linalg.lstsq(stacked, np.vstack([y, np.zeros((d, y.shape[1]))]), rcond=None)[0].T
    return solution[:, :-1], solution[:, -1]


# -- R ----------------------------------------------------------------------------------------------
def test_the_projection_comes_from_the_seed_alone():
    r = projection_matrix(1280, 500, seed=0)
    assert r.dtype == torch.float32 and r.shape == (1280, 500)
    assert torch.equal(r, projection_matrix(1280, 500, seed=0))
    assert not torch.equal(r, projection_matrix(1280, 500, seed=1))
    # N(0, 1/d): mean 0 and variance 1/d over 640 000 draws (standard errors 1.6e-5 and 2.2e-6).
    assert abs(float(r.double().mean())) < 1e-4
    assert float(r.double().var()) * 1280 == pytest.approx(1.0, abs=0.01)
    # The run's model carries exactly this R, rebuilt identically by every process that builds it.
    cfg = tiny_config("lorm.head_merge=analytic", "lorm.head_projection=500")
    model, _ = build_model(cfg, 10, torch.device("cpu"))
    again, _ = build_model(cfg, 10, torch.device("cpu"))
    assert torch.equal(model.projection.weight, r) and torch.equal(again.projection.weight, r)
    other, _ = build_model(apply_overrides(cfg, ["seed=1"]), 10, torch.device("cpu"))
    assert not torch.equal(other.projection.weight, r)
    plain, _ = build_model(tiny_config(), 10, torch.device("cpu"))
    assert plain.projection is None


def test_the_config_offers_every_activation_the_projection_knows():
    hint = typing.get_type_hints(LormConfig)["head_activation"]
    assert typing.get_args(hint) == tuple(ACTIVATIONS)
    assert LormConfig().head_projection == 0 and LormConfig().head_activation == "relu"


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_random_features_are_the_activation_of_f_r_at_float32_whatever_the_autocast(activation):
    g = torch.Generator().manual_seed(3)
    features = torch.randn(40, 24, generator=g) * 3
    matrix = projection_matrix(24, 70, seed=5)
    layer = RandomFeatures(matrix, activation)
    expected = _BRUTE[activation](features.double().numpy() @ matrix.double().numpy())
    got = layer(features)
    assert got.dtype == torch.float32 and got.shape == (40, 70)
    np.testing.assert_allclose(got.double().numpy(), expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(features), got)


# -- the sums and the solve ---------------------------------------------------------------------------
def _pixel_backbone(side: int, classes: int) -> Backbone:
    """A real Backbone whose pooled features are its float input's pixels (encoder = flatten), so
    random images are random features F with d = 3·side²."""
    d = 3 * side * side
    model = Backbone(
        nn.Flatten(),
        nn.Linear(d, classes),
        name="pixels",
        feature_dim=d,
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
        lora_targets="^$",
        img_size=side,
    )
    return model.requires_grad_(False)


@pytest.mark.parametrize(("width", "activation"), [(96, "relu"), (20, "tanh")])
def test_federated_projected_sums_solve_the_centralised_ridge_on_every_seen_task(width, activation):
    """Random images through a pixel backbone, 3 clients per task, 2 tasks of 3 classes: after each
    task the server's head equals the float64 ridge least squares on the stacked σ(F R) of every
    seen task's data of every client, and its unseen rows are 0."""
    side, classes, ridge = 4, 6, 0.05
    lorm = LormConfig(
        head_merge="analytic", head_projection=width, head_activation=activation, head_ridge=ridge
    )
    model = _pixel_backbone(side, classes)
    model.projection = RandomFeatures(projection_matrix(model.feature_dim, width, seed=11), activation)
    client, server = (
        AnalyticHead(lorm, classes, model.feature_dim),
        AnalyticHead(lorm, classes, model.feature_dim),
    )
    g = torch.Generator().manual_seed(7)
    like = (torch.zeros(classes, model.feature_dim), torch.zeros(classes))
    seen_f, seen_y = [], []
    for task in range(2):
        instruction = Instruction(task, -1, "head_stats", "none", 3 * task, 3 * task + 3)
        sums = None
        for _ in range(3):
            n = int(torch.randint(8, 30, (1,), generator=g))
            images = torch.rand(n, 3, side, side, generator=g)
            labels = torch.randint(3 * task, 3 * task + 3, (n,), generator=g)
            reply = client.feature_summands(
                model, ClientData(images, labels), instruction, batch_size=7, precision="32"
            )
            assert reply["head.features.G"].shape == (width + 1, width + 1)
            sums = add_arrays(sums, reply)
            seen_f.append(images.flatten(1).double().numpy())
            seen_y.append(labels.numpy())
        server.fold_features(sums, instruction.classes, like=like)
        h = _BRUTE[activation](np.vstack(seen_f) @ model.projection.weight.double().numpy())
        seen = 3 * task + 3
        weight, bias = _ridge(h, np.eye(seen)[np.concatenate(seen_y)], ridge)
        deployed_weight, deployed_bias = server.deployed()
        assert deployed_weight.shape == (classes, width) and deployed_weight.dtype == torch.float32
        np.testing.assert_allclose(deployed_weight[:seen].double().numpy(), weight, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(deployed_bias[:seen].double().numpy(), bias, rtol=1e-4, atol=1e-5)
        assert not deployed_weight[seen:].any() and not deployed_bias[seen:].any()
    # The deployed model applies R and this head; the trained head on F goes along for local training.
    arrays = server.deployed_arrays(like)
    assert sorted(arrays) == ["head.bias", "head.projected.bias", "head.projected.weight", "head.weight"]
    assert arrays["head.weight"] is like[0]


def test_a_model_without_its_projection_cannot_collect_projected_sums():
    lorm = LormConfig(head_merge="analytic", head_projection=8)
    model = _pixel_backbone(2, 4)
    instruction = Instruction(0, -1, "head_stats", "none", 0, 2)
    data = ClientData(torch.rand(3, 3, 2, 2), torch.tensor([0, 1, 0]))
    with pytest.raises(ValueError, match=r"lorm.head_projection = 8 but the model's projection is 0 wide"):
        AnalyticHead(lorm, 4, model.feature_dim).feature_summands(
            model, data, instruction, batch_size=4, precision="32"
        )


@pytest.mark.parametrize("method", ["lorm-fsa", "head-only"])
def test_a_run_deploys_the_ridge_solve_on_every_seen_task_s_projected_features(method):
    """Through the whole protocol on real images: the server's head is the float64 ridge on σ(F R)
    of the features the clients' deployed models produced, and the deployed model's logits (which
    the run's accuracies come from) are that head on σ(F R) of the test features."""
    cfg = tiny_config("train.threads=1", "train.rounds=1", f"method={method}", *PROJECTED)
    exp, results, seen_features, seen_labels = run_recording_head_features(cfg)
    r = projection_matrix(exp.model.feature_dim, 96, cfg.seed).double().numpy()
    h = np.maximum(seen_features.numpy() @ r, 0.0)
    weight, bias = _ridge(h, np.eye(10)[seen_labels.numpy()], 0.01)
    got_weight, got_bias = exp.server.analytic_head
    assert got_weight.shape == (10, 96)
    np.testing.assert_allclose(got_weight.double().numpy(), weight, rtol=2e-3, atol=2e-6)
    np.testing.assert_allclose(got_bias.double().numpy(), bias, rtol=2e-3, atol=2e-6)

    exp.server.deploy(exp.model, exp.layers)
    with torch.no_grad():
        logits = exp.model(exp.test.images).double().numpy()
        test_h = np.maximum(exp.model.features(exp.test.images).double().numpy() @ r, 0.0)
    np.testing.assert_allclose(logits, test_h @ weight.T + bias, rtol=0, atol=1e-4)
    hits = logits.argmax(1) == exp.test.labels.numpy()
    assert results["final_accuracy"] == pytest.approx(100.0 * hits.mean(), abs=1e-4)
    head_rows = [np.linalg.norm(weight[c : c + 5], axis=1).mean() for c in (0, 5)]
    diagnostics = results["diagnostics"][-1]["mean_head_row_norm_per_task"]
    np.testing.assert_allclose(diagnostics, head_rows, rtol=1e-3)


def test_the_option_off_leaves_the_run_as_it_was_and_on_changes_only_the_head():
    """lorm-fsa: task 1's adapters train identically with and without the projection (local training
    uses the trained head on F); only the deployed head and its sums differ."""
    cfg = tiny_config("train.threads=1", "train.rounds=1", "method=lorm-fsa", "lorm.head_merge=analytic")
    plain, projected = (
        build_experiment(cfg),
        build_experiment(apply_overrides(cfg, ["lorm.head_projection=96"])),
    )
    a, b = run_simulation(plain.cfg, experiment=plain), run_simulation(projected.cfg, experiment=projected)
    sa, sb = plain.server.state_dict(), projected.server.state_dict()
    for key in sa:
        if not key.startswith("analytic."):
            assert torch.equal(sa[key], sb[key]), key
    assert sa["analytic.gram"].shape == (1281, 1281) and sb["analytic.gram"].shape == (97, 97)
    assert [r["upload_bytes"] for r in a["rounds"] if r["phase"] == "train"] == [
        r["upload_bytes"] for r in b["rounds"] if r["phase"] == "train"
    ]
    head_stats = [r["upload_bytes"] / r["clients"] for r in b["rounds"] if r["phase"] == "head_stats"]
    assert head_stats == [8 * (97 * 97 + 97 * 5)] * 2


def test_the_oracle_head_uses_the_projection_too():
    """head-only never moves the backbone, so the oracle head (re-solved from every task's features
    through the final model, same solver and projection) is the deployed head: same accuracies."""
    results = run_simulation(
        tiny_config(*PROJECTED, "method=head-only", "train.forgetting_diagnostics=true", "train.threads=1")
    )
    report = results["forgetting_diagnostics"]
    assert report["oracle_head_accuracy_per_task"] == pytest.approx(results["accuracy_matrix"][-1], abs=1e-4)
    assert report["oracle_head_final_accuracy"] == pytest.approx(results["final_accuracy"], abs=1e-4)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["lorm.head_projection=-1"], "lorm.head_projection = -1 is not allowed; expected an integer >= 0"),
        (["lorm.head_activation=swish"], "'lorm.head_activation' got 'swish'; allowed: relu, gelu, tanh"),
        (
            ["lorm.head_projection=100"],
            "lorm.head_projection = 100 is not allowed: method 'lorm' runs lorm.head_merge = 'fedavg'",
        ),
        (
            ["lorm.head_projection=100", "method=ccvr", "lorm.head_merge=analytic"],
            "method 'ccvr' runs lorm.head_merge = 'ccvr', and the projection feeds only the analytic head",
        ),
        (
            ["lorm.head_projection=100", "method=joint", "lorm.head_merge=analytic"],
            "lorm.head_projection = 100 is not allowed with method 'joint', which has no analytic head",
        ),
    ],
)
def test_bad_projection_settings_are_one_line_errors_before_any_work(overrides, message):
    with pytest.raises(ConfigError) as err:
        build_experiment(apply_overrides(tiny_config(), overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the selection tool -----------------------------------------------------------------------------
def _tool(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(TOOL), "--threads", "1", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _grid(path: Path) -> dict[tuple[int, str, float], dict]:
    with path.open() as f:
        return {
            (int(r["head_projection"]), r["head_activation"], float(r["head_ridge"])): r
            for r in csv.DictReader(f)
        }


def test_the_selection_tool_gives_the_federated_head_only_accuracy(tmp_path):
    """Smoke, head-only: for each (M, σ, ridge) the tool's accuracy matrix is the federated run's."""
    grid_args = ["--widths", "0,64", "--activations", "relu,tanh", "--ridges", "0.01,0.1"]
    done = _tool("--preset", "smoke", *grid_args, "--csv", str(tmp_path / "grid.csv"))
    assert done.returncode == 0, done.stderr
    grid = _grid(tmp_path / "grid.csv")
    assert len(grid) == 6 and "best on test: lorm.head_projection=" in done.stdout
    for key in [(0, "-", 0.1), (64, "relu", 0.01), (64, "tanh", 0.1)]:
        width, activation, ridge = key
        overrides = [
            "method=head-only",
            "lorm.head_merge=analytic",
            f"lorm.head_ridge={ridge}",
            "train.threads=1",
        ]
        if width:
            overrides += [f"lorm.head_projection={width}", f"lorm.head_activation={activation}"]
        run = run_simulation(apply_overrides(preset_config("smoke"), overrides))
        row = grid[key]
        assert json.loads(row["accuracy_matrix"]) == run["accuracy_matrix"], key
        assert float(row["final_accuracy"]) == pytest.approx(run["final_accuracy"], abs=1e-4)
        assert float(row["average_incremental_accuracy"]) == pytest.approx(
            run["average_incremental_accuracy"], abs=1e-4
        )
        assert int(row["gram_bytes_float64"]) == 8 * ((width or 1280) + 1) ** 2
    assert len({row["final_accuracy"] for row in grid.values()}) > 1  # the grid points differ


def test_the_selection_tool_on_a_first_session_model_gives_the_run_s_accuracy(tmp_path):
    """lorm-fsa's backbone is fixed after task 1, and every task's head sums went through it: the
    tool on its model/ reproduces the run's accuracies; a LoRM model (backbone moved) is refused."""
    projected = ["lorm.head_merge=analytic", "lorm.head_projection=64", "lorm.head_ridge=0.01"]
    cfg = apply_overrides(preset_config("smoke"), ["method=lorm-fsa", *projected, "train.threads=1"])
    run = run_simulation(cfg, tmp_path / "fsa")
    done = _tool(
        "--model",
        str(tmp_path / "fsa" / "model"),
        "--widths",
        "64",
        "--ridges",
        "0.01",
        "--csv",
        str(tmp_path / "grid.csv"),
    )
    assert done.returncode == 0, done.stderr
    row = _grid(tmp_path / "grid.csv")[(64, "relu", 0.01)]
    assert json.loads(row["accuracy_matrix"]) == run["accuracy_matrix"]

    run_simulation(
        apply_overrides(preset_config("smoke"), ["train.threads=1", "train.rounds=1"]), tmp_path / "lorm"
    )
    refused = _tool("--model", str(tmp_path / "lorm" / "model"))
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1 and "Traceback" not in refused.stderr
    assert "comes from method 'lorm', whose backbone moved after its first task" in refused.stderr
    bad = _tool("--preset", "smoke", "--activations", "swish")
    assert bad.returncode == 2 and "--activations 'swish': allowed are relu" in bad.stderr
