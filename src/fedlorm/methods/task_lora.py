"""Task-structured federated LoRA: a fresh adapter per task, merged within and across tasks.

Every method but ``finetune``/``joint`` and the prompt methods runs on this server and client. The
registry (:mod:`fedlorm.methods.registry`) builds their :class:`TaskParts` (the entry's within-task
client merge, and the head strategy and cross-task rule the run's config names) and hands them to
both; neither looks anything up itself. A task is: training rounds
(each: the round's factor(s) and the task's head rows, then the merge's summands), then, if the
parts need them, a ``task_stats`` step (the adapted layers' input Grams for the cross-task merge)
and a ``head_stats`` step (feature sums for the analytic head). LoRM is this with the alternating
closed form, closed-form task merge and RegMean head (docs/design.md, "Closed forms").
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fedlorm import merging
from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.arrays import HEAD, apply_arrays, factor_key
from fedlorm.methods.base import Arrays, Client, ClientData, ClientReply, Instruction, Server
from fedlorm.methods.common import collect_statistics, train_with_config
from fedlorm.methods.cross_task import CrossTaskRule
from fedlorm.methods.heads import HeadStrategy
from fedlorm.methods.replies import ReplySpec, gram
from fedlorm.methods.steps import Factor, Phase
from fedlorm.methods.within_task import LayerShape, WithinTaskMerge

__all__ = ["TaskLoRAClient", "TaskLoRAServer", "TaskParts"]

_FIXED_KEYS = (".fixed_delta", ".fixed_B", ".fixed_A")
_DENSE = {"fixed": "fixed_delta", "earlier": "earlier_sum"}
"""Broadcast key of a low-rank update's dense form, by the prefix of its factor keys."""


def _mode(alpha: float) -> str:
    return "diag" if alpha == 0 else "full"


@dataclass(frozen=True)
class TaskParts:
    """The parts one task-structured LoRA server or client is built from, resolved for one run.

    The registry builds a fresh set for the server and another for the client, so that the
    server's head strategy and cross-task rule keep state of their own.
    """

    within: WithinTaskMerge
    """How a task's clients are merged within a round (the registry entry's rule)."""
    head: HeadStrategy
    """How the head is merged (``lorm.head_merge``), built for the run's classes and features."""
    cross: CrossTaskRule
    """How finished tasks are merged (``lorm.cross_task``, unless the entry fixes it)."""
    adapt_tasks: int | None = None
    """Train the adapters on the first N tasks only; None: on every task."""


def _earlier_update(arrays: Mapping[str, Tensor], name: str, t: int) -> tuple[Tensor, Tensor] | Tensor | None:
    """(Σ_{j<t} ΔW_j)/(t + 1) for layer ``name`` from the broadcast: factors, dense, or none."""
    factor_b, factor_a = arrays.get(f"{name}.earlier_B"), arrays.get(f"{name}.earlier_A")
    if factor_b is not None and factor_a is not None:
        return factor_b / (t + 1), factor_a
    dense = arrays.get(f"{name}.earlier_sum")
    return None if dense is None else dense / (t + 1)


