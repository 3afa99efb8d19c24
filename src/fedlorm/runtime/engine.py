"""The one run loop of every runtime: plan → broadcast → fold replies → aggregate → evaluate → report →
checkpoint, over a :class:`Transport` that carries the messages.

The loop owns everything a run's numbers depend on apart from the clients' local work: the step plan
(:func:`step_plan`), which clients each step asks (:func:`step_clients`), how replies are checked and
summed (:func:`fold_replies`; under secure aggregation in process :func:`fold_secure_replies`, whose
sums go through the one secure fold, :func:`fedlorm.secure.fold.fold_secure_sum`), the server's
random stream, the evaluation after each step, the checkpoint after each completed step and the
files a run leaves (results.json, metrics.csv, accuracy.png, ``model/``). A transport only delivers a
step's broadcast to the asked clients (each only the part it does not hold,
:mod:`fedlorm.runtime.delivery`) and brings their replies back:
:class:`fedlorm.runtime.simulator.InProcess` calls the clients in turn,
``fedlorm.flower.federation.FlowerTransport`` sends Flower messages to SuperNodes. So both runtimes
give the same numbers for the same config and seed, and both resume after a crash
(:func:`resume_run`) with the numbers of an uninterrupted run.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedlorm.config import RunConfig, config_from_plain, config_to_dict
from fedlorm.fcl import sample_clients
from fedlorm.methods import ClientReply, Instruction, Server, add_arrays
from fedlorm.methods.bounds import check_bound, outliers, sample_magnitudes
from fedlorm.methods.guard import guarded_aggregate
from fedlorm.methods.steps import Phase, step_label
from fedlorm.methods.validation import InvalidReplyError, check_reply
from fedlorm.results import MetricsCSV, plot_run, write_json_atomic
from fedlorm.runtime.checkpoint import (
    Checkpoint,
    CheckpointError,
    load_checkpoint,
    remove_checkpoint,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from fedlorm.runtime.experiment import Experiment
from fedlorm.runtime.forgetting import ForgettingProbe
from fedlorm.runtime.progress import RunProgress
from fedlorm.runtime.report import (
    METRICS_FIELDS,
    StepTally,
    evaluate_step,
    metrics_row,
    note_divergence,
    run_results,
    save_run_model,
    secure_tally,
    step_name,
    task_diagnostics,
    task_test_sizes,
)
from fedlorm.runtime.tensorboard import open_board
from fedlorm.secure.contribution import contribution, digit_layout, secure_upload_bytes
from fedlorm.secure.encoding import EncodingSpec, modular_sum
from fedlorm.secure.fold import fold_secure_sum
from fedlorm.seeding import derive_seed, torch_generator

__all__ = [
    "KILL_ENV",
    "Transport",
    "checkpoint_config",
    "fold_replies",
    "fold_secure_replies",
    "kill_point",
    "resume_run",
    "run",
    "step_clients",
    "step_plan",
]

logger = logging.getLogger(__name__)

KILL_ENV = "FEDLORM_TEST_KILL_AT"
"""Test hook for the crash-and-resume tests; unset in normal use.

