"""Build everything a run needs from its config: data, scenario, the one shared model, the method.

Both runtimes (the in-process simulator and the Flower app) start here, so for the same config and
seed they see the same images, partitions, initial weights and method objects.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer, inject_lora
from fedlorm.backbones import Backbone, create_backbone
from fedlorm.config import ConfigError, RunConfig, validate_config
from fedlorm.data import (
    LabeledImages,
    Preprocessing,
    check_data_root,
    class_incremental_union,
    load_dataset,
    per_class_split,
    per_class_subsample,
)
from fedlorm.fcl import Scenario, dirichlet_partition, make_scenario
from fedlorm.methods import METHODS, Client, ClientData, Server
from fedlorm.methods.registry import check_method_config
from fedlorm.precision import check_precision
from fedlorm.projection import RandomFeatures, projection_matrix
from fedlorm.seeding import derive_seed

__all__ = [
    "ClientSource",
    "Experiment",
    "RunData",
    "build_data",
    "build_experiment",
    "build_experiment_without_data",
    "build_model",
    "effective_config",
    "load_split",
    "preprocessing",
    "resolve_device",
]

logger = logging.getLogger(__name__)


ClientSource = Callable[[int, int], ClientData]
"""``source(task, client)``: client ``client``'s share of ``task`` (see ``Experiment.client_source``)."""


@dataclass
class Experiment:
    """Data, scenario, model and method objects of one run (one model copy for all clients).

    ``class_names``: the name of the class at each position of the class order (logit order).
    ``client_source``: where clients' shares come from instead of ``train``/``partitions``, e.g.
    the folders ``fedlorm partition`` wrote (:mod:`fedlorm.runtime.partitions`).
    """

    cfg: RunConfig
    scenario: Scenario
    train: ClientData
    test: ClientData
    model: Backbone
    layers: dict[str, LoRALayer]
    server: Server
    client: Client
    device: torch.device
    partitions: list[list[Tensor]]
    class_names: list[str] = field(default_factory=list)
    client_source: ClientSource | None = None

    def client_share(self, task: int, client: int) -> ClientData:
        """Client ``client``'s training data of ``task``."""
        if self.client_source is not None:
            return self.client_source(task, client)
        idx = self.partitions[task][client]
        return ClientData(self.train.images[idx], self.train.labels[idx])

    def client_data(self, task: int) -> list[ClientData]:
        """The task's training data split across clients."""
        return [self.client_share(task, k) for k in range(self.cfg.scenario.num_clients)]


@dataclass
class RunData:
    """A run's data without model: scenario, training and evaluation sets, per-task client splits."""

    scenario: Scenario
    train: ClientData
    test: ClientData
    partitions: list[list[Tensor]]
    class_names: list[str]


def _partition(cfg: RunConfig, scenario: Scenario, labels: Tensor) -> list[list[Tensor]]:
    """Per task, the seeded Dirichlet split of its training samples across clients.

    Drawn for every task before training starts, so an impossible split fails before any output.
    """
    sc = cfg.scenario
    out = []
    for task in range(scenario.num_tasks):
        classes = scenario.task_classes(task)
        in_task = torch.nonzero((labels >= classes.start) & (labels < classes.stop)).flatten()
        try:
            shares = dirichlet_partition(
                labels[in_task].numpy(),
                sc.num_clients,
                sc.beta,
                min_samples=sc.min_samples,
                seed=derive_seed(cfg.seed, "partition", task),
            )
        except ValueError as err:
            raise ConfigError(f"task {task + 1}: {err}") from None
        out.append([in_task[torch.as_tensor(share, dtype=torch.long)] for share in shares])
    return out


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; anything else must be a valid torch device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(
            f"train.device = {name!r} is not a torch device; use auto, cpu or cuda[:N]"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"train.device = {name!r} but no CUDA device is available; use auto or cpu"
        )
    return device


def preprocessing(cfg: RunConfig) -> Preprocessing:
    """The run's test-time transform and training augmentation (``data.*``)."""
    data = cfg.data
    return Preprocessing(
        size=data.image_size,
        test_crop=data.test_crop,
        crop_pct=data.crop_pct,
        interpolation=data.interpolation,
        photo_resize=data.photo_resize,
        augmentation=data.augment,
        augment_scale=data.augment_scale,
        flip=data.augment_flip,
    )


