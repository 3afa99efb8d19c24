"""The regularised baselines ``lwf`` and ``ewc``: their terms against hand-written float64 answers, the
federated Fisher against per-client per-sample gradients, λ = 0 against ``finetune``, and resume.

Tolerances: float64 inputs must match the hand computation to 1e-12 (relative); float32 inputs to
1e-5. The server's Fisher (float32 per-sample gradients, squared and summed in float64) must match a
float64 model's per-sample gradients to 1e-4 relative to its largest entry. Under autocast (the
Fisher step runs at ``train.precision``, as training) the sums must stay within the precision's
rounding of the float32 ones: 0.03 (bfloat16) and 0.005 (float16) relative on a ViT.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from fedlorm.config import ConfigError, RunConfig, apply_overrides, validate_config
from fedlorm.methods import ClientData, Instruction, Phase, ewc, step_label
from fedlorm.methods.arrays import apply_arrays
from fedlorm.methods.ewc import (
    ANCHOR,
    FISHER,
    EWCClient,
    autocast_squared_gradient_sums,
    fisher_key,
)
from fedlorm.methods.lwf import TEACHER
from fedlorm.methods.regularisers import ewc_penalty, lwf_loss, parameter_paths, squared_gradient_sums
from fedlorm.runtime.engine import run
from fedlorm.runtime.experiment import Experiment, build_experiment, build_model
from fedlorm.runtime.simulator import InProcess, resume_simulation, run_simulation


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: the runs are small and the machine is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- the terms on plain tensors ---------------------------------------------------------------------
def _hand_lwf(z: list[list[float]], z_old: list[list[float]], weight: float, t: float) -> float:
    """λ·T²·mean over rows of Σ_c p_c log(p_c / q_c), in Python floats (float64)."""
    total = 0.0
    for row, old in zip(z, z_old, strict=True):
        q = [math.exp(v / t) for v in row]
        p = [math.exp(v / t) for v in old]
        q = [v / sum(q) for v in q]
        p = [v / sum(p) for v in p]
        total += sum(pc * math.log(pc / qc) for pc, qc in zip(p, q, strict=True))
    return weight * t * t * total / len(z)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("weight, temperature", [(1.0, 2.0), (0.3, 0.7), (2.5, 5.0)])
def test_lwf_loss_matches_a_hand_computation(dtype, rel, weight, temperature):
    rng = torch.Generator().manual_seed(3)
    z = (3 * torch.randn(7, 4, generator=rng, dtype=torch.float64)).to(dtype).requires_grad_(True)
    z_old = (3 * torch.randn(7, 4, generator=rng, dtype=torch.float64)).to(dtype)
    got = lwf_loss(z, z_old, weight=weight, temperature=temperature)
    want = _hand_lwf(z.double().tolist(), z_old.double().tolist(), weight, temperature)
    assert float(got.detach()) == pytest.approx(want, rel=rel)
    # d/dz of λT²·mean KL is λT·(q − p)/N.
    got.backward()
    p = torch.softmax(z_old.double() / temperature, dim=1)
    q = torch.softmax(z.detach().double() / temperature, dim=1)
    want_grad = weight * temperature * (q - p) / z.shape[0]
    torch.testing.assert_close(z.grad.double(), want_grad, rtol=rel, atol=rel * float(want_grad.abs().max()))


def test_lwf_loss_is_zero_for_the_teachers_own_logits():
    z = torch.randn(5, 3, dtype=torch.float64)
    assert float(lwf_loss(z, z.clone(), weight=1.0, temperature=2.0)) == pytest.approx(0.0, abs=1e-15)


@pytest.mark.parametrize("dtype, rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_ewc_penalty_and_its_gradient_match_brute_force(dtype, rel):
    rng = torch.Generator().manual_seed(5)
    shapes = {"a.lora_A": (2, 5), "a.lora_B": (4, 2), "b.lora_A": (3, 3)}
    params = {
        k: torch.randn(s, generator=rng, dtype=torch.float64).to(dtype).requires_grad_(True)
        for k, s in shapes.items()
    }
    anchor = {k: torch.randn(s, generator=rng, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
    fisher = {k: torch.rand(s, generator=rng, dtype=torch.float64).to(dtype) for k, s in shapes.items()}
    weight = 7.5
    got = ewc_penalty(params, anchor, fisher, weight=weight)
    want = 0.0
    for key in shapes:
        for f, theta, star in zip(
            fisher[key].flatten().tolist(),
            params[key].flatten().tolist(),
            anchor[key].flatten().tolist(),
            strict=True,
        ):
            want += weight / 2 * f * (theta - star) ** 2
    assert float(got.detach()) == pytest.approx(want, rel=rel)
    got.backward()
    for key in shapes:
        for j, (f, theta, star) in enumerate(
            zip(
                fisher[key].flatten().tolist(),
                params[key].flatten().tolist(),
                anchor[key].flatten().tolist(),
                strict=True,
            )
        ):
            assert float(params[key].grad.flatten()[j]) == pytest.approx(
                weight * f * (theta - star), rel=rel, abs=1e-30
            )


def test_ewc_penalty_refuses_nothing_to_penalise():
    with pytest.raises(ValueError, match="at least one array"):
        ewc_penalty({}, {}, {}, weight=1.0)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.lwf_lambda=-1", "train.lwf_lambda"),
        ("train.lwf_lambda=inf", "train.lwf_lambda"),
        ("train.lwf_temperature=0", "train.lwf_temperature"),
        ("train.ewc_lambda=-0.5", "train.ewc_lambda"),
        ("train.ewc_lambda=nan", "train.ewc_lambda"),
    ],
)
def test_config_rejects_bad_weights(override, key):
    cfg = apply_overrides(RunConfig(), [override])
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_config(cfg)


# -- the federated Fisher ---------------------------------------------------------------------------
class _Recorder(EWCClient):
    """EWCClient that keeps the broadcast of each Fisher step (the test rebuilds the sums from it)."""

    fisher_arrays: dict[int, dict[str, torch.Tensor]]

    def update(self, arrays, instruction, data, generator):
        if instruction.phase is Phase.FISHER_STATS:
            self.fisher_arrays[instruction.task] = {k: v.clone() for k, v in arrays.items()}
        return super().update(arrays, instruction, data, generator)


def _ewc_experiment(*overrides: str) -> Experiment:
    cfg = tiny_config("method=ewc", *overrides)
    exp = build_experiment(cfg)
    client = _Recorder(cfg, exp.client.model, exp.client.layers)
    client.fisher_arrays = {}
    exp.client = client
    return exp


def _per_sample_fisher64(exp: Experiment, arrays: dict[str, torch.Tensor], task: int, client: int):
    """Client ``client``'s empirical Fisher (1/n_i)·Σ_x g(x)², g from a float64 copy of the model, one
    sample at a time (stacked per-sample gradients), and n_i."""
    model = copy.deepcopy(exp.client.model)
    names = parameter_paths(exp.client.model, exp.client.layers)
    layers = {
        name: model.get_submodule(names[f"{name}.lora_A"].removesuffix(".lora_A"))
        for name in exp.client.layers
    }
    apply_arrays(model, layers, arrays)
    model.double().eval().requires_grad_(False)
    params = {key: model.get_parameter(path) for key, path in names.items() if ".lora_" in key}
    for p in params.values():
        p.requires_grad_(True)
    classes = exp.scenario.task_classes(task)
    data = exp.client_share(task, client)
    rows = {key: [] for key in params}
    for i in range(len(data)):
        image = model.preprocessing.test_input(data.images[i : i + 1]).double()
        logits = model(image)[:, classes.start : classes.stop]
        loss = F.cross_entropy(logits, data.labels[i : i + 1] - classes.start)
        grads = torch.autograd.grad(loss, list(params.values()))
        for key, g in zip(params, grads, strict=True):
            rows[key].append(g.flatten())
    return {key: torch.stack(r).square().mean(dim=0) for key, r in rows.items()}, len(data)


def test_server_fisher_is_the_sample_weighted_mean_of_client_fishers():
    exp = _ewc_experiment()
    run(exp, InProcess())
    arrays = exp.client.fisher_arrays[0]
    assert set(exp.client.fisher_arrays) == {0}  # the last task needs no Fisher
    total, count = None, 0
    for k in range(exp.cfg.scenario.num_clients):
        fisher, n = _per_sample_fisher64(exp, arrays, 0, k)
        weighted = {key: n * f for key, f in fisher.items()}
        total = weighted if total is None else {key: total[key] + weighted[key] for key in total}
        count += n
    server = exp.server
    assert set(server.fisher) == set(total)
    scale = max(float(f.abs().max()) for f in total.values())
    assert scale > 0
    for key, summed in total.items():
        want = (summed / count).reshape(server.fisher[key].shape)
        assert server.fisher[key].dtype == torch.float64
        torch.testing.assert_close(server.fisher[key], want, rtol=1e-4, atol=1e-4 * scale)
    # θ* is the model the Fisher was computed at: task 0's final global factors.
    for key, anchor in server.anchor.items():
        assert torch.equal(anchor, arrays[key])


def test_ewc_broadcasts_anchor_and_fisher_only_after_the_first_task():
    exp = build_experiment(tiny_config("method=ewc"))
    server = exp.server
    classes = exp.scenario.task_classes(0)
    server.start_task(0, classes, torch.Generator().manual_seed(0))
    steps = list(server.instructions(0, classes))
    assert [s.phase for s in steps] == [Phase.TRAIN, Phase.TRAIN, Phase.FISHER_STATS]
    assert not any(k.startswith((ANCHOR, FISHER)) for k in server.arrays(steps[0]))
    last = exp.scenario.task_classes(exp.scenario.num_tasks - 1)
    assert all(s.phase is Phase.TRAIN for s in server.instructions(1, last))


def test_fisher_step_has_its_own_label_and_record():
    step = Instruction(0, -1, "fisher_stats", "none", 0, 5)
    assert step.phase is Phase.FISHER_STATS
    assert (step_label(step), step_label(step, stable=True)) == ("Fisher statistics", "task0.fisher")
    assert Instruction.from_record(step.to_record()) == step


def _fisher_step(exp: Experiment, arrays: dict[str, torch.Tensor], client: int):
    """Client ``client``'s ``fisher_stats`` reply on task 0 at ``arrays``, and the dtypes of the head's
    outputs a forward hook saw during it."""
    classes = exp.scenario.task_classes(0)
    step = Instruction(0, -1, Phase.FISHER_STATS, "none", classes.start, classes.stop)
    seen: list[torch.dtype] = []
    hook = exp.client.model.head.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    try:
        reply = exp.client.update(arrays, step, exp.client_share(0, client), torch.Generator().manual_seed(0))
    finally:
        hook.remove()
    return reply, set(seen)


def _trained_looking_arrays(exp: Experiment) -> dict[str, torch.Tensor]:
    """The server's task-0 broadcast with every B and the head drawn nonzero (at B = 0 the factors A,
    and at a zero head every factor, get no gradient)."""
    server = exp.server
    server.start_task(0, exp.scenario.task_classes(0), torch.Generator().manual_seed(0))
    rng = torch.Generator().manual_seed(11)
    return {
        key: 0.05 * torch.randn(value.shape, generator=rng)
        if key.endswith(".lora_B") or key == "head.weight"
        else value.clone()
        for key, value in server.state.items()
    }


def _relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """‖got − want‖ / ‖want‖ over every array together (Frobenius, float64)."""
    diff = sum(float((got[k].double() - want[k].double()).square().sum()) for k in want)
    return math.sqrt(diff / sum(float(w.double().square().sum()) for w in want.values()))


def test_fisher_summands_follow_the_training_precision():
    """``32``: a client's Σ_x g(x)² is the float64 per-sample answer (1e-4 of its largest entry).
    ``bf16-mixed``: the forward runs under bfloat16 autocast as training does (the head's output is
    bfloat16), the sums are float64 and not float32's. At 8 bits this 32-px EfficientNet gets some
    samples' gradients wrong by their own size (0.15 relative over the client, measured), so only a
    sanity bound here; the accuracy of the reduced-precision sums is checked on a ViT below."""
    exp32 = build_experiment(tiny_config("method=ewc"))
    exp16 = copy.copy(exp32)  # the same data and model, a client that runs at bf16-mixed
    bf16 = tiny_config("method=ewc", "train.precision=bf16-mixed")
    exp16.client = EWCClient(bf16, exp32.model, exp32.layers)
    arrays = _trained_looking_arrays(exp32)
    client = 1
    fisher, n = _per_sample_fisher64(exp32, arrays, 0, client)
    want = {fisher_key(key): f * n for key, f in fisher.items()}
    got32, dtypes32 = _fisher_step(exp32, arrays, client)
    got16, dtypes16 = _fisher_step(exp16, arrays, client)
    assert (dtypes32, dtypes16) == ({torch.float32}, {torch.bfloat16})
    assert got32.num_examples == got16.num_examples == n
    assert set(got32.summands) == set(got16.summands) == {*want, "n"}
    scale = max(float(w.abs().max()) for w in want.values())
    assert scale > 0
    for key, summed in want.items():
        assert got32.summands[key].dtype == got16.summands[key].dtype == torch.float64
        torch.testing.assert_close(got32.summands[key], summed, rtol=1e-4, atol=1e-4 * scale)
    assert 0 < _relative_error(got16.summands, want) < 0.5


@pytest.mark.parametrize("precision, bound", [("bf16-mixed", 0.03), ("16-mixed", 0.005)])
def test_reduced_precision_fisher_is_float32s_within_its_rounding_on_a_vit(precision, bound):
    """ViT-Ti/16 (random weights, 224 px, the paper presets' family), four images: the autocast sums
    are within the precision's rounding of the float32 ones (measured: bfloat16 0.011, float16 0.0016
    relative), and the float32 per-sample loop is :func:`squared_gradient_sums`' vmap to 1e-5."""
    cfg = tiny_config("model.backbone=vit_tiny_patch16_224", "model.weights=none", "data.image_size=224")
    model, layers = build_model(cfg, 10, torch.device("cpu"))
    rng = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=rng))
        model.head.weight.copy_(0.05 * torch.randn(model.head.weight.shape, generator=rng))
    client = EWCClient(cfg, model, layers)
    images = torch.randint(0, 256, (4, 3, 224, 224), dtype=torch.uint8, generator=rng)
    data = ClientData(images, torch.tensor([0, 1, 2, 3]))
    args = {"classes": range(0, 5), "batch_size": 4}
    want = autocast_squared_gradient_sums(model, client.factors, data, precision="32", **args)
    paths = {client.paths[key]: factor for key, factor in client.factors.items()}
    by_path = squared_gradient_sums(model, paths, data, **args)
    assert _relative_error({k: by_path[client.paths[k]] for k in want}, want) < 1e-5
    got = autocast_squared_gradient_sums(model, client.factors, data, precision=precision, **args)
    assert all(v.dtype == torch.float64 for v in got.values())
    assert 0 < _relative_error(got, want) < bound


