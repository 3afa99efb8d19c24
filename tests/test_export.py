"""The model a run leaves (``model/``): plain timm + peft reproduce the run's logits, fedlorm loads it
back (a prompt pool and a model without LoRA layers too), and ``fedlorm predict`` / ``fedlorm evaluate``
use it."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from fedlorm.adapters import lora_layers
from fedlorm.adapters.peft_io import adapter_ranks
from fedlorm.backbones import create_backbone
from fedlorm.cli import main
from fedlorm.export import (
    BASE_WEIGHTS,
    HEAD_WEIGHTS,
    MODEL_JSON,
    PROJECTION_WEIGHTS,
    load_model,
    save_model,
)
from fedlorm.methods.prompts import PROMPT_WEIGHTS, L2PServer
from fedlorm.methods.prompts.vit import plain_features
from fedlorm.runtime.experiment import Experiment, build_experiment
from fedlorm.runtime.report import save_run_model
from fedlorm.runtime.simulator import run_simulation

pytest.importorskip("peft")

MODEL_DOC = Path(__file__).resolve().parents[1] / "docs" / "outputs.md"
"""The page whose section "The model a run leaves" holds the timm + peft snippet this file runs."""
SNIPPET_PATH = 'path = "runs/default-lorm-s0/model"'


@dataclass
class Run:
    """A finished run: its directory, experiment, results, and test images with the run's logits."""

    out: Path
    exp: Experiment
    results: dict
    x: torch.Tensor
    logits: torch.Tensor

    @property
    def model_dir(self) -> Path:
        return self.out / "model"


def _finished_run(out: Path, *overrides: str) -> Run:
    cfg = tiny_config("train.threads=1", *overrides)
    exp = build_experiment(cfg)
    results = run_simulation(cfg, out, experiment=exp)
    exp.server.deploy(exp.model, exp.layers)
    x = exp.model.preprocessing.test_input(exp.test.images[::7][:8])
    with torch.no_grad():
        logits = exp.model(x)
    return Run(out, exp, results, x, logits)


@pytest.fixture(scope="module")
def lite0_run(tmp_path_factory) -> Run:
    """EfficientNet-Lite0, 2 tasks with diagonal statistics: the earlier task is a merged factor pair."""
    return _finished_run(tmp_path_factory.mktemp("lite0") / "run", "lorm.head_merge=analytic")


@pytest.fixture(scope="module")
def projected_run(tmp_path_factory) -> Run:
    """EfficientNet-Lite0 with the analytic head on 48 random ReLU features (lorm.head_projection)."""
    return _finished_run(
        tmp_path_factory.mktemp("projected") / "run", "lorm.head_merge=analytic", "lorm.head_projection=48"
    )


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Run:
    """timm's tiny random ViT with full statistics: the merged update is dense."""
    return _finished_run(
        tmp_path_factory.mktemp("vit") / "run",
        "model.backbone=test_vit",
        "model.weights=none",
        "lorm.alpha_backbone=0.5",
    )


