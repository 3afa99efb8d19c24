"""LoRM (ICLR 2025): alternating closed-form merges of LoRA's B and A, within and across tasks.

Per task, rounds alternate B, A, B, ... (B first: with B = 0 at a task's start, A has zero gradient).
Clients train the round's factor and the current task's head rows, then send additive summands
(docs/design.md, "Closed forms"): B-round ``M_i = B_i H_i, H_i = A G̃_i Aᵀ``; A-round
``N_i = A_i G̃_i, G̃_i``; head ``W_i G̃_i, G̃_i`` (RegMean) plus ``n_i b_i, n_i``. At a task's end
the clients send the Grams of every adapted layer's inputs through the merged task model and the
server folds the task's update ``ΔW_t`` into ``ΔW = (Σ_t ΔW_t G_t)(Σ_t G_t)⁻¹``.

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
from fedlorm.precision import autocast

__all__ = ["LoRMClient", "LoRMServer"]

_FIXED_KEYS = (".fixed_delta", ".fixed_B", ".fixed_A")
_DENSE = {"fixed": "fixed_delta", "earlier": "earlier_sum"}
"""Broadcast key of a low-rank update's dense form, by the prefix of its factor keys."""


def _mode(alpha: float) -> str:
    return "diag" if alpha == 0 else "full"


