"""The in-process runtime: the engine's loop (:mod:`fedlorm.runtime.engine`) with a transport that
calls the step's clients in turn on the one shared model.

Client k's RNG stream is derived from (seed, task, round, k), exactly as a Flower SuperNode derives
it, so the replies are the same bits in both runtimes. The clients share this process, so each gets
the whole broadcast; the download each step reports is what a Flower SuperNode of that client is
sent, only the arrays it does not hold yet (:mod:`fedlorm.runtime.delivery`), so both runtimes report
the same bytes. With an output directory the run is
checkpointed after every completed step; :func:`resume_simulation` continues from the last one and
gives the same accuracy matrix as an uninterrupted run with the same seed. A finished run writes
its deployed model to ``model/`` (:mod:`fedlorm.export`) and removes its checkpoint: ``results.json``
is then the record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import Tensor

from fedlorm.config import RunConfig, validate_config
from fedlorm.methods import ClientReply, Instruction
from fedlorm.methods.steps import step_label
from fedlorm.runtime.checkpoint import CheckpointError
from fedlorm.runtime.delivery import Broadcast, Ledger
from fedlorm.runtime.engine import (
    checkpoint_config,
    fold_replies,
    fold_secure_replies,
    kill_point,
    resume_run,
    run,
)
from fedlorm.runtime.experiment import Experiment, build_experiment
from fedlorm.runtime.report import StepTally
from fedlorm.secure.contribution import encoding_spec, secure_record
from fedlorm.seeding import torch_generator

__all__ = ["InProcess", "resume_simulation", "run_simulation"]


class InProcess:
    """The in-process transport: every asked client's update runs here, one after the other."""

    name = "in-process"

    def __init__(self) -> None:
        self.secure: dict[str, Any] | None = None
        """With ``secure.aggregation``: results.json's record of it (the encoding; nothing is masked in
        process, and the record says so)."""
        self.ledger = Ledger()
        """What each client holds of the broadcasts so far, by client index (the download count)."""

    def begin(self, exp: Experiment) -> None:
        """Nothing to connect; with secure aggregation, check the run's config allows it."""
        if exp.cfg.secure.aggregation:
            validate_config(exp.cfg)  # the method's own config (e.g. joint's one client) must allow it
            self.secure = secure_record(exp.cfg, masked=False)

    def run_step(
        self, exp: Experiment, instruction: Instruction, clients: list[int], advance: Callable[[int], None]
    ) -> StepTally:
        """One broadcast → local work on ``clients`` → checked, summed replies → server merge.

        With ``secure.aggregation`` the replies are encoded, summed modulo 2^k and decoded as
        SecAgg+ would (:func:`fold_secure_replies`), so the numbers are a Flower secure run's; no
        mask is applied (nothing leaves this process). Every client that answers holds the
        broadcast afterwards; under secure aggregation a client not in the sum is forgotten, as a
        Flower server forgets a SuperNode whose masked vector did not come back.

        Returns:
            The step's tally; its download is the sum of the clients' deltas.
        """
        broadcast = Broadcast(exp.server.arrays(instruction))
        download = sum(self.ledger.plan(k, broadcast).payload_bytes for k in clients)
        replies = self.replies(exp, instruction, broadcast.arrays, clients, advance)
        answered = set(clients)
        if self.secure is not None:
            spec = encoding_spec(exp.cfg.secure)
            tally, contributors = fold_secure_replies(exp.server, instruction, replies, spec)
            answered = set(contributors)
        else:
            tally = fold_replies(exp.server, instruction, replies)
        for k in clients:
            if k in answered:
                self.ledger.delivered(k, broadcast)
            else:
                self.ledger.forget(k)
        tally.download_bytes = download
        return tally

    @staticmethod
    def replies(
        exp: Experiment,
        instruction: Instruction,
        arrays: Mapping[str, Tensor],
        clients: Sequence[int],
        advance: Callable[[int], None] = lambda n: None,
    ) -> Iterator[tuple[int, ClientReply]]:
        """The clients' replies to ``arrays`` and ``instruction`` in turn (a generator: one at a time)."""
        for k in clients:
            generator = torch_generator(exp.cfg.seed, "client", instruction.task, instruction.round, k)
            reply = exp.client.update(arrays, instruction, exp.client_share(instruction.task, k), generator)
            advance(1)
            yield k, reply
            kill_point(f"{step_label(instruction, stable=True)}.client{k}")

    def task_end(self, exp: Experiment, task: int) -> None:
        """No client-side evaluation in process: the server's evaluation is the run's."""

    def results_extra(self) -> dict[str, Any]:
        """results.json names the runtime (and records secure aggregation when it is on)."""
        if self.secure is None:
            return {"runtime": self.name}
        return {"runtime": self.name, "secure_aggregation": self.secure}

    def record(self) -> dict[str, Any]:
        """What each client holds (checkpoint): a resumed run counts the bytes an uninterrupted one does."""
        return {"ledger": self.ledger.to_record()}

    def load_record(self, record: Mapping[str, Any]) -> None:
        """Restore what each client holds (a checkpoint written before the ledger existed: nothing);
        CheckpointError if the record is damaged."""
        try:
            self.ledger = Ledger.from_record(record.get("ledger") or {})
        except ValueError as err:
            raise CheckpointError(f"the checkpoint's transport record is damaged: {err}") from None

    def finish(self, exp: Experiment, out: Path) -> None:
        """No artefacts beyond the engine's."""


def run_simulation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Run the whole class-incremental sequence in this process.

    Args:
        cfg: The run's config (a preset, a TOML file and overrides resolved).
        out_dir: Where to write results.json, metrics.csv, accuracy.png, model/ and a checkpoint
            after every step; None writes nothing. The folder is used as it is: callers that must
            not replace an earlier run check it first (:mod:`fedlorm.run_setup`).
        progress: Show a progress bar on stderr.
        experiment: The experiment already built from ``cfg`` (:func:`build_experiment`), so a
            caller can check data and model before anything is written; built here if None.

    Returns:
        The results dict that results.json holds: the accuracy matrix, the final and average
        incremental accuracy, forgetting, traffic, per-step rows and diagnostics.

    Raises:
        ValueError: One line, if the config, the data or the weights cannot be used.
    """
    return run(experiment or build_experiment(cfg), InProcess(), out_dir, progress=progress)


def resume_simulation(
    out_dir: str | Path, *, progress: bool = False, experiment: Experiment | None = None
) -> dict[str, Any]:
    """Continue the run checkpointed in ``out_dir`` from its last completed step.

    The config comes from the checkpoint; the results equal an uninterrupted run's with the same
    seed.

    Args:
        out_dir: The folder of the interrupted run.
        progress: Show a progress bar on stderr.
        experiment: The experiment built from the checkpoint's config; built here if None.

    Returns:
        The whole run's results dict, as :func:`run_simulation` returns it.

    Raises:
        CheckpointError: A ValueError, before anything is written, if the checkpoint is missing,
            unreadable, or does not fit ``experiment``.
    """
    cfg, ckpt = checkpoint_config(out_dir)
    exp = experiment or build_experiment(cfg)
    return resume_run(exp, InProcess(), out_dir, progress=progress, checkpoint=ckpt)
