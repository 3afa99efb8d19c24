"""The Flower transport of the engine's run loop, and the ServerApp's run over a Flower grid.

:class:`FlowerTransport` carries each step of :func:`fedlorm.runtime.engine.run` as Flower messages:
each SuperNode whose client the step asks is sent the part of the step's broadcast it does not hold
(:mod:`fedlorm.flower.delivery`; a node that lacks what it is told it holds asks again and is sent
it), their replies come back, are checked and folded exactly as in process (:class:`FedlormStrategy`).
So for the same config and seed the two runtimes give the same numbers, report the same bytes and
write the same files; the engine checkpoints after every step, and :func:`run_federation` with
``resume`` continues a run whose ServerApp (or SuperLink) was killed. With ``secure.aggregation``
each step is instead one SecAgg+ secure sum (:mod:`fedlorm.flower.secure_step`): the server sees only
the sums, journals each step's contributors before unmasking (``secure_steps.json``, so a resumed
step sums exactly them again or keeps the state), and the federated evaluation is one more secure
sum. On top the transport records which clients each step dropped and why, and what nodes were sent
beyond their clients' share of the broadcast (``results["flower"]``, kept across a resume), runs the
optional federated evaluation after each task, and saves the server's final state
(``server_state.safetensors``) so that merged adapters can be compared across runtimes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.serverapp import Grid
from safetensors.torch import save_file

from fedlorm.config import validate_config
from fedlorm.flower.delivery import FlowerDelivery
from fedlorm.flower.messages import resend_keys, to_array_record
from fedlorm.flower.secure_step import run_secure_evaluation, run_secure_step
from fedlorm.flower.settings import FlowerSettings
from fedlorm.flower.strategy import FedlormStrategy, StepReport
from fedlorm.methods import Instruction
from fedlorm.methods.steps import step_label
from fedlorm.results import write_json_atomic
from fedlorm.runtime.checkpoint import CheckpointError
from fedlorm.runtime.delivery import Broadcast, Ledger
from fedlorm.runtime.engine import checkpoint_config, resume_run, run
from fedlorm.runtime.experiment import Experiment
from fedlorm.runtime.report import StepTally
from fedlorm.secure.contribution import secure_record

__all__ = ["SECURE_JOURNAL", "SERVER_STATE", "FlowerTransport", "run_federation"]

logger = logging.getLogger(__name__)

SERVER_STATE = "server_state.safetensors"
SECURE_JOURNAL = "secure_steps.json"
"""A secure run's journal: each step's contributors, written before the step's sum is unmasked, so a
resumed run sums exactly them again or keeps the state (:func:`run_secure_step`'s ``pinned``)."""

_LISTS = ("steps", "dropped", "resent", "federated_evaluation")
"""The lists of results["flower"] that a resumed run continues."""


class FlowerTransport:
    """The engine's transport over a Flower grid: one message per SuperNode per step."""

    name = "flower"

    def __init__(
        self, grid: Grid, settings: FlowerSettings, context: Context | None = None, out: Path | None = None
    ) -> None:
        self.grid, self.settings = grid, settings
        self.journal_path = out / SECURE_JOURNAL if out is not None else None
        """Where a secure run journals each step's contributors before unmasking (None: nowhere)."""
        self.journal: dict[str, list[int]] = {}
        self.resumed = False
        blank = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
        self.context = context or blank
        """The ServerApp's context (SecAgg+'s workflow runs in a private copy of it)."""
        self.strategy: FedlormStrategy | None = None
        self.delivery = FlowerDelivery()
        """What each client (and each node this ServerApp sent to) holds of the broadcasts."""
        self.step_index = 0
        """Flower's round number of the last message group (counts every step, across sessions)."""
        self.flower: dict[str, Any] = {
            "min_clients": settings.min_clients,
            "reply_timeout": settings.reply_timeout,
            "clients_at_start": [],
            "steps": [],
            "dropped": [],
            "resent": [],
            "federated_evaluation": [],
            "ignored_nodes": {},
        }

    def begin(self, exp: Experiment) -> None:
        """Identify the connected SuperNodes (waiting up to ``node_wait`` s for one per client)."""
        cfg = exp.cfg
        if cfg.secure.aggregation:
            validate_config(cfg)  # the method's own config (e.g. joint's one client) must allow it
            self.flower["secure_aggregation"] = secure_record(cfg, masked=True)
            self._open_journal()
        self.strategy = FedlormStrategy(
            exp.server, cfg.scenario.num_clients, self.settings.min_clients, self.settings.reply_timeout
        )
        self.strategy.summary()
        served = self.strategy.discover(self.grid, wait=self.settings.node_wait)
        logger.info("%d of %d clients have a SuperNode", len(served), cfg.scenario.num_clients)
        self.flower["clients_at_start"] = served
        self.flower["ignored_nodes"] = self.strategy.ignored

    def run_step(
        self, exp: Experiment, instruction: Instruction, clients: list[int], advance: Callable[[int], None]
    ) -> StepTally:
        """Send one step to ``clients``' SuperNodes, wait for the replies (at most ``reply_timeout`` s
        per exchange), merge what is valid; the step's tally as the engine reports it."""
        strategy = self._strategy()
        started = time.perf_counter()
        self.step_index += 1
        strategy.discover(self.grid)
        if exp.cfg.secure.aggregation:
            step = step_label(instruction, stable=True)
            report = run_secure_step(
                strategy,
                self.grid,
                self.context,
                exp.server,
                instruction,
                exp.cfg.secure,
                server_round=self.step_index,
                timeout=self.settings.reply_timeout,
                clients=clients,
                delivery=self.delivery,
                pinned=self.journal.get(step),
                pin=lambda contributors: self._pin(step, contributors),
            )
        else:
            report = self._plain_step(exp, instruction, clients)
        advance(len(report.asked))
        logger.info(
            "%s: merged clients %s, dropped %d (%.1f s)",
            report.step,
            report.merged,
            len(report.dropped),
            time.perf_counter() - started,
        )
        self._record(instruction, report)
        # Every client the step asked counts; each one not merged counts as rejected.
        tally = report.tally or StepTally()
        return dataclasses.replace(
            tally,
            clients=len(report.asked),
            rejected=len(report.asked) - len(report.merged),
            upload_bytes=report.upload_bytes,
            download_bytes=report.download_bytes,
            kept=report.kept,
        )

    def _plain_step(self, exp: Experiment, instruction: Instruction, clients: list[int]) -> StepReport:
        """One plain step: each node its share of the broadcast, a resend to those that ask, the fold."""
        strategy, grid, timeout = self._strategy(), self.grid, self.settings.reply_timeout
        report = strategy.begin_step(instruction, clients, grid)
        broadcast = Broadcast(exp.server.arrays(instruction))
        deltas, report.download_bytes, report.resent = self.delivery.plan(report.nodes, broadcast)
        messages = strategy.configure_train(instruction, deltas, self.step_index)
        replies = list(grid.send_and_receive(messages, timeout=timeout))
        asking = {m.metadata.src_node_id: resend_keys(m) for m in replies}
        asking = {node: keys for node, keys in asking.items() if keys is not None and node in report.nodes}
        if asking:
            again = {}
            for node, keys in sorted(asking.items()):
                again[node], resent = self.delivery.resend(node, report.nodes[node], broadcast, keys)
                report.resent.append(resent)
                logger.info("%s: node %d asked again for %d arrays", report.step, node, len(keys))
            replies = [m for m in replies if m.metadata.src_node_id not in asking]
            replies += grid.send_and_receive(
                strategy.configure_train(instruction, again, self.step_index), timeout=timeout
            )
        report = strategy.aggregate_train(report, instruction, replies)
        self.delivery.settle(
            report.nodes, broadcast, [m.metadata.src_node_id for m in replies if _answered(m)]
        )
        return report

    def task_end(self, exp: Experiment, task: int) -> None:
        """With ``federated_eval``, the clients score the merged model on their own training shares
        (under secure aggregation as one secure sum: the server learns only the overall accuracy)."""
        if not self.settings.federated_eval:
            return
        if exp.cfg.secure.aggregation:
            strategy = self._strategy()
            strategy.discover(self.grid)
            self.step_index += 1
            evaluation = run_secure_evaluation(
                strategy,
                self.grid,
                self.context,
                exp.server,
                task,
                exp.cfg.secure,
                server_round=self.step_index,
                timeout=self.settings.reply_timeout,
            )
        else:
            evaluation = self._federated_evaluation(exp, task)
        self.flower["federated_evaluation"].append(evaluation)

    def results_extra(self) -> dict[str, Any]:
        """results.json's Flower keys: the runtime and what happened to every client in every step."""
        return {"runtime": self.name, "flower": self.flower}

    def record(self) -> dict[str, Any]:
        """The step counter, what each client holds and the per-step records so far (checkpoint)."""
        return {
            "step_index": self.step_index,
            "ledger": self.delivery.run.to_record(),
            **{key: self.flower[key] for key in _LISTS},
        }

    def load_record(self, record: Mapping[str, Any]) -> None:
        """Continue the step counter, the clients' ledger and the per-step records of the checkpointed
        session (this ServerApp has sent no node anything yet)."""
        self.resumed = True
        self.step_index = int(record.get("step_index", 0))
        try:
            self.delivery = FlowerDelivery(Ledger.from_record(record.get("ledger") or {}))
        except ValueError as err:
            raise CheckpointError(f"the checkpoint's transport record is damaged: {err}") from None
        for key in _LISTS:
            self.flower[key] = list(record.get(key, []))

    def finish(self, exp: Experiment, out: Path) -> None:
        """Save the server's final state (``server_state.safetensors``); the run needs no journal now."""
        state = {k: v.detach().cpu().contiguous().clone() for k, v in exp.server.state_dict().items()}
        save_file(state, str(out / SERVER_STATE))
        if self.journal_path is not None:
            self.journal_path.unlink(missing_ok=True)

    def _open_journal(self) -> None:
        """A resumed secure run reads the contributors its steps were pinned to; a new run starts empty."""
        path = self.journal_path
        if path is None or not path.exists():
            return
        if not self.resumed:
            path.unlink()
            return
        try:
            journal = json.loads(path.read_text())
            self.journal = {str(step): sorted(int(k) for k in clients) for step, clients in journal.items()}
        except (OSError, ValueError, TypeError, AttributeError) as err:
            raise CheckpointError(f"secure-step journal {str(path)!r} is damaged: {err}") from None

    def _pin(self, step: str, clients: list[int]) -> None:
        """Journal ``step``'s contributors before its masks are removed (atomic, so a crash keeps it)."""
        self.journal[step] = list(clients)
        if self.journal_path is not None:
            write_json_atomic(self.journal_path, self.journal)

    def _strategy(self) -> FedlormStrategy:
        if self.strategy is None:
            raise RuntimeError("FlowerTransport.run_step called before begin")
        return self.strategy

    def _record(self, instruction: Instruction, report: StepReport) -> None:
        self.flower["steps"].append(report.to_record())
        step = {"task": instruction.task, "round": instruction.round, "phase": instruction.phase.value}
        for dropped in report.dropped:
            self.flower["dropped"].append(
                {**step, "node_id": dropped.node_id, "partition": dropped.partition, "reason": dropped.reason}
            )
        for resent in report.resent:
            self.flower["resent"].append({**step, **dataclasses.asdict(resent)})

    def _federated_evaluation(self, exp: Experiment, task: int) -> dict[str, Any]:
        strategy, grid = self._strategy(), self.grid
        strategy.discover(grid)
        arrays = to_array_record(exp.server.deployed_arrays())
        messages = strategy.configure_evaluate(self.step_index, arrays, ConfigRecord({"task": task}), grid)
        replies = grid.send_and_receive(messages, timeout=self.settings.reply_timeout)
        metrics = strategy.aggregate_evaluate(self.step_index, replies)
        if metrics is None:
            logger.warning("task %d: no client evaluated the merged model", task + 1)
            return {"task": task, "accuracy": None, "partitions": [], "accuracies": []}
        logger.info("task %d: clients' accuracy on their own data %.2f%%", task + 1, metrics["accuracy"])
        return {"task": task, **{key: metrics[key] for key in ("accuracy", "partitions", "accuracies")}}


def _answered(reply: Message) -> bool:
    """Whether a train reply answers its step (no error, no resend request): the node holds the broadcast."""
    return not reply.has_error() and resend_keys(reply) is None


def run_federation(
    grid: Grid,
    exp: Experiment,
    settings: FlowerSettings,
    out: Path | None,
    *,
    resume: bool = False,
    context: Context | None = None,
) -> dict[str, Any]:
    """Run every task over ``grid``; return (and write to ``out``) the results dict.

    With ``resume``, continue the run checkpointed in ``out`` (CheckpointError, a ValueError, if
    there is none or it was written for another config than ``exp``'s). ``context``: the
    ServerApp's (secure aggregation runs SecAgg+ in a copy of it).
    """
    transport = FlowerTransport(grid, settings, context, out)
    if not resume:
        return run(exp, transport, out)
    if out is None:
        raise ValueError("resuming a Flower run needs its output directory")
    _, checkpoint = checkpoint_config(out)
    return resume_run(exp, transport, out, checkpoint=checkpoint)
