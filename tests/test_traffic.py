"""Broadcast traffic: low-rank updates travel as exact factor pairs, and download bytes are counted.

The factor forms are checked against brute force: the merged update against least squares on the
stacked, Gram-weighted task deltas (float64), the earlier tasks' sum against Σ B_j A_j, the layer's
factor-form frozen update against the dense one. A smoke run checks the recorded download bytes (each
client is sent only what it does not hold from earlier steps, counted here with ``torch.equal``,
independently of :mod:`fedlorm.runtime.delivery`) and that its accuracies equal those of a run whose
broadcast was turned back into dense matrices.
"""

from __future__ import annotations

import csv
import json

import pytest
import torch
from torch import nn

from fedlorm.adapters import LoRAConv2d, LoRALinear
from fedlorm.config import RunConfig, apply_overrides
from fedlorm.methods import METHODS, Instruction, Kind, payload_bytes
from fedlorm.methods.arrays import apply_arrays
from fedlorm.methods.task_lora import TaskLoRAServer
from fedlorm.presets import preset_config
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation

F64 = torch.float64
LAYER = "layer"
D_OUT, D_IN, RANK, TASKS, UNSEEN = 12, 16, 2, 3, 5  # feature UNSEEN: zero in every task's Gram


class _Model(nn.Module):
    """What TaskLoRAServer reads of a model: the head."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(4, 3 * TASKS).double()


def _server(*overrides: str, d_out: int = D_OUT, d_in: int = D_IN) -> TaskLoRAServer:
    cfg = apply_overrides(RunConfig(), ["train.rounds=2", "model.scaling=0.5", *overrides])
    layers = {LAYER: LoRALinear(nn.Linear(d_in, d_out).double(), rank=RANK)}
    server = METHODS[cfg.method].build_server(cfg, _Model(), layers)
    assert isinstance(server, TaskLoRAServer)
    return server


def _sums(server: TaskLoRAServer, instruction: Instruction, generator: torch.Generator) -> dict:
    """Random sums of the expected reply's shapes; Grams positive, feature UNSEEN never seen."""
    out = {}
    for key, summand in server.expected_reply(instruction).items():
        shape, dtype = summand.shape, summand.dtype
        if summand.kind is Kind.COUNT:
            out[key] = torch.tensor(50.0, dtype=dtype)
        elif summand.kind is Kind.GRAM and len(shape) == 2:
            low = torch.randn(shape[0], 3, generator=generator, dtype=dtype)
            out[key] = low @ low.T + torch.eye(shape[0], dtype=dtype)
        elif summand.kind is Kind.GRAM:
            out[key] = torch.rand(shape, generator=generator, dtype=dtype) + 0.1
            if key == f"{LAYER}.G" and instruction.phase == "task_stats":
                out[key][UNSEEN] = 0.0
        else:
            out[key] = torch.randn(shape, generator=generator, dtype=dtype)
    return out


def _run_tasks(server: TaskLoRAServer, tasks: int = TASKS):
    """Drive the server through ``tasks`` tasks; after each, yield (t, scaling·B_t A_t, its Gram)."""
    generator = torch.Generator().manual_seed(0)
    for task in range(tasks):
        classes = range(3 * task, 3 * task + 3)
        server.start_task(task, classes, generator)
        gram = None
        for instruction in server.instructions(task, classes):
            sums = _sums(server, instruction, generator)
            if instruction.phase == "task_stats":
                gram = sums[f"{LAYER}.G"]
            server.aggregate(instruction, sums, 50)
        # The task's factors as folded: the statistics step leaves them as the last round made them.
        yield task, server.scaling * server.B[LAYER].to(F64) @ server.A[LAYER].to(F64), gram


