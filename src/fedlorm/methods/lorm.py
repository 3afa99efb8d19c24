"""LoRM (ICLR 2025): alternating closed-form merges of LoRA's B and A, within and across tasks.

Per task, rounds alternate B, A, B, ... (B first: with B = 0 at a task's start, A has zero gradient).
Clients train the round's factor and the current task's head rows, then send additive summands
(DESIGN.md §2): B-round ``M_i = B_i H_i, H_i = A G̃_i Aᵀ``; A-round ``N_i = A_i G̃_i, G̃_i``; head
``W_i G̃_i, G̃_i`` (RegMean) plus ``n_i b_i, n_i``. At a task's end the clients send the Grams of
every adapted layer's inputs through the merged task model and the server folds the task's update
``ΔW_t`` into ``ΔW = (Σ_t ΔW_t G_t)(Σ_t G_t)⁻¹``.

The same task structure serves the baselines that differ from LoRM in one place only: the
within-task client merge (``fedavg``, ``ffa``, ``fedavg-product``, ``regmean``, ``lorm-avg``; see
:mod:`fedlorm.methods.client_merge`) or the cross-task merge (``lorm.cross_task``: ``simple_mean``
ΔW = mean_t ΔW_t, ``task_arithmetic`` ΔW = Σ_t ΔW_t; neither needs the end-of-task statistics).

Heads (``lorm.head_merge``): ``fedavg`` averages the clients' trained rows, ``regmean`` is the paper's
closed form, and ``analytic`` deploys a ridge-regression classifier over all seen classes, solved from
running sums of the clients' features (F̂ᵀF̂, F̂ᵀY with F̂ = [F, 1]) collected at each task's end
through the deployed backbone (one extra forward pass, ``head_stats``); the trained head then only
serves local training.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
from torch import Tensor, nn

from fedlorm import merging
from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone
from fedlorm.config import RunConfig
from fedlorm.methods.base import (
    Arrays,
    Client,
    ClientData,
    ClientReply,
    Instruction,
    ReplySpec,
    Server,
)
from fedlorm.methods.client_merge import CLIENT_MERGES
from fedlorm.methods.common import (
    HEAD,
    apply_arrays,
    collect_statistics,
    factor_key,
    train_with_config,
)

__all__ = ["LoRMClient", "LoRMServer"]


def _mode(alpha: float) -> str:
    return "diag" if alpha == 0 else "full"


class LoRMClient(Client):
    """Trains the round's factor(s) and head rows; replies with the method's additive summands
    (:mod:`fedlorm.methods.client_merge`), or with feature sums for the analytic head."""

    def update(
        self,
        arrays: Mapping[str, Tensor],
        instruction: Instruction,
        data: ClientData,
        generator: torch.Generator,
    ) -> ClientReply:
        cfg, train = self.cfg.lorm, self.cfg.train
        merge = CLIENT_MERGES[self.cfg.method]
        apply_arrays(self.model, self.layers, arrays)
        if instruction.phase == "head_stats":
            return ClientReply(self._analytic_summands(data, instruction), num_examples=len(data))
        metrics: dict[str, float] = {}
        if instruction.phase == "train":
            metrics["train_loss"] = train_with_config(
                self.model,
                self.layers,
                data,
                train,
                factor=instruction.factor,
                classes=instruction.classes,
                generator=generator,
            )
        layer_grams = instruction.phase == "task_stats" or merge.needs_grams
        grams = self._statistics(arrays, instruction, data, layer_grams)
        summands: Arrays = {}
        for name, layer in self.layers.items():
            gram = merging.shrink_gram(grams[name], cfg.alpha_backbone) if layer_grams else None
            if instruction.phase == "task_stats":
                summands[f"{name}.G"] = gram
            else:
                summands.update(merge.summands(name, layer, instruction.factor, gram, len(data)))
        if instruction.phase == "train":
            summands.update(self._head_summands(grams.get(HEAD), len(data)))
        return ClientReply(summands=summands, num_examples=len(data), metrics=metrics)

    def _statistics(
        self, arrays: Mapping[str, Tensor], instruction: Instruction, data: ClientData, layer_grams: bool
    ) -> dict[str, Tensor]:
        """Grams through the statistics model: the trained one, or the authors' averaged one."""
        cfg = self.cfg.lorm
        modules: dict[str, nn.Module] = dict(self.layers) if layer_grams else {}
        modes = {name: _mode(cfg.alpha_backbone) for name in modules}
        if instruction.phase == "train" and cfg.head_merge == "regmean":
            modules[HEAD] = self.model.head
            modes[HEAD] = _mode(cfg.alpha_head)
        if not modules:
            return {}
        if cfg.stats_model == "reference":
            # fed-mammoth: inputs through W0 + (Σ_{j<t} ΔW_j + current ΔW) / (t + 1).
            t = instruction.task
            for name, layer in self.layers.items():
                earlier = arrays.get(f"{name}.earlier_sum")
                layer.set_fixed_delta(None if earlier is None else earlier / (t + 1))
                layer.scaling = self.cfg.model.scaling / (t + 1)
        try:
            return collect_statistics(
                self.model, modules, data, modes=modes, batch_size=self.cfg.train.eval_batch_size
            )
        finally:
            if cfg.stats_model == "reference":
                for layer in self.layers.values():
                    layer.scaling = self.cfg.model.scaling
                apply_arrays(
                    self.model,
                    self.layers,
                    {k: v for k, v in arrays.items() if k.endswith(".fixed_delta")},
                )

    @torch.no_grad()
    def _analytic_summands(self, data: ClientData, instruction: Instruction) -> Arrays:
        """F̂ᵀF̂ and F̂ᵀY of the deployed model's pooled features (Y: one-hot over the task's classes)."""
        self.model.eval()
        device = self.model.head.weight.device
        width = instruction.class_stop - instruction.class_start
        gram, cross = None, None
        for batch in torch.arange(len(data)).split(self.cfg.train.eval_batch_size):
            features = self.model.features(data.images[batch].to(device, non_blocking=True))
            targets = nn.functional.one_hot(data.labels[batch] - instruction.class_start, width)
            g, c = merging.analytic_head_summands(features.cpu(), targets.double())
            gram, cross = (g, c) if gram is None else (gram + g, cross + c)
        return {f"{HEAD}.features.G": gram, f"{HEAD}.features.Y": cross}

    def _head_summands(self, head_gram: Tensor | None, n: int) -> Arrays:
        weight = self.model.head.weight.detach()
        bias = self.model.head.bias.detach().to(torch.float64)
        out: Arrays = {
            f"{HEAD}.nb": n * bias,
            f"{HEAD}.n": torch.tensor(float(n), dtype=torch.float64),
        }
        if head_gram is None:
            out[f"{HEAD}.nW"] = n * weight.to(torch.float64)
        else:
            gram = merging.shrink_gram(head_gram, self.cfg.lorm.alpha_head)
            out[f"{HEAD}.WG"], out[f"{HEAD}.G"] = merging.regmean_summands(weight, gram)
        return out