def _documented_snippet() -> str:
    section = MODEL_DOC.read_text().split("## The model a run leaves", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1 and SNIPPET_PATH in blocks[0]
    return blocks[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["lite0_run", "vit_run", "projected_run"])
def test_timm_and_peft_alone_give_the_runs_logits(name, request, tmp_path):
    run: Run = request.getfixturevalue(name)
    torch.save(run.x, tmp_path / "x.pt")
    code = "\n".join(
        [
            "import sys, torch",
            f"x = torch.load({str(tmp_path / 'x.pt')!r})",
            _documented_snippet().replace(SNIPPET_PATH, f"path = {str(run.model_dir)!r}"),
            f"torch.save(logits.detach(), {str(tmp_path / 'logits.pt')!r})",
            "assert 'fedlorm' not in sys.modules, 'the snippet imported fedlorm'",
        ]
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    theirs = torch.load(tmp_path / "logits.pt")
    assert theirs.shape == run.logits.shape == (len(run.x), 10)
    assert run.logits.abs().max() > 0.1  # the head is trained: a wrong load would show
    # fedlorm evaluates each LoRA layer as one merged matrix (and a CNN in channels-last layout),
    # peft as the base plus two thin products: the same function, float32 round-off apart.
    torch.testing.assert_close(theirs, run.logits, rtol=1e-4, atol=1e-4)


def test_lite0_model_holds_the_merged_factor_pairs_and_the_analytic_head(lite0_run):
    run = lite0_run
    rank = run.exp.cfg.model.rank
    for layer in run.exp.layers.values():  # two tasks of rank 2 merged: factor pairs of width <= 4
        assert layer.fixed_B is not None and layer.fixed_delta is None
        assert torch.count_nonzero(layer.lora_B) == 0
    ranks = adapter_ranks(run.model_dir)
    assert list(ranks) == [name.removeprefix("encoder.") for name in run.exp.layers]
    widths = {name: run.exp.layers[f"encoder.{name}"].fixed_B.shape[1] for name in ranks}
    assert ranks == widths
    assert max(ranks.values()) == 2 * rank
    head = load_file(str(run.model_dir / HEAD_WEIGHTS))
    weight, bias = run.exp.server.analytic_head
    assert torch.equal(head["weight"], weight) and torch.equal(head["bias"], bias)
    info = json.loads((run.model_dir / MODEL_JSON).read_text())
    assert info["timm_model"] == "tf_efficientnet_lite0" and info["timm_kwargs"] == {"num_classes": 0}
    assert info["base_weights"] == BASE_WEIGHTS and (run.model_dir / BASE_WEIGHTS).is_file()
    assert info["class_names"] == [str(d) for d in range(10)]  # MNIST, natural class order
    assert (info["image_size"], info["test_crop"], info["mean"]) == (32, "resize", [0.5, 0.5, 0.5])
    assert info["config"] == run.results["config"] and info["seed"] == 0
    # Without a projection the model stays version 1, as every model written before.
    assert info["format_version"] == 1 and "head_projection" not in info
    assert not (run.model_dir / PROJECTION_WEIGHTS).exists()


def test_a_projected_head_is_written_with_its_r_and_loads_back_exactly(projected_run, tmp_path):
    """model/ holds R (d × M) and the head over σ(F R); it is version 2 and loads back to the run's
    logits bit for bit; a model.json that names a bad activation, a version-1 model with a projection
    and a projection of the wrong width are refused in one line."""
    run = projected_run
    info = json.loads((run.model_dir / MODEL_JSON).read_text())
    assert info["format_version"] == 2
    assert info["head_projection"] == {"weights": PROJECTION_WEIGHTS, "activation": "ReLU"}
    stored = load_file(str(run.model_dir / PROJECTION_WEIGHTS))
    assert list(stored) == ["weight"] and torch.equal(stored["weight"], run.exp.model.projection.weight)
    head = load_file(str(run.model_dir / HEAD_WEIGHTS))
    weight, bias = run.exp.server.analytic_head
    assert head["weight"].shape == (10, 48)
    assert torch.equal(head["weight"], weight) and torch.equal(head["bias"], bias)
    saved = load_model(run.model_dir)
    assert saved.model.projection.activation_name == "relu"
    with torch.no_grad():
        assert torch.equal(saved.model(run.x), run.logits)
        features = saved.model.features(run.x)
        expected = nn.functional.linear(torch.relu(features @ stored["weight"]), head["weight"], head["bias"])
    torch.testing.assert_close(run.logits, expected, rtol=0, atol=1e-5)

    def broken(change):
        folder = tmp_path / f"broken{len(list(tmp_path.iterdir()))}"
        shutil.copytree(run.model_dir, folder)
        change(folder)
        with pytest.raises(ValueError) as err:
            load_model(folder)
        assert "\n" not in str(err.value)
        return str(err.value)

    def edit_json(**fields):
        def change(folder):
            data = json.loads((folder / MODEL_JSON).read_text())
            data.update(fields)
            (folder / MODEL_JSON).write_text(json.dumps(data))

        return change

    assert "head projection activation 'Swish' is unknown; allowed: ReLU, GELU" in broken(
        edit_json(head_projection={"weights": PROJECTION_WEIGHTS, "activation": "Swish"})
    )
    assert "head_projection needs format_version 2" in broken(edit_json(format_version=1))
    assert f"{PROJECTION_WEIGHTS} missing" in broken(lambda folder: (folder / PROJECTION_WEIGHTS).unlink())
    wrong = {"weight": torch.zeros(1280, 7)}  # R of another width than the head's
    assert "holds {'bias': (10,), 'weight': (10, 48)}; the model needs {'weight': (10, 7)" in broken(
        lambda folder: save_file(wrong, str(folder / PROJECTION_WEIGHTS))
    )


def test_vit_model_writes_the_dense_merge_as_an_identity_factorisation(vit_run):
    run = vit_run
    for layer in run.exp.layers.values():
        assert layer.fixed_delta is not None and layer.fixed_B is None
    ranks = adapter_ranks(run.model_dir)
    shapes = {n: (lay.out_features, lay.in_features) for n, lay in run.exp.layers.items()}
    assert ranks == {name.removeprefix("encoder."): min(shape) for name, shape in shapes.items()}
    info = json.loads((run.model_dir / MODEL_JSON).read_text())
    assert info["timm_kwargs"] == {"num_classes": 0, "img_size": 32}
    assert info["base_weights"] == BASE_WEIGHTS  # random weights cannot be fetched again


@pytest.mark.parametrize("name", ["lite0_run", "vit_run", "projected_run"])
def test_load_model_rebuilds_the_run_model(name, request):
    run: Run = request.getfixturevalue(name)
    saved = load_model(run.model_dir)
    assert saved.class_names == run.exp.class_names
    assert saved.preprocessing == run.exp.model.preprocessing
    with torch.no_grad():
        torch.testing.assert_close(saved.model(run.x), run.logits, rtol=0, atol=1e-5)
        uint8 = run.exp.test.images[:4]
        torch.testing.assert_close(saved.model(uint8), run.exp.model(uint8), rtol=0, atol=1e-5)


def test_predict_prints_the_top_classes_of_image_files(lite0_run, tmp_path, capsys):
    run = lite0_run
    picks = [0, 37]
    paths = []
    for i in picks:
        paths.append(tmp_path / f"digit{i}.png")
        Image.fromarray(run.exp.test.images[i, 0].numpy()).save(paths[-1])
    assert main(["predict", "--model", str(run.model_dir), "--top", "3", *map(str, paths)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * 4
    with torch.no_grad():
        probabilities = run.exp.model(run.exp.test.images[picks]).softmax(dim=1)
    for k, path in enumerate(paths):
        block = lines[4 * k : 4 * k + 4]
        assert block[0] == str(path)
        values, indices = probabilities[k].topk(3)
        printed = [line.split() for line in block[1:]]
        assert [name for _, name in printed] == [run.exp.class_names[int(j)] for j in indices]
        assert [float(p) for p, _ in printed] == pytest.approx(values.tolist(), abs=1e-4)


def test_evaluate_scores_the_runs_final_accuracy(lite0_run, capsys):
    run = lite0_run
    assert main(["evaluate", "--model", str(run.model_dir), "train.threads=1"]) == 0
    out = capsys.readouterr().out.strip()
    match = re.fullmatch(r"class-IL accuracy ([\d.]+)% on (\d+) test images of (\d+) classes \(mnist\)", out)
    assert match, out
    assert float(match[1]) == pytest.approx(run.results["final_accuracy"], abs=0.005)
    assert (int(match[2]), int(match[3])) == (sum(run.results["task_test_sizes"]), 10)
    assert main(["evaluate", "--model", str(run.model_dir), "data.test_per_class=2"]) == 0
    assert "on 20 test images of 10 classes" in capsys.readouterr().out


def test_a_run_refuses_an_earlier_model_and_overwrite_replaces_it(lite0_run, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copytree(lite0_run.model_dir, out / "model")
    argv = ["run", "--quiet", "--out", str(out), "--seed", "1", *TINY, "train.threads=1"]
    assert main(argv) == 2
    assert "already holds results (model)" in capsys.readouterr().err
    assert json.loads((out / "model" / MODEL_JSON).read_text())["seed"] == 0
    assert main([*argv, "--overwrite"]) == 0
    assert json.loads((out / "model" / MODEL_JSON).read_text())["seed"] == 1
    assert sorted(p.name for p in out.iterdir()) == ["accuracy.png", "metrics.csv", "model", "results.json"]


@pytest.mark.parametrize("method", ["head-only", "finetune"])
def test_every_method_leaves_a_model_that_loads_back(method, tmp_path):
    """head-only deploys no adapter update (each layer gets a zero rank-one term); finetune deploys
    its one adapter without a frozen update (here with random factors instead of trained ones)."""
    exp = build_experiment(tiny_config(f"method={method}", "train.threads=1"))
    g = torch.Generator().manual_seed(0)
    if method == "finetune":  # head rows and both factors, as if trained
        for key, value in exp.server.state.items():
            exp.server.state[key] = torch.randn(value.shape, generator=g) * 0.1
    save_run_model(exp, tmp_path)
    ranks = adapter_ranks(tmp_path / "model")
    assert set(ranks.values()) == ({1} if method == "head-only" else {exp.cfg.model.rank})
    saved = load_model(tmp_path / "model")
    images = exp.test.images[::9][:6]
    with torch.no_grad():
        expected = exp.model.eval()(images)
        torch.testing.assert_close(saved.model(images), expected, rtol=0, atol=1e-5)
    assert method == "head-only" or expected.abs().max() > 0.1


def test_a_prompt_model_without_lora_layers_saves_and_loads_back(tmp_path, capsys):
    """No peft files (``peft_adapter: false``); the pool's rows in prompts.safetensors, rebuilt by
    ``load_model``; a model.json naming a method without prompts is refused in one line."""
    prompt = ["prompt.pool_size=4", "prompt.length=2", "prompt.top_k=2"]
    cfg = tiny_config("method=l2p", "model.backbone=test_vit", "model.weights=none", *prompt)
    torch.manual_seed(0)
    model = create_backbone("test_vit", 10, pretrained=False, img_size=32).requires_grad_(False).eval()
    server = L2PServer(cfg, model, {})
    server.start_task(0, range(5), torch.Generator().manual_seed(0))
    server.state["head.weight"] = torch.randn(10, 64, generator=torch.Generator().manual_seed(1))
    server.deploy(model, {})
    names = [str(d) for d in range(10)]
    save_model(tmp_path / "model", model, {}, class_names=names, cfg=cfg)
    files = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert files == [BASE_WEIGHTS, HEAD_WEIGHTS, MODEL_JSON, PROMPT_WEIGHTS]
    info = json.loads((tmp_path / "model" / MODEL_JSON).read_text())
    assert info["peft_adapter"] is False and info["prompts"] == {"weights": PROMPT_WEIGHTS, "task": 0}
    rows = load_file(str(tmp_path / "model" / PROMPT_WEIGHTS))
    assert {k: tuple(v.shape) for k, v in rows.items()} == {"P": (4, 2, 64), "K": (4, 64)}
    assert torch.equal(rows["K"], server.state["prompt.K"])

    saved = load_model(tmp_path / "model")
    assert lora_layers(saved.model) == {}
    g = torch.Generator().manual_seed(2)
    images = torch.randint(0, 256, (5, 3, 32, 32), generator=g, dtype=torch.uint8)
    with torch.no_grad():
        want, got = model(images), saved.model(images)
        unprompted = model.head(plain_features(model.encoder, model.normalize(images)))
    assert torch.equal(got, want)
    assert (got - unprompted).abs().max() > 0.1  # the prompts change the logits: a lost pool would show

    Image.fromarray(images[0].permute(1, 2, 0).numpy()).save(tmp_path / "x.png")
    assert main(["predict", "--model", str(tmp_path / "model"), "--top", "1", str(tmp_path / "x.png")]) == 0
    probability, name = capsys.readouterr().out.splitlines()[1].split()
    value, index = want[0].softmax(dim=0).max(dim=0)
    assert (name, float(probability)) == (names[int(index)], pytest.approx(float(value), abs=1e-4))

    info["method"] = "lorm"
    (tmp_path / "model" / MODEL_JSON).write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"method 'lorm', whose prompt pool this fedlorm cannot") as err:
        load_model(tmp_path / "model")
    assert "\n" not in str(err.value) and "l2p, coda-p" in str(err.value)
    with pytest.raises(ValueError, match=r"carries a L2PPool; method 'lorm' does not rebuild one"):
        save_model(tmp_path / "other", model, {}, class_names=names, cfg=tiny_config())