class TaskLoRAClient(Client):
    """Trains the round's factor(s) and head rows; replies with its parts' additive summands."""

    def __init__(
        self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer], parts: TaskParts
    ) -> None:
        super().__init__(cfg, model, layers)
        self.within, self.head, self.cross = parts.within, parts.head, parts.cross

    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        train = self.cfg.train
        apply_arrays(self.model, self.layers, arrays)
        if instruction.phase is Phase.HEAD_STATS:
            summands = self.head.feature_summands(
                self.model, data, instruction, batch_size=train.eval_batch_size, precision=train.precision
            )
            return ClientReply(summands, num_examples=len(data))
        metrics: dict[str, float] = {}
        if instruction.phase is Phase.TRAIN:
            metrics["train_loss"] = train_with_config(
                self.model,
                self.layers,
                data,
                train,
                factor=instruction.factor,
                classes=instruction.classes,
                generator=generator,
            )
        data_summands: Arrays = {}
        if instruction.phase is Phase.TRAIN:
            data_summands = self.within.data_summands(
                self.model, self.layers, data, instruction, batch_size=train.eval_batch_size
            )
        layer_grams = instruction.phase is Phase.TASK_STATS or self.within.needs_grams
        stats_rng = generator if self.cfg.data.augment_statistics else None
        grams = self._statistics(arrays, instruction, data, layer_grams, stats_rng)
        summands: Arrays = dict(data_summands)
        for name, layer in self.layers.items():
            layer_gram = (
                merging.shrink_gram(grams[name], self.cfg.lorm.alpha_backbone) if layer_grams else None
            )
            if instruction.phase is Phase.TASK_STATS:
                assert layer_gram is not None
                summands.update(self.cross.summands(name, layer_gram))
            else:
                summands.update(self.within.summands(name, layer, instruction.factor, layer_gram, len(data)))
        if instruction.phase is Phase.TRAIN:
            head = self.model.head
            summands.update(self.head.summands(head.weight, head.bias, grams.get(HEAD), len(data)))
        return ClientReply(summands=summands, num_examples=len(data), metrics=metrics)

    def _statistics(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        layer_grams: bool,
        generator: torch.Generator | None,
    ) -> dict[str, Tensor]:
        """Grams through the statistics model: the trained one, or the authors' averaged one; on
        augmented batches when ``generator`` is given (the reference's statistics pass)."""
        cfg = self.cfg.lorm
        modules: dict[str, nn.Module] = dict(self.layers) if layer_grams else {}
        modes = {name: _mode(cfg.alpha_backbone) for name in modules}
        if instruction.phase is Phase.TRAIN and self.head.gram_mode is not None:
            modules[HEAD] = self.model.head
            modes[HEAD] = self.head.gram_mode
        if not modules:
            return {}
        if cfg.stats_model == "reference":
            # fed-mammoth: inputs through W0 + (Σ_{j<t} ΔW_j + current ΔW) / (t + 1).
            t = instruction.task
            for name, layer in self.layers.items():
                layer.set_fixed_delta(_earlier_update(arrays, name, t))
                layer.scaling = self.cfg.model.scaling / (t + 1)
        try:
            return collect_statistics(
                self.model,
                modules,
                data,
                modes=modes,
                batch_size=self.cfg.train.eval_batch_size,
                precision=self.cfg.train.precision,
                generator=generator,
            )
        finally:
            if cfg.stats_model == "reference":
                for layer in self.layers.values():
                    layer.scaling = self.cfg.model.scaling
                apply_arrays(
                    self.model,
                    self.layers,
                    {k: v for k, v in arrays.items() if k.endswith(_FIXED_KEYS)},
                )