def _earlier_update(arrays: Mapping[str, Tensor], name: str, t: int) -> tuple[Tensor, Tensor] | Tensor | None:
    """(Σ_{j<t} ΔW_j)/(t + 1) for layer ``name`` from the broadcast: factors, dense, or none."""
    factor_b, factor_a = arrays.get(f"{name}.earlier_B"), arrays.get(f"{name}.earlier_A")
    if factor_b is not None and factor_a is not None:
        return factor_b / (t + 1), factor_a
    dense = arrays.get(f"{name}.earlier_sum")
    return None if dense is None else dense / (t + 1)


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
        stats_rng = generator if self.cfg.data.augment_statistics else None
        grams = self._statistics(arrays, instruction, data, layer_grams, stats_rng)
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
        if instruction.phase == "train" and cfg.head_merge == "regmean":
            modules[HEAD] = self.model.head
            modes[HEAD] = _mode(cfg.alpha_head)
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

    @torch.no_grad()
    def _analytic_summands(self, data: ClientData, instruction: Instruction) -> Arrays:
        """F̂ᵀF̂ and F̂ᵀY of the deployed model's pooled features (Y: one-hot over the task's classes).

        The images take the test-time transform: the head is fitted to features as they are at test
        time, not to augmented ones.
        """
        self.model.eval()
        device = self.model.head.weight.device
        width = instruction.class_stop - instruction.class_start
        gram, cross = None, None
        for batch in torch.arange(len(data)).split(self.cfg.train.eval_batch_size):
            with autocast(device, self.cfg.train.precision):
                features = self.model.features(data.images[batch].to(device, non_blocking=True))
            targets = nn.functional.one_hot(data.labels[batch] - instruction.class_start, width)
            g, c = merging.analytic_head_summands(features.float().cpu(), targets.double())
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
    """Holds the current task's factors, the head and the cross-task sums P = Σ ΔW_t G_t, Q = Σ G_t.

    The broadcast sends low-rank updates as factor pairs wherever that is exact and smaller than
    the dense matrix: the earlier tasks' sum of the reference statistics model, Σ_t scaling·B_t A_t
    (``{layer}.earlier_B``/``_A``, dense ``{layer}.earlier_sum``), and the deployed
    ΔW = Σ_t scaling·B_t A_t diag(w_t) (``{layer}.fixed_B``/``_A``, dense ``{layer}.fixed_delta``),
    which holds for diagonal statistics (w_t = p_t/Q, P = Σ_t scaling·B_t A_t diag(p_t)),
    ``simple_mean`` and ``task_arithmetic``, from either task start. With full statistics the
    deployed ΔW mixes input features and is always sent dense.
    """

    def __init__(self, cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer]) -> None:
        super().__init__(cfg, model, layers)
        if cfg.lorm.stats_model == "reference" and cfg.lorm.task_start != "pretrained":
            raise ValueError(
                "lorm.stats_model='reference' reproduces the authors' setup and needs "
                f"lorm.task_start='pretrained', got {cfg.lorm.task_start!r}"
            )
        self.merge = CLIENT_MERGES[cfg.method]
        if self.merge.adapt_tasks is not None and cfg.lorm.head_merge != "analytic":
            raise ValueError(
                f"method {cfg.method!r} adds later tasks' classes through the analytic head only; "
                f"set lorm.head_merge = 'analytic' (now {cfg.lorm.head_merge!r})"
            )
        self.scaling = cfg.model.scaling
        self.dtype = model.head.weight.dtype
        self.device = model.head.weight.device
        self.shapes = {name: (lay.out_features, lay.in_features, lay.rank) for name, lay in layers.items()}
        self.A = {name: lay.lora_A.detach().clone() for name, lay in layers.items()}
        self.B = {name: torch.zeros_like(lay.lora_B) for name, lay in layers.items()}
        self.head_weight = model.head.weight.detach().clone()  # model.head_init decides
        self.head_bias = model.head.bias.detach().clone()
        self.P: dict[str, Tensor] = {}
        self.Q: dict[str, Tensor] = {}
        self.merged: dict[str, Tensor] = {}
        # Per layer, every folded task's scaling·B_t side by side and A_t stacked (float64), and
        # where the deployed ΔW has factor form, each task's coefficient row p_t (T × d_in).
        self.task_B: dict[str, Tensor] = {}
        self.task_A: dict[str, Tensor] = {}
        self.task_P: dict[str, Tensor] = {}
        self.factored = self._rule() != "closed_form" or cfg.lorm.alpha_backbone == 0
        self.task = -1
        self.task_finished = False
        self.tasks_folded = 0
        classes, features = self.head_weight.shape
        self.analytic_gram = torch.zeros(features + 1, features + 1, dtype=torch.float64)
        self.analytic_cross = torch.zeros(features + 1, classes, dtype=torch.float64)
        self.analytic_head: tuple[Tensor, Tensor] | None = None

    # -- protocol -----------------------------------------------------------------------------------
    def adapts(self, task: int) -> bool:
        """Whether ``task`` trains the adapters (all tasks unless ``lorm.adapt_tasks`` or the
        method, e.g. ``lorm-fsa``, stops them)."""
        limit = self.cfg.lorm.adapt_tasks or self.merge.adapt_tasks
        return limit is None or task < limit

    def start_task(self, task: int, classes: range, generator: torch.Generator) -> None:
        self.task = task
        if not self.adapts(task):  # the deployed backbone stays as the adapted tasks left it
            return
        self.task_finished = False
        for name, (d_out, d_in, rank) in self.shapes.items():
            a = torch.empty(rank, d_in, dtype=torch.float32)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            self.A[name] = a.to(device=self.device, dtype=self.dtype)
            self.B[name] = torch.zeros(d_out, rank, device=self.device, dtype=self.dtype)

    def instructions(self, task: int, classes: range) -> Iterator[Instruction]:
        if not self.adapts(task):
            yield Instruction(task, -1, "head_stats", "none", classes.start, classes.stop)
            return
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
            # The reference statistics model implies task_start="pretrained": ΔW_j = scaling·B_j A_j.
            for name in self.shapes:
                out.update(self._stack_arrays(name, "earlier", None))
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
            out.update(self._merged_arrays(name))
        return out

    def state_dict(self) -> Arrays:
        out = self._training_arrays()
        for prefix, table in (
            ("P", self.P),
            ("Q", self.Q),
            ("merged", self.merged),
            ("task_B", self.task_B),
            ("task_A", self.task_A),
            ("task_P", self.task_P),
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
            ("task_B", self.task_B),
            ("task_A", self.task_A),
            ("task_P", self.task_P),
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
            if self.cfg.lorm.task_start == "merged":
                out.update(self._merged_arrays(name))
        return out

    def _merged_arrays(self, name: str) -> Arrays:
        """Layer ``name``'s deployed ΔW as broadcast: a factor pair where exact, else dense."""
        if name not in self.merged:
            return {}
        if not self.factored:  # full statistics: (Σ ΔW_t G_t)(Σ G_t)⁻¹ has no factor form
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
            A = A * weights.repeat_interleave(self.shapes[name][2], dim=0)
        keep = (B != 0).any(dim=0) & (A != 0).any(dim=1)
        width, (d_out, d_in, _) = int(keep.sum()), self.shapes[name]
        if width == 0:
            return {}
        if width * (d_out + d_in) >= d_out * d_in:
            dense = self.merged[name] if prefix == "fixed" else (B @ A).to(self.dtype)
            return {f"{name}.{_DENSE[prefix]}": dense}
        return {f"{name}.{prefix}_B": B[:, keep].to(self.dtype), f"{name}.{prefix}_A": A[keep].to(self.dtype)}

    def _column_weights(self, name: str) -> Tensor:
        """The rows w_t (T × d_in) with deployed ΔW = Σ_t scaling·B_t A_t diag(w_t); 0 where Q = 0."""
        p = self.task_P[name]
        rule = self._rule()
        if rule == "closed_form":  # diagonal statistics: ΔW = P diag(Q)⁻¹, merging._solve_right's rule
            q = self.Q[name].to(p.device)
            seen = q > 0
            return torch.where(seen, p / torch.where(seen, q, torch.ones_like(q)), torch.zeros_like(p))
        return p / self.tasks_folded if rule == "simple_mean" else p

    def _stack_task(self, name: str, sums: Arrays | None) -> None:
        """Append the current task's factors (and, where factored, its row p_t) to ``name``'s stacks.

        Called before the fold updates Q and the task count, so that the deployed weights w_u of the
        earlier tasks are still those the task trained on.
        """
        B = self.scaling * self.B[name].to(torch.float64)
        A = self.A[name].to(torch.float64)
        if self.factored:
            rule, d_in = self._rule(), self.shapes[name][1]
            g = torch.ones(d_in, dtype=torch.float64, device=B.device)
            if rule == "closed_form":
                assert sums is not None
                g = sums[f"{name}.G"].to(B.device, torch.float64)
            p = self.task_P.get(name)
            if p is not None and self.cfg.lorm.task_start == "merged":
                # ΔW_t includes the deployed Σ_{u<t} scaling·B_u A_u diag(w_u), so P gains w_u·g_t.
                p = p + self._column_weights(name) * g
            self.task_P[name] = g[None] if p is None else torch.cat([p, g[None]])
        if name in self.task_B:
            B, A = torch.cat([self.task_B[name], B], 1), torch.cat([self.task_A[name], A], 0)
        self.task_B[name], self.task_A[name] = B, A

    def _rule(self) -> str:
        """The cross-task rule in effect (head-only trains no adapter: its task deltas are zero)."""
        return self.cfg.lorm.cross_task if self.merge.schedule != "none" else "task_arithmetic"

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
        The task's factors also go onto the stacks the broadcast's factor pairs are built from.
        """
        rule = self._rule()
        for name in self.shapes:
            self._stack_task(name, sums)
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
        self.task_finished = True
