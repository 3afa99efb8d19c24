"""Per-method validated settings of a preset: a run of the preset starts from them, the user's file and
``key=value`` overrides win, and results.json, ``fedlorm presets``, ``compare`` and the Flower run
config all agree on where each value came from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fedlorm.cli import main
from fedlorm.compare import plan_comparison
from fedlorm.config import ConfigError, config_from_dict
from fedlorm.flower.settings import run_config_for, settings_from_run_config
from fedlorm.methods import METHODS
from fedlorm.presets import PRESETS, Preset, config_sources, preset_config, resolve_config

TABLE = {"lorm": {"train.lr": 2e-3, "model.rank": 3}, "fedavg": {"train.lr": 1e-4}}


@pytest.fixture
def preset(monkeypatch: pytest.MonkeyPatch) -> str:
    """The smoke preset with a validated table of its own, registered as ``checked``."""
    smoke = PRESETS["smoke"]
    monkeypatch.setitem(PRESETS, "checked", Preset("smoke with a validated table", smoke.overrides, TABLE))
    return "checked"


def test_each_method_starts_from_its_own_validated_settings(preset: str) -> None:
    lorm, fedavg, ffa = (resolve_config(preset, method=m) for m in ("lorm", "fedavg", "ffa"))
    assert (lorm.train.lr, lorm.model.rank) == (2e-3, 3)
    assert (fedavg.train.lr, fedavg.model.rank) == (1e-4, 2)  # the preset's rank
    assert (ffa.train.lr, ffa.model.rank) == (3e-3, 2)  # no table: the default rate
    assert lorm.preset == fedavg.preset == preset
    assert resolve_config(preset).train.lr == 2e-3  # the method's default is lorm


def test_the_users_values_win_wherever_the_method_is_chosen(preset: str, tmp_path: Path) -> None:
    assert resolve_config(preset, overrides=["train.lr=5e-3"]).train.lr == 5e-3
    chosen = resolve_config(preset, overrides=["method=fedavg"])
    assert (chosen.method, chosen.train.lr) == ("fedavg", 1e-4)
    toml = tmp_path / "run.toml"
    toml.write_text('method = "fedavg"\n[model]\nrank = 8\n')
    from_file = resolve_config(preset, toml)
    assert (from_file.method, from_file.train.lr, from_file.model.rank) == ("fedavg", 1e-4, 8)
    sources = config_sources(from_file)
    assert (sources["train.lr"], sources["model.rank"], sources["method"]) == ("validated", "user", "user")
    assert sources["train.rounds"] == "preset" and sources["train.weight_decay"] == "default"


def test_the_preset_cannot_be_set_as_a_key(preset: str) -> None:
    with pytest.raises(ConfigError, match="config key 'preset' = 'default' cannot be set; choose the preset"):
        resolve_config(preset, overrides=["preset=default"])


def test_sources_name_the_method_s_own_changes() -> None:
    joint = METHODS["joint"].run_config(resolve_config("default", method="joint"))
    sources = config_sources(joint, METHODS["joint"].run_config)
    assert (sources["scenario.tasks"], sources["scenario.num_clients"]) == ("method", "method")
    assert sources["lorm.head_merge"] == "preset"
    unnamed = config_from_dict({"train": {"lr": 0.1}})
    assert {k: v for k, v in config_sources(unnamed).items() if v != "default"} == {"train.lr": "user"}


def test_compare_plans_each_method_at_its_validated_settings(preset: str, tmp_path: Path) -> None:
    def base(method: str):
        return resolve_config(preset, method=method)

    own = {"fedavg": ["model.rank=5"]}
    plan = {p.method: p.cfg for p in plan_comparison(base, ["lorm", "fedavg"], [0], tmp_path, own)}
    assert (plan["lorm"].train.lr, plan["lorm"].model.rank) == (2e-3, 3)
    assert (plan["fedavg"].train.lr, plan["fedavg"].model.rank) == (1e-4, 5)


def test_flower_run_configs_start_from_the_validated_settings(preset: str) -> None:
    cfg, settings = settings_from_run_config({"preset": preset, "method": "fedavg"})
    assert (cfg.train.lr, cfg.preset) == (1e-4, preset)
    changed = resolve_config(preset, overrides=["train.lr=7e-4"], method="fedavg")
    run_config = run_config_for(changed, settings)
    assert run_config["train.lr"] == 7e-4 and "preset" in run_config
    assert settings_from_run_config(run_config)[0] == changed


def test_results_and_the_presets_command_say_where_each_value_came_from(
    preset: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shrink = ["data.train_per_class=6", "data.test_per_class=2", "data.image_size=24",
              "scenario.num_clients=2", "scenario.min_samples=1", "train.rounds=1", "train.threads=1"]
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--preset", preset, "--out", str(out), *shrink, "model.rank=1"]) == 0
    results = json.loads((out / "results.json").read_text())
    sources = results["config_sources"]
    assert (sources["train.lr"], sources["model.rank"]) == ("validated", "user")
    assert (sources["data.image_size"], sources["data.datasets"]) == ("user", "preset")
    assert results["config"]["train"]["lr"] == 2e-3 and results["config"]["preset"] == preset
    capsys.readouterr()
    assert main(["presets", preset, "--method", "fedavg"]) == 0
    shown = capsys.readouterr().out
    assert "train.lr = 0.0001  (validated)" in shown and "train.rounds = 2  (preset)" in shown
    assert main(["presets"]) == 0
    assert "validated for fedavg: train.lr=0.0001" in capsys.readouterr().out


def test_the_presets_validated_tables_name_methods_and_keys_that_exist() -> None:
    for name, preset in PRESETS.items():
        for method, settings in preset.validated.items():
            assert method in METHODS, (name, method)
            cfg = preset_config(name, method)  # unknown keys or wrong types raise ConfigError
            assert cfg.method == method and settings