class TaskLoRAServer(Server):
    """Holds the current task's factors, the trained head, its parts' state and the deployed ΔW.

    The broadcast sends low-rank updates as factor pairs wherever that is exact and smaller than
    the dense matrix: the earlier tasks' sum of the reference statistics model, Σ_t scaling·B_t A_t
    (``{layer}.earlier_B``/``_A``, dense ``{layer}.earlier_sum``), and the deployed
    ΔW = Σ_t scaling·B_t A_t diag(w_t) (``{layer}.fixed_B``/``_A``, dense ``{layer}.fixed_delta``)
    wherever the cross-task rule gives it that form (:meth:`CrossTaskRule.factored`).
    """

    def __init__(
        self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer], parts: TaskParts
    ) -> None:
        super().__init__(cfg, model, layers)
        self.within, self.head, self.cross = parts.within, parts.head, parts.cross
        self.adapt_tasks = parts.adapt_tasks
        self.scaling = cfg.model.scaling
        self.dtype = model.head.weight.dtype
        self.device = model.head.weight.device
        self.shapes = {
            name: LayerShape(lay.out_features, lay.in_features, lay.rank) for name, lay in layers.items()
        }
        self.A = {name: lay.lora_A.detach().clone() for name, lay in layers.items()}
        self.B = {name: torch.zeros_like(lay.lora_B) for name, lay in layers.items()}
        self.head_weight = model.head.weight.detach().clone()  # model.head_init decides
        self.head_bias = model.head.bias.detach().clone()
        self.merged: dict[str, Tensor] = {}
        # Per layer, every folded task's scaling·B_t side by side and A_t stacked (float64), and
        # where the deployed ΔW has factor form, each task's coefficient row p_t (T × d_in).
        self.task_B: dict[str, Tensor] = {}
        self.task_A: dict[str, Tensor] = {}
        self.task_P: dict[str, Tensor] = {}
        self.factored = self.cross.factored(cfg.lorm.alpha_backbone)
        self.task = -1
        self.task_finished = not self.adapts(0)  # a backbone that never adapts is deployed as it is
        self.tasks_folded = 0

    @property
    def analytic_head(self) -> tuple[Tensor, Tensor] | None:
        """The head deployed instead of the trained one (the analytic head's solve), if any."""
        return self.head.deployed()

    # -- protocol -----------------------------------------------------------------------------------
    def adapts(self, task: int) -> bool:
        """Whether ``task`` has training rounds: all tasks unless ``lorm.adapt_tasks`` or the
        method (e.g. ``lorm-fsa``) stops them, and none where no factor trains and the deployed
        head is solved from the ``head_stats`` sums alone (``head-only`` with the analytic head:
        its trained rows would never be deployed)."""
        if not (self.within.trains_adapters or not self.head.supports_frozen_backbone):
            return False
        return self.adapt_tasks is None or task < self.adapt_tasks

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        self.task = task
        if self.adapts(task):  # otherwise the deployed backbone stays as the adapted tasks left it
            self.task_finished = False
            for name, (d_out, d_in, rank) in self.shapes.items():
                a = torch.empty(rank, d_in, dtype=torch.float32)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
                self.A[name] = a.to(device=self.device, dtype=self.dtype)
                self.B[name] = torch.zeros(d_out, rank, device=self.device, dtype=self.dtype)
        self.head.start_task(task, generator)

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        def step(phase: Phase, round_index: int = -1, factor: Factor = Factor.NONE) -> Instruction:
            return Instruction(task, round_index, phase, factor, classes.start, classes.stop)

        if self.adapts(task):
            for r in range(self.cfg.train.rounds):
                yield step(Phase.TRAIN, r, self.within.factor(r))
            if self.cross.needs_statistics:
                yield step(Phase.TASK_STATS)
        if self.head.collects_features:
            yield step(Phase.HEAD_STATS)

    def arrays(self, instruction: Instruction) -> Arrays:
        if instruction.phase is Phase.HEAD_STATS:
            return self.deployed_arrays()
        out = self._training_arrays()
        if self.cfg.lorm.stats_model == "reference":
            # The reference statistics model implies task_start="pretrained": ΔW_j = scaling·B_j A_j.
            for name in self.shapes:
                out.update(self._stack_arrays(name, "earlier", None))
        return out

    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        if instruction.phase is Phase.TASK_STATS:
            self._fold_task(sums)
            return
        if instruction.phase is Phase.HEAD_STATS:
            self.head.fold_features(sums, instruction.classes, like=(self.head_weight, self.head_bias))
            return
        for name in self.shapes:
            self.A[name], self.B[name] = self.within.solve(
                name,
                instruction.factor,
                sums,
                sums[f"{HEAD}.n"],
                self.A[name],
                self.B[name],
                scaling=self.scaling,
                ridge=self.cfg.lorm.ridge,
            )
        self.head_weight, self.head_bias = self.head.solve(
            sums, self.head_weight, self.head_bias, ridge=self.cfg.lorm.ridge
        )
        if instruction.round == self.cfg.train.rounds - 1 and not self.cross.needs_statistics:
            self._fold_task(None)

    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        if instruction.phase is Phase.HEAD_STATS:
            return self.head.feature_spec(instruction)
        spec: ReplySpec = {}
        full = self.cfg.lorm.alpha_backbone != 0
        for name, shape in self.shapes.items():
            layer_gram = gram(shape.d_in, full=full)
            if instruction.phase is Phase.TASK_STATS:
                spec.update(self.cross.spec(name, layer_gram))
            else:
                spec.update(self.within.spec(name, shape, instruction.factor, layer_gram))
        if instruction.phase is Phase.TRAIN:
            spec.update(self.head.spec())
        return spec

    def deployed_arrays(self) -> Arrays:
        if not self.task_finished:
            return self._training_arrays()
        out = self.head.deployed_arrays((self.head_weight, self.head_bias))
        for name in self.shapes:
            out[factor_key(name, "A")] = self.A[name]
            out[factor_key(name, "B")] = torch.zeros_like(self.B[name])
            out.update(self._merged_arrays(name))
        return out

    def state_dict(self) -> Arrays:
        out = self._training_arrays()
        out.update(self.cross.state_dict())
        for prefix, table in self._tables():
            out.update({f"{prefix}.{name}": value for name, value in table.items()})
        out["task"] = torch.tensor(self.task)
        out["task_finished"] = torch.tensor(self.task_finished)
        out["tasks_folded"] = torch.tensor(self.tasks_folded)
        out.update(self.head.state_dict())
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name in self.shapes:
            self.A[name] = state[factor_key(name, "A")].to(self.device, copy=True)
            self.B[name] = state[factor_key(name, "B")].to(self.device, copy=True)
        self.head_weight = state[f"{HEAD}.weight"].to(self.device, copy=True)
        self.head_bias = state[f"{HEAD}.bias"].to(self.device, copy=True)
        self.cross.load_state_dict(state, list(self.shapes), self.device)
        for prefix, table in self._tables():
            table.clear()
            for name in self.shapes:
                if f"{prefix}.{name}" in state:
                    table[name] = state[f"{prefix}.{name}"].to(self.device, copy=True)
        self.task = int(state["task"])
        self.task_finished = bool(state["task_finished"])
        self.tasks_folded = int(state["tasks_folded"])
        self.head.load_state_dict(state, self.device)

    # -- internals ----------------------------------------------------------------------------------
    def _tables(self) -> tuple[tuple[str, dict[str, Tensor]], ...]:
        """The per-layer tables of the deployed update, with their state_dict prefixes."""
        return (
            ("merged", self.merged),
            ("task_B", self.task_B),
            ("task_A", self.task_A),
            ("task_P", self.task_P),
        )

    def _training_arrays(self) -> Arrays:
        out: Arrays = {f"{HEAD}.weight": self.head_weight, f"{HEAD}.bias": self.head_bias}
        for name in self.shapes:
            out[factor_key(name, "A")] = self.A[name]
            out[factor_key(name, "B")] = self.B[name]
            if self.cfg.lorm.task_start == "merged":
                out.update(self._merged_arrays(name))
        return out

    def _merged_arrays(self, name: str) -> Arrays:
        """Layer ``name``'s deployed ΔW as broadcast: a factor pair where exact, else dense."""
        if name not in self.merged:
            return {}
        if not self.factored:  # e.g. full statistics: (Σ ΔW_t G_t)(Σ G_t)⁻¹ has no factor form
            return {f"{name}.fixed_delta": self.merged[name]}
        return self._stack_arrays(name, "fixed", self._column_weights(name))

    def _stack_arrays(self, name: str, prefix: str, weights: Tensor | None) -> Arrays:
        """Σ_t scaling·B_t A_t diag(w_t) (w_t = 1 if None) in its cheaper exact form.

        Factors ``{name}.{prefix}_B``, ``_A`` unless they hold at least as many numbers as the dense
        matrix, which then goes as ``{name}.{_DENSE[prefix]}``. Rank-one terms that are zero (a zero
        column of B_t, a zero row of A_t·diag(w_t)) are left out; with none left nothing is sent,
        which the client reads as no update.
        """
        if name not in self.task_B:
            return {}
        B, A = self.task_B[name], self.task_A[name]
        if weights is not None:
            A = A * weights.repeat_interleave(self.shapes[name].rank, dim=0)
        keep = (B != 0).any(dim=0) & (A != 0).any(dim=1)
        width, (d_out, d_in, _) = int(keep.sum()), self.shapes[name]
        if width == 0:
            return {}
        if width * (d_out + d_in) >= d_out * d_in:
            dense = self.merged[name] if prefix == "fixed" else (B @ A).to(self.dtype)
            return {f"{name}.{_DENSE[prefix]}": dense}
        return {f"{name}.{prefix}_B": B[:, keep].to(self.dtype), f"{name}.{prefix}_A": A[keep].to(self.dtype)}

    def _column_weights(self, name: str) -> Tensor:
        """The rows w_t (T × d_in) with deployed ΔW = Σ_t scaling·B_t A_t diag(w_t)."""
        return self.cross.column_weights(name, self.task_P[name], self.tasks_folded)

    def _stack_task(self, name: str, sums: Arrays | None) -> None:
        """Append the current task's factors (and, where factored, its row p_t) to ``name``'s stacks.

        Called before the fold updates Q and the task count, so that the deployed weights w_u of the
        earlier tasks are still those the task trained on.
        """
        B = self.scaling * self.B[name].to(torch.float64)
        A = self.A[name].to(torch.float64)
        if self.factored:
            g = self.cross.task_row(name, sums, self.shapes[name].d_in, B.device)
            p = self.task_P.get(name)
            if p is not None and self.cfg.lorm.task_start == "merged":
                # ΔW_t includes the deployed Σ_{u<t} scaling·B_u A_u diag(w_u), so P gains w_u·g_t.
                p = p + self._column_weights(name) * g
            self.task_P[name] = g[None] if p is None else torch.cat([p, g[None]])
        if name in self.task_B:
            B, A = torch.cat([self.task_B[name], B], 1), torch.cat([self.task_A[name], A], 0)
        self.task_B[name], self.task_A[name] = B, A

    def _task_delta(self, name: str) -> Tensor:
        delta = self.scaling * (self.B[name].to(torch.float64) @ self.A[name].to(torch.float64))
        if self.cfg.lorm.task_start == "merged" and name in self.merged:
            delta = delta + self.merged[name].to(torch.float64)
        return delta

    def _fold_task(self, sums: Arrays | None) -> None:
        """Fold task t's ΔW_t into the deployed ΔW by the cross-task rule (``sums``: the
        ``task_stats`` step's, None without one); the task's factors also go onto the stacks the
        broadcast's factor pairs are built from."""
        for name in self.shapes:
            self._stack_task(name, sums)
        self.tasks_folded += 1
        for name in self.shapes:
            self.merged[name] = self.cross.fold(
                name, self._task_delta(name), sums, self.tasks_folded, self.merged.get(name), dtype=self.dtype
            )
        self.task_finished = True