def _stacked_least_squares(deltas: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """argmin_X Σ_t ‖(X − ΔW_t) diag(g_t)^½‖², minimum norm (unseen features 0), by lstsq."""
    design = torch.cat([torch.diag(g.sqrt()) for g in grams])
    target = torch.cat([torch.diag(g.sqrt()) @ d.T for d, g in zip(deltas, grams, strict=True)])
    return torch.linalg.lstsq(design, target, driver="gelsd").solution.T


def _product(arrays: dict, prefix: str) -> torch.Tensor:
    return arrays[f"{LAYER}.{prefix}_B"].to(F64) @ arrays[f"{LAYER}.{prefix}_A"].to(F64)


@pytest.mark.parametrize(
    "rule, start",
    [
        ("closed_form", "pretrained"),
        ("closed_form", "merged"),
        ("simple_mean", "merged"),
        ("task_arithmetic", "pretrained"),
    ],
)
def test_factor_form_of_the_merged_update_equals_the_brute_force_merge(rule, start):
    server = _server(f"lorm.cross_task={rule}", f"lorm.task_start={start}", "lorm.stats_model=trained")
    deltas, grams, merged = [], [], torch.zeros(D_OUT, D_IN, dtype=F64)
    for task, trained, gram in _run_tasks(server):
        deltas.append(trained + merged if start == "merged" else trained)  # ΔW_t as _task_delta
        grams.append(gram)
        if rule == "closed_form":
            merged = _stacked_least_squares(deltas, grams)
        else:
            merged = sum(deltas) / (len(deltas) if rule == "simple_mean" else 1)
        deployed = server.deployed_arrays()
        assert f"{LAYER}.fixed_delta" not in deployed
        assert deployed[f"{LAYER}.fixed_B"].shape == (D_OUT, RANK * (task + 1))
        torch.testing.assert_close(_product(deployed, "fixed"), merged, rtol=1e-10, atol=1e-12)
    if rule == "closed_form":
        assert not merged[:, UNSEEN].any() and not _product(deployed, "fixed")[:, UNSEEN].any()
    if start == "merged":  # the next task trains on the merged update, sent as the same factors
        server.start_task(TASKS, range(0, 3), torch.Generator().manual_seed(1))
        arrays = server.arrays(next(iter(server.instructions(TASKS, range(0, 3)))))
        torch.testing.assert_close(_product(arrays, "fixed"), merged, rtol=1e-10, atol=1e-12)


def test_earlier_factors_are_the_sum_of_the_task_products_and_nothing_dense_is_broadcast():
    server = _server("lorm.stats_model=reference")
    total = torch.zeros(D_OUT, D_IN, dtype=F64)
    for task, delta, _ in _run_tasks(server):
        total += delta
        for instruction in server.instructions(task + 1, range(0, 3)):
            arrays = server.arrays(instruction)
            assert f"{LAYER}.earlier_sum" not in arrays
            torch.testing.assert_close(_product(arrays, "earlier"), total, rtol=1e-12, atol=1e-14)
            sent = [*arrays.values(), *server.deployed_arrays().values()]
            assert all(v.shape != (D_OUT, D_IN) for v in sent)


def test_full_statistics_send_the_merged_update_dense_and_the_earlier_sum_as_factors():
    server = _server("lorm.stats_model=reference", "lorm.alpha_backbone=0.5")
    total = sum(delta for _, delta, _ in _run_tasks(server, 2))
    deployed = server.deployed_arrays()
    assert f"{LAYER}.fixed_B" not in deployed
    assert torch.equal(deployed[f"{LAYER}.fixed_delta"], server.merged[LAYER])
    arrays = server.arrays(Instruction(2, 0, "train", "B", 6, 9))
    torch.testing.assert_close(_product(arrays, "earlier"), total, rtol=1e-12, atol=1e-14)


def test_the_cheaper_form_is_sent_once_factors_are_wider_than_the_dense_matrix():
    # d_out = 5, d_in = 6, rank 2: two tasks' factors hold 2·2·11 = 44 numbers, the matrix 30.
    server = _server("lorm.stats_model=reference", d_out=5, d_in=6)
    for task, _, _ in _run_tasks(server, 2):
        deployed = server.deployed_arrays()
        arrays = server.arrays(Instruction(task + 1, 0, "train", "B", 0, 3))
        if task == 0:
            assert {f"{LAYER}.fixed_B", f"{LAYER}.earlier_B"} <= set(deployed) | set(arrays)
        else:
            assert f"{LAYER}.fixed_B" not in deployed and f"{LAYER}.earlier_B" not in arrays
            assert torch.equal(deployed[f"{LAYER}.fixed_delta"], server.merged[LAYER])
            assert arrays[f"{LAYER}.earlier_sum"].shape == (5, 6)


def test_nothing_is_sent_for_tasks_that_trained_no_adapter():
    server = _server("method=head-only", "lorm.stats_model=reference")
    list(_run_tasks(server, 2))
    arrays = server.arrays(Instruction(2, 0, "train", "none", 6, 9))
    assert not any(".fixed" in k or ".earlier" in k for k in [*arrays, *server.deployed_arrays()])


# -- the layer ----------------------------------------------------------------------------------------
def _factors(d_out: int, d_in: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(d_out, k, generator=g, dtype=F64), torch.randn(k, d_in, generator=g, dtype=F64)


@pytest.mark.parametrize("kind", ["linear", "conv-stride1", "conv-stride2"])
def test_a_factor_form_frozen_update_computes_the_dense_one(kind):
    torch.manual_seed(0)
    if kind == "linear":
        layer, x = LoRALinear(nn.Linear(7, 5).double(), rank=2), torch.randn(3, 4, 7, dtype=F64)
    else:
        stride = int(kind[-1])
        layer = LoRAConv2d(nn.Conv2d(7, 5, 1, stride=stride).double(), rank=2)
        x = torch.randn(2, 7, 5, 6, dtype=F64)
    with torch.no_grad():
        layer.lora_B.normal_()
    B, A = _factors(5, 7, 3)
    layer.set_fixed_delta(B @ A)
    dense = layer(x)
    layer.set_fixed_delta((B, A))
    assert layer.fixed_delta is None and layer.fixed_B.shape == (5, 3)
    torch.testing.assert_close(layer(x), dense, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.frozen_delta(), B @ A, rtol=0, atol=0)
    layer.set_fixed_delta(None)
    assert layer.frozen_delta() is None and layer.fixed_A is None


def test_factor_form_state_dicts_load_into_fresh_layers_and_bad_shapes_fail():
    layer = LoRALinear(nn.Linear(7, 5).double(), rank=2)
    B, A = _factors(5, 7, 4)
    layer.set_fixed_delta((B.float(), A.float()))
    assert layer.fixed_B.dtype == F64 and {"fixed_B", "fixed_A"} <= set(layer.state_dict())
    fresh = LoRALinear(nn.Linear(7, 5).double(), rank=2)
    fresh.set_fixed_delta(torch.ones(5, 7))  # the checkpoint's form replaces the layer's
    fresh.load_state_dict(layer.state_dict())
    assert fresh.fixed_delta is None and torch.equal(fresh.frozen_delta(), layer.frozen_delta())
    dense = LoRALinear(nn.Linear(7, 5).double(), rank=2)
    dense.set_fixed_delta(torch.ones(5, 7))
    fresh.load_state_dict(dense.state_dict())
    assert fresh.fixed_B is None and torch.equal(fresh.fixed_delta, torch.ones(5, 7, dtype=F64))
    with pytest.raises(ValueError, match=r"\(5, k\) and \(k, 7\)"):
        layer.set_fixed_delta((B, A[:3]))
    with pytest.raises(ValueError, match=r"\(5, k\) and \(k, 7\)"):
        layer.set_fixed_delta((B.T, A))


def test_apply_arrays_rebuilds_either_form():
    layers = {LAYER: LoRALinear(nn.Linear(7, 5).double(), rank=2)}
    model = _Model()
    B, A = _factors(5, 7, 3)
    apply_arrays(model, layers, {f"{LAYER}.fixed_B": B, f"{LAYER}.fixed_A": A})
    assert torch.equal(layers[LAYER].frozen_delta(), B @ A)
    apply_arrays(model, layers, {f"{LAYER}.fixed_delta": B @ A})
    assert layers[LAYER].fixed_B is None and torch.equal(layers[LAYER].fixed_delta, B @ A)
    apply_arrays(model, layers, {})
    assert layers[LAYER].frozen_delta() is None


# -- a whole run --------------------------------------------------------------------------------------
def _densified(arrays: dict) -> dict:
    """The broadcast with every factor pair replaced by its dense product (the former protocol)."""
    out = {}
    for key, value in arrays.items():
        for prefix, dense in (("fixed", "fixed_delta"), ("earlier", "earlier_sum")):
            if key.endswith(f".{prefix}_B"):
                layer = key[: -len(f".{prefix}_B")]
                product = value.to(F64) @ arrays[f"{layer}.{prefix}_A"].to(F64)
                out[f"{layer}.{dense}"] = product.to(value.dtype)
        if not key.endswith(("_A", "_B")) or ".lora_" in key:
            out[key] = value
    return out


def _smoke_run(out, densify: bool):
    cfg = apply_overrides(preset_config("smoke"), ["train.device=cpu", "train.threads=1"])
    exp = build_experiment(cfg)
    server, sent = exp.server, []
    arrays, deployed = server.arrays, server.deployed_arrays

    def broadcast(instruction):
        value = _densified(arrays(instruction)) if densify else arrays(instruction)
        sent.append({key: array.clone() for key, array in value.items()})
        return value

    server.arrays = broadcast
    if densify:
        server.deployed_arrays = lambda: _densified(deployed())
    return run_simulation(cfg, out, experiment=exp), sent, cfg.scenario.num_clients


@pytest.fixture(scope="module")
def smoke_runs(tmp_path_factory):
    """The smoke preset twice: as broadcast (factors; written to a directory) and densified."""
    threads = torch.get_num_threads()
    out = tmp_path_factory.mktemp("smoke")
    factor = _smoke_run(out, densify=False)
    dense = _smoke_run(None, densify=True)
    torch.set_num_threads(threads)
    return out, factor, dense


def _new_bytes(held: torch.Tensor | None, value: torch.Tensor) -> int:
    """Bytes of ``value`` a client holding ``held`` under its key lacks: none if equal, the rest if
    ``held`` is its leading part along one axis, else all."""
    size = value.element_size()
    if held is None or held.dtype != value.dtype or held.dim() != value.dim():
        return value.numel() * size
    if held.shape == value.shape and torch.equal(held, value):
        return 0
    grown = [d for d in range(value.dim()) if held.shape[d] != value.shape[d]]
    extends = (
        len(grown) == 1
        and 0 < held.shape[grown[0]] < value.shape[grown[0]]
        and torch.equal(value.narrow(grown[0], 0, held.shape[grown[0]]), held)
    )
    return (value.numel() - held.numel() if extends else value.numel()) * size


def _expected_download(sent: list[dict], clients: int) -> list[int]:
    """Each step's download when every client takes part in every step and keeps what it was sent."""
    held: dict[str, torch.Tensor] = {}
    out = []
    for arrays in sent:
        out.append(clients * sum(_new_bytes(held.get(key), value) for key, value in arrays.items()))
        held.update(arrays)
    return out


def test_download_bytes_are_what_each_client_lacks_times_the_clients(smoke_runs):
    out, (results, sent, clients), (dense, dense_sent, _) = smoke_runs
    expected = _expected_download(sent, clients)
    assert [r["download_bytes"] for r in results["rounds"]] == expected
    assert results["download_bytes"] == sum(expected) > 0
    with open(out / "metrics.csv", newline="") as handle:
        assert [int(r["download_bytes"]) for r in csv.DictReader(handle)] == expected
    assert json.loads((out / "results.json").read_text())["download_bytes"] == sum(expected)
    # The first step sends everything; each later step of a task less: the factor that did not
    # train and the earlier tasks' update stay with the clients.
    whole = [payload_bytes(arrays) * clients for arrays in sent]
    steps = len(sent) // 2
    assert expected[0] == whole[0] and all(e < w for e, w in zip(expected[1:], whole[1:], strict=True))
    assert expected[steps] > max(expected[1:steps])  # a new task: new factors, and the earlier ones
    # Task 0 sends no earlier update; task 1 sends it once, as factors smaller than its sum.
    dense_bytes = [r["download_bytes"] for r in dense["rounds"]]
    assert dense_bytes == _expected_download(dense_sent, clients)
    assert expected[:steps] == dense_bytes[:steps]
    assert expected[steps] < dense_bytes[steps]
    assert expected[steps + 1 :] == dense_bytes[steps + 1 :]
    assert any(k.endswith(".earlier_B") for k in sent[-1])
    assert not any(k.endswith(".earlier_B") for k in dense_sent[-1])


def test_factor_broadcast_leaves_the_smoke_accuracies_as_they_were(smoke_runs):
    _, (results, _, _), (dense, _, _) = smoke_runs
    for key in ("accuracy_matrix", "task_aware_accuracy_matrix"):
        flat = [[v for row in run[key] for v in row] for run in (results, dense)]
        assert [len(row) for row in results[key]] == [1, 2]
        assert flat[0] == pytest.approx(flat[1], abs=1e-6), key
    losses = [[r["train_loss"] for r in run["rounds"] if r["phase"] == "train"] for run in (results, dense)]
    assert len(losses[0]) == 4 and losses[0] == pytest.approx(losses[1], rel=1e-4)