When it names a point, the process SIGKILLs itself there. Points (0-based; ``STEP`` is
:func:`~fedlorm.methods.steps.step_label` with ``stable=True``, e.g. ``task1.round0``,
``task0.stats`` or ``task0.head``): ``STEP.clientK`` after client K's reply
was folded (mid-round, in-process transport), ``STEP.done`` after the step's checkpoint was committed
(between rounds), ``STEP.checkpoint.tensors`` / ``STEP.checkpoint.record`` after the checkpoint's
temporary tensor / record file was written and before its rename (mid-write).
"""

_SERVER = "server."


class Transport(Protocol):
    """How a step's broadcast reaches the asked clients and their replies come back.

    ``run_step`` delivers the step to ``clients`` (calling ``advance(n)`` as n clients finish, for
    the progress bar), folds the replies into ``exp.server`` (:func:`fold_replies`, or the secure
    fold) and returns the step's :class:`~fedlorm.runtime.report.StepTally`: whom it asked, what it
    merged, the bytes up and down. ``record`` / ``load_record`` carry the transport's own
    JSON-compatible bookkeeping (what each client holds, for instance) through a checkpoint;
    ``results_extra`` is added to results.json.
    """

    name: str

    def begin(self, exp: Experiment) -> None: ...

    def run_step(
        self, exp: Experiment, instruction: Instruction, clients: list[int], advance: Callable[[int], None]
    ) -> StepTally: ...

    def task_end(self, exp: Experiment, task: int) -> None: ...

    def results_extra(self) -> dict[str, Any]: ...

    def record(self) -> dict[str, Any]: ...

    def load_record(self, record: Mapping[str, Any]) -> None: ...

    def finish(self, exp: Experiment, out: Path) -> None: ...


def run(
    exp: Experiment, transport: Transport, out: str | Path | None = None, *, progress: bool = False
) -> dict[str, Any]:
    """Run the whole class-incremental sequence over ``transport``; return (and write) the results."""
    torch.manual_seed(derive_seed(exp.cfg.seed, "torch"))
    server_rng = torch_generator(exp.cfg.seed, "server")
    probe = _probe(exp)
    return _Loop(exp, transport, Path(out) if out is not None else None, server_rng, probe).run(
        RunProgress(), progress
    )


def checkpoint_config(out: str | Path) -> tuple[RunConfig, Checkpoint]:
    """The config of the run checkpointed in ``out``, and its checkpoint (CheckpointError if unusable)."""
    return _config_of(out, load_checkpoint(Path(out)))


def _config_of(out: str | Path, ckpt: Checkpoint) -> tuple[RunConfig, Checkpoint]:
    try:
        return config_from_plain(ckpt.record["config"]), ckpt
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint in {str(out)!r} is damaged: {err}") from None


def resume_run(
    exp: Experiment,
    transport: Transport,
    out: str | Path,
    *,
    progress: bool = False,
    checkpoint: Checkpoint | None = None,
) -> dict[str, Any]:
    """Continue the run checkpointed in ``out`` from its last completed step, over ``transport``.

    ``exp`` must be built from the checkpoint's config (:func:`checkpoint_config`); the results equal
    an uninterrupted run's with the same seed. Raises :class:`CheckpointError` (a ValueError) before
    writing anything if the checkpoint is missing, unreadable, or does not fit ``exp``.
    """
    out = Path(out)
    cfg, ckpt = checkpoint_config(out) if checkpoint is None else _config_of(out, checkpoint)
    # Compared after a round trip, so a checkpoint written before a config key existed still fits.
    if config_to_dict(exp.cfg) != config_to_dict(cfg):
        raise CheckpointError(f"the experiment was built from another config than the checkpoint in {out}")
    try:
        state = RunProgress.from_record(ckpt.record["progress"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint in {str(out)!r} is damaged: {err}") from None
    _check_position(state, step_plan(exp), ckpt.record.get("completed_step"))
    server_state = {k[len(_SERVER) :]: v for k, v in ckpt.tensors.items() if k.startswith(_SERVER)}
    try:
        exp.server.load_state_dict(server_state)
    except NotImplementedError:
        raise CheckpointError(f"method {exp.cfg.method!r} cannot be resumed (no load_state_dict)") from None
    except KeyError as err:
        raise CheckpointError(f"checkpoint in {str(out)!r} lacks the server array {err}") from None
    server_rng = torch.Generator()
    try:
        restore_rng(ckpt.tensors, server_rng)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"checkpoint in {str(out)!r} has no usable RNG state: {err}") from None
    probe = _probe(exp)
    if probe is not None:
        probe.load_state_dict(ckpt.tensors)
    transport.load_record(ckpt.record.get("transport") or {})
    logger.info("resuming %s at task %d, step %d", out, state.task + 1, state.step + 1)
    return _Loop(exp, transport, out, server_rng, probe).run(state, progress)


def step_plan(exp: Experiment) -> list[list[Instruction]]:
    """Every task's steps in order."""
    scenario = exp.scenario
    return [list(exp.server.instructions(t, scenario.task_classes(t))) for t in range(scenario.num_tasks)]


