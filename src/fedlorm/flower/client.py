"""The client side of a Flower run: the experiment a SuperNode builds and what it computes per message.

It calls exactly what the in-process simulator calls for client k (:meth:`Client.update` with the
stream ``torch_generator(seed, "client", task, round, k)``), so a reply's summands are the same bits.
A node given ``data_dir`` (its folder from ``fedlorm partition``) reads only that folder and loads
no dataset; its shares are the simulator's, so the replies are the same bits too. A node without it
loads the dataset once and then reads its own shares from the node cache
(:mod:`fedlorm.flower.node_cache`), the same way: in deployment every message is a fresh process.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from torch import Tensor

from fedlorm.config import RunConfig, config_to_dict
from fedlorm.methods import ClientReply, Instruction
from fedlorm.runtime.evaluation import evaluate
from fedlorm.runtime.experiment import Experiment, build_experiment
from fedlorm.seeding import derive_seed, torch_generator

__all__ = ["check_partition", "client_experiment", "local_accuracy", "local_update"]

_CACHE: dict[str, Experiment] = {}


def client_experiment(cfg: RunConfig, data_dir: str | None = None, partition: int = 0) -> Experiment:
    """The experiment for ``cfg``, built once per process (simulation workers serve many messages).

    With ``data_dir``: client ``partition``'s own folder is read (ValueError, one line, if it is
    missing, unreadable, or of another run or client) and no dataset is loaded. Without it: client
    ``partition``'s node-cache entry if there is one, else the dataset (which also writes the entry).
    """
    config = config_to_dict(cfg)
    whole = json.dumps([config, None, None], sort_keys=True)  # a full build serves every partition
    key = json.dumps([config, data_dir, partition], sort_keys=True)
    if whole in _CACHE and not data_dir:
        return _CACHE[whole]
    if key not in _CACHE:
        if data_dir:
            from fedlorm.runtime.partitions import node_experiment

            exp = node_experiment(cfg, data_dir, partition)
        else:
            from fedlorm.flower import node_cache

            exp = node_cache.load_inputs(cfg, partition)
            if exp is None:
                exp = build_experiment(cfg)
                node_cache.store_inputs(cfg, exp, partition)
                key = whole
        _CACHE.clear()
        _CACHE[key] = exp
        torch.manual_seed(derive_seed(cfg.seed, "torch"))
    return _CACHE[key]


def check_partition(exp: Experiment, partition: int, partitions: int) -> None:
    """ValueError unless this SuperNode's partition fits the run's clients."""
    clients = exp.cfg.scenario.num_clients
    if partitions != clients:
        raise ValueError(f"num-partitions = {partitions} but the run has {clients} clients")
    if not 0 <= partition < clients:
        raise ValueError(f"partition-id = {partition} is outside 0..{clients - 1}")


def local_update(
    exp: Experiment, partition: int, instruction: Instruction, arrays: Mapping[str, Tensor]
) -> ClientReply:
    """Client ``partition``'s reply to ``instruction``, exactly as the in-process simulator computes it."""
    generator = torch_generator(exp.cfg.seed, "client", instruction.task, instruction.round, partition)
    data = exp.client_share(instruction.task, partition)
    return exp.client.update(arrays, instruction, data, generator)


def local_accuracy(
    exp: Experiment, partition: int, task: int, arrays: Mapping[str, Tensor]
) -> tuple[float, int]:
    """Class-IL accuracy (%) of ``arrays``' model on this client's shares of tasks 0..task, and their size."""
    exp.client.deploy(arrays, task)
    shares = [exp.client_share(t, partition) for t in range(task + 1)]
    images = torch.cat([share.images for share in shares])
    labels = torch.cat([share.labels for share in shares])
    train = exp.cfg.train
    result = evaluate(exp.model, images, labels, exp.scenario, task, train.eval_batch_size, train.precision)
    return result.seen_accuracy, len(labels)
