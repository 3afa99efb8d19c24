"""Client sampling (``scenario.participation``): the seeded draw, who computes, what merges, resume.

The merge checks rebuild the server's state from the sampled clients' own factors (captured right
after each ``Client.update``) in float64, independently of the replies' summands and the server's sums.
The Flower side (only the sampled clients' SuperNodes get a training message, same numbers as in
process) is in tests/test_flower.py.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedlorm.config import ConfigError, apply_overrides, config_to_dict, validate_config
from fedlorm.fcl import clients_per_round, sample_clients
from fedlorm.methods import Instruction, payload_bytes
from fedlorm.runtime.engine import step_clients, step_plan
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.report import untimed
from fedlorm.runtime.simulator import InProcess, resume_simulation, run_simulation
from fedlorm.seeding import torch_generator

# 4 clients, half of them per training round: 2 asked, different pairs in different rounds (seed 0).
SAMPLED = ("train.threads=1", "scenario.num_clients=4", "scenario.participation=0.5")


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """Configs here pin train.threads=1, which build_experiment applies process-wide; undo it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _ignore(finished: int) -> None:
    """A progress callback that shows nothing."""


# -- the draw --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("clients", "fraction", "asked"),
    [
        (10, 1.0, 10),
        (10, 0.5, 5),
        (10, 0.01, 1),
        (10, 0.96, 10),
        (4, 0.3, 1),
        (4, 0.375, 2),
        (3, 0.5, 2),
        (1, 0.1, 1),
    ],
)
def test_a_round_asks_the_fraction_rounded_half_up_and_at_least_one(clients, fraction, asked):
    assert clients_per_round(clients, fraction) == asked
    drawn = sample_clients(7, clients, fraction, 1, 2)
    assert len(drawn) == asked == len(set(drawn))
    assert drawn == sorted(drawn) and all(0 <= k < clients for k in drawn)


def test_the_draw_is_a_pure_seeded_function_of_seed_task_and_round():
    draws = {(t, r): sample_clients(3, 10, 0.3, t, r) for t in range(3) for r in range(4)}
    # The same call gives the same clients, and they come from the named stream.
    for (t, r), drawn in draws.items():
        assert sample_clients(3, 10, 0.3, t, r) == drawn
        perm = torch.randperm(10, generator=torch_generator(3, "participation", t, r))
        assert drawn == sorted(perm[:3].tolist())
    # Rounds, tasks and seeds draw different sets (not all equal by chance).
    assert len({tuple(d) for d in draws.values()}) > 6
    assert len({tuple(sample_clients(3, 10, 0.3, 0, r)) for r in range(4)}) > 1
    assert [sample_clients(s, 10, 0.3, 0, 0) for s in range(4)] != [draws[0, 0]] * 4
    # Full participation draws nothing: every client, in order.
    assert sample_clients(3, 10, 1.0, 0, 0) == list(range(10))


def test_statistics_steps_ask_every_client_and_training_steps_the_sample():
    cfg = tiny_config(*SAMPLED)
    train = Instruction(1, 2, "train", "B", 5, 10)
    assert step_clients(cfg, train) == sample_clients(cfg.seed, 4, 0.5, 1, 2)
    assert len(step_clients(cfg, train)) == 2
    for phase in ("task_stats", "head_stats"):
        assert step_clients(cfg, Instruction(1, -1, phase, "none", 5, 10)) == [0, 1, 2, 3]
    full = tiny_config("scenario.num_clients=4")
    assert full.scenario.participation == 1.0
    assert step_clients(full, train) == [0, 1, 2, 3]


# -- the config key --------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0", "1.5", "-1", "nan"])
def test_a_fraction_outside_0_1_is_a_one_line_config_error(value):
    cfg = apply_overrides(tiny_config(), [f"scenario.participation={value}"])
    with pytest.raises(ConfigError) as caught:
        validate_config(cfg)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"scenario.participation = {float(value)!r} is not allowed; expected ")
    assert "(0, 1]" in message


def test_the_flower_settings_cap_min_clients_at_the_sampled_count():
    pytest.importorskip("flwr")
    from fedlorm.flower.settings import settings_from_run_config

    run_config = {"preset": "smoke", "scenario.participation": 0.5}
    _, settings = settings_from_run_config({**run_config, "min-clients": 2})
    assert settings.min_clients == 2
    with pytest.raises(ConfigError, match=r"min-clients = 3 .* 1\.\.2 .*participation = 0\.5 of .* = 4"):
        settings_from_run_config({**run_config, "min-clients": 3})


def test_the_flower_wrapper_refuses_min_clients_above_the_sample_before_starting(tmp_path, capsys):
    pytest.importorskip("flwr")
    from fedlorm.cli import main

    out = tmp_path / "o"
    argv = ["flower", "simulate", "--preset", "smoke", "--min-clients", "3", "--out", str(out)]
    assert main([*argv, "scenario.participation=0.5"]) == 2
    assert capsys.readouterr().err.strip() == (
        "fedlorm: error: --min-clients 3 is not in 1..2 "
        "(the clients a training round asks: scenario.participation = 0.5 of 4)"
    )
    assert not out.exists()


# -- the in-process runtime ------------------------------------------------------------------------
def _client_of(exp, instruction, generator):
    """Which client a ``Client.update`` call is for: its random stream is (seed, task, round, k)."""
    state = generator.get_state()
    (k,) = [
        k
        for k in range(exp.cfg.scenario.num_clients)
        if torch.equal(
            state,
            torch_generator(exp.cfg.seed, "client", instruction.task, instruction.round, k).get_state(),
        )
    ]
    return k


