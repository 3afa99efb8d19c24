"""Checkpoint and resume: a run killed with SIGKILL anywhere resumes to the uninterrupted run's numbers.

The killed runs are real ``python -m fedlorm run`` processes that kill themselves at a named point
(``FEDLORM_TEST_KILL_AT``, a test hook of the simulator); the resumes go through ``fedlorm run
--resume``. ``train.threads=1`` in every run keeps the float arithmetic the same in every process.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, tiny_config
from safetensors.torch import load_file

from fedlorm.cli import main
from fedlorm.methods import METHODS, Server
from fedlorm.runtime.checkpoint import (
    CHECKPOINT_RECORD,
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from fedlorm.runtime.engine import KILL_ENV, fold_replies, step_clients
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import InProcess
from fedlorm.seeding import torch_generator

# With the forgetting probe on, its per-task features must survive the checkpoint too.
ARGS = [*TINY, "train.threads=1", "train.forgetting_diagnostics=true"]
# Columns of metrics.csv that do not depend on timing.
STABLE = [
    "task", "round", "phase", "factor", "train_loss", "seen_accuracy", "upload_bytes", "download_bytes",
    "rejected",
]


def _fedlorm(*argv: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != KILL_ENV}
    env["HF_HUB_OFFLINE"] = "1"
    if kill_at is not None:
        env[KILL_ENV] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "fedlorm", *argv], capture_output=True, text=True, env=env, timeout=300
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a shared 2-core machine, two spinning threads per process cost 10-30x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    proc = _fedlorm("run", "--quiet", "--out", str(out), *ARGS)
    assert proc.returncode == 0, proc.stderr
    return out


def _stable_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "metrics.csv", newline="") as handle:
        return [{k: row[k] for k in STABLE} for row in csv.DictReader(handle)]


@pytest.mark.slow
@pytest.mark.parametrize(
    "kills",
    [
        # mid-round in task 1, then (in the resumed process) between writing the new checkpoint's
        # record and renaming it, in task 2
        ["task0.round1.client1", "task1.round1.checkpoint.record"],
        # the end-of-task statistics pass's tensor file is written but not yet renamed
        ["task0.stats.checkpoint.tensors"],
        # between rounds of task 2: the cross-task sums of task 1 must come back
        ["task1.round0.done"],
    ],
    ids=["mid-round+mid-record-write", "mid-tensor-write", "between-rounds"],
)
def test_killed_run_resumes_to_the_uninterrupted_numbers(tmp_path, capsys, uninterrupted, kills):
    out = tmp_path / "run"
    proc = _fedlorm("run", "--quiet", "--out", str(out), *ARGS, kill_at=kills[0])
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert (out / CHECKPOINT_RECORD).is_file()
    for kill_at in kills[1:]:
        proc = _fedlorm("run", "--quiet", "--resume", str(out), kill_at=kill_at)
        assert proc.returncode == -signal.SIGKILL, proc.stderr

    # Without --resume the directory is refused, and nothing in it changes.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["run", "--quiet", "--out", str(out), *ARGS]) == 2
    err = capsys.readouterr().err
    assert "--resume" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    assert main(["run", "--quiet", "--resume", str(out)]) == 0, capsys.readouterr().err
    resumed = json.loads((out / "results.json").read_text())
    expected = json.loads((uninterrupted / "results.json").read_text())
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert resumed["task_aware_accuracy_matrix"] == expected["task_aware_accuracy_matrix"]
    assert resumed["upload_bytes"] == expected["upload_bytes"]
    assert resumed["download_bytes"] == expected["download_bytes"]
    assert resumed["forgetting_diagnostics"] == expected["forgetting_diagnostics"]
    assert _stable_rows(out) == _stable_rows(uninterrupted)
    assert not list(out.glob("checkpoint*")) and not list(out.glob(".*tmp"))
    for name in ("adapter_model.safetensors", "head.safetensors", "base_model.safetensors"):
        resumed_model, expected_model = (load_file(str(d / "model" / name)) for d in (out, uninterrupted))
        assert resumed_model.keys() == expected_model.keys()
        assert all(torch.equal(resumed_model[k], expected_model[k]) for k in resumed_model), name


@pytest.mark.slow
@pytest.mark.parametrize("label", ["task0.head", "task0.round-1"])
def test_a_run_killed_after_the_analytic_head_step_resumes_under_its_label_or_the_old_one(
    tmp_path, capsys, label
):
    """The analytic head's step is checkpointed as ``task0.head``; checkpoints written before steps
    had labels call it ``task0.round-1`` and still resume."""
    args = [*TINY, "train.threads=1", "train.rounds=1", "lorm.head_merge=analytic"]
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(whole), *args]) == 0, capsys.readouterr().err
    proc = _fedlorm("run", "--quiet", "--out", str(out), *args, kill_at="task0.head.done")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    record = json.loads((out / CHECKPOINT_RECORD).read_text())
    assert record["completed_step"] == "task0.head"
    record["completed_step"] = label
    (out / CHECKPOINT_RECORD).write_text(json.dumps(record))
    assert main(["run", "--quiet", "--resume", str(out)]) == 0, capsys.readouterr().err
    resumed, expected = (json.loads((d / "results.json").read_text()) for d in (out, whole))
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert _stable_rows(out) == _stable_rows(whole)


def test_a_projected_head_run_killed_after_its_first_head_step_resumes_to_the_same_model(tmp_path, capsys):
    """``lorm.head_projection``: the (M + 1)-wide sums survive the checkpoint, and the resumed run
    leaves the uninterrupted run's accuracies, projected head and R."""
    projected = ["method=head-only", "lorm.head_merge=analytic", "lorm.head_projection=40"]
    args = [*TINY, "train.threads=1", *projected]
    whole, out = tmp_path / "whole", tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(whole), *args]) == 0, capsys.readouterr().err
    proc = _fedlorm("run", "--quiet", "--out", str(out), *args, kill_at="task0.head.done")
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert main(["run", "--quiet", "--resume", str(out)]) == 0, capsys.readouterr().err
    resumed, expected = (json.loads((d / "results.json").read_text()) for d in (out, whole))
    assert resumed["accuracy_matrix"] == expected["accuracy_matrix"]
    assert _stable_rows(out) == _stable_rows(whole)
    for name in ("head.safetensors", "projection.safetensors"):
        resumed_model, expected_model = (load_file(str(d / "model" / name)) for d in (out, whole))
        assert resumed_model.keys() == expected_model.keys()
        assert all(torch.equal(resumed_model[k], expected_model[k]) for k in resumed_model), name
    assert load_file(str(out / "model" / "head.safetensors"))["weight"].shape == (10, 40)


