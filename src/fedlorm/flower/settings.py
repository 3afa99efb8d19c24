"""Flower's run config ↔ fedlorm's config: flat scalar keys that mirror :class:`RunConfig`'s dotted keys.

Flower run configs hold flat scalars only, and every key must be declared in the app's
``[tool.flwr.app.config]``. So the app declares every fedlorm key (``train.rounds``, ``lorm.alpha_head``,
...) with the value ``""``, which means "keep the preset's value", plus the runtime keys below. Lists are
given comma-separated (``data.datasets = "mnist,fashion_mnist"``), None as ``"none"``.

This module imports neither torch nor flwr: the command-line wrapper uses it before anything heavy.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedlorm.config import (
    ConfigError,
    RunConfig,
    config_from_dict,
    config_to_dict,
    flat_keys,
    validate_config,
)
from fedlorm.presets import preset_config

__all__ = [
    "RUNTIME_DEFAULTS",
    "UNSET",
    "FlowerSettings",
    "config_keys",
    "default_run_config",
    "run_config_for",
    "settings_from_run_config",
    "to_toml",
]

UNSET = ""
"""A mirrored fedlorm key with this value keeps the preset's value."""

RUNTIME_DEFAULTS: dict[str, bool | float | int | str] = {
    "preset": "default",
    "out": "",
    "min-clients": 1,
    "reply-timeout": 600.0,
    "node-wait": 120.0,
    "federated-eval": True,
    "server-data": "",
    "client-data": "",
    "resume": False,
    "overwrite": False,
}
"""Run-config keys of the Flower runtime itself (not fedlorm config keys), with their defaults."""

Scalar = bool | float | int | str


@dataclass(frozen=True)
class FlowerSettings:
    """How the ServerApp runs the federation; everything else is the fedlorm config."""

    preset: str = "default"
    out: str = ""
    """Results directory; "" means runs/flower-PRESET-METHOD-sSEED under the ServerApp's working dir."""
    min_clients: int = 1
    """A step merges only if at least this many clients sent a valid reply; else the state stays.

    At most the number of clients a training round asks (``scenario.participation``)."""
    reply_timeout: float = 600.0
    """Seconds the server waits for a step's replies; later replies are dropped."""
    node_wait: float = 120.0
    """Seconds the server waits at start for one SuperNode per client (then goes on with min_clients)."""
    federated_eval: bool = True
    """After each task, clients also report the merged model's accuracy on their own training shares."""
    server_data: str = ""
    """The server's folder from ``fedlorm partition`` (``DIR/server``): the ServerApp evaluates on it
    and loads no dataset. "" means the configured datasets' evaluation split, loaded by the ServerApp."""
    client_data: str = ""
    """A folder holding ``client-K/`` per client (``fedlorm partition``'s ``DIR``): a SuperNode whose
    node config sets no ``data-dir`` reads ``client_data/client-K``. For simulation, where virtual
    SuperNodes cannot be given node configs of their own; "" means such a node loads the datasets."""
    resume: bool = False
    """Continue the run checkpointed in ``out`` (after a killed ServerApp or SuperLink) instead of
    starting over; the config must be the checkpoint's."""
    overwrite: bool = False
    """Replace an earlier run's results or checkpoint in ``out``; without it the ServerApp refuses a
    folder that holds either, and nothing there is lost."""


def config_keys() -> list[str]:
    """Every fedlorm config key in dotted form (``method``, ``seed``, ``data.datasets``, ...), but
    ``preset``, which is the runtime key of the same name."""
    return [key for key in flat_keys(config_to_dict(RunConfig())) if key != "preset"]


def default_run_config() -> dict[str, Scalar]:
    """The app's declared run config: runtime keys with defaults, every fedlorm key unset."""
    return {**RUNTIME_DEFAULTS, **dict.fromkeys(config_keys(), UNSET)}


