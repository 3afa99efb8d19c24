"""Typed config: TOML files, dotted overrides, and one-line errors for unknown keys and bad values."""

from __future__ import annotations

import pytest

from fedlorm.config import (
    ConfigError,
    RunConfig,
    apply_overrides,
    config_from_plain,
    config_to_dict,
    load_toml,
    validate_config,
)
from fedlorm.methods.registry import HEADS, check_method_config
from fedlorm.presets import PRESETS, preset_config


def test_overrides_parse_to_the_field_types():
    cfg = apply_overrides(
        RunConfig(),
        [
            "train.rounds=6",
            "train.lr=1e-3",
            "scenario.tasks=[20, 20, 16]",
            "model.targets=none",
            "data.datasets=mnist,fashion_mnist",
            "train.eval_every_round=false",
            "lorm.stats_model=reference",
        ],
    )
    assert cfg.train.rounds == 6
    assert cfg.train.lr == pytest.approx(1e-3)
    assert cfg.scenario.tasks == [20, 20, 16]
    assert cfg.model.targets is None
    assert cfg.data.datasets == ["mnist", "fashion_mnist"]
    assert cfg.train.eval_every_round is False
    assert cfg.lorm.stats_model == "reference"
    assert RunConfig().train.rounds == 4, "overrides must not mutate the defaults"


def test_integer_accepted_where_a_float_is_expected_and_tasks_as_int():
    cfg = apply_overrides(RunConfig(), ["train.lr=1", "scenario.tasks=10"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.scenario.tasks == 10


def test_toml_file_with_sections_and_dotted_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(
        'method = "lorm"\nseed = 3\nmodel.rank = 8\n[train]\nrounds = 2\n[lorm]\nalpha_head = 0.3\n'
    )
    cfg = load_toml(path)
    assert (cfg.seed, cfg.train.rounds, cfg.lorm.alpha_head, cfg.model.rank) == (3, 2, 0.3, 8)


def test_roundtrip_through_plain_dict():
    cfg = apply_overrides(RunConfig(), ["train.lr_a=0.01", "scenario.tasks=[3,2]"])
    assert config_to_dict(config_from_plain(config_to_dict(cfg))) == config_to_dict(cfg)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.roundz=3", "unknown config key 'train.roundz'"),
        ("nosection.x=1", "unknown config key 'nosection'"),
        ("train.rounds=three", "'train.rounds' expects an integer"),
        ("train.rounds=2.5", "'train.rounds' expects an integer"),
        ("train.eval_every_round=maybe", "expects true or false"),
        ("lorm.stats_model=mine", "allowed: trained, reference"),
        ("train=4", "'train' is a section"),
        ("train.rounds.x=1", "'train.rounds' is a value"),
        ("rounds", "not of the form key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError, match=None) as err:
        apply_overrides(RunConfig(), [override])
    assert fragment in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("scenario.beta=0", "scenario.beta = 0.0"),
        ("scenario.beta=-1", "scenario.beta = -1.0"),
        ("model.rank=0", "model.rank = 0"),
        ("train.rounds=0", "train.rounds = 0"),
        ("scenario.num_clients=0", "scenario.num_clients = 0"),
        ("lorm.alpha_head=1.5", "lorm.alpha_head = 1.5"),
        ("train.lr=0", "train.lr = 0.0"),
        ("scenario.tasks=[2,0]", "scenario.tasks = [2, 0]"),
        ("lorm.adapt_tasks=0", "lorm.adapt_tasks = 0"),
    ],
)
def test_out_of_range_values_are_rejected(override, fragment):
    cfg = apply_overrides(RunConfig(), [override])
    with pytest.raises(ConfigError) as err:
        validate_config(cfg)
    assert fragment in str(err.value)


def test_missing_and_invalid_toml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_toml(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nrounds = 2")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(bad)


def test_every_preset_builds_a_valid_config():
    for name in PRESETS:
        validate_config(preset_config(name))
    with pytest.raises(ConfigError, match="preset 'nope' is unknown"):
        preset_config("nope")


def test_which_head_adapt_tasks_needs_is_the_method_layers_rule():
    """``validate_config`` checks only the range of ``lorm.adapt_tasks``; the head it needs is the head
    strategies' flag, which ``check_method_config`` reads: one line naming the value and the allowed
    head, read off the registry (only the analytic head solves a task's rows without training)."""
    assert [name for name, head in HEADS.items() if head.supports_frozen_backbone] == ["analytic"]
    cfg = apply_overrides(RunConfig(), ["lorm.adapt_tasks=1", "lorm.head_merge=fedavg"])
    validate_config(cfg)
    with pytest.raises(ConfigError) as err:
        check_method_config(cfg)
    message = str(err.value)
    assert message.startswith("lorm.adapt_tasks = 1 is not allowed with lorm.head_merge = 'fedavg': ")
    assert "set lorm.head_merge = 'analytic', or lorm.adapt_tasks = none" in message
    assert "\n" not in message
    check_method_config(apply_overrides(cfg, ["lorm.head_merge=analytic"]))
    check_method_config(apply_overrides(cfg, ["lorm.adapt_tasks=none"]))


@pytest.mark.parametrize("head", ["fedavg", "regmean", "ccvr"])
def test_a_methods_own_adapted_task_limit_needs_the_analytic_head_too(head):
    cfg = apply_overrides(RunConfig(), ["method=lorm-fsa", f"lorm.head_merge={head}"])
    validate_config(cfg)
    with pytest.raises(ConfigError) as err:
        check_method_config(cfg)
    assert str(err.value) == (
        "method 'lorm-fsa': tasks after the first 1 add their classes to the head through its feature "
        f"sums only; set lorm.head_merge = 'analytic' (now {head!r})"
    )
    check_method_config(apply_overrides(cfg, ["lorm.head_merge=analytic"]))