def test_float16_fisher_scales_the_loss_and_backs_off(monkeypatch):
    """``16-mixed`` (float16 autocast, here on the CPU) scales the loss as training's scaler does. A
    first scale of 2⁴⁰ overflows float16 and is halved, the sample redone, at least 24 times; scaling
    by powers of two is exact, so the sums are the default scale's bit for bit, and finite."""
    exp = build_experiment(tiny_config("method=ewc"))
    apply_arrays(exp.client.model, exp.client.layers, _trained_looking_arrays(exp))
    model, factors = exp.client.model, exp.client.factors
    data = exp.client_share(0, 1)
    args = {"classes": exp.scenario.task_classes(0), "batch_size": exp.cfg.train.batch_size}
    default = autocast_squared_gradient_sums(model, factors, data, precision="16-mixed", **args)
    forwards: list[torch.dtype] = []
    hook = model.head.register_forward_hook(lambda module, a, out: forwards.append(out.dtype))
    monkeypatch.setattr(ewc, "FP16_LOSS_SCALE", 2.0**40)
    try:
        got = autocast_squared_gradient_sums(model, factors, data, precision="16-mixed", **args)
    finally:
        hook.remove()
    assert set(forwards) == {torch.float16}
    assert len(forwards) - len(data) >= 24  # each halving redoes one sample
    assert all(v.dtype == torch.float64 and bool(torch.isfinite(v).all()) for v in got.values())
    for key, value in default.items():
        assert torch.equal(got[key], value), key


