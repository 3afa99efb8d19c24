"""Typed run configuration: dataclasses, TOML files and dotted ``key=value`` overrides.

Every knob of a run lives here with its default; a results file stores the whole config so a run can
be repeated from it. Unknown keys and values of the wrong type are errors, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

__all__ = [
    "ConfigError",
    "DataConfig",
    "LormConfig",
    "ModelConfig",
    "PromptConfig",
    "RunConfig",
    "ScenarioConfig",
    "SecureConfig",
    "TrainConfig",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "flat_keys",
    "load_toml",
    "validate_config",
]


_INF = float("inf")


class ConfigError(ValueError):
    """A configuration value or key that is not allowed; the message is one line for the user."""


@dataclass
class DataConfig:
    """Which images, how many, at what size; how they are preprocessed and augmented.

    ``test_crop``: ``resize`` to image_size, or ``center-crop`` (shorter side to
    image_size / crop_pct, then the centre crop; photo datasets are then stored at that size).
    ``augment``: the training augmentation (``flip``, ``random-resized-crop`` with minimum area
    ``augment_scale``, ``resize-random-crop``; ``augment_flip`` adds a horizontal flip to the
    crops), also applied in the statistics passes unless ``augment_statistics`` is false.
    ``normalize``: ``model`` (the backbone's own mean/std), ``half`` (0.5/0.5), ``imagenet``, ``none``.
    ``photo_resize``: how a photo of any shape becomes the square it is stored as: ``crop`` (shorter
    side to the storage size, centre square: aspect ratio kept, long side's margins lost) or
    ``squash`` (the whole photo to ``image_size`` × ``image_size``, as the LoRM reference stores it;
    test-time crops and training crops then start from that square).
    """

    datasets: list[str] = field(default_factory=lambda: ["fashion_mnist", "mnist"])
    root: str | None = None
    download: bool = False
    image_size: int = 48
    train_per_class: int | None = 200
    test_per_class: int | None = 100
    validation_per_class: int | None = None
    normalize: Literal["model", "half", "imagenet", "none"] = "model"
    test_crop: Literal["resize", "center-crop"] = "resize"
    crop_pct: float = 0.875
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    photo_resize: Literal["crop", "squash"] = "crop"
    augment: Literal["none", "flip", "random-resized-crop", "resize-random-crop"] = "none"
    augment_scale: float = 0.08
    augment_flip: bool = True
    augment_statistics: bool = True


@dataclass
class ScenarioConfig:
    """Class-incremental task split, the federated partition of each task and client sampling.

    ``participation``: the fraction of clients each training round asks, in (0, 1]. A round asks
    max(1, participation × num_clients rounded half up) clients, drawn without replacement from the
    seeded stream (seed, "participation", task, round) (:mod:`fedlorm.fcl.participation`), so both
    runtimes and a resumed run ask the same ones; only they train, reply and count in the merge and
    in the traffic. The end-of-task statistics steps (``task_stats``, ``head_stats``) always ask
    every client: the cross-task merge and the analytic head need every class's sums. 1.0 (the
    default) asks every client in every round.
    """

    tasks: int | list[int] = 5
    class_order: Literal["natural", "random"] = "natural"
    num_clients: int = 10
    beta: float = 0.5
    min_samples: int = 6
    participation: float = 1.0


@dataclass
class ModelConfig:
    """Backbone, its weights and the LoRA adapters put on it."""

    backbone: str = "efficientnet_lite0"
    weights: str = "pretrained"
    rank: int = 4
    scaling: float = 1.0
    targets: str | None = None
    head_init: Literal["zeros", "trunc-normal"] = "zeros"


@dataclass
class TrainConfig:
    """Rounds per task and the clients' local optimisation (AdamW, masked cross-entropy).

    ``precision``: ``32``, ``bf16-mixed`` (autocast to bfloat16) or ``16-mixed`` (autocast to
    float16 with a gradient scaler, CUDA only); statistics always accumulate in float64.
    ``forgetting_diagnostics``: feature drift and an oracle head at the end of an in-process run
    (:mod:`fedlorm.runtime.forgetting`). ``tensorboard``: also write every step's metrics as
    TensorBoard scalars to ``OUT/tensorboard`` (the ``tensorboard`` extra).
    ``lwf_lambda``, ``lwf_temperature``: the weight λ and temperature T of ``lwf``'s distillation
    term (Li & Hoiem's 1 and 2). ``ewc_lambda``: the weight λ of ``ewc``'s penalty, chosen on the
    built-in benchmark's validation split from 5e2-5e5 (docs/evidence.md).
    """

    rounds: int = 4
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 3e-3
    lr_a: float | None = None
    lr_b: float | None = None
    lr_head: float | None = None
    weight_decay: float = 0.0
    eval_batch_size: int = 256
    eval_every_round: bool = False
    forgetting_diagnostics: bool = False
    tensorboard: bool = False
    device: str = "auto"
    threads: int | None = None
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    lwf_lambda: float = 1.0
    lwf_temperature: float = 2.0
    ewc_lambda: float = 50000.0


@dataclass
class LormConfig:
    """LoRM's merges: statistics shrinkage, head merge and which model the statistics go through.

    ``adapt_tasks``: train the adapters on the first N tasks only; later tasks add their classes
    to the analytic head through a backbone that no longer moves (first-session adaptation).
    """

    alpha_backbone: float = 0.0
    alpha_head: float = 0.5
    head_merge: Literal["regmean", "fedavg", "analytic", "ccvr"] = "fedavg"
    head_ridge: float = 1e-3
    head_projection: int = 0
    """``head_merge = analytic``: M > 0 solves the head on σ(F R) for a seeded d × M Gaussian R
    (random features, RanPAC); 0 solves it on the pooled features F."""
    head_activation: Literal["relu", "gelu", "tanh", "sigmoid", "identity"] = "relu"
    """σ of ``head_projection`` (unused without one)."""
    stats_model: Literal["trained", "reference"] = "reference"
    task_start: Literal["pretrained", "merged"] = "pretrained"
    cross_task: Literal["closed_form", "simple_mean", "task_arithmetic", "ties"] = "closed_form"
    ridge: float = 1e-10
    adapt_tasks: int | None = None
    ties_density: float = 0.2
    """``cross_task = ties``: the share of each task delta's entries (largest magnitudes) kept."""
    ties_scale: float = 1.0
    """``cross_task = ties``: λ, the factor on the merged update."""
    ccvr_samples: int = 100
    """``head_merge = ccvr``: virtual features drawn per seen class at each task's end."""
    ccvr_epochs: int = 10
    """``head_merge = ccvr``: SGD epochs of the head's calibration on the virtual features."""
    ccvr_lr: float = 0.01
    """``head_merge = ccvr``: the calibration's SGD learning rate."""


@dataclass
class PromptConfig:
    """The prompt methods' pools (``l2p``, ``coda-p``; ViT backbones only, docs/methods.md)."""

    pool_size: int = 10
    """``l2p``: M, the prompts in the pool (each with a learnable key)."""
    length: int = 5
    """``l2p``: L_p, the tokens of one prompt."""
    top_k: int = 5
    """``l2p``: N, the prompts selected per image (their N·L_p tokens are prepended)."""
    key_weight: float = 0.1
    """``l2p``: λ, the weight of the key–query term λ·Σ(1 − cos) in the loss."""
    coda_components: int = 10
    """``coda-p``: prompt components added per task (each with a key and an attention vector)."""
    coda_length: int = 8
    """``coda-p``: the prefix length per layer (even: half keys, half values)."""
    coda_layers: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    """``coda-p``: the transformer blocks that get a prefix (0-based)."""


@dataclass
class SecureConfig:
    """Secure aggregation (Flower's SecAgg+): the server learns only the sums of the clients' replies.

    ``aggregation``: on or off (off: every number is as without this section). Each summand entry is
    sent as ``words`` fixed-point digits of ``word_bits`` bits under the public bound
    2^``bound_exponent`` on any one client's |entry| (docs/secure-aggregation.md); the digits are
    summed modulo 2^``modulus_bits``. ``num_shares`` and ``reconstruction_threshold`` are SecAgg+'s:
    an integer count, or a float in (0, 1] (a share of a step's clients, resp. of the shares); the
    default threshold, above half the shares, keeps a server that lies about dropouts from rebuilding
    a client's mask (docs/security.md).

    Without ``aggregation`` the server sees each reply and bounds it on public grounds
    (docs/security.md): no per-sample magnitude above 2^``bound_exponent``, and none above
    ``spread_limit`` (Grams and counts) or ``value_spread_limit`` (values) times the median of the
    step's other replies (``inf``: no such test).
    """

    aggregation: bool = False
    words: int = 4
    word_bits: int = 24
    modulus_bits: int = 32
    bound_exponent: int = 40
    num_shares: int | float = 1.0
    reconstruction_threshold: int | float = 0.67
    spread_limit: float = 1e4
    value_spread_limit: float = 1e6


@dataclass
class RunConfig:
    """One federated class-incremental run.

    ``preset``: the named preset the config was built from (``fedlorm.presets``), which decides the
    validated per-method settings it starts from and lets results say where each value came from;
    None for a config built directly.
    """

    method: str = "lorm"
    seed: int = 0
    preset: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    scenario: ScenarioConfig = field(default_factory=ScenarioConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    lorm: LormConfig = field(default_factory=LormConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    secure: SecureConfig = field(default_factory=SecureConfig)


def flat_keys(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested (or already dotted) mappings as one level of dotted keys: ``{"train.lr": 0.001, ...}``.

    Args:
        tree: A config as :func:`config_to_dict` gives it, or any nested mapping of its sections.
        prefix: Put before every key (used by the recursion).

    Returns:
        Dotted key → value, in the mapping's order.
    """
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The config as plain JSON/TOML-compatible data (None values kept)."""
    return dataclasses.asdict(cfg)


def config_from_dict(data: Mapping[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A config from nested mappings (as read from TOML), on top of ``base`` or the defaults."""
    cfg = _copy(base) if base is not None else RunConfig()
    _merge_into(cfg, data, prefix="")
    return cfg


def load_toml(path: str | Path, base: RunConfig | None = None) -> RunConfig:
    """Read a TOML config file (sections = dataclass groups, dotted keys allowed)."""
    path = Path(path)
    if not path.is_file():
        problem = "is not a file" if path.exists() else "does not exist"
        raise ConfigError(f"config file {str(path)!r} {problem}")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    return config_from_dict(data, base)


def apply_overrides(cfg: RunConfig, overrides: Iterable[str]) -> RunConfig:
    """Apply ``section.key=value`` strings; values are parsed as TOML, bare words as strings."""
    cfg = _copy(cfg)
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. train.rounds=5)"
            )
        _set_path(cfg, key.split("."), _parse_value(raw.strip()))
    return cfg


def _copy(cfg: RunConfig) -> RunConfig:
    return config_from_plain(dataclasses.asdict(cfg))


def config_from_plain(data: Mapping[str, Any]) -> RunConfig:
    """Rebuild a config from ``config_to_dict`` output (e.g. a results file's ``config``)."""
    cfg = RunConfig()
    _merge_into(cfg, data, prefix="")
    return cfg


def _parse_value(raw: str) -> Any:
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _merge_into(obj: Any, data: Mapping[str, Any], prefix: str) -> None:
    for key, value in data.items():
        _set_path(obj, str(key).split("."), value, shown_prefix=prefix)


def _set_path(obj: Any, path: list[str], value: Any, shown_prefix: str = "") -> None:
    target = obj
    for depth, name in enumerate(path):
        shown = shown_prefix + ".".join(path[: depth + 1])
        fields = {f.name: f for f in dataclasses.fields(target)}
        if name not in fields:
            allowed = ", ".join(sorted(shown_prefix + ".".join([*path[:depth], f]) for f in fields))
            raise ConfigError(f"unknown config key {shown!r}; allowed here: {allowed}")
        hint = typing.get_type_hints(type(target))[name]
        last = depth == len(path) - 1
        if dataclasses.is_dataclass(hint):
            if last:
                if not isinstance(value, Mapping):
                    raise ConfigError(
                        f"config key {shown!r} is a section; give it a table, not {value!r}"
                    )
                _merge_into(getattr(target, name), value, prefix=shown + ".")
                return
            target = getattr(target, name)
            continue
        if not last:
            raise ConfigError(f"config key {shown!r} is a value, not a section")
        setattr(target, name, _coerce(value, hint, shown))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check ``value`` against the field's type hint, converting only where lossless."""
    origin = get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        is_none = value is None or (isinstance(value, str) and value.lower() == "none")
        if is_none and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"config key {key!r} got {value!r}")
    if origin is Literal:
        allowed = get_args(hint)
        if isinstance(value, int) and not isinstance(value, bool) and str(value) in allowed:
            value = str(value)  # train.precision=32 parses as the integer 32
        if value not in allowed:
            raise ConfigError(
                f"config key {key!r} got {value!r}; allowed: {', '.join(map(str, allowed))}"
            )
        return value
    if origin is list:
        (item_type,) = get_args(hint)
        if isinstance(value, str):
            value = [v for v in (p.strip() for p in value.split(",")) if v]
        if isinstance(value, int) and not isinstance(value, bool) and item_type is int:
            raise ConfigError(
                f"config key {key!r} expects a list of {item_type.__name__}, got {value!r}"
            )
        if not isinstance(value, list | tuple):
            raise ConfigError(
                f"config key {key!r} expects a list of {item_type.__name__}, got {value!r}"
            )
        return [_coerce(v, item_type, key) for v in value]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ConfigError(f"config key {key!r} expects true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} expects an integer, got {value!r}")
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key {key!r} expects a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key {key!r} expects a string, got {value!r}")
    raise ConfigError(f"config key {key!r} has an unsupported type {hint!r}")


def validate_config(cfg: RunConfig) -> None:
    """Range checks that need no data or model (names are checked where their registries live)."""
    checks: list[tuple[str, Any, bool, str]] = [
        ("seed", cfg.seed, cfg.seed >= 0, "an integer >= 0"),
        ("data.image_size", cfg.data.image_size, cfg.data.image_size >= 8, "an integer >= 8"),
        (
            "data.train_per_class",
            cfg.data.train_per_class,
            cfg.data.train_per_class is None or cfg.data.train_per_class >= 1,
            "an integer >= 1 or none",
        ),
        (
            "data.test_per_class",
            cfg.data.test_per_class,
            cfg.data.test_per_class is None or cfg.data.test_per_class >= 1,
            "an integer >= 1 or none",
        ),
        (
            "data.validation_per_class",
            cfg.data.validation_per_class,
            cfg.data.validation_per_class is None or cfg.data.validation_per_class >= 1,
            "an integer >= 1 or none",
        ),
        (
            "data.datasets",
            cfg.data.datasets,
            len(cfg.data.datasets) >= 1,
            "at least one dataset name",
        ),
        (
            "scenario.num_clients",
            cfg.scenario.num_clients,
            cfg.scenario.num_clients >= 1,
            "an integer >= 1",
        ),
        ("scenario.beta", cfg.scenario.beta, cfg.scenario.beta > 0, "a number > 0"),
        (
            "scenario.participation",
            cfg.scenario.participation,
            0 < cfg.scenario.participation <= 1,
            "a number in (0, 1] (the fraction of clients each training round asks)",
        ),
        (
            "scenario.min_samples",
            cfg.scenario.min_samples,
            cfg.scenario.min_samples >= 1,
            "an integer >= 1",
        ),
        ("model.rank", cfg.model.rank, cfg.model.rank >= 1, "an integer >= 1"),
        ("train.rounds", cfg.train.rounds, cfg.train.rounds >= 1, "an integer >= 1"),
        (
            "train.local_epochs",
            cfg.train.local_epochs,
            cfg.train.local_epochs >= 1,
            "an integer >= 1",
        ),
        ("train.batch_size", cfg.train.batch_size, cfg.train.batch_size >= 1, "an integer >= 1"),
        (
            "train.eval_batch_size",
            cfg.train.eval_batch_size,
            cfg.train.eval_batch_size >= 1,
            "an integer >= 1",
        ),
        ("train.lwf_lambda", cfg.train.lwf_lambda, 0 <= cfg.train.lwf_lambda < _INF, "a finite number >= 0"),
        (
            "train.lwf_temperature",
            cfg.train.lwf_temperature,
            0 < cfg.train.lwf_temperature < _INF,
            "a finite number > 0",
        ),
        ("train.ewc_lambda", cfg.train.ewc_lambda, 0 <= cfg.train.ewc_lambda < _INF, "a finite number >= 0"),
        (
            "train.weight_decay",
            cfg.train.weight_decay,
            cfg.train.weight_decay >= 0,
            "a number >= 0",
        ),
        (
            "lorm.alpha_backbone",
            cfg.lorm.alpha_backbone,
            0 <= cfg.lorm.alpha_backbone <= 1,
            "a number in [0, 1]",
        ),
        (
            "lorm.alpha_head",
            cfg.lorm.alpha_head,
            0 <= cfg.lorm.alpha_head <= 1,
            "a number in [0, 1]",
        ),
        ("lorm.ridge", cfg.lorm.ridge, cfg.lorm.ridge >= 0, "a number >= 0"),
        ("lorm.head_ridge", cfg.lorm.head_ridge, cfg.lorm.head_ridge > 0, "a number > 0"),
        (
            "lorm.head_projection",
            cfg.lorm.head_projection,
            cfg.lorm.head_projection >= 0,
            "an integer >= 0 (0: the head on the pooled features, M: on M random features)",
        ),
        (
            "lorm.adapt_tasks",
            cfg.lorm.adapt_tasks,
            cfg.lorm.adapt_tasks is None or cfg.lorm.adapt_tasks >= 1,
            "an integer >= 1 or none",
        ),
        (
            "lorm.ties_density",
            cfg.lorm.ties_density,
            0 < cfg.lorm.ties_density <= 1,
            "a number in (0, 1] (the share of each task delta's entries TIES keeps)",
        ),
        ("lorm.ties_scale", cfg.lorm.ties_scale, cfg.lorm.ties_scale > 0, "a number > 0"),
        ("lorm.ccvr_samples", cfg.lorm.ccvr_samples, cfg.lorm.ccvr_samples >= 1, "an integer >= 1"),
        ("lorm.ccvr_epochs", cfg.lorm.ccvr_epochs, cfg.lorm.ccvr_epochs >= 1, "an integer >= 1"),
        ("lorm.ccvr_lr", cfg.lorm.ccvr_lr, cfg.lorm.ccvr_lr > 0, "a number > 0"),
        ("data.crop_pct", cfg.data.crop_pct, 0 < cfg.data.crop_pct <= 1, "a number in (0, 1]"),
        (
            "data.augment_scale",
            cfg.data.augment_scale,
            0 < cfg.data.augment_scale <= 1,
            "a number in (0, 1]",
        ),
        (
            "data.augment_flip",
            cfg.data.augment_flip,
            cfg.data.augment_flip or cfg.data.augment != "flip",
            "true when data.augment = 'flip' (false would leave nothing to augment)",
        ),
    ]
    for name in ("lr", "lr_a", "lr_b", "lr_head"):
        value = getattr(cfg.train, name)
        checks.append((f"train.{name}", value, value is None or value > 0, "a number > 0"))
    tasks = cfg.scenario.tasks
    if isinstance(tasks, int):
        checks.append(
            ("scenario.tasks", tasks, tasks >= 1, "an integer >= 1 or a list of class counts")
        )
    else:
        checks.append(
            (
                "scenario.tasks",
                tasks,
                len(tasks) >= 1 and all(n >= 1 for n in tasks),
                "an integer >= 1 or a non-empty list of positive class counts",
            )
        )
    checks.extend(_prompt_checks(cfg.prompt))
    checks.extend(_secure_checks(cfg))
    for key, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{key} = {value!r} is not allowed; expected {allowed}")


def _prompt_checks(p: PromptConfig) -> list[tuple[str, Any, bool, str]]:
    """The ``prompt`` section's ranges (the layers' upper bound is checked against the model)."""
    layers = p.coda_layers
    return [
        ("prompt.pool_size", p.pool_size, p.pool_size >= 1, "an integer >= 1"),
        ("prompt.length", p.length, p.length >= 1, "an integer >= 1"),
        (
            "prompt.top_k",
            p.top_k,
            1 <= p.top_k <= p.pool_size,
            f"an integer in [1, prompt.pool_size = {p.pool_size}]",
        ),
        ("prompt.key_weight", p.key_weight, 0 <= p.key_weight < _INF, "a finite number >= 0"),
        ("prompt.coda_components", p.coda_components, p.coda_components >= 1, "an integer >= 1"),
        (
            "prompt.coda_length",
            p.coda_length,
            p.coda_length >= 2 and p.coda_length % 2 == 0,
            "an even integer >= 2 (half key, half value prefix)",
        ),
        (
            "prompt.coda_layers",
            layers,
            len(layers) >= 1 and len(set(layers)) == len(layers) and min(layers) >= 0,
            "a non-empty list of distinct block indices >= 0",
        ),
    ]


def _secure_checks(cfg: RunConfig) -> list[tuple[str, Any, bool, str]]:
    """The ``secure`` section's ranges; with aggregation on, also what every step's clients allow."""
    sec = cfg.secure
    bits = sec.word_bits
    checks: list[tuple[str, Any, bool, str]] = [
        ("secure.words", sec.words, sec.words >= 1, "an integer >= 1"),
        ("secure.word_bits", bits, 2 <= bits <= 30, "an integer in [2, 30] (Flower's quantizer)"),
        (
            "secure.modulus_bits",
            sec.modulus_bits,
            bits < sec.modulus_bits <= 32,
            f"an integer in (secure.word_bits = {bits}, 32]",
        ),
        (
            "secure.bound_exponent",
            sec.bound_exponent,
            -64 <= sec.bound_exponent <= 512,
            "an integer in [-64, 512]",
        ),
        (
            "secure.num_shares",
            sec.num_shares,
            _is_share(sec.num_shares) and sec.num_shares != 2,
            "an integer >= 3 or a fraction in (0, 1] of a step's clients",
        ),
        (
            "secure.reconstruction_threshold",
            sec.reconstruction_threshold,
            _is_share(sec.reconstruction_threshold)
            and not (
                isinstance(sec.num_shares, int)
                and isinstance(sec.reconstruction_threshold, int)
                and sec.reconstruction_threshold >= sec.num_shares > 1
            ),
            "an integer below secure.num_shares or a fraction in (0, 1] of the shares",
        ),
        ("secure.spread_limit", sec.spread_limit, sec.spread_limit > 1, "a number > 1, or inf"),
        (
            "secure.value_spread_limit",
            sec.value_spread_limit,
            sec.value_spread_limit > 1,
            "a number > 1, or inf",
        ),
    ]
    if not sec.aggregation:
        return checks
    clients = cfg.scenario.num_clients
    asked = min(clients, max(1, math.floor(cfg.scenario.participation * clients + 0.5)))
    most = (1 << (sec.modulus_bits - bits)) - 1 if bits < sec.modulus_bits else 0
    checks += [
        (
            "scenario.num_clients",
            clients,
            asked >= 2 and clients <= most,
            f"at least 2 clients in every step (a training round asks {asked}) and at most {most} "
            f"(n·2^secure.word_bits < 2^secure.modulus_bits) with secure.aggregation = true",
        ),
    ]
    for key in ("num_shares", "reconstruction_threshold"):
        value = getattr(sec, key)
        if isinstance(value, int) and value > 1:
            checks.append(
                (
                    f"secure.{key}",
                    value,
                    value <= asked,
                    f"at most the {asked} clients a step asks (scenario.num_clients = {clients}, "
                    f"scenario.participation = {cfg.scenario.participation:g})",
                )
            )
    return checks


def _is_share(value: int | float) -> bool:
    """SecAgg+'s share settings: a positive integer count, or a fraction in (0, 1]."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return value >= 1
    return 0 < value <= 1