def load_split(
    cfg: RunConfig, split: str, per_class: int | None, size: int | None = None
) -> LabeledImages:
    """The configured datasets' ``split`` (united class-incrementally), subsampled per class.

    Photo datasets are stored (uint8) at ``size``, by default the size the run's test-time crop is
    taken from, so the model needs at most a crop later.
    """
    check_data_root(cfg.data.root, cfg.data.download)
    size = size or preprocessing(cfg).storage_size
    parts = [
        load_dataset(
            name, split, root=cfg.data.root, download=cfg.data.download, size=size,
            photo_resize=cfg.data.photo_resize,
        )
        for name in cfg.data.datasets
    ]
    data = parts[0] if len(parts) == 1 else class_incremental_union(parts)
    return per_class_subsample(data, per_class, seed=derive_seed(cfg.seed, "subsample", split))


def _train_and_evaluation_data(cfg: RunConfig) -> tuple[LabeledImages, LabeledImages]:
    """Training data and the set every evaluation uses: the test split, or with
    ``data.validation_per_class`` a validation set held out of the training split (for choosing
    hyper-parameters without looking at the test set)."""
    held_out = cfg.data.validation_per_class
    if held_out is None:
        return (
            load_split(cfg, "train", cfg.data.train_per_class),
            load_split(cfg, "test", cfg.data.test_per_class),
        )
    train = load_split(cfg, "train", None)
    try:
        rest, validation = per_class_split(train, held_out, seed=derive_seed(cfg.seed, "validation"))
    except ValueError as err:
        raise ConfigError(f"data.validation_per_class = {held_out}: {err}") from None
    seed = derive_seed(cfg.seed, "subsample", "train")
    return per_class_subsample(rest, cfg.data.train_per_class, seed=seed), validation


def _pretrained(weights: str) -> bool | Path:
    if weights == "pretrained":
        return True
    if weights in ("none", "random"):
        return False
    return Path(weights)


def build_model(
    cfg: RunConfig, num_classes: int, device: torch.device
) -> tuple[Backbone, dict[str, LoRALayer]]:
    """The run's frozen backbone with its head, LoRA layers and, with ``lorm.head_projection``, the
    head's random projection, on ``device`` (seeded by ``cfg.seed``)."""
    torch.manual_seed(derive_seed(cfg.seed, "model"))
    model = create_backbone(
        cfg.model.backbone,
        num_classes,
        pretrained=_pretrained(cfg.model.weights),
        img_size=cfg.data.image_size,
        normalization=cfg.data.normalize,
        head_init=cfg.model.head_init,
        preprocessing=preprocessing(cfg),
    )
    model.requires_grad_(False)
    layers = inject_lora(
        model, cfg.model.targets or model.lora_targets, cfg.model.rank, cfg.model.scaling
    )
    if cfg.lorm.head_projection:
        # From the run's seed alone: every client and the server build the same R.
        matrix = projection_matrix(model.feature_dim, cfg.lorm.head_projection, cfg.seed)
        model.projection = RandomFeatures(matrix, cfg.lorm.head_activation)
    return model.to(device), layers


def effective_config(cfg: RunConfig) -> RunConfig:
    """The config as the run uses it, checked before any data loads.

    Args:
        cfg: The config as given.

    Returns:
        ``cfg`` with the method's own changes applied (e.g. ``joint``: one task of all classes on
        one client).

    Raises:
        ConfigError: One line, if a value is out of range, the method unknown, or the method's parts
            cannot run the combination asked for.
    """
    validate_config(cfg)
    if cfg.method not in METHODS:
        raise ConfigError(
            f"method {cfg.method!r} is unknown; choose one of: {', '.join(sorted(METHODS))}"
        )
    effective = METHODS[cfg.method].run_config(cfg)
    check_method_config(effective)
    return effective


def _compute_device(cfg: RunConfig) -> torch.device:
    device = resolve_device(cfg.train.device)
    try:
        check_precision(cfg.train.precision, device)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    return device


