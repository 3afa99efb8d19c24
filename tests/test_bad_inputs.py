"""The bad-input catalogue: every malformed input is one clear line, exit code 2 or ValueError, no change.

CLI cases go through ``fedlorm.cli.main`` in process (an exception other than the one-line error
would propagate and fail the test, so a pass means no traceback); one case runs the real console
command to check stderr for a traceback. Each CLI case hashes the output directory before and after:
nothing in it may change, whether it did not exist, held an earlier run's results, or a checkpoint.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config

from fedlorm import merging
from fedlorm.cli import main
from fedlorm.config import RunConfig, apply_overrides, config_to_dict, load_toml
from fedlorm.export import BASE_WEIGHTS, HEAD_WEIGHTS, MODEL_JSON, save_model
from fedlorm.presets import preset_config
from fedlorm.runtime.checkpoint import CHECKPOINT_RECORD, load_checkpoint, save_checkpoint
from fedlorm.runtime.experiment import build_model
from fedlorm.runtime.progress import RunProgress


@dataclass
class Files:
    """Malformed files and folders made once per test module."""

    root: Path
    paths: dict[str, Path] = field(default_factory=dict)

    def __getitem__(self, name: str) -> str:
        return str(self.paths[name])


def _write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data)
    else:
        path.write_bytes(data)
    return path


def _png(path: Path, shade: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (64, 64), (shade, 255 - shade, 40)).save(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    root = tmp_path_factory.mktemp("bad")
    f = Files(root)
    p = f.paths
    p["file"] = _write(root / "a_file.txt", "not a directory\n")
    p["toml_syntax"] = _write(root / "syntax.toml", "[train]\nrounds = = 3\n")
    p["toml_key"] = _write(root / "key.toml", "[train]\nroundz = 3\n")
    p["toml_type"] = _write(root / "type.toml", "[train]\nrounds = 'five'\n")
    p["toml_section"] = _write(root / "section.toml", "train = 3\n")
    p["toml_binary"] = _write(root / "binary.toml", b"\xff\xfe\x00rounds")
    p["toml_dir"] = root / "conf.d"
    p["toml_dir"].mkdir()
    p["empty"] = root / "empty"
    p["empty"].mkdir()
    # MNIST idx files in the wrong place (one level too deep) and with garbage content.
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    p["nested"] = root / "nested"
    for stem in stems:
        _write(root / "nested" / "mnist" / "deeper" / stem, b"\x00\x00\x08\x03")
    p["corrupt_idx"] = root / "corrupt_idx"
    for stem in stems:
        _write(root / "corrupt_idx" / stem, b"\x00\x00\x08\x03" + bytes(range(60)))
    # EuroSAT-style class folders with one corrupt image among valid ones.
    p["eurosat"] = root / "eurosat_root"
    for c, cls in enumerate(["AnnualCrop", "Forest", "River", "SeaLake"]):
        for i in range(3):
            _png(root / "eurosat_root" / "EuroSAT_RGB" / cls / f"{cls}_{i}.png", 40 * c + i)
    p["corrupt_image"] = _write(root / "eurosat_root" / "EuroSAT_RGB" / "Forest" / "Forest_9.png",
                                b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    # Weights: truncated, of another architecture, not a weights file at all.
    full = root / "full.pth"
    torch.save({f"layer{i}.weight": torch.randn(64, 64) for i in range(4)}, full)
    p["weights_truncated"] = _write(root / "truncated.pth", full.read_bytes()[:3000])
    p["weights_other_arch"] = full
    p["weights_text"] = _write(root / "weights.pth", "these are not weights\n")
    # Checkpoints: a sound one (its config is never used), an unreadable record, truncated tensors.
    p["ckpt"] = root / "ckpt"
    save_checkpoint(p["ckpt"], {"config": {}, "completed_step": "task0.round1", "progress": {}},
                    {"server.x": torch.zeros(3)})
    p["ckpt_plan"] = root / "ckpt_plan"  # a sound record whose position is not in the run's plan
    progress = {**RunProgress(task=0, step=1).to_record(), "rounds": [{}]}
    record = {"config": config_to_dict(tiny_config()), "completed_step": "task0.round7", "progress": progress}
    save_checkpoint(p["ckpt_plan"], record, {"server.x": torch.zeros(3)})
    p["ckpt_json"] = root / "ckpt_json"
    _write(p["ckpt_json"] / CHECKPOINT_RECORD, "{not json")
    p["ckpt_cut"] = root / "ckpt_cut"
    save_checkpoint(p["ckpt_cut"], {"config": {}, "progress": {}}, {"server.x": torch.zeros(1000)})
    tensors = p["ckpt_cut"] / load_checkpoint(p["ckpt_cut"]).record["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:200])
    # Saved models: a sound one (untrained), one without its head, one with cut base weights, a
    # broken model.json; and an image to predict on.
    cfg = tiny_config()
    model, layers = build_model(cfg, 10, torch.device("cpu"))
    p["model"] = save_model(root / "model", model, layers, class_names=[str(d) for d in range(10)], cfg=cfg)
    p["model_headless"] = Path(shutil.copytree(p["model"], root / "model_headless"))
    (p["model_headless"] / HEAD_WEIGHTS).unlink()
    p["model_cut_base"] = Path(shutil.copytree(p["model"], root / "model_cut_base"))
    base = p["model_cut_base"] / BASE_WEIGHTS
    base.write_bytes(base.read_bytes()[:5000])
    p["model_json"] = root / "model_json"
    _write(p["model_json"] / MODEL_JSON, "{not json")
    p["image"] = root / "digit.png"
    _png(p["image"], 90)
    return f


@dataclass(frozen=True)
class Case:
    """One CLI invocation: ``argv(files, out)``, a fragment the error line must contain, and what
    the output directory holds before ("none", "results", "checkpoint" or "model")."""

    argv: Callable[[Files, str], list[str]]
    fragment: Callable[[Files], str] | str
    out: str = "none"


def run_args(*extra: str) -> Callable[[Files, str], list[str]]:
    return lambda f, out: ["run", "--quiet", "--out", out, *TINY, *extra]


def predict_args(model: str, *images: str) -> Callable[[Files, str], list[str]]:
    """``fedlorm predict`` on the files fixture's entry ``model`` (or a literal path) and images."""
    def argv(f: Files, out: str) -> list[str]:
        paths = [f[name] if name in f.paths else name for name in (model, *images)]
        return ["predict", "--model", *paths]

    return argv