def test_resume_refuses_options_that_change_the_run(tmp_path, capsys):
    save_checkpoint(tmp_path, {"config": {}, "completed_step": "task0.round0", "progress": {}}, {})
    for extra in (["--seed", "1"], ["train.rounds=3"], ["--method", "finetune"], ["--overwrite"]):
        assert main(["run", "--resume", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedlorm: error: --resume takes the run's config") and "\n" not in err


@pytest.mark.parametrize("method", ["lorm", "finetune"])
def test_server_state_round_trips_exactly(method):
    exp = build_experiment(tiny_config(f"method={method}", "train.rounds=1"))
    server, classes = exp.server, exp.scenario.task_classes(0)
    server.start_task(0, classes, torch_generator(0, "server"))
    for instruction in server.instructions(0, classes):
        arrays, clients = server.arrays(instruction), step_clients(exp.cfg, instruction)
        fold_replies(server, instruction, InProcess.replies(exp, instruction, arrays, clients))
    state = server.state_dict()
    fresh = build_experiment(exp.cfg).server
    fresh.load_state_dict(state)
    restored = fresh.state_dict()
    assert restored.keys() == state.keys()
    for key, value in state.items():
        assert restored[key].dtype == value.dtype and torch.equal(restored[key], value), key
        assert restored[key] is not value
    # The copy is independent: the next task's start changes it, not the original.
    fresh.start_task(1, exp.scenario.task_classes(1), torch_generator(0, "server"))
    assert all(torch.equal(server.state_dict()[k], v) for k, v in state.items())


def test_every_method_can_be_resumed():
    for name, method in METHODS.items():
        assert method.server.load_state_dict is not Server.load_state_dict, name


def test_checkpoint_write_is_all_or_nothing(tmp_path):
    first = {"a": torch.arange(4.0), "alias": torch.zeros(2)}
    first["same"] = first["a"]  # shared memory is stored as two copies
    save_checkpoint(tmp_path, {"n": 1}, first)

    def crash(stage: str) -> None:
        if stage == "record":
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(tmp_path, {"n": 2}, {"a": torch.ones(4)}, hook=crash)
    ckpt = load_checkpoint(tmp_path)
    assert ckpt.record["n"] == 1 and torch.equal(ckpt.tensors["same"], torch.arange(4.0))
    assert len(list(tmp_path.glob("checkpoint-*.safetensors"))) == 2  # the new one is unreferenced
    save_checkpoint(tmp_path, {"n": 3}, {"a": torch.ones(4)})
    assert len(list(tmp_path.glob("checkpoint-*.safetensors"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))
    tensors = tmp_path / load_checkpoint(tmp_path).record["tensors"]
    tensors.write_bytes(tensors.read_bytes()[:-3])
    with pytest.raises(CheckpointError, match="truncated or replaced"):
        load_checkpoint(tmp_path)