def build_data(cfg: RunConfig) -> RunData:
    """Load the data of ``cfg`` (as :func:`effective_config` returns it): scenario and client splits."""
    train_raw, test_raw = _train_and_evaluation_data(cfg)
    num_classes = len(train_raw.class_names)
    scenario = make_scenario(
        num_classes,
        cfg.scenario.tasks,
        cfg.scenario.class_order,
        seed=derive_seed(cfg.seed, "class_order"),
    )
    return RunData(
        scenario=scenario,
        partitions=_partition(cfg, scenario, scenario.to_positions(train_raw.labels)),
        train=_to_client_data(train_raw, scenario, cfg.data.image_size),
        test=_to_client_data(test_raw, scenario, cfg.data.image_size),
        class_names=[train_raw.class_names[c] for c in scenario.class_order],
    )


def build_experiment(cfg: RunConfig) -> Experiment:
    """Everything a run needs, built from its config: no training yet.

    The config is checked first (:func:`effective_config`), so a bad combination fails before any
    data loads; then the data, the class order and partitions, the model with its LoRA layers, and
    the method's server and client are built.

    Args:
        cfg: The run's config.

    Returns:
        The experiment, with the config as the run uses it (``experiment.cfg``).

    Raises:
        ValueError: One line, if the config, the device, the data or the weights cannot be used.
    """
    cfg = effective_config(cfg)
    device = _compute_device(cfg)
    data = build_data(cfg)
    return _assemble(cfg, device, data)


def build_experiment_without_data(
    cfg: RunConfig,
    scenario: Scenario,
    class_names: list[str],
    client_source: ClientSource,
    test: ClientData | None = None,
) -> Experiment:
    """Model and methods of ``cfg`` for a node that reads its shares from ``client_source``.

    Loads no dataset: ``train`` is empty and ``partitions`` is ``[]``; the scenario, class names
    and the evaluation set ``test`` (empty if None) come from the caller (e.g. a partition folder).

    Args:
        cfg: The run's config.
        scenario: The run's class order and tasks.
        class_names: The class names in logit order.
        client_source: ``source(task, client)`` gives a client's share of a task.
        test: The evaluation set; empty if None.

    Returns:
        The experiment.

    Raises:
        ValueError: One line, if the config, the device or the weights cannot be used.
    """
    cfg = effective_config(cfg)
    device = _compute_device(cfg)
    empty = ClientData(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0, dtype=torch.long))
    data = RunData(
        scenario=scenario,
        train=empty,
        test=empty if test is None else test,
        partitions=[],
        class_names=class_names,
    )
    return _assemble(cfg, device, data, client_source)


def _assemble(
    cfg: RunConfig, device: torch.device, data: RunData, client_source: ClientSource | None = None
) -> Experiment:
    num_classes = data.scenario.num_classes
    model, layers = build_model(cfg, num_classes, device)
    method = METHODS[cfg.method]
    logger.info(
        "built %s: %d classes in %d tasks, %d train / %d test images, %d LoRA layers",
        cfg.model.backbone,
        num_classes,
        data.scenario.num_tasks,
        len(data.train),
        len(data.test),
        len(layers),
    )
    return Experiment(
        cfg=cfg,
        scenario=data.scenario,
        train=data.train,
        test=data.test,
        model=model,
        layers=layers,
        server=method.build_server(cfg, model, layers),
        client=method.build_client(cfg, model, layers),
        device=device,
        partitions=data.partitions,
        class_names=data.class_names,
        client_source=client_source,
    )


def _to_client_data(data: LabeledImages, scenario: Scenario, size: int) -> ClientData:
    """Images stay uint8 at their stored size (the backbone makes each batch float at ``size``, with
    the same ops as before, so results are unchanged); labels become class positions.

    A float copy at ``size`` up front would take 4·3·size² bytes an image: 30 GB for CIFAR-100's 50k
    images at 224 px.
    """
    logger.debug(
        "keeping %d images as uint8 %s (%.2f GB; float at %d px would take %.2f GB)",
        len(data),
        tuple(data.images.shape[1:]),
        data.images.numel() / 1e9,
        size,
        len(data) * 3 * size * size * 4 / 1e9,
    )
    labels: Tensor = scenario.to_positions(data.labels)
    return ClientData(images=data.images, labels=labels)
