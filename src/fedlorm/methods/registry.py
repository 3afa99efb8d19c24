"""Every method by name, with the parts it is built from; the head and cross-task rules by the names
``lorm.head_merge`` and ``lorm.cross_task`` take; and the check of a config against those parts.

A method is one :class:`Method` line. A task-structured LoRA method names its within-task client
merge (:mod:`fedlorm.methods.within_task`); the head strategy and cross-task rule come from the run's
config, unless the entry fixes the latter. The entry builds the run's server and client and hands
each its parts (:meth:`Method.build_server`, :meth:`Method.build_client`), so no part looks up the
registry. docs/methods.md shows how to add a method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import ConfigError, RunConfig
from fedlorm.methods.base import Client, Server
from fedlorm.methods.cross_task import (
    ClosedFormTasks,
    CrossTaskRule,
    SimpleMeanTasks,
    TaskArithmetic,
    TiesMerge,
)
from fedlorm.methods.ewc import EWCClient, EWCServer
from fedlorm.methods.extras import ModelExtra
from fedlorm.methods.finetune import FinetuneClient, FinetuneServer
from fedlorm.methods.heads import AnalyticHead, CCVRHead, HeadStrategy, RegMeanHead, TrainedAverageHead
from fedlorm.methods.joint import joint_config
from fedlorm.methods.lwf import LwFClient, LwFServer
from fedlorm.methods.prompts import (
    CodaClient,
    CodaServer,
    L2PClient,
    L2PServer,
    SavedPromptPool,
    require_vit,
)
from fedlorm.methods.steps import Factor
from fedlorm.methods.task_lora import TaskLoRAClient, TaskLoRAServer, TaskParts
from fedlorm.methods.within_task import (
    ALTERNATE,
    AlternatingClosedForm,
    DeltaRegMean,
    FactorAverage,
    FisherAverage,
    ProductAverage,
    WithinTaskMerge,
)

__all__ = ["CROSS_TASK_RULES", "HEADS", "METHODS", "WITHIN_TASK_MERGES", "Method", "check_method_config"]


def _as_given(cfg: RunConfig) -> RunConfig:
    return cfg


@dataclass(frozen=True)
class Method:
    """A registered method: its server and client classes and the parts they are built from."""

    server: type[Server]
    client: type[Client]
    summary: str
    within_task: WithinTaskMerge | None = None
    """The within-task client merge of a task-structured LoRA method (None: not one)."""
    cross_task: str | None = None
    """A ``lorm.cross_task`` rule this method always uses, whatever the config says."""
    adapt_tasks: int | None = None
    """Train the adapters on the first N tasks only (``lorm.adapt_tasks`` overrides it)."""
    run_config: Callable[[RunConfig], RunConfig] = _as_given
    """The config the run really uses (e.g. joint's one task of all classes on one client)."""
    vit_only: bool = False
    """Runs on ViT backbones only (its ``run_config`` refuses others); the CNN smoke pins skip it."""
    model_extra: ModelExtra | None = None
    """The export hook of a method whose deployed model holds more than backbone, adapters and head
    (e.g. a prompt pool): how ``model/`` stores that and how loading rebuilds it."""

    def adapted_tasks(self, cfg: RunConfig) -> int | None:
        """The run's adapted-task limit.

        Args:
            cfg: The run's config.

        Returns:
            ``lorm.adapt_tasks`` if set, else the method's own limit; None: every task adapts.
        """
        return cfg.lorm.adapt_tasks or self.adapt_tasks

    def task_parts(self, cfg: RunConfig, model: Backbone) -> TaskParts:
        """A fresh set of the parts a task-structured LoRA method runs with.

        Args:
            cfg: The run's config, as the run uses it (``run_config`` applied).
            model: The run's model; its head's shape sizes the head strategy.

        Returns:
            The entry's within-task merge, the head strategy of ``lorm.head_merge``, the cross-task
            rule (the entry's own, else ``lorm.cross_task``) and the adapted-task limit.

        Raises:
            ValueError: If the method is not task-structured (it has no ``within_task``).
        """
        if self.within_task is None:
            raise ValueError(f"{self.summary!r} is not a task-structured LoRA method")
        classes, features = model.head.weight.shape
        return TaskParts(
            within=self.within_task,
            head=HEADS[cfg.lorm.head_merge](cfg.lorm, classes, features),
            cross=CROSS_TASK_RULES[self.cross_task or cfg.lorm.cross_task].from_config(cfg.lorm),
            adapt_tasks=self.adapted_tasks(cfg),
        )

    def build_server(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> Server:
        """The run's server, with parts of its own.

        Args:
            cfg: The run's config, as the run uses it; it is checked first.
            model: The run's model with its LoRA layers injected; the server copies its initial state.
            layers: The model's LoRA layers by name.

        Returns:
            A server at the start of the run (no task started yet).

        Raises:
            ConfigError: If ``cfg`` asks the method's parts for what they cannot do.
        """
        check_method_config(cfg)
        if self.within_task is None:
            return self.server(cfg, model, layers)
        return self.server(cfg, model, layers, self.task_parts(cfg, model))  # type: ignore[call-arg]

    def build_client(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> Client:
        """The run's client (one object serves every client), with parts of its own.

        Args:
            cfg: The run's config, as the run uses it.
            model: The one model every client trains in turn.
            layers: The model's LoRA layers by name.

        Returns:
            A client; it keeps no state between steps.
        """
        if self.within_task is None:
            return self.client(cfg, model, layers)
        return self.client(cfg, model, layers, self.task_parts(cfg, model))  # type: ignore[call-arg]


def ccvr_config(cfg: RunConfig) -> RunConfig:
    """``cfg`` with ``lorm.head_merge = ccvr`` (a copy): the method is its head."""
    return dataclasses.replace(cfg, lorm=dataclasses.replace(cfg.lorm, head_merge="ccvr"))


def _task_lora(summary: str, merge: WithinTaskMerge, **parts: object) -> Method:
    return Method(TaskLoRAServer, TaskLoRAClient, summary, merge, **parts)  # type: ignore[arg-type]


METHODS: dict[str, Method] = {
    "lorm": _task_lora("LoRM: alternating closed-form merges of B and A", AlternatingClosedForm()),
    "lorm-avg": _task_lora("LoRM's alternation, factors averaged", FactorAverage(ALTERNATE)),
    "fedavg": _task_lora("FedIT: A and B averaged", FactorAverage((Factor.BOTH,))),
    "ffa": _task_lora("FFA-LoRA: A frozen at its init, B averaged", FactorAverage((Factor.B,))),
    "fedavg-product": _task_lora("exact mean of B_iA_i, SVD to rank r", ProductAverage()),
    "regmean": _task_lora("RegMean on ΔW_i = B_iA_i, SVD to rank r", DeltaRegMean()),
    # Trains no adapter: its task deltas are zero, so no statistics pass is needed to merge them.
    "head-only": _task_lora("the head only", FactorAverage((Factor.NONE,)), cross_task="task_arithmetic"),
    # First-session adaptation: later tasks only add their classes to the analytic head through a
    # backbone that no longer moves, so no class's sums go stale.
    "lorm-fsa": _task_lora(
        "LoRM on the first task, analytic head after", AlternatingClosedForm(), adapt_tasks=1
    ),
    # Federated TIES: FedAvg-LoRA within a task (its clients share the task), TIES across tasks.
    "ties": _task_lora(
        "FedIT per task, TIES-merging of the task deltas", FactorAverage((Factor.BOTH,)), cross_task="ties"
    ),
    "fisher": _task_lora("A and B Fisher-weighted averaged (diagonal empirical Fisher)", FisherAverage()),
    "ccvr": _task_lora(
        "FedIT, head calibrated on virtual features (CCVR)",
        FactorAverage((Factor.BOTH,)),
        run_config=ccvr_config,
    ),
    "finetune": Method(FinetuneServer, FinetuneClient, "one adapter fine-tuned across tasks (lower bound)"),
    "lwf": Method(LwFServer, LwFClient, "finetune plus LwF distillation on old classes' logits"),
    "ewc": Method(EWCServer, EWCClient, "finetune plus an EWC penalty on the factors (federated Fisher)"),
    "joint": Method(
        FinetuneServer,
        FinetuneClient,
        "all classes on one client at once (upper bound)",
        run_config=joint_config,
    ),
    # Prompt methods put tokens into a ViT's sequence: the CNN benchmark refuses them (require_vit).
    "l2p": Method(
        L2PServer,
        L2PClient,
        "L2P: top-N prompts from a keyed pool (ViT backbone only)",
        run_config=require_vit,
        vit_only=True,
        model_extra=SavedPromptPool(L2PServer.pool_type),
    ),
    "coda-p": Method(
        CodaServer,
        CodaClient,
        "CODA-Prompt: attention-weighted prefix components (ViT backbone only)",
        run_config=require_vit,
        vit_only=True,
        model_extra=SavedPromptPool(CodaServer.pool_type),
    ),
}
"""Method name → its registry entry."""

WITHIN_TASK_MERGES: dict[str, WithinTaskMerge] = {
    name: m.within_task for name, m in METHODS.items() if m.within_task is not None
}
"""Task-structured LoRA method name → its within-task client merge."""

HEADS: dict[str, type[HeadStrategy]] = {
    "fedavg": TrainedAverageHead,
    "regmean": RegMeanHead,
    "analytic": AnalyticHead,
    "ccvr": CCVRHead,
}
"""``lorm.head_merge`` → head strategy (built with the run's LoRM config, classes, features)."""

CROSS_TASK_RULES: dict[str, type[CrossTaskRule]] = {
    "closed_form": ClosedFormTasks,
    "simple_mean": SimpleMeanTasks,
    "task_arithmetic": TaskArithmetic,
    "ties": TiesMerge,
}
"""``lorm.cross_task`` → cross-task rule (built by ``from_config`` with the run's LoRM config)."""


def check_method_config(cfg: RunConfig) -> None:
    """Refuse a config that asks the method's parts for what they cannot do, before any data loads.

    An adapted-task limit (``lorm.adapt_tasks``, or the method's own, as ``lorm-fsa``'s) leaves the
    later tasks without training rounds, so their classes need a head strategy that solves the head
    from feature sums alone (:attr:`~fedlorm.methods.heads.HeadStrategy.supports_frozen_backbone`).
    A task-structured method with the authors' statistics model (``lorm.stats_model = reference``)
    trains every task from the pretrained weights, so it needs ``lorm.task_start = pretrained``.

    Args:
        cfg: The run's config, as the run uses it (the method's ``run_config`` applied).

    Raises:
        ConfigError: One line naming the value and what is allowed.
    """
    method = METHODS.get(cfg.method)
    lorm = cfg.lorm
    task_structured = method is not None and method.within_task is not None
    if task_structured and lorm.stats_model == "reference" and lorm.task_start != "pretrained":
        raise ConfigError(
            "lorm.stats_model='reference' reproduces the authors' setup and needs "
            f"lorm.task_start='pretrained', got {lorm.task_start!r}"
        )
    _check_frozen_backbone_head(cfg, method)
    _check_head_projection(cfg, task_structured)


def _check_frozen_backbone_head(cfg: RunConfig, method: Method | None) -> None:
    """An adapted-task limit needs a head that takes later tasks' classes from feature sums alone."""
    lorm = cfg.lorm
    limit = method.adapted_tasks(cfg) if method is not None else lorm.adapt_tasks
    head = HEADS.get(lorm.head_merge)
    if limit is None or head is None or head.supports_frozen_backbone:
        return
    allowed = " or ".join(repr(name) for name, part in HEADS.items() if part.supports_frozen_backbone)
    reason = (
        f"tasks after the first {limit} add their classes to the head through its feature sums only; "
        f"set lorm.head_merge = {allowed}"
    )
    if lorm.adapt_tasks is not None:
        raise ConfigError(
            f"lorm.adapt_tasks = {limit} is not allowed with lorm.head_merge = {lorm.head_merge!r}: "
            f"{reason}, or lorm.adapt_tasks = none"
        )
    raise ConfigError(f"method {cfg.method!r}: {reason} (now {lorm.head_merge!r})")


def _check_head_projection(cfg: RunConfig, task_structured: bool) -> None:
    """``lorm.head_projection`` feeds the analytic head only: refuse it where no analytic head runs."""
    width = cfg.lorm.head_projection
    if width == 0:
        return
    if not task_structured:
        raise ConfigError(
            f"lorm.head_projection = {width} is not allowed with method {cfg.method!r}, which has no "
            "analytic head; use a task-structured method (e.g. lorm, head-only, lorm-fsa) or 0"
        )
    if cfg.lorm.head_merge != "analytic":
        raise ConfigError(
            f"lorm.head_projection = {width} is not allowed: method {cfg.method!r} runs lorm.head_merge = "
            f"{cfg.lorm.head_merge!r}, and the projection feeds only the analytic head; set "
            "lorm.head_merge = 'analytic' or lorm.head_projection = 0"
        )
