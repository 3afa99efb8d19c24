"""In-process reference runs, run once per test session and shared by every test that checks another
runtime (Flower simulation, loopback grids, deployments, partition folders) against them, with the one
check of what "equals the in-process run" means.

The ``reference_run`` fixture of conftest.py hands out :func:`reference_run`; a config's run is
computed the first time a test asks for it, and every later test gets the same read-only record.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedlorm.config import RunConfig, config_to_dict
from fedlorm.fcl import Scenario
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.report import untimed
from fedlorm.runtime.simulator import run_simulation

ATOL = 1e-6
"""How far a runtime may be from the in-process run: float32 round-off of a different summation order."""


@dataclass(frozen=True)
class ReferenceRun:
    """One finished in-process run: its results, its server's final state and its data layout."""

    cfg: RunConfig
    results: Mapping[str, Any]
    server_state: Mapping[str, Tensor]
    scenario: Scenario
    class_names: list[str]
    seconds: float
    """Wall time of the run when it was computed (build and run)."""


_RUNS: dict[str, ReferenceRun] = {}


def reference_run(cfg: RunConfig) -> ReferenceRun:
    """The in-process run of ``cfg``, computed once per session (a deep copy for the caller's results)."""
    key = json.dumps(config_to_dict(cfg), sort_keys=True, default=str)
    if key not in _RUNS:
        started = time.perf_counter()
        exp = build_experiment(cfg)
        results = run_simulation(cfg, experiment=exp)
        state = {k: v.detach().clone() for k, v in exp.server.state_dict().items()}
        _RUNS[key] = ReferenceRun(
            cfg=cfg,
            results=MappingProxyType(results),
            server_state=MappingProxyType(state),
            scenario=exp.scenario,
            class_names=list(exp.class_names),
            seconds=time.perf_counter() - started,
        )
    return _RUNS[key]


def results_of(run: ReferenceRun) -> dict[str, Any]:
    """A private copy of the reference's results dict, to compare or change freely."""
    return copy.deepcopy(dict(run.results))


def assert_equals_reference(
    results: Mapping[str, Any],
    server_state: Mapping[str, Tensor] | None,
    reference: ReferenceRun,
    *,
    exact_accuracy: bool = False,
    traffic: bool = False,
) -> None:
    """What "equals the in-process run" means for every runtime.

    The accuracy matrix (to :data:`ATOL`, or exactly), the test-set sizes, every metrics row but
    its timings, and each array of the server's final state (to :data:`ATOL`, same keys).

    Args:
        results: The other runtime's results dict.
        server_state: Its server's final state (None: not compared).
        reference: The in-process run of the same config.
        exact_accuracy: Require the very same accuracy numbers.
        traffic: Also require the same upload and download bytes and diagnostics.
    """
    local = reference.results
    shapes = [[len(row) for row in r["accuracy_matrix"]] for r in (results, local)]
    assert shapes[0] == shapes[1], shapes
    if exact_accuracy:
        assert results["accuracy_matrix"] == local["accuracy_matrix"]
    else:
        flat = [[v for row in r["accuracy_matrix"] for v in row] for r in (results, local)]
        assert np.allclose(flat[0], flat[1], rtol=0, atol=ATOL), flat
    assert results["task_test_sizes"] == local["task_test_sizes"]
    assert untimed(results["rounds"]) == untimed(local["rounds"])
    if traffic:
        for key in ("upload_bytes", "download_bytes", "diagnostics"):
            assert results[key] == local[key], key
    if server_state is not None:
        assert server_state.keys() == reference.server_state.keys()
        for key, value in reference.server_state.items():
            torch.testing.assert_close(server_state[key], value, rtol=0, atol=ATOL, msg=key)
