"""Shared fixtures: a tiny real-data configuration that runs the whole engine in seconds."""

from __future__ import annotations

import logging
import os

import pytest
import torch

from fedlorm.config import RunConfig, apply_overrides

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One intra-op thread: the tests' tensors are small, and on a 2-core machine shared with subprocesses
# (Flower, kill-and-resume) more threads than cores made the suite 10-30x slower.
torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def _node_cache_of_this_session(tmp_path_factory):
    """SuperNodes' node caches (fedlorm.flower.node_cache) go to a folder of this test session, not
    to the user's ~/.flwr; the Flower processes the tests start inherit it."""
    saved = os.environ.get("FEDLORM_NODE_CACHE")
    os.environ["FEDLORM_NODE_CACHE"] = str(tmp_path_factory.mktemp("node-cache"))
    yield
    if saved is None:
        os.environ.pop("FEDLORM_NODE_CACHE", None)
    else:
        os.environ["FEDLORM_NODE_CACHE"] = saved


TINY = [
    "data.datasets=mnist",
    "data.image_size=32",
    "data.train_per_class=8",
    "data.test_per_class=5",
    "scenario.tasks=2",
    "scenario.num_clients=3",
    "scenario.min_samples=2",
    "model.rank=2",
    "train.rounds=2",
    "train.local_epochs=1",
    "train.batch_size=8",
]


def tiny_config(*overrides: str) -> RunConfig:
    """MNIST (the offline 5k subset), 2 tasks x 5 classes, 3 clients, EfficientNet-Lite0 at 32 px."""
    return apply_overrides(RunConfig(), [*TINY, *overrides])


def run_recording_head_features(cfg: RunConfig):
    """Run ``cfg`` in process, recording at every ``head_stats`` step the pooled features (float64)
    and labels of the client's data through its deployed model: ``(experiment, results, features,
    labels)``, stacked over clients and tasks."""
    from fedlorm.runtime.experiment import build_experiment
    from fedlorm.runtime.simulator import run_simulation

    exp = build_experiment(cfg)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    update = exp.client.update

    def recording_update(arrays, instruction, data, generator):
        reply = update(arrays, instruction, data, generator)
        if instruction.phase == "head_stats":  # the deployed model is loaded: record its features
            with torch.no_grad():
                seen.append((exp.model.features(data.images).double(), data.labels))
        return reply

    exp.client.update = recording_update
    results = run_simulation(cfg, experiment=exp)
    return exp, results, torch.cat([f for f, _ in seen]), torch.cat([y for _, y in seen])


@pytest.fixture
def flower_process():
    """What a Flower process holds, for tests that build messages or call the ClientApp in this one:
    a run/node/task identity for messages; afterwards, fedlorm's logger (the ClientApp routes it to
    Flower's handlers), torch's threads (it pins them) and its cached experiment restored."""
    from flwr.supercore.task_identity import TaskIdentity

    from fedlorm.flower import client

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    logger = logging.getLogger("fedlorm")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    threads = torch.get_num_threads()
    yield
    logger.handlers[:], logger.level, logger.propagate = saved
    torch.set_num_threads(threads)
    client._CACHE.clear()


@pytest.fixture
def tiny() -> RunConfig:
    return tiny_config()


@pytest.fixture(scope="session")
def reference_run():
    """``reference_run(cfg)``: the in-process run of ``cfg``, computed once per test session and shared
    by every test that compares another runtime with it (tests/reference_runs.py)."""
    from reference_runs import reference_run as run

    return run