# -- whole runs -------------------------------------------------------------------------------------
def _train_rows(results: dict) -> list[tuple[int, int, float]]:
    return [(r["task"], r["round"], r["train_loss"]) for r in results["rounds"] if r["phase"] == "train"]


@pytest.mark.parametrize("override", ["method=lwf train.lwf_lambda=0", "method=ewc train.ewc_lambda=0"])
def test_zero_weight_gives_finetunes_numbers(override):
    base = build_experiment(tiny_config("method=finetune"))
    want = run_simulation(base.cfg, experiment=base)
    exp = build_experiment(tiny_config(*override.split()))
    got = run_simulation(exp.cfg, experiment=exp)
    assert got["accuracy_matrix"] == want["accuracy_matrix"]
    assert _train_rows(got) == _train_rows(want)
    deployed, reference = exp.server.deployed_arrays(), base.server.deployed_arrays()
    assert deployed.keys() == reference.keys()
    for key, value in reference.items():
        assert torch.equal(deployed[key], value), key


def test_lwf_broadcasts_the_teacher_from_the_second_task_on():
    exp = build_experiment(tiny_config("method=lwf"))
    server, scenario = exp.server, exp.scenario
    gen = torch.Generator().manual_seed(0)
    server.start_task(0, scenario.task_classes(0), gen)
    first = next(iter(server.instructions(0, scenario.task_classes(0))))
    assert not any(k.startswith(TEACHER) for k in server.arrays(first))
    server.start_task(1, scenario.task_classes(1), gen)
    step = Instruction(1, 0, "train", "both", scenario.task_classes(1).start, scenario.task_classes(1).stop)
    arrays = server.arrays(step)
    for key, value in server.state.items():
        assert torch.equal(arrays[TEACHER + key], value)