def step_clients(cfg: RunConfig, instruction: Instruction) -> list[int]:
    """The clients (ascending) a step asks, whatever the transport.

    A training step asks the ``scenario.participation`` sample of its task and round
    (:func:`fedlorm.fcl.sample_clients`, a pure function of seed, task and round, so a resumed run
    asks the same clients). The statistics steps (``task_stats``, ``head_stats``) ask every client:
    the cross-task merge and the analytic head need the sums over every client's data.
    """
    clients = cfg.scenario.num_clients
    if instruction.phase is not Phase.TRAIN:
        return list(range(clients))
    return sample_clients(cfg.seed, clients, cfg.scenario.participation, instruction.task, instruction.round)


def fold_replies(
    server: Server,
    instruction: Instruction,
    replies: Iterable[tuple[int, ClientReply]],
    min_clients: int = 0,
) -> StepTally:
    """Check each client's reply, sum the valid ones, hand the sums to the server (every transport).

    This is the one place a plain reply is checked. A reply is left out, and logged with its
    reason, if it fails :func:`check_reply` against :meth:`Server.expected_reply` (finite,
    well-formed, PSD), exceeds the public bound 2^``secure.bound_exponent`` per sample, or is more
    than ``secure.spread_limit`` (values: ``secure.value_spread_limit``) times the median of the
    step's other replies per sample (:mod:`fedlorm.methods.bounds`). If fewer than ``min_clients``
    replies pass the first two checks, nothing is merged. Otherwise the rest are summed in client
    order and merged by :func:`~fedlorm.methods.guard.guarded_aggregate`; if none is left, or the
    merge fails, the server's state stays as it was and the tally's ``kept`` says why.

    Args:
        server: The method's server.
        instruction: The step the replies answer.
        replies: (client, reply) pairs, in the order they are summed.
        min_clients: Fewest valid replies the step merges (Flower's ``min-clients``; the in-process
            runtime has no minimum).

    Returns:
        The step's tally (its ``download_bytes`` is the transport's to fill in).
    """
    expected = server.expected_reply(instruction)
    secure = server.cfg.secure
    bound = math.ldexp(1.0, secure.bound_exponent)
    tally = StepTally()
    checked: list[tuple[int, ClientReply, dict[str, float]]] = []
    for k, reply in replies:
        tally.clients += 1
        tally.upload_bytes += reply.upload_bytes
        try:
            check_reply(reply, expected)
            magnitudes = sample_magnitudes(reply, expected)
            beyond = check_bound(magnitudes, bound)
            if beyond is not None:
                raise InvalidReplyError(beyond)
        except InvalidReplyError as err:
            _reject(tally, instruction, k, str(err))
            continue
        checked.append((k, reply, magnitudes))
    if len(checked) < min_clients:
        logger.warning(
            "%s: only %d valid replies (min_clients = %d); the previous global state stays",
            step_name(instruction),
            len(checked),
            min_clients,
        )
        tally.kept = "too-few"
        return tally
    sizes = [magnitudes for _, _, magnitudes in checked]
    far = outliers(sizes, expected, secure.spread_limit, secure.value_spread_limit)
    sums = None
    for i, (k, reply, _) in enumerate(checked):
        if i in far:
            _reject(tally, instruction, k, far[i])
            continue
        sums = add_arrays(sums, reply.summands)
        tally.examples += reply.num_examples
        tally.loss_sum += reply.metrics.get("train_loss", 0.0) * reply.num_examples
    if sums is None:
        tally.kept = "no-reply"
        logger.warning(
            "%s: every client was rejected; the previous global state stays", step_name(instruction)
        )
        return tally
    outcome = guarded_aggregate(server, instruction, sums, tally.examples)
    tally.merge_seconds = outcome.seconds
    if not outcome.merged:
        tally.kept = "merge"
        logger.warning("%s: %s; the previous global state stays", step_name(instruction), outcome.failure)
    return tally


def _reject(tally: StepTally, instruction: Instruction, client: int, reason: str) -> None:
    """Leave ``client``'s reply out of the step's sums, and log why."""
    tally.rejected += 1
    tally.dropped[client] = reason
    logger.warning("%s: client %d rejected: %s", step_name(instruction), client, reason)