def settings_from_run_config(run_config: Mapping[str, Any]) -> tuple[RunConfig, FlowerSettings]:
    """The fedlorm config (preset, then every key that is set) and the runtime settings."""
    known = set(RUNTIME_DEFAULTS) | set(config_keys())
    unknown = sorted(set(run_config) - known)
    if unknown:
        raise ConfigError(
            f"run config keys {unknown[:3]} are neither fedlorm config keys nor {sorted(RUNTIME_DEFAULTS)}"
        )
    values = {**RUNTIME_DEFAULTS, **run_config}
    preset = str(values["preset"])
    method = values.get("method", UNSET)
    # The preset's validated settings of the run's method first, then every key the run sets.
    cfg = preset_config(preset, None if method == UNSET else str(method))
    for key in config_keys():
        value = values.get(key, UNSET)
        if value != UNSET:
            cfg = config_from_dict({key: value}, base=cfg)
    validate_config(cfg)
    if cfg.train.forgetting_diagnostics:
        raise ConfigError(
            "train.forgetting_diagnostics = true needs every client's data on the server; it is an "
            "in-process diagnostic (fedlorm run), not available on Flower"
        )
    settings = FlowerSettings(
        preset=preset,
        out=str(values["out"]),
        min_clients=_integer(values["min-clients"], "min-clients"),
        reply_timeout=float(values["reply-timeout"]),
        node_wait=float(values["node-wait"]),
        federated_eval=_boolean(values["federated-eval"], "federated-eval"),
        server_data=str(values["server-data"]),
        client_data=str(values["client-data"]),
        resume=_boolean(values["resume"], "resume"),
        overwrite=_boolean(values["overwrite"], "overwrite"),
    )
    from fedlorm.fcl.participation import clients_per_round  # imports torch, needed only here

    clients = cfg.scenario.num_clients
    asked = clients_per_round(clients, cfg.scenario.participation)
    if not 1 <= settings.min_clients <= asked:
        allowed = (
            f"scenario.num_clients ({clients})"
            if asked == clients
            else f"{asked} (the clients a training round asks: scenario.participation = "
            f"{cfg.scenario.participation:g} of scenario.num_clients = {clients})"
        )
        raise ConfigError(f"min-clients = {settings.min_clients} is not allowed; expected 1..{allowed}")
    for key, value in (("reply-timeout", settings.reply_timeout), ("node-wait", settings.node_wait)):
        if not (value > 0 and math.isfinite(value)):
            raise ConfigError(f"{key} = {value!r} is not allowed; expected seconds > 0")
    return cfg, settings


def run_config_for(cfg: RunConfig, settings: FlowerSettings) -> dict[str, Scalar]:
    """A run config that reproduces ``cfg`` exactly: the runtime keys, the preset, every key that differs.

    Keys equal to the preset's value are left out, so the run config stays short and only keys a run
    changes must be declared by the app.
    """
    preset = flat_keys(config_to_dict(preset_config(settings.preset, cfg.method)))
    out: dict[str, Scalar] = {
        "preset": settings.preset,
        "out": settings.out,
        "min-clients": settings.min_clients,
        "reply-timeout": float(settings.reply_timeout),
        "node-wait": float(settings.node_wait),
        "federated-eval": settings.federated_eval,
        "server-data": settings.server_data,
        "client-data": settings.client_data,
        "resume": settings.resume,
        "overwrite": settings.overwrite,
    }
    for key, value in flat_keys(config_to_dict(cfg)).items():
        # The method always goes: the other keys are compared with the preset's settings for it.
        if key == "method" or (key != "preset" and (key not in preset or value != preset[key])):
            out[key] = _scalar(value)
    return out


def to_toml(run_config: Mapping[str, Scalar]) -> str:
    """Flat run config as TOML text (dotted keys), for ``flwr run --run-config FILE.toml``."""
    lines = []
    for key, value in run_config.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, int | float):
            text = repr(value)
        else:
            text = json.dumps(str(value), ensure_ascii=False)
        lines.append(f"{key} = {text}")
    return "\n".join(lines) + "\n"



def _scalar(value: Any) -> Scalar:
    if value is None:
        return "none"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    if isinstance(value, bool | int | float | str):
        return value
    raise ConfigError(f"config value {value!r} cannot travel in a Flower run config")


def _integer(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f"{key} = {value!r} is not an integer")
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(f"{key} = {value!r} is not an integer") from None
    if not number.is_integer():
        raise ConfigError(f"{key} = {value!r} is not an integer")
    return int(number)


def _boolean(value: Any, key: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ConfigError(f"{key} = {value!r} is not true or false")
