"""The SuperNode's cache of its own shares: same bits as the full build, keyed, atomic, self-healing."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_config

from fedlorm.config import apply_overrides
from fedlorm.flower import client, node_cache
from fedlorm.runtime.experiment import build_experiment


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.setenv(node_cache.ENV, str(tmp_path / "cache"))
    client._CACHE.clear()
    threads = torch.get_num_threads()
    yield
    client._CACHE.clear()
    torch.set_num_threads(threads)


def test_an_entry_gives_the_full_builds_shares_bit_for_bit(tmp_path):
    cfg = tiny_config("train.threads=1")
    full = build_experiment(cfg)
    folder = node_cache.store_inputs(cfg, full, 1)
    assert folder is not None and folder.parent.parent == tmp_path / "cache"
    assert not [p for p in folder.parent.parent.iterdir() if p.name.startswith(".")]  # no staging left
    cached = node_cache.load_inputs(cfg, 1)
    assert cached is not None and len(cached.train) == 0 and len(cached.test) == 0
    assert cached.scenario.class_order == full.scenario.class_order
    assert cached.class_names == full.class_names
    for task in range(full.scenario.num_tasks):
        a, b = full.client_share(task, 1), cached.client_share(task, 1)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    with pytest.raises(ValueError, match="client 1's data only"):
        cached.client_share(0, 0)


def test_other_seed_or_client_uses_another_entry_and_the_switch_turns_it_off(monkeypatch):
    cfg = tiny_config("train.threads=1")
    keys = {
        node_cache.entry_key(cfg, 0),
        node_cache.entry_key(cfg, 1),
        node_cache.entry_key(apply_overrides(cfg, ["seed=1"]), 0),
        node_cache.entry_key(apply_overrides(cfg, ["data.root=/elsewhere"]), 0),
    }
    assert len(keys) == 4
    assert node_cache.entry_key(apply_overrides(cfg, ["train.rounds=7"]), 0) == node_cache.entry_key(cfg, 0)
    monkeypatch.setenv(node_cache.ENV, "off")
    assert node_cache.cache_root() is None
    assert node_cache.load_inputs(cfg, 0) is None


def test_a_damaged_entry_is_deleted_and_rebuilt():
    cfg = tiny_config("train.threads=1")
    folder = node_cache.store_inputs(cfg, build_experiment(cfg), 0)
    (folder / "task-0.safetensors").write_bytes(b"garbage")
    assert node_cache.load_inputs(cfg, 0) is None
    assert not folder.parent.exists()
    exp = client.client_experiment(cfg, None, 0)  # rebuilds from the dataset and writes the entry again
    assert len(exp.train) > 0 and folder.is_dir()
    client._CACHE.clear()
    again = client.client_experiment(cfg, None, 0)  # a fresh process: from the entry, no dataset
    assert len(again.train) == 0
    share, cached = exp.client_share(1, 0), again.client_share(1, 0)
    assert torch.equal(share.images, cached.images) and torch.equal(share.labels, cached.labels)
