"""The prompt methods (l2p, coda-p) on a small random ViT: selection, composition, the plain-ViT
identity, the server's FedAvg and deployment, a 2-task run and the model/ it leaves, and the refusal
of a CNN backbone."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from fedlorm.backbones import create_backbone
from fedlorm.cli import main
from fedlorm.config import ConfigError, apply_overrides, validate_config
from fedlorm.export import MODEL_JSON, load_model
from fedlorm.methods import ClientData, Instruction, Phase, add_arrays, step_label
from fedlorm.methods.prompts import (
    PROMPT_WEIGHTS,
    CodaClient,
    CodaPool,
    CodaServer,
    L2PClient,
    L2PPool,
    L2PServer,
    coda_prompt,
    select_prompts,
)
from fedlorm.methods.prompts.coda import orthonormal_rows
from fedlorm.methods.prompts.pool import PREFIX
from fedlorm.methods.prompts.vit import plain_features
from fedlorm.methods.steps import Factor
from fedlorm.methods.validation import check_reply
from fedlorm.runtime.experiment import build_experiment, effective_config
from fedlorm.runtime.simulator import run_simulation

TINY_VIT = dict(img_size=32, patch_size=8, depth=2)
PROMPTS = ["prompt.pool_size=4", "prompt.length=2", "prompt.top_k=2", "prompt.coda_components=2",
           "prompt.coda_length=2", "prompt.coda_layers=[0,1]"]


def _vit_config(method: str, *overrides: str):
    return apply_overrides(tiny_config(f"method={method}", *PROMPTS), list(overrides))


def _model(classes: int = 10):
    torch.manual_seed(0)
    model = create_backbone("vit_tiny_patch16_224", classes, pretrained=False, **TINY_VIT)
    return model.requires_grad_(False).eval()


def _images(n: int = 3) -> torch.Tensor:
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64)


def test_selection_is_the_brute_force_top_n_by_cosine():
    g = torch.Generator().manual_seed(0)
    query, keys = _randn(g, 6, 16), _randn(g, 9, 16)
    index, similarity = select_prompts(query, keys, 4)
    for b in range(6):
        cos = [float(query[b] @ keys[m] / (query[b].norm() * keys[m].norm())) for m in range(9)]
        best = sorted(range(9), key=lambda m: -cos[m])[:4]
        assert index[b].tolist() == best
        assert similarity[b].tolist() == pytest.approx([cos[m] for m in best], abs=1e-12)


def test_coda_prompt_is_the_brute_force_weighted_sum_of_components():
    g = torch.Generator().manual_seed(0)
    B, M, L, D = 3, 5, 4, 7
    q, P, K, A = _randn(g, B, D), _randn(g, M, L, D), _randn(g, M, D), _randn(g, M, D)
    got = coda_prompt(q, P, K, A)
    for b in range(B):
        want = torch.zeros(L, D, dtype=torch.float64)
        for m in range(M):
            a = q[b] * A[m]
            want += float(a @ K[m] / (a.norm() * K[m].norm())) * P[m]
        assert torch.allclose(got[b], want, rtol=0, atol=1e-12)


def test_new_coda_components_are_orthonormal_to_the_earlier_ones():
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 10, generator=g, dtype=torch.float64)
    fresh = orthonormal_rows(old, 4, g)
    assert torch.allclose(fresh @ fresh.T, torch.eye(4, dtype=torch.float64), atol=1e-12)
    assert (fresh @ old.T).abs().max() < 1e-12


@pytest.mark.parametrize(("pool_type", "override"), [(L2PPool, "length"), (CodaPool, "coda_length")])
def test_zero_length_prompts_give_the_plain_vit_features(pool_type, override):
    model = _model()
    x = model.normalize(_images())
    plain = model.encoder(x)
    cfg = _vit_config("l2p")
    cfg = dataclasses.replace(cfg, prompt=dataclasses.replace(cfg.prompt, **{override: 0}))
    pool = pool_type(cfg, model.encoder)
    pool.active, pool.trained = pool.layout(0)
    torch.nn.init.normal_(pool.arrays["P0" if pool_type is CodaPool else "K"])
    features, _ = pool.features(model.encoder, x)
    assert torch.allclose(plain, plain_features(model.encoder, x), rtol=0, atol=1e-6)
    assert torch.allclose(features, plain, rtol=0, atol=1e-5)
    nonzero = pool_type(_vit_config("l2p"), model.encoder)
    nonzero.active, nonzero.trained = nonzero.layout(0)
    for array in nonzero.arrays.values():
        torch.nn.init.normal_(array)
    assert not torch.allclose(nonzero.features(model.encoder, x)[0], plain, atol=1e-3)


def _shares(classes: range, sizes: list[int]) -> list[ClientData]:
    g = torch.Generator().manual_seed(2)
    return [
        ClientData(
            torch.randint(0, 256, (n, 3, 32, 32), generator=g, dtype=torch.uint8),
            torch.randint(classes.start, classes.stop, (n,), generator=g),
        )
        for n in sizes
    ]


@pytest.mark.parametrize(("server_type", "client_type"), [(L2PServer, L2PClient), (CodaServer, CodaClient)])
def test_server_sets_the_sample_weighted_mean_of_the_clients_trained_rows(server_type, client_type):
    cfg = _vit_config("l2p", "train.batch_size=4", "train.lr=0.05")
    model = _model()
    server, client = server_type(cfg, model, {}), client_type(cfg, model, {})
    g = torch.Generator().manual_seed(3)
    for task, classes in enumerate([range(0, 5), range(5, 10)]):
        server.start_task(task, classes, g)
        before = {k: v.clone() for k, v in server.state.items()}
        instruction = Instruction(task, 0, Phase.TRAIN, Factor.PROMPTS, classes.start, classes.stop)
        broadcast, spec = server.arrays(instruction), server.expected_reply(instruction)
        sums, trained, sizes = None, [], [3, 5]
        for k, data in enumerate(_shares(classes, sizes)):
            reply = client.update(broadcast, instruction, data, torch.Generator().manual_seed(k))
            check_reply(reply, spec)
            trained.append({key: value / len(data) for key, value in reply.summands.items() if key != "n"})
            sums = add_arrays(sums, reply.summands)
        server.aggregate(instruction, sums, sum(sizes))
        _, rows = server.pool.layout(task)
        for key in trained[0]:
            mean = sum(n * t[key] for n, t in zip(sizes, trained, strict=True)) / sum(sizes)
            part = rows if key.startswith(PREFIX) else slice(classes.start, classes.stop)
            assert torch.allclose(server.state[key][part].double(), mean, rtol=0, atol=1e-6)
            assert not torch.equal(server.state[key][part], before[key][part])
            untouched = torch.ones(server.state[key].shape[0], dtype=torch.bool)
            untouched[part] = False
            assert torch.equal(server.state[key][untouched], before[key][untouched])


@pytest.mark.parametrize(("method", "numbers"), [("l2p", 4 * 2 * 192 + 4 * 192), ("coda-p", 2 * 2 * 4 * 192)])
def test_two_task_run_on_a_tiny_vit_evaluates_the_deployed_prompts(method, numbers, tmp_path, capsys):
    cfg = _vit_config(method, "model.backbone=vit_tiny_patch16_224", "model.weights=none", "train.lr=0.01")
    exp = build_experiment(cfg)
    results = run_simulation(cfg, tmp_path, experiment=exp)
    assert [len(row) for row in results["accuracy_matrix"]] == [1, 2]
    replies = 2 * cfg.train.rounds * cfg.scenario.num_clients  # each sends its rows, 5 head rows, n
    assert results["upload_bytes"] == replies * 8 * (numbers + 5 * 192 + 5 + 1)
    with (tmp_path / "metrics.csv").open() as f:
        factors = [row["factor"] for row in csv.DictReader(f) if row["phase"] == "train"]
    assert factors == ["prompts"] * 2 * cfg.train.rounds
    exp.server.deploy(exp.model, exp.layers)
    x = _images()
    deployed = exp.model.features(x)
    vit, normalized = exp.model.encoder, exp.model.normalize(x)
    assert torch.equal(deployed, exp.server.pool.features(vit, normalized)[0])
    assert not torch.allclose(deployed, plain_features(vit, normalized), atol=1e-4)

    # model/ holds the prompts: loaded back, it computes the run's final model
    info = json.loads((tmp_path / "model" / MODEL_JSON).read_text())
    assert info["prompts"] == {"weights": PROMPT_WEIGHTS, "task": 1} and "peft_adapter" not in info
    saved = load_model(tmp_path / "model")
    images, labels = exp.test.images, exp.test.labels
    with torch.no_grad():
        want, got = exp.model(images), saved.model(images)
        assert torch.equal(got, want)
        assert not torch.allclose(saved.model.head(plain_features(vit, exp.model.normalize(images))), got)
    hits = got.argmax(dim=1) == labels
    per_task = [100.0 * float(hits[(labels >= c.start) & (labels < c.stop)].double().mean())
                for c in map(exp.scenario.task_classes, range(2))]
    assert per_task == pytest.approx(results["accuracy_matrix"][-1], abs=1e-4)  # the run counts in float32
    assert 100.0 * float(hits.double().mean()) == pytest.approx(results["final_accuracy"], abs=1e-4)

    # fedlorm evaluate and predict on it
    assert main(["evaluate", "--model", str(tmp_path / "model"), "train.threads=1"]) == 0
    printed = re.fullmatch(r"class-IL accuracy ([\d.]+)% on 50 test images of 10 classes \(mnist\)",
                           capsys.readouterr().out.strip())
    assert printed and float(printed[1]) == pytest.approx(results["final_accuracy"], abs=0.005)
    png = tmp_path / "digit.png"
    Image.fromarray(images[3, 0].numpy()).save(png)
    assert main(["predict", "--model", str(tmp_path / "model"), "--top", "2", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    values, indices = want[3].softmax(dim=0).topk(2)
    assert [line.split()[1] for line in lines[1:]] == [exp.class_names[int(i)] for i in indices]
    assert [float(line.split()[0]) for line in lines[1:]] == pytest.approx(values.tolist(), abs=1e-4)


@pytest.mark.parametrize("method", ["l2p", "coda-p"])
def test_a_cnn_backbone_is_refused_in_one_line(method):
    with pytest.raises(ConfigError) as err:
        effective_config(tiny_config(f"method={method}"))
    message = str(err.value)
    assert "\n" not in message
    assert "needs a ViT backbone" in message and "'efficientnet_lite0'" in message
    assert "model.backbone=vit_base_patch16_224.augreg_in21k" in message
    cnn = create_backbone("efficientnet_lite0", 10, pretrained=False)
    with pytest.raises(ConfigError, match="needs a ViT backbone"):
        L2PServer(tiny_config(f"method={method}"), cnn, {})


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("prompt.top_k=11", r"prompt.top_k = 11 is not allowed"),
        ("prompt.coda_length=3", r"prompt.coda_length = 3 is not allowed"),
        ("prompt.coda_layers=[0,0]", r"prompt.coda_layers = \[0, 0\] is not allowed"),
    ],
)
def test_bad_prompt_settings_are_one_line_errors(override, match):
    with pytest.raises(ConfigError, match=match):
        validate_config(tiny_config(override))


def test_prefix_layers_beyond_the_depth_are_refused():
    with pytest.raises(ConfigError, match=r"prompt.coda_layers = \[0, 5\].*blocks 0..1"):
        CodaPool(_vit_config("coda-p", "prompt.coda_layers=[0,5]"), _model().encoder)


def test_a_restored_server_broadcasts_and_deploys_the_same_arrays():
    cfg = _vit_config("coda-p")
    server = CodaServer(cfg, _model(), {})
    server.start_task(1, range(5, 10), torch.Generator().manual_seed(0))
    restored = CodaServer(cfg, _model(), {})
    restored.load_state_dict(server.state_dict())
    instruction = Instruction(1, 0, Phase.TRAIN, Factor.PROMPTS, 5, 10)
    for got, want in [(restored.arrays(instruction), server.arrays(instruction)),
                      (restored.deployed_arrays(), server.deployed_arrays())]:
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("server_type", [L2PServer, CodaServer])
def test_prompt_rounds_are_labelled_by_what_they_train(server_type):
    server = server_type(_vit_config("coda-p", "train.rounds=3"), _model(), {})
    steps = list(server.instructions(1, range(5, 10)))
    assert [step.factor for step in steps] == [Factor.PROMPTS] * 3
    assert [step_label(step) for step in steps] == [f"round {k} (prompts)" for k in (1, 2, 3)]
    assert step_label(steps[0], stable=True) == "task1.round0"
    assert steps[1].to_record()["factor"] == "prompts"
    assert Instruction.from_record(steps[1].to_record()) == steps[1]
    assert Factor.PROMPTS.trained == ()


@pytest.mark.parametrize("server_type", [L2PServer, CodaServer])
def test_deployed_arrays_is_a_getter_and_deploy_loads_the_pool(server_type):
    model = _model()
    server = server_type(_vit_config("coda-p"), model, {})
    server.start_task(0, range(0, 5), torch.Generator().manual_seed(0))
    server.start_task(1, range(5, 10), torch.Generator().manual_seed(1))
    server.state["head.weight"] += 0.5
    pool = server.pool
    before = {name: array.clone() for name, array in pool.arrays.items()}
    first, second = server.deployed_arrays(), server.deployed_arrays()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert (pool.active, pool.task) == (0, None)
    assert all(torch.equal(pool.arrays[name], before[name]) for name in before)
    assert all(float(array.abs().sum()) == 0 for array in pool.arrays.values())  # never loaded: zeros
    assert float(model.head.weight.abs().sum()) == 0

    server.deploy(model, {})
    active = {L2PServer: 4, CodaServer: 2 * 2}[server_type]  # l2p: the whole pool; coda-p: two tasks' 2
    assert (pool.active, pool.task) == (active, 1)
    for name, array in pool.arrays.items():
        assert torch.equal(array[:active], first[PREFIX + name]) and first[PREFIX + name].shape[0] == active
        assert float(array[active:].abs().sum()) == 0
    assert torch.equal(model.head.weight, first["head.weight"])
    assert float(model.head.weight.abs().min()) == 0.5
    x = model.normalize(_images())
    assert torch.equal(model.encoder(x), pool.features(model.encoder, x)[0])


@pytest.mark.parametrize(("server_type", "client_type"), [(L2PServer, L2PClient), (CodaServer, CodaClient)])
def test_a_client_deploying_the_servers_arrays_computes_the_servers_model(server_type, client_type):
    """Federated evaluation loads the broadcast deployed model on each client (Client.deploy): the
    prompts must reach the client's pool, not only the head."""
    cfg = _vit_config("coda-p")
    server_model, client_model = _model(), _model()
    server = server_type(cfg, server_model, {})
    for task, classes in enumerate((range(0, 5), range(5, 10))):
        server.start_task(task, classes, torch.Generator().manual_seed(task))
    server.state["head.weight"] += 0.5
    server.deploy(server_model, {})
    client = client_type(cfg, client_model, {})
    client.deploy(server.deployed_arrays(), 1)
    assert (client.pool.active, client.pool.task) == (server.pool.active, 1)
    images = _images()
    with torch.no_grad():
        want, got = server_model(images), client_model(images)
    assert torch.equal(got, want)