def fold_secure_replies(
    server: Server, instruction: Instruction, replies: Iterable[tuple[int, ClientReply]], spec: EncodingSpec
) -> tuple[StepTally, list[int]]:
    """The in-process runtime's secure sum: the encoding SecAgg+ sums, without the masks.

    Each client checks and encodes its own reply (:func:`~fedlorm.secure.contribution.contribution`;
    one that fails contributes nothing, as a client that errors out of SecAgg+), the digits are
    summed modulo 2^modulus_bits and folded by the one secure fold,
    :func:`~fedlorm.secure.fold.fold_secure_sum`, as a Flower run folds its secure sum. As a Flower
    server, it logs which clients are not in the sum, and why only at the debug level (in process,
    the clients are this process).

    Args:
        server: The method's server.
        instruction: The step the replies answer.
        replies: (client, reply) pairs.
        spec: The run's public encoding (:func:`~fedlorm.secure.contribution.encoding_spec`).

    Returns:
        The step's tally (the bits a Flower run's secure sum gives) and the contributing clients.
    """
    expected = server.expected_reply(instruction)
    layout = digit_layout(expected, spec)
    encodings, contributors, clients = [], [], 0
    for k, reply in replies:
        clients += 1
        try:
            encodings.append(contribution(reply, expected, spec))
        except ValueError as err:
            logger.warning("%s: client %d is not in the secure sum", step_name(instruction), k)
            logger.debug("%s: client %d refused its own reply: %s", step_name(instruction), k, err)
            continue
        contributors.append(k)
    if not encodings:
        logger.warning("%s: no client contributed; the previous global state stays", step_name(instruction))
        return StepTally(clients=clients, rejected=clients, kept="no-reply"), contributors
    fold = fold_secure_sum(server, instruction, modular_sum(encodings, spec), spec, len(encodings))
    upload = len(encodings) * secure_upload_bytes(layout)
    tally = secure_tally(fold, instruction, clients=clients, contributors=len(encodings), upload_bytes=upload)
    return tally, contributors