class LoRMServer(Server):
    """Holds the current task's factors, the head and the cross-task sums P = Σ ΔW_t G_t, Q = Σ G_t."""

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        if cfg.lorm.stats_model == "reference" and cfg.lorm.task_start != "pretrained":
            raise ValueError(
                "lorm.stats_model='reference' reproduces the authors' setup and needs "
                f"lorm.task_start='pretrained', got {cfg.lorm.task_start!r}"
            )
        self.merge = CLIENT_MERGES[cfg.method]
        self.scaling = cfg.model.scaling
        self.dtype = model.head.weight.dtype
        self.device = model.head.weight.device
        self.shapes = {name: (lay.out_features, lay.in_features, lay.rank) for name, lay in layers.items()}
        self.A = {name: lay.lora_A.detach().clone() for name, lay in layers.items()}
        self.B = {name: torch.zeros_like(lay.lora_B) for name, lay in layers.items()}
        self.head_weight = torch.zeros_like(model.head.weight)
        self.head_bias = torch.zeros_like(model.head.bias)
        self.P: dict[str, Tensor] = {}
        self.Q: dict[str, Tensor] = {}
        self.merged: dict[str, Tensor] = {}
        self.earlier_sum: dict[str, Tensor] = {}
        self.task = -1
        self.task_finished = False
        self.tasks_folded = 0
        classes, features = self.head_weight.shape
        self.analytic_gram = torch.zeros(features + 1, features + 1, dtype=torch.float64)
        self.analytic_cross = torch.zeros(features + 1, classes, dtype=torch.float64)
        self.analytic_head: tuple[Tensor, Tensor] | None = None

    # -- protocol -----------------------------------------------------------------------------------
    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        self.task = task
        self.task_finished = False
        for name, (d_out, d_in, rank) in self.shapes.items():
            a = torch.empty(rank, d_in, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A[name] = a.to(device=self.device, dtype=self.dtype)
            self.B[name] = torch.zeros(d_out, rank, device=self.device, dtype=self.dtype)

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        for r in range(self.cfg.train.rounds):
            yield Instruction(task, r, "train", self.merge.factor(r), classes.start, classes.stop)
        if self.cfg.lorm.cross_task == "closed_form" and self.merge.schedule != "none":
            yield Instruction(task, -1, "task_stats", "none", classes.start, classes.stop)
        if self.cfg.lorm.head_merge == "analytic":
            yield Instruction(task, -1, "head_stats", "none", classes.start, classes.stop)

    def arrays(self, instruction: Instruction) -> Arrays:
        if instruction.phase == "head_stats":
            return self.deployed_arrays()
        out = self._training_arrays()
        if self.cfg.lorm.stats_model == "reference":
            for name, total in self.earlier_sum.items():
                out[f"{name}.earlier_sum"] = total
        return out

    def aggregate(self, instruction: Instruction, sums: Arrays, num_examples: int) -> None:
        if instruction.phase == "task_stats":
            self._fold_task(sums)
            return
        if instruction.phase == "head_stats":
            self._solve_analytic_head(sums, instruction.classes)
            return
        for name in self.shapes:
            self.A[name], self.B[name] = self.merge.solve(
                name,
                instruction.factor,
                sums,
                sums[f"{HEAD}.n"],
                self.A[name],
                self.B[name],
                scaling=self.scaling,
                ridge=self.cfg.lorm.ridge,
            )
        self._merge_head(sums)
        last_round = instruction.round == self.cfg.train.rounds - 1
        if last_round and (self.cfg.lorm.cross_task != "closed_form" or self.merge.schedule == "none"):
            self._fold_task(None)

    def expected_reply(self, instruction: Instruction) -> ReplySpec:
        f64, lorm = torch.float64, self.cfg.lorm
        if instruction.phase == "head_stats":
            width = self.analytic_gram.shape[0]
            return {
                f"{HEAD}.features.G": ((width, width), f64),
                f"{HEAD}.features.Y": ((width, len(instruction.classes)), f64),
            }
        spec: ReplySpec = {}
        for name, (d_out, d_in, rank) in self.shapes.items():
            gram = (d_in,) if lorm.alpha_backbone == 0 else (d_in, d_in)
            if instruction.phase == "task_stats":
                spec[f"{name}.G"] = (gram, f64)
            else:
                spec.update(self.merge.spec(name, (d_out, d_in, rank), instruction.factor, gram))
        if instruction.phase == "train":
            classes, features = self.head_weight.shape
            spec[f"{HEAD}.nb"], spec[f"{HEAD}.n"] = ((classes,), f64), ((), f64)
            if lorm.head_merge == "regmean":
                head_gram = (features,) if lorm.alpha_head == 0 else (features, features)
                spec[f"{HEAD}.WG"], spec[f"{HEAD}.G"] = ((classes, features), f64), (head_gram, f64)
            else:
                spec[f"{HEAD}.nW"] = ((classes, features), f64)
        return spec

    def deployed_arrays(self) -> Arrays:
        if not self.task_finished:
            return self._training_arrays()
        weight, bias = self.analytic_head or (self.head_weight, self.head_bias)
        out = {f"{HEAD}.weight": weight, f"{HEAD}.bias": bias}
        for name in self.shapes:
            out[factor_key(name, "A")] = self.A[name]
            out[factor_key(name, "B")] = torch.zeros_like(self.B[name])
            if name in self.merged:
                out[f"{name}.fixed_delta"] = self.merged[name]
        return out

    def state_dict(self) -> Arrays:
        out = self._training_arrays()
        for prefix, table in (
            ("P", self.P),
            ("Q", self.Q),
            ("merged", self.merged),
            ("earlier_sum", self.earlier_sum),
        ):
            out.update({f"{prefix}.{name}": value for name, value in table.items()})
        out["task"] = torch.tensor(self.task)
        out["task_finished"] = torch.tensor(self.task_finished)
        out["tasks_folded"] = torch.tensor(self.tasks_folded)
        out["analytic.gram"], out["analytic.cross"] = self.analytic_gram, self.analytic_cross
        if self.analytic_head is not None:
            out["analytic.weight"], out["analytic.bias"] = self.analytic_head
        return out

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        for name in self.shapes:
            self.A[name] = state[factor_key(name, "A")].to(self.device, copy=True)
            self.B[name] = state[factor_key(name, "B")].to(self.device, copy=True)
        self.head_weight = state[f"{HEAD}.weight"].to(self.device, copy=True)
        self.head_bias = state[f"{HEAD}.bias"].to(self.device, copy=True)
        for prefix, table in (
            ("P", self.P),
            ("Q", self.Q),
            ("merged", self.merged),
            ("earlier_sum", self.earlier_sum),
        ):
            table.clear()
            for name in self.shapes:
                if f"{prefix}.{name}" in state:
                    table[name] = state[f"{prefix}.{name}"].to(self.device, copy=True)
        self.task = int(state["task"])
        self.task_finished = bool(state["task_finished"])
        self.tasks_folded = int(state["tasks_folded"])
        self.analytic_gram = state["analytic.gram"].clone()
        self.analytic_cross = state["analytic.cross"].clone()
        self.analytic_head = None
        if "analytic.weight" in state:
            self.analytic_head = (
                state["analytic.weight"].to(self.device, copy=True),
                state["analytic.bias"].to(self.device, copy=True),
            )

    # -- internals ----------------------------------------------------------------------------------
    def _training_arrays(self) -> Arrays:
        out: Arrays = {f"{HEAD}.weight": self.head_weight, f"{HEAD}.bias": self.head_bias}
        for name in self.shapes:
            out[factor_key(name, "A")] = self.A[name]
            out[factor_key(name, "B")] = self.B[name]
            if self.cfg.lorm.task_start == "merged" and name in self.merged:
                out[f"{name}.fixed_delta"] = self.merged[name]
        return out

    def _merge_head(self, sums: Arrays) -> None:
        n = sums[f"{HEAD}.n"]
        if f"{HEAD}.WG" in sums:
            self.head_weight = merging.regmean_solve(
                sums[f"{HEAD}.WG"],
                sums[f"{HEAD}.G"],
                reference=self.head_weight,
                dtype=self.dtype,
                ridge=self.cfg.lorm.ridge,
            )
        else:
            self.head_weight = (sums[f"{HEAD}.nW"] / n).to(self.dtype)
        self.head_bias = (sums[f"{HEAD}.nb"] / n).to(self.dtype)

    def _solve_analytic_head(self, sums: Arrays, classes: range) -> None:
        """Fold the task's feature sums into the running ones and re-solve the ridge classifier."""
        self.analytic_gram += sums[f"{HEAD}.features.G"]
        self.analytic_cross[:, classes.start : classes.stop] += sums[f"{HEAD}.features.Y"]
        seen = classes.stop
        weight, bias = merging.analytic_head_solve(
            self.analytic_gram, self.analytic_cross[:, :seen], ridge=self.cfg.lorm.head_ridge
        )
        full_weight = torch.zeros_like(self.head_weight)
        full_bias = torch.zeros_like(self.head_bias)
        full_weight[:seen] = weight.to(self.device, self.dtype)
        full_bias[:seen] = bias.to(self.device, self.dtype)
        self.analytic_head = (full_weight, full_bias)

    def _task_delta(self, name: str) -> Tensor:
        delta = self.scaling * (self.B[name].to(torch.float64) @ self.A[name].to(torch.float64))
        if self.cfg.lorm.task_start == "merged" and name in self.merged:
            delta = delta + self.merged[name].to(torch.float64)
        return delta

    def _fold_task(self, sums: Arrays | None) -> None:
        """Fold task t's ΔW_t into the deployed ΔW by the configured cross-task rule.

        ``closed_form``: P += ΔW_t G_t, Q += G_t, ΔW = P Q⁻¹ (earlier value kept where Q = 0);
        ``simple_mean``: ΔW = (1/t) Σ ΔW_t; ``task_arithmetic``: ΔW = Σ ΔW_t (no statistics).
        """
        # head-only trains no adapter: its task deltas are zero and need no statistics.
        rule = self.cfg.lorm.cross_task if self.merge.schedule != "none" else "task_arithmetic"
        self.tasks_folded += 1
        for name in self.shapes:
            delta = self._task_delta(name)
            if rule == "closed_form":
                assert sums is not None
                p, q = merging.merge_tasks_summands(delta, sums[f"{name}.G"])
                self.Q[name] = q if name not in self.Q else self.Q[name] + q
            else:
                p = delta
            self.P[name] = p if name not in self.P else self.P[name] + p
            if rule == "closed_form":
                self.merged[name] = merging.merge_tasks_solve(
                    self.P[name],
                    self.Q[name],
                    reference=self.merged.get(name),
                    dtype=self.dtype,
                    ridge=self.cfg.lorm.ridge,
                )
            else:
                divisor = self.tasks_folded if rule == "simple_mean" else 1
                self.merged[name] = (self.P[name] / divisor).to(self.dtype)
            if self.cfg.lorm.stats_model == "reference":
                # The reference statistics model implies task_start="pretrained", so ΔW_t = B_t A_t.
                previous = self.earlier_sum.get(name)
                self.earlier_sum[name] = (delta if previous is None else previous + delta).to(self.dtype)
        self.task_finished = True