CLI_CASES: dict[str, Case] = {
    # command line
    "unknown-subcommand": Case(lambda f, out: ["fly"], "'fly'"),
    "unknown-option": Case(run_args("--rounds", "3"), "--rounds"),
    "seed-not-an-integer": Case(run_args("--seed", "x"), "'x'"),
    "seed-negative": Case(run_args("--seed=-1"), "seed = -1"),
    "override-without-equals": Case(run_args("train.rounds"), "'train.rounds'"),
    "override-unknown-key": Case(run_args("train.roundz=2"), "'train.roundz'"),
    "override-wrong-type": Case(run_args("train.rounds=many"), "'many'"),
    "override-bad-choice": Case(run_args("scenario.class_order=sorted"), "'sorted'"),
    "override-out-of-range": Case(run_args("scenario.beta=0"), "scenario.beta = 0.0"),
    "unknown-method": Case(run_args("--method", "nope"), "'nope'"),
    "impossible-partition": Case(run_args("scenario.num_clients=30"), "30"),
    "device-not-a-device": Case(run_args("train.device=tpu9"), "'tpu9'"),
    "precision-unknown": Case(run_args("train.precision=fp8"), "'fp8'"),
    "precision-the-device-cannot-run": Case(
        run_args("train.precision=16-mixed", "train.device=cpu"), "needs a CUDA device"
    ),
    "augment-unknown": Case(run_args("data.augment=mixup"), "'mixup'"),
    "augment-scale-out-of-range": Case(run_args("data.augment_scale=0"), "data.augment_scale = 0.0"),
    "crop-pct-out-of-range": Case(run_args("data.crop_pct=1.5"), "data.crop_pct = 1.5"),
    "normalize-unknown": Case(run_args("data.normalize=clip"), "'clip'"),
    "head-init-unknown": Case(run_args("model.head_init=xavier"), "'xavier'"),
    "adapt-tasks-without-the-analytic-head": Case(
        run_args("lorm.adapt_tasks=1", "lorm.head_merge=fedavg", "lorm.head_projection=0"),
        "lorm.adapt_tasks = 1 is not allowed with lorm.head_merge = 'fedavg'",
    ),
    "adapting-method-without-the-analytic-head": Case(
        run_args("method=lorm-fsa", "lorm.head_merge=ccvr"),
        "method 'lorm-fsa': tasks after the first 1 add their classes to the head through its feature sums",
    ),
    "head-projection-negative": Case(
        run_args("lorm.head_merge=analytic", "lorm.head_projection=-1"), "lorm.head_projection = -1"
    ),
    "head-activation-unknown": Case(run_args("lorm.head_activation=swish"), "'swish'"),
    "head-projection-without-the-analytic-head": Case(
        run_args("lorm.head_projection=100", "lorm.head_merge=regmean"),
        "lorm.head_projection = 100 is not allowed: method 'lorm' runs lorm.head_merge = 'regmean'",
    ),
    "head-projection-with-a-method-without-the-analytic-head": Case(
        run_args("lorm.head_projection=100", "lorm.head_merge=analytic", "method=joint"),
        "lorm.head_projection = 100 is not allowed with method 'joint'",
    ),
    # output directory
    "out-is-a-file": Case(lambda f, out: ["run", "--out", f["file"], *TINY], lambda f: f["file"]),
    "out-below-a-file": Case(
        lambda f, out: ["run", "--out", f["file"] + "/run", *TINY],
        lambda f: f"--out '{f['file']}/run' cannot be created: '{f['file']}' is a file",
    ),
    "compare-out-below-a-file": Case(
        lambda f, out: ["compare", "--methods", "lorm", "--out", f["file"] + "/cmp", *TINY],
        lambda f: f"--out '{f['file']}/cmp' cannot be created",
    ),
    "out-holds-results": Case(run_args(), "already holds results", out="results"),
    "out-holds-a-model": Case(run_args(), "already holds results (model)", out="model"),
    "overwrite-but-bad-weights-keeps-old-results": Case(
        lambda f, out: ["run", "--overwrite", "--out", out, *TINY, "model.weights=/does/not/exist.pth"],
        "pretrained weights file '/does/not/exist.pth'",
        out="results",
    ),
    "out-holds-a-checkpoint": Case(run_args(), "--resume", out="checkpoint"),
    # resume
    "resume-without-checkpoint": Case(lambda f, out: ["run", "--resume", f["empty"]], lambda f: f["empty"]),
    "resume-a-file": Case(lambda f, out: ["run", "--resume", f["file"]], lambda f: f["file"]),
    "resume-with-a-seed": Case(lambda f, out: ["run", "--resume", f["ckpt"], "--seed", "1"], "--seed"),
    "resume-with-overrides": Case(
        lambda f, out: ["run", "--resume", f["ckpt"], "train.rounds=9"], "overrides"
    ),
    "resume-unreadable-record": Case(
        lambda f, out: ["run", "--resume", f["ckpt_json"]], "is not readable JSON"
    ),
    "resume-truncated-tensors": Case(lambda f, out: ["run", "--resume", f["ckpt_cut"]], "truncated"),
    "resume-damaged-progress": Case(lambda f, out: ["run", "--resume", f["ckpt"]], "is damaged"),
    "resume-position-not-in-plan": Case(
        lambda f, out: ["run", "--resume", f["ckpt_plan"]], "after 'task0.round7') does not fit"
    ),
    # config files
    "config-missing": Case(run_args("--config", "/does/not/exist.toml"), "/does/not/exist.toml"),
    "config-syntax": Case(lambda f, out: run_args("--config", f["toml_syntax"])(f, out), "syntax.toml"),
    "config-unknown-key": Case(lambda f, out: run_args("--config", f["toml_key"])(f, out), "'train.roundz'"),
    "config-wrong-type": Case(lambda f, out: run_args("--config", f["toml_type"])(f, out), "'five'"),
    "config-value-for-section": Case(
        lambda f, out: run_args("--config", f["toml_section"])(f, out), "'train'"
    ),
    "config-not-text": Case(lambda f, out: run_args("--config", f["toml_binary"])(f, out), "binary.toml"),
    "config-is-a-directory": Case(
        lambda f, out: run_args("--config", f["toml_dir"])(f, out), "conf.d' is not a file"
    ),
    # presets
    "preset-unknown": Case(run_args("--preset", "nope"), "preset 'nope'"),
    # data
    "dataset-unknown": Case(run_args("data.datasets=nope"), "'nope'"),
    "data-root-missing": Case(run_args("data.root=/does/not/exist"), "/does/not/exist"),
    "data-root-is-a-file": Case(
        lambda f, out: run_args(f"data.root={f['file']}")(f, out),
        lambda f: f"data.root '{f['file']}' is not a directory",
    ),
    "data-root-below-a-file": Case(
        lambda f, out: run_args(f"data.root={f['file']}/data", "data.download=true")(f, out),
        lambda f: f"data.root '{f['file']}/data' cannot be read",
    ),
    "data-root-empty": Case(lambda f, out: run_args(f"data.root={f['empty']}")(f, out), lambda f: f["empty"]),
    "data-root-wrong-layout": Case(
        lambda f, out: run_args(f"data.root={f['nested']}")(f, out), lambda f: f["nested"]
    ),
    "data-corrupt-idx-files": Case(
        lambda f, out: run_args(f"data.root={f['corrupt_idx']}")(f, out), lambda f: f["corrupt_idx"]
    ),
    "data-corrupt-image": Case(
        lambda f, out: run_args(
            "data.datasets=eurosat", f"data.root={f['eurosat']}", "scenario.num_clients=2"
        )(f, out),
        lambda f: f["corrupt_image"],
    ),
    # weights
    "weights-missing": Case(run_args("model.weights=/does/not/exist.pth"), "/does/not/exist.pth"),
    "weights-truncated": Case(
        lambda f, out: run_args(f"model.weights={f['weights_truncated']}")(f, out), "truncated.pth"
    ),
    "weights-wrong-architecture": Case(
        lambda f, out: run_args(f"model.weights={f['weights_other_arch']}")(f, out), "full.pth"
    ),
    "weights-not-weights": Case(
        lambda f, out: run_args(f"model.weights={f['weights_text']}")(f, out), "weights.pth"
    ),
    "backbone-unknown": Case(run_args("model.backbone=not_a_model"), "'not_a_model'"),
    "weights-offline-hub": Case(  # HF_HUB_OFFLINE=1 (conftest): fails at once, no 46 s of retries
        run_args("model.backbone=vit_tiny_patch16_224"), "weights for vit_tiny_patch16_224 (offline?)"
    ),
    # saved models: fedlorm predict / evaluate
    "model-missing": Case(
        predict_args("/does/not/exist", "image"), "--model '/does/not/exist' does not exist"
    ),
    "model-is-a-file": Case(predict_args("file", "image"), "is not a directory"),
    "model-without-model-json": Case(predict_args("empty", "image"), "has no model.json"),
    "model-json-unreadable": Case(predict_args("model_json", "image"), "model.json': Expecting"),
    "model-incomplete": Case(predict_args("model_headless", "image"), "incomplete: head.safetensors missing"),
    "model-base-weights-cut": Case(predict_args("model_cut_base", "image"), "base_model.safetensors"),
    "predict-image-missing": Case(predict_args("model", "/does/not/exist.png"), "/does/not/exist.png"),
    "predict-image-unreadable": Case(predict_args("model", "weights_text"), "cannot decode image"),
    "predict-top-zero": Case(
        lambda f, out: ["predict", "--model", f["model"], "--top", "0", f["image"]], "--top 0"
    ),
    "evaluate-model-missing": Case(
        lambda f, out: ["evaluate", "--model", "/does/not/exist"], "--model '/does/not/exist'"
    ),
    "evaluate-data-root-a-file": Case(
        lambda f, out: ["evaluate", "--model", f["model"], f"data.root={f['file']}"],
        "is not a directory",
    ),
    "evaluate-unknown-key": Case(
        lambda f, out: ["evaluate", "--model", f["model"], "data.rooot=x"], "'data.rooot'"
    ),
}


