"""Per-node data: write a run's client shares and evaluation set (``fedlorm partition``), and read
one participant's folder back for the run that wrote it.

The shares are the simulator's own (:meth:`Experiment.client_data`): the same seeded subsample,
class order and Dirichlet split, so a run whose clients read their folders gives the same numbers.
The on-disk format is :mod:`fedlorm.data.partition_store` (described in docs/partitions.md).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from fedlorm.config import RunConfig
from fedlorm.data.partition_store import (
    SERVER,
    Participant,
    StoredPartition,
    TaskData,
    check_output,
    folder_name,
    make_manifest,
    read_partition,
)
from fedlorm.data.partition_store import write_partitions as write_folders
from fedlorm.fcl import Scenario
from fedlorm.methods import ClientData
from fedlorm.runtime.experiment import (
    ClientSource,
    Experiment,
    RunData,
    build_data,
    build_experiment_without_data,
    effective_config,
    preprocessing,
)

__all__ = [
    "client_manifest",
    "data_config",
    "folder_source",
    "load_partition",
    "node_experiment",
    "server_experiment",
    "write_partitions",
]


def data_config(cfg: RunConfig, who: Participant) -> dict[str, Any]:
    """The config fields that decide ``who``'s data (what a folder's fingerprint hashes).

    Clients' shares do not depend on ``data.test_per_class``, so changing it keeps their folders
    valid; the server's evaluation set does.
    """
    cfg = effective_config(cfg)
    data, sc = cfg.data, cfg.scenario
    fields: dict[str, Any] = {
        "seed": cfg.seed,
        "data.datasets": list(data.datasets),
        "data.storage_size": preprocessing(cfg).storage_size,
        "data.photo_resize": data.photo_resize,
        "data.train_per_class": data.train_per_class,
        "data.validation_per_class": data.validation_per_class,
        "scenario.tasks": sc.tasks,
        "scenario.class_order": sc.class_order,
        "scenario.num_clients": sc.num_clients,
        "scenario.beta": sc.beta,
        "scenario.min_samples": sc.min_samples,
    }
    if who == SERVER:
        fields["data.test_per_class"] = data.test_per_class
    return fields


# -- writing ---------------------------------------------------------------------------------------
def write_partitions(cfg: RunConfig, out: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
    """Load ``cfg``'s data and write ``out/client-K`` for every client and ``out/server``."""
    cfg = effective_config(cfg)
    check_output(out, overwrite)  # before the (slow) data loading
    data = build_data(cfg)
    return write_folders(out, _folders(cfg, data), overwrite=overwrite)


def client_manifest(
    cfg: RunConfig, scenario: Scenario, class_names: list[str], client: int
) -> dict[str, Any]:
    """The manifest of client ``client``'s folder for the run ``cfg`` (as :func:`effective_config`
    returns it) with this scenario and class names."""
    spans = [scenario.task_classes(t) for t in range(scenario.num_tasks)]
    return make_manifest(
        client,
        split="train",
        config=data_config(cfg, client),
        num_clients=cfg.scenario.num_clients,
        class_order=scenario.class_order,
        task_classes=spans,
        class_names=class_names,
    )


def _folders(cfg: RunConfig, data: RunData) -> Iterator[tuple[dict[str, Any], list[TaskData]]]:
    """Each participant's manifest and per-task data, one at a time (only one copy in memory)."""
    scenario = data.scenario
    spans = [scenario.task_classes(t) for t in range(scenario.num_tasks)]
    common = {
        "num_clients": cfg.scenario.num_clients,
        "class_order": scenario.class_order,
        "task_classes": spans,
        "class_names": data.class_names,
    }
    train = data.train
    for k in range(cfg.scenario.num_clients):
        tasks = [(train.images[part[k]], train.labels[part[k]]) for part in data.partitions]
        yield client_manifest(cfg, scenario, data.class_names, k), tasks
    split = "test" if cfg.data.validation_per_class is None else "validation"
    labels = data.test.labels
    tasks = []
    for span in spans:
        idx = torch.nonzero((labels >= span.start) & (labels < span.stop)).flatten()
        tasks.append((data.test.images[idx], labels[idx]))
    yield make_manifest(SERVER, split=split, config=data_config(cfg, SERVER), **common), tasks