def kill_point(name: str) -> None:
    """Test hook (see :data:`KILL_ENV`): SIGKILL this process if ``$FEDLORM_TEST_KILL_AT`` names ``name``."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))


def _probe(exp: Experiment) -> ForgettingProbe | None:
    return ForgettingProbe() if exp.cfg.train.forgetting_diagnostics else None


class _Loop:
    """The task/step loop of one run session, from a :class:`RunProgress` on."""

    def __init__(
        self,
        exp: Experiment,
        transport: Transport,
        out: Path | None,
        server_rng: torch.Generator,
        probe: ForgettingProbe | None,
    ) -> None:
        self.exp, self.transport, self.out = exp, transport, out
        self.server_rng, self.probe = server_rng, probe

    def run(self, state: RunProgress, show: bool) -> dict[str, Any]:
        started = time.perf_counter()
        exp, transport, out = self.exp, self.transport, self.out
        cfg, scenario, server = exp.cfg, exp.scenario, exp.server
        plan = step_plan(exp)
        board = open_board(cfg.train.tensorboard, out, len(state.rounds))  # before any file is written
        csv = _metrics_csv(out, state.rounds) if out is not None else None
        asked = [len(step_clients(cfg, instruction)) for steps in plan for instruction in steps]
        bar = tqdm(
            total=sum(asked),
            initial=sum(asked[: sum(map(len, plan[: state.task])) + state.step]),
            disable=not show,
            unit="client",
            dynamic_ncols=True,
        )
        test_sizes = task_test_sizes(exp)

        def wall() -> float:
            return state.elapsed + time.perf_counter() - started

        transport.begin(exp)
        while state.task < scenario.num_tasks:
            task, steps = state.task, plan[state.task]
            if state.step == 0:
                server.start_task(task, scenario.task_classes(task), self.server_rng)
            for step in range(state.step, len(steps)):
                instruction, last = steps[step], step == len(steps) - 1
                bar.set_description(f"task {task + 1}/{scenario.num_tasks} {step_label(instruction)}")
                step_started = time.perf_counter()
                tally = transport.run_step(exp, instruction, step_clients(cfg, instruction), bar.update)
                row = metrics_row(
                    exp,
                    instruction,
                    tally,
                    upload_bytes=tally.upload_bytes,
                    download_bytes=tally.download_bytes,
                    clients=tally.clients,
                    rejected=tally.rejected,
                )
                row["step_seconds"] = round(time.perf_counter() - step_started, 6)
                note_divergence(exp, state, instruction, row)
                if cfg.train.eval_every_round or last:
                    eval_started = time.perf_counter()
                    evaluation = evaluate_step(exp, task, row)
                    row["eval_seconds"] = round(time.perf_counter() - eval_started, 6)
                state.step_done(row)
                if board is not None:
                    board.step(len(state.rounds), row)
                if last:
                    if board is not None:
                        board.task(len(state.rounds), task, evaluation.class_il, evaluation.seen_accuracy)
                    state.task_done(
                        evaluation.class_il, evaluation.task_aware, task_diagnostics(exp, evaluation)
                    )
                    if self.probe is not None:
                        self.probe.task_end(exp, task)
                    logger.info(
                        "task %d: accuracy on seen classes %.2f%%", task + 1, evaluation.seen_accuracy
                    )
                    transport.task_end(exp, task)
                if out is not None:
                    if last:
                        write_json_atomic(out / "results.json", self._results(state, test_sizes, wall()))
                    self._save(state, wall(), step_label(instruction, stable=True))
                    assert csv is not None
                    csv.append(row)
                kill_point(f"{step_label(instruction, stable=True)}.done")
        bar.close()
        if board is not None:
            board.close()
        diagnostics = {"forgetting_diagnostics": self.probe.report(exp)} if self.probe is not None else {}
        results = self._results(state, test_sizes, wall(), diagnostics)
        if out is not None:
            write_json_atomic(out / "results.json", results)
            plot_run(results, out / "accuracy.png")
            save_run_model(exp, out)
            transport.finish(exp, out)
            remove_checkpoint(out)
        return results

    def _results(
        self, state: RunProgress, test_sizes: list[int], wall: float, extra: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        return run_results(
            self.exp, state, test_sizes, wall, {**(extra or {}), **self.transport.results_extra()}
        )

    def _save(self, state: RunProgress, wall: float, point: str) -> None:
        """Checkpoint the state after the step named ``point``."""
        assert self.out is not None
        record = {
            "config": config_to_dict(self.exp.cfg),
            "completed_step": point,
            "progress": {**state.to_record(), "elapsed": round(wall, 3)},
            "transport": self.transport.record(),
        }
        tensors: dict[str, Tensor] = {_SERVER + k: v for k, v in self.exp.server.state_dict().items()}
        tensors.update(rng_tensors(self.server_rng))
        if self.probe is not None:
            tensors.update(self.probe.state_dict())
        save_checkpoint(
            self.out, record, tensors, hook=lambda stage: kill_point(f"{point}.checkpoint.{stage}")
        )


def _check_position(state: RunProgress, plan: list[list[Instruction]], completed: str | None) -> None:
    """A checkpoint's position must exist in the plan and follow the step it says was completed."""
    task, step = state.task, state.step
    last = None
    if 0 <= task < len(plan) and 0 <= step < len(plan[task]):
        if step > 0:
            last = plan[task][step - 1]
        elif task > 0:
            last = plan[task - 1][-1]
    elif task == len(plan) and step == 0:
        last = plan[-1][-1]
    if last is None or completed not in _stable_ids(last):
        raise CheckpointError(
            f"checkpoint position (task {task + 1}, step {step + 1}, after {completed!r}) does not fit "
            "this run's plan of steps"
        )


def _stable_ids(instruction: Instruction) -> tuple[str, ...]:
    """The ids a checkpoint may name ``instruction`` by: its stable label, and for a head-statistics
    step also ``taskT.round-1``, the id checkpoints written before steps had labels carry."""
    label = step_label(instruction, stable=True)
    if instruction.phase is Phase.HEAD_STATS:
        return label, f"task{instruction.task}.round-1"
    return (label,)


def _metrics_csv(out: Path, rows: list[dict[str, Any]]) -> MetricsCSV:
    """The run's metrics.csv; a resumed run rewrites it from the checkpoint's rows first."""
    path = out / "metrics.csv"
    if rows:
        path.unlink(missing_ok=True)
    csv = MetricsCSV(path, METRICS_FIELDS)
    for row in rows:
        csv.append(row)
    return csv