def _snapshot(folder: Path) -> dict[str, str] | None:
    if not folder.exists():
        return None
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _prepare(out: Path, kind: str) -> None:
    if kind == "results":
        _write(out / "results.json", '{"accuracy_matrix": [[50.0]]}\n')
        _write(out / "metrics.csv", "task,round\n0,0\n")
    elif kind == "checkpoint":
        save_checkpoint(out, {"config": {}, "completed_step": "task1.round0", "progress": {}}, {})
    elif kind == "model":
        _write(out / "model" / MODEL_JSON, "{}\n")


@pytest.mark.parametrize("name", list(CLI_CASES))
def test_cli_bad_input_is_one_line_exit_2_and_changes_nothing(name, files, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("FEDLORM_DATA", str(tmp_path / "cache"))
    case = CLI_CASES[name]
    out = tmp_path / "out"
    _prepare(out, case.out)
    before = _snapshot(out)
    code = main(case.argv(files, str(out)))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("fedlorm: error: "), err
    fragment = case.fragment(files) if callable(case.fragment) else case.fragment
    assert fragment in lines[0]
    assert "Traceback" not in err
    assert _snapshot(out) == before


API_CASES: dict[str, tuple[Callable[[], object], str]] = {
    "merge-b-shapes": (
        lambda: merging.merge_b([torch.ones(4, 2)], torch.ones(3, 5), [torch.ones(5)]),
        "expected (d_out, 3)",
    ),
    "merge-a-nan-gram": (
        lambda: merging.merge_a([torch.ones(2, 3)], [torch.tensor([1.0, math.nan, 1.0])]),
        "grams[0] contains NaN",
    ),
    "merge-a-negative-diagonal": (
        lambda: merging.merge_a([torch.ones(2, 3)], [torch.tensor([1.0, -1.0, 1.0])]),
        "grams[0] has a negative diagonal",
    ),
    "merge-tasks-empty": (lambda: merging.merge_tasks([], []), "deltas is empty"),
    "merge-mixed-statistics": (
        lambda: merging.regmean([torch.ones(2, 3)] * 2, [torch.eye(3), torch.ones(3)]),
        "mixes full and diagonal",
    ),
    "regmean-negative-weight": (
        lambda: merging.regmean([torch.ones(2, 3)], [torch.eye(3)], weights=[-1.0]),
        "weights[0] = -1.0",
    ),
    "shrink-alpha-out-of-range": (lambda: merging.shrink_gram(torch.eye(3), 2.0), "alpha = 2.0"),
    "solve-wrong-gram-shape": (
        lambda: merging.merge_a_solve(torch.ones(2, 3), torch.eye(4)), "G_sum has shape (4, 4)"
    ),
    "solve-not-a-tensor": (lambda: merging.merge_a_solve([[1.0]], torch.eye(1)), "must be a torch.Tensor"),
    "solve-negative-ridge": (
        lambda: merging.merge_a_solve(torch.ones(2, 3), torch.eye(3), ridge=-1.0), "ridge = -1.0"
    ),
    "preset-api-unknown": (lambda: preset_config("nope"), "preset 'nope'"),
    "config-api-bad-override": (lambda: apply_overrides(RunConfig(), ["model.rank=two"]), "'two'"),
    "config-api-missing-file": (lambda: load_toml("/does/not/exist.toml"), "/does/not/exist.toml"),
    "checkpoint-api-missing": (lambda: load_checkpoint("/does/not/exist"), "/does/not/exist"),
}


@pytest.mark.parametrize("name", list(API_CASES))
def test_api_bad_input_is_a_one_line_value_error(name):
    call, fragment = API_CASES[name]
    with pytest.raises(ValueError) as info:
        call()
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_catalogue_size():
    assert len(CLI_CASES) + len(API_CASES) >= 25


def test_console_command_prints_no_traceback(files, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "FEDLORM_DATA": str(tmp_path / "cache")}
    out = tmp_path / "out"
    argv = ["run", "--out", str(out), *TINY, f"data.root={files['corrupt_idx']}"]
    proc = subprocess.run(
        [sys.executable, "-m", "fedlorm", *argv], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and files["corrupt_idx"] in proc.stderr
    assert not out.exists()