# -- reading ---------------------------------------------------------------------------------------
def _read(path: str | os.PathLike[str], cfg: RunConfig, who: Participant) -> StoredPartition:
    """``who``'s checked folder for ``cfg``; a hand-made one (no fingerprint) must still fit the run."""
    cfg = effective_config(cfg)
    stored = read_partition(path, who, config=data_config(cfg, who))
    sc = cfg.scenario
    where = f"partition folder {str(path)!r}"
    if stored.num_clients != sc.num_clients:
        raise ValueError(f"{where} is one of {stored.num_clients} clients, but the run has {sc.num_clients}")
    tasks = sc.tasks if isinstance(sc.tasks, int) else len(sc.tasks)
    if len(stored.tasks) != tasks:
        raise ValueError(f"{where} holds {len(stored.tasks)} tasks, but the run has {tasks}")
    if not isinstance(sc.tasks, int) and list(stored.task_sizes) != list(sc.tasks):
        raise ValueError(f"{where} has task sizes {list(stored.task_sizes)}, but the run has {sc.tasks}")
    return stored


def load_partition(path: str | os.PathLike[str], cfg: RunConfig, who: Participant) -> list[ClientData]:
    """Per task, the data in ``who``'s folder ``path`` (a client index, or ``"server"``), checked
    against the run ``cfg``. ValueError, one line naming ``path``, for a folder that is missing,
    empty, of another run or participant, or unreadable."""
    return [ClientData(images, labels) for images, labels in _read(path, cfg, who).tasks]


def folder_source(root: str | os.PathLike[str], cfg: RunConfig) -> ClientSource:
    """Every client's shares read from ``root/client-K`` (all checked up front), as an
    :attr:`Experiment.client_source` for the in-process simulator."""
    clients = effective_config(cfg).scenario.num_clients
    shares = [load_partition(Path(root) / folder_name(k), cfg, k) for k in range(clients)]
    return lambda task, client: shares[client][task]


def node_experiment(cfg: RunConfig, path: str | os.PathLike[str], client: int) -> Experiment:
    """Model and methods of ``cfg`` with client ``client``'s shares from its folder ``path``; loads
    no dataset (scenario and class names come from the folder's manifest)."""
    stored = _read(path, cfg, client)
    shares = [ClientData(images, labels) for images, labels in stored.tasks]

    def source(task: int, k: int) -> ClientData:
        if k != client:
            raise ValueError(f"this node holds client {client}'s data only, not client {k}'s")
        return shares[task]

    scenario = Scenario(stored.class_order, stored.task_sizes)
    return build_experiment_without_data(cfg, scenario, list(stored.class_names), source)


def server_experiment(cfg: RunConfig, path: str | os.PathLike[str]) -> Experiment:
    """Model and methods of ``cfg`` evaluating on the server folder ``path`` (``DIR/server``); loads
    no dataset and holds no client's data.

    The evaluation set is the folder's tasks one after another. The in-process run keeps the test
    split in its loaded order instead; accuracies do not depend on the order, and float sums over
    it (mean logit norms) differ at most in rounding.
    """
    stored = _read(path, cfg, SERVER)

    def source(task: int, k: int) -> ClientData:
        raise ValueError(f"the server holds no client's data (asked for client {k}'s share of task {task})")

    tasks = [(images, labels) for images, labels in stored.tasks if len(labels)] or list(stored.tasks[:1])
    shapes = sorted({tuple(images.shape[1:]) for images, _ in tasks})
    if len(shapes) > 1:
        raise ValueError(
            f"partition folder {str(path)!r} has images of different sizes across tasks "
            f"({', '.join('x'.join(map(str, s)) for s in shapes)}); the evaluation set needs one"
        )
    test = ClientData(torch.cat([i for i, _ in tasks]), torch.cat([lab for _, lab in tasks]))
    scenario = Scenario(stored.class_order, stored.task_sizes)
    return build_experiment_without_data(cfg, scenario, list(stored.class_names), source, test)