class _Crash(InProcess):
    """The in-process transport, failing when it reaches one step (a crash between checkpoints)."""

    def __init__(self, at: tuple[int, int]) -> None:
        super().__init__()
        self.at = at

    def run_step(self, exp, instruction, clients, advance):
        if (instruction.task, instruction.round) == self.at:
            raise RuntimeError("crash")
        return super().run_step(exp, instruction, clients, advance)


@pytest.mark.parametrize("method", ["lwf", "ewc"])
def test_method_runs_end_to_end_and_resumes(method, tmp_path: Path):
    cfg = tiny_config(f"method={method}", "train.threads=1")
    exp = build_experiment(cfg)
    want = run_simulation(cfg, experiment=exp)
    assert len(want["accuracy_matrix"]) == 2
    assert all(math.isfinite(loss) for _, _, loss in _train_rows(want))
    # The server's state round-trips into a fresh server.
    fresh = build_experiment(cfg).server
    fresh.load_state_dict(exp.server.state_dict())
    state, restored = exp.server.state_dict(), fresh.state_dict()
    assert state.keys() == restored.keys()
    assert any(k.startswith((TEACHER, ANCHOR)) for k in state)
    for key, value in state.items():
        assert torch.equal(restored[key], value), key
    # Crash in task 1's second round: the checkpoint holds the teacher (lwf) or anchor and Fisher (ewc).
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="crash"):
        run(build_experiment(cfg), _Crash((1, 1)), out)
    got = resume_simulation(out)
    assert got["accuracy_matrix"] == want["accuracy_matrix"]
    assert _train_rows(got) == _train_rows(want)