def _spy(exp):
    """Record each ``Client.update`` call: the client, its reply and its trained factors right after."""
    calls = []
    update = exp.client.update

    def spy(arrays, instruction, data, generator):
        k = _client_of(exp, instruction, generator)
        reply = update(arrays, instruction, data, generator)
        factors = {
            name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone())
            for name, layer in exp.layers.items()
        }
        calls.append((k, instruction, reply, factors))
        return reply

    exp.client.update = spy
    return calls


def test_only_the_sampled_clients_compute_and_the_merge_is_theirs_alone():
    cfg = tiny_config(*SAMPLED, "method=fedavg", "train.rounds=1")
    exp = build_experiment(cfg)
    classes = exp.scenario.task_classes(0)
    exp.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    instruction = step_plan(exp)[0][0]
    assert instruction.phase == "train" and instruction.factor == "both"
    shares = exp.client_data(0)
    calls = _spy(exp)
    arrays = exp.server.arrays(instruction)
    download = payload_bytes(arrays)

    tally = InProcess().run_step(exp, instruction, step_clients(exp.cfg, instruction), _ignore)

    sampled = sample_clients(cfg.seed, 4, 0.5, 0, 0)
    assert [k for k, *_ in calls] == sampled and len(sampled) == 2
    assert tally.clients == 2 and tally.rejected == 0
    assert tally.download_bytes == 2 * download  # the first step: each client is sent everything
    assert tally.upload_bytes == sum(reply.upload_bytes for _, _, reply, _ in calls) > 0
    # FedIT's merge from the sampled clients' own factors: the sample-weighted means of A and of B.
    n = torch.tensor([float(len(shares[k])) for k in sampled], dtype=torch.float64)
    assert [reply.num_examples for _, _, reply, _ in calls] == n.long().tolist()
    for name in exp.layers:
        for i, factor in enumerate("AB"):
            stacked = torch.stack([factors[name][i].to(torch.float64) for *_, factors in calls])
            mean = (n.view(-1, 1, 1) * stacked).sum(0) / n.sum()
            merged = getattr(exp.server, factor)[name]
            torch.testing.assert_close(merged.to(torch.float64), mean, rtol=0, atol=1e-6, msg=name)
    # The others' factors would have moved the mean: the full-participation merge differs.
    everyone = build_experiment(apply_overrides(cfg, ["scenario.participation=1.0"]))
    everyone.server.start_task(0, classes, torch_generator(cfg.seed, "server"))
    full = InProcess().run_step(everyone, instruction, step_clients(everyone.cfg, instruction), _ignore)
    assert full.clients == 4 and full.download_bytes == 4 * download
    # (A has no gradient in the first round, where B starts at 0: its mean is the shared init.)
    assert any(not torch.equal(exp.server.B[k], everyone.server.B[k]) for k in exp.layers)


def test_a_sampled_run_asks_the_sample_in_training_and_everyone_for_statistics(tmp_path):
    cfg = tiny_config(*SAMPLED)
    exp = build_experiment(cfg)
    calls = []
    update = exp.client.update

    def spy(arrays, instruction, data, generator):
        calls.append((instruction.task, instruction.round, instruction.phase))
        return update(arrays, instruction, data, generator)

    exp.client.update = spy
    results = run_simulation(cfg, tmp_path, experiment=exp)
    expected = []
    for steps in step_plan(exp):
        for instruction in steps:
            asked = step_clients(cfg, instruction)
            assert len(asked) == (2 if instruction.phase == "train" else 4)
            expected += [(instruction.task, instruction.round, instruction.phase)] * len(asked)
    assert calls == expected
    assert [(r["phase"], r["clients"]) for r in results["rounds"]] == [
        ("train", 2),
        ("train", 2),
        ("task_stats", 4),
    ] * 2
    drawn = {tuple(step_clients(cfg, i)) for steps in step_plan(exp) for i in steps if i.phase == "train"}
    assert len(drawn) > 1, "every round drew the same clients; the resume test below would prove little"


def test_a_sampled_run_interrupted_mid_round_resumes_to_the_same_clients_and_numbers(tmp_path):
    cfg = tiny_config(*SAMPLED)
    whole = run_simulation(cfg, tmp_path / "whole")

    exp = build_experiment(cfg)
    update = exp.client.update
    seen = []

    def crash(arrays, instruction, data, generator):
        if (instruction.task, instruction.round) == (1, 1):
            raise KeyboardInterrupt  # mid-round: the checkpoint is the one after task 1, round 0
        seen.append((instruction.task, instruction.round))
        return update(arrays, instruction, data, generator)

    exp.client.update = crash
    with pytest.raises(KeyboardInterrupt):
        run_simulation(cfg, tmp_path / "cut", experiment=exp)

    assert seen[-1] == (1, 0)
    fresh = build_experiment(cfg)
    calls = _spy(fresh)
    resumed = resume_simulation(tmp_path / "cut", experiment=fresh)
    asked = [(i.task, i.round, i.phase, k) for k, i, *_ in calls]
    redo = Instruction(1, 1, "train", "A", 5, 10)
    assert asked == [(1, 1, "train", k) for k in step_clients(cfg, redo)] + [
        (1, -1, "task_stats", k) for k in range(4)
    ]
    assert resumed["config"] == whole["config"] == config_to_dict(cfg)
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"]
    assert resumed["upload_bytes"] == whole["upload_bytes"]
    assert resumed["download_bytes"] == whole["download_bytes"]

    def rows(results):
        return untimed(results["rounds"])

    assert rows(resumed) == rows(whole)
