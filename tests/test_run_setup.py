"""One set of output-folder rules for every way a run starts (fedlorm.run_setup): ``fedlorm run``,
``fedlorm flower ...``, the ServerApp that plain ``flwr run`` starts, and ``fedlorm compare``.

A folder that holds an earlier run's results or checkpoint is refused in one line unless the caller
asked to overwrite (or to resume), and a refusal changes nothing in it: every file keeps its bytes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import TINY

from fedlorm.cli import main
from fedlorm.config import ConfigError, RunConfig
from fedlorm.run_setup import RUN_CONFIG, check_output, clear_output, server_setup

EARLIER = {
    "results.json": '{"final_accuracy": 81.5}\n',
    "metrics.csv": "step,seen_accuracy\n0,90.0\n",
    "accuracy.png": "not really a png",
    "server_state.safetensors": "state",
    "model/model.json": "{}\n",
    "notes.txt": "the user's own file\n",
}
"""An earlier run's outputs, and a file of the user's that no run writes."""


def _earlier_run(out: Path, checkpoint: bool = False) -> dict[str, bytes]:
    """Fill ``out`` with an earlier run's files (and a checkpoint record); return every file's bytes."""
    for name, text in EARLIER.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text)
    if checkpoint:
        record = {"format": 1, "tensors": "x", "completed_step": "task0.stats"}
        (out / "checkpoint.json").write_text(json.dumps(record))
    return _snapshot(out)


def _snapshot(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def test_fedlorm_run_and_flower_refuse_a_folder_with_results_and_lose_nothing(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _earlier_run(out)
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    expected = (
        f"fedlorm: error: --out {str(out)!r} already holds results (results.json, metrics.csv, "
        "accuracy.png, server_state.safetensors, model); pass --overwrite to replace them or choose "
        "another --out"
    )
    for command in (["run"], ["flower", "simulate"], ["flower", "deploy-local"]):
        assert main([*command, "--out", str(out), *TINY]) == 2
        assert capsys.readouterr().err.strip() == expected, command
        assert _snapshot(out) == before
    assert not home.exists()  # Flower was never started


def test_flower_overwrite_clears_the_folder_and_tells_the_serverapp(tmp_path, monkeypatch, capsys):
    """``fedlorm flower deploy-local --overwrite`` without starting Flower: the earlier results go
    before the run starts (so none of them is reported as this run's), the user's files stay, and the
    run config carries ``overwrite = true`` to the ServerApp."""
    from fedlorm.flower import launch

    out = tmp_path / "out"
    _earlier_run(out)
    runs = []

    class Stopped:
        def stop(self):
            pass

    monkeypatch.setattr(launch, "start_superlink", lambda home, **kwargs: (Stopped(), "127.0.0.1:1"))
    monkeypatch.setattr(launch, "start_supernode", lambda *args, **kwargs: Stopped())
    def flwr_run(app, connection, run_config, **kwargs):
        runs.append(dict(run_config))
        return 0

    monkeypatch.setattr(launch, "flwr_run", flwr_run)
    assert main(["flower", "deploy-local", "--out", str(out), "--overwrite", *TINY]) == 1
    assert "the Flower run wrote no results" in capsys.readouterr().err
    assert [r["overwrite"] for r in runs] == [True] and runs[0]["out"] == str(out.resolve())
    assert sorted(_snapshot(out)) == ["notes.txt"]


def test_a_checkpoint_is_refused_without_resume_or_overwrite_everywhere(tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    before = _earlier_run(out, checkpoint=True)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    for command in (["run"], ["flower", "simulate"]):
        assert main([*command, "--out", str(out), *TINY]) == 2
        err = capsys.readouterr().err.strip()
        assert err == (
            f"fedlorm: error: --out {str(out)!r} holds an unfinished run (last completed step "
            f"task0.stats); pass --resume {str(out)!r} to continue it or --overwrite to start over"
        )
        assert _snapshot(out) == before
    with pytest.raises(ConfigError) as refused:
        server_setup(RunConfig(), out=str(out), preset="default", resume=False, overwrite=False)
    assert str(refused.value) == (
        f"out {str(out)!r} holds an unfinished run (last completed step task0.stats); set resume=true "
        "in the run config to continue it or overwrite=true to start over"
    )


@pytest.fixture
def fedlorm_records():
    """Records of fedlorm's loggers, caught by a handler of their own: the ServerApp routes fedlorm's
    logging into Flower's handlers (fedlorm.flower.logs), which this undoes afterwards."""
    logger = logging.getLogger("fedlorm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    watched = logging.getLogger("fedlorm.flower.serverapp")
    watched.addHandler(handler)
    yield records
    watched.removeHandler(handler)
    logger.handlers[:], logger.level, logger.propagate = saved


def test_the_serverapp_refuses_a_folder_with_results_before_loading_any_data(tmp_path, fedlorm_records):
    """What plain ``flwr run`` gets: the ServerApp's main, started with a run config whose ``out``
    holds results and no ``overwrite``. It logs one line and raises; data, grid and files are untouched
    (the data root does not exist and the grid is None: touching either would fail otherwise)."""
    pytest.importorskip("flwr")
    from flwr.app import Context, RecordDict

    from fedlorm.config import apply_overrides
    from fedlorm.flower import serverapp
    from fedlorm.flower.settings import FlowerSettings, run_config_for

    out = tmp_path / "out"
    before = _earlier_run(out)
    cfg = apply_overrides(RunConfig(), [*TINY, f"data.root={tmp_path / 'no-data'}", "data.download=false"])
    run_config = run_config_for(cfg, FlowerSettings(out=str(out)))
    assert run_config["overwrite"] is False
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    with pytest.raises(ConfigError) as refused:
        serverapp.main(None, context)
    message = (
        f"out {str(out)!r} already holds results (results.json, metrics.csv, accuracy.png, "
        "server_state.safetensors, model); set overwrite=true in the run config to replace them or "
        "choose another out"
    )
    assert str(refused.value) == message
    assert [(r.levelname, r.getMessage()) for r in fedlorm_records] == [("ERROR", message)]
    assert _snapshot(out) == before


def test_overwrite_removes_only_an_earlier_runs_outputs_and_resume_removes_nothing(tmp_path):
    out = tmp_path / "out"
    _earlier_run(out, checkpoint=True)
    (out / "checkpoint-abc.safetensors").write_text("tensors")
    (out / "flower-logs").mkdir()
    (out / "flower-logs" / "superlink.log").write_text("log")
    kept = _snapshot(out)
    resumed = server_setup(RunConfig(), out=str(out), preset="default", resume=True, overwrite=False)
    assert resumed.prepare() == out.resolve() and _snapshot(out) == kept
    setup = server_setup(RunConfig(), out=str(out), preset="default", resume=False, overwrite=True)
    assert _snapshot(out) == kept  # checking changes nothing; prepare() removes
    assert setup.prepare() == out.resolve()
    assert sorted(_snapshot(out)) == ["flower-logs/superlink.log", "notes.txt"]


def test_a_new_folder_is_created_only_by_prepare_and_its_default_name_follows_the_runtime(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    setup = server_setup(RunConfig(seed=3), out="", preset="smoke", resume=False, overwrite=False)
    assert setup.out == tmp_path / "runs" / "flower-smoke-lorm-s3" and not setup.out.exists()
    setup.prepare()
    assert setup.out.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"^out '.*file' exists and is not a directory$"):
        server_setup(RunConfig(), out=str(tmp_path / "file"), preset="default", resume=False, overwrite=False)


def test_check_output_accepts_an_empty_folder_and_a_missing_one(tmp_path):
    check_output(tmp_path, overwrite=False)
    check_output(tmp_path / "missing", overwrite=False, options=RUN_CONFIG)
    (tmp_path / "notes.txt").write_text("x")
    check_output(tmp_path, overwrite=False)
    clear_output(tmp_path)
    assert (tmp_path / "notes.txt").exists()


@pytest.mark.slow
def test_plain_flwr_run_refuses_an_out_with_results_and_nothing_is_lost(tmp_path):
    """The ServerApp started by ``flwr run`` on a SuperLink (as a user would, with run-config keys
    only): the run fails with the one line in its streamed log, and the folder keeps its bytes. No
    SuperNode is needed: the ServerApp refuses before it sends anything."""
    pytest.importorskip("flwr")
    from fedlorm.flower import launch

    out = tmp_path / "out"
    before = _earlier_run(out)
    home, log = tmp_path / "flwr-home", tmp_path / "serverapp.log"
    link, address = launch.start_superlink(home, log=tmp_path / "superlink.log")
    try:
        launch.write_connection(home, "local", address)
        app = launch.write_app(tmp_path / "app")
        run_config = {"preset": "smoke", "out": str(out)}
        launch.flwr_run(app, "local", run_config, flwr_home=home, log=log, timeout=300)
    finally:
        link.stop()
    text = log.read_text()
    assert f"out {str(out)!r} already holds results" in text, text[-3000:]
    assert "set overwrite=true in the run config to replace them" in text
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["lorm.task_start=merged"],
            "lorm.stats_model='reference' reproduces the authors' setup and needs "
            "lorm.task_start='pretrained', got 'merged'",
        ),
        (
            ["method=lorm-fsa", "lorm.head_merge=fedavg"],
            "method 'lorm-fsa': tasks after the first 1 add their classes to the head through its "
            "feature sums only; set lorm.head_merge = 'analytic' (now 'fedavg')",
        ),
    ],
)
def test_a_combination_the_methods_parts_cannot_run_is_refused_before_any_data_loads(
    tmp_path, capsys, monkeypatch, overrides, message
):
    """The data root does not exist, so any data loading would fail with another message first."""
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr-home"))
    no_data = [f"data.root={tmp_path / 'no-data'}", "data.download=false"]
    for command in (["run"], ["flower", "simulate"]):
        out = tmp_path / "out"
        assert main([*command, "--out", str(out), *TINY, *no_data, *overrides]) == 2
        assert capsys.readouterr().err.strip() == f"fedlorm: error: {message}"
        assert not out.exists() and not (tmp_path / "flwr-home").exists()
