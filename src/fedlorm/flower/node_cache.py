"""A SuperNode's cache of its own data share, so that only a run's first message on a node loads the dataset.

In deployment (flwr 1.42, both isolation modes) every message runs in a fresh ``flwr-clientapp``
process. A node without ``data-dir`` would load and split the whole dataset (train and test) in every
one of them just to take out its own share. Instead, the first message writes the node's share of every
task, in the partition-folder format of :mod:`fedlorm.data.partition_store` (docs/partitions.md), to

    ``$FEDLORM_NODE_CACHE``, else ``$FLWR_HOME/fedlorm-node-cache``, else ``~/.flwr/fedlorm-node-cache``

as ``<key>/client-K/``, and every later message reads that folder exactly as a node given
``data-dir`` does (:func:`fedlorm.runtime.partitions.node_experiment`), which gives the same bits.

``<key>`` is a SHA-256 of what decides the share: the config fields of
:func:`fedlorm.runtime.partitions.data_config` (seed, datasets, sizes, scenario), the dataset folder
(``data.root`` resolved), the client index and fedlorm's version. Another config, seed, client or
data folder gives another key; an entry that fails its own checks (its manifest's fingerprint and
files' SHA-256, as for any partition folder) is deleted and rebuilt. An entry is written into a
temporary folder beside it and renamed into place, so a crash never leaves half an entry and two
processes racing for one entry keep one complete copy.

Clear it by deleting the folder (``rm -rf "$FLWR_HOME/fedlorm-node-cache"``; nothing else lives
there); changing files inside ``data.root`` in place needs that too. ``FEDLORM_NODE_CACHE=off``
switches the cache off. Nodes given ``data-dir`` never use it: their folder is already this format.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from fedlorm import __version__
from fedlorm.config import RunConfig
from fedlorm.data.common import dataset_root
from fedlorm.data.partition_store import folder_name, write_partitions
from fedlorm.runtime.experiment import Experiment, effective_config
from fedlorm.runtime.partitions import client_manifest, data_config, node_experiment

__all__ = ["ENV", "cache_root", "entry_key", "load_inputs", "store_inputs"]

ENV = "FEDLORM_NODE_CACHE"
_OFF = ("off", "0", "false", "none")
_FORMAT = "fedlorm-node-cache/1"

logger = logging.getLogger(__name__)


def cache_root() -> Path | None:
    """The cache folder (see the module docstring), or None when ``FEDLORM_NODE_CACHE=off``."""
    given = os.environ.get(ENV, "").strip()
    if given.lower() in _OFF:
        return None
    if given:
        return Path(given).expanduser()
    home = os.environ.get("FLWR_HOME", "").strip()
    return (Path(home).expanduser() if home else Path.home() / ".flwr") / "fedlorm-node-cache"


def entry_key(cfg: RunConfig, client: int) -> str:
    """SHA-256 (hex) of everything that decides client ``client``'s share of the run ``cfg``."""
    cfg = effective_config(cfg)
    facts = {
        "format": _FORMAT,
        "fedlorm": __version__,
        "client": client,
        "data": data_config(cfg, client),
        "root": str(dataset_root(cfg.data.root).resolve()),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def _folder(root: Path, cfg: RunConfig, client: int) -> Path:
    return root / entry_key(cfg, client) / folder_name(client)


def load_inputs(cfg: RunConfig, client: int) -> Experiment | None:
    """Client ``client``'s experiment built from its cache entry, or None if there is none (a bad
    entry is deleted, so the caller rebuilds it)."""
    root = cache_root()
    if root is None:
        return None
    folder = _folder(root, cfg, client)
    if not folder.is_dir():
        return None
    try:
        return node_experiment(cfg, folder, client)
    except ValueError as err:
        logger.warning("node cache entry %s is unusable, rebuilding it: %s", folder.parent, err)
        shutil.rmtree(folder.parent, ignore_errors=True)
        return None


def store_inputs(cfg: RunConfig, exp: Experiment, client: int) -> Path | None:
    """Write client ``client``'s shares of ``exp`` (built in full from ``cfg``) as its cache entry;
    its folder, or None (cache off, or the folder cannot be written: logged, the run goes on)."""
    root = cache_root()
    if root is None:
        return None
    folder = _folder(root, cfg, client)
    if folder.is_dir():
        return folder
    tasks = [exp.client_share(t, client) for t in range(exp.scenario.num_tasks)]
    manifest = client_manifest(effective_config(cfg), exp.scenario, exp.class_names, client)
    try:
        root.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".entry-", suffix=".tmp", dir=root))
        try:
            write_partitions(staging, [(manifest, [(d.images, d.labels) for d in tasks])], overwrite=True)
            os.replace(staging, folder.parent)
        except OSError:
            if not folder.is_dir():  # not a lost race with another process writing the same entry
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except OSError as err:
        logger.warning("cannot write the node cache entry in %s: %s", root, err)
        return None
    return folder
