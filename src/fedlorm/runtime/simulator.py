"""The in-process runtime: the step's clients in turn on the one shared model, the server between steps.

It is a transport of the protocol in :mod:`fedlorm.methods.base` and nothing more: the step's
clients (:func:`step_clients`) get the broadcast arrays and the instruction, replies are checked and
summed (:func:`fold_replies`), the server sees only the sums.

With an output directory the run is checkpointed after every completed step (training round or
end-of-task statistics pass, :mod:`fedlorm.runtime.checkpoint`); :func:`resume_simulation` continues
from the last one and gives the same accuracy matrix as an uninterrupted run with the same seed.
A finished run writes its deployed model to ``model/`` (:mod:`fedlorm.export`) and removes its
checkpoint: ``results.json`` is then the record.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from fedlorm.config import RunConfig, config_from_plain, config_to_dict
from fedlorm.fcl import sample_clients
from fedlorm.methods import ClientData, ClientReply, Instruction, Server, add_arrays, payload_bytes
from fedlorm.methods.validation import InvalidReplyError, check_reply, reply_spec
from fedlorm.results import MetricsCSV, plot_run, write_json_atomic
from fedlorm.runtime.checkpoint import (
    CheckpointError,
    load_checkpoint,
    remove_checkpoint,
    restore_rng,
    rng_tensors,
    save_checkpoint,
)
from fedlorm.runtime.experiment import Experiment, build_experiment
from fedlorm.runtime.forgetting import ForgettingProbe
from fedlorm.runtime.progress import RunProgress
from fedlorm.runtime.report import (
    METRICS_FIELDS,
    StepTally,
    evaluate_step,
    metrics_row,
    note_divergence,
    round_name,
    run_results,
    save_run_model,
    step_name,
    task_diagnostics,
    task_test_sizes,
)
from fedlorm.seeding import derive_seed, torch_generator

__all__ = [
    "KILL_ENV",
    "METRICS_FIELDS",
    "StepTally",
    "fold_replies",
    "resume_simulation",
    "run_simulation",
    "step_clients",
    "step_plan",
    "step_point",
]

logger = logging.getLogger(__name__)

KILL_ENV = "FEDLORM_TEST_KILL_AT"
"""Test hook for the crash-and-resume tests; unset in normal use.

When it names a point, the process SIGKILLs itself there. Points (0-based; ``STEP`` is
:func:`step_point`, e.g. ``task1.round0`` or ``task0.stats``): ``STEP.clientK`` after client K's reply
was folded (mid-round), ``STEP.done`` after the step's checkpoint was committed (between rounds),
``STEP.checkpoint.tensors`` / ``STEP.checkpoint.record`` after the checkpoint's temporary tensor /
record file was written and before its rename (mid-write).
"""

_SERVER = "server."


def run_simulation(
    cfg: RunConfig,
    out_dir: str | Path | None = None,
    *,
    progress: bool = False,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Run the whole class-incremental sequence in process; return (and write) the results dict."""
    exp = experiment or build_experiment(cfg)
    torch.manual_seed(derive_seed(exp.cfg.seed, "torch"))
    server_rng = torch_generator(exp.cfg.seed, "server")
    out = Path(out_dir) if out_dir is not None else None
    return _simulate(exp, out, RunProgress(), server_rng, progress, _probe(exp))


def resume_simulation(
    out_dir: str | Path, *, progress: bool = False, experiment: Experiment | None = None
) -> dict[str, Any]:
    """Continue the run checkpointed in ``out_dir`` from its last completed step.

    The config comes from the checkpoint; the results equal an uninterrupted run's with the same
    seed. Raises :class:`CheckpointError` (a ValueError) before writing anything if the
    checkpoint is missing, unreadable, or does not fit ``experiment``.
    """
    out = Path(out_dir)
    ckpt = load_checkpoint(out)
    try:
        cfg = config_from_plain(ckpt.record["config"])
        state = RunProgress.from_record(ckpt.record["progress"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint in {str(out)!r} is damaged: {err}") from None
    exp = experiment or build_experiment(cfg)
    # Compared after a round trip, so a checkpoint written before a config key existed still fits.
    if config_to_dict(exp.cfg) != config_to_dict(cfg):
        raise CheckpointError(f"the experiment was built from another config than the checkpoint in {out}")
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
    logger.info("resuming %s at task %d, step %d", out, state.task + 1, state.step + 1)
    return _simulate(exp, out, state, server_rng, progress, probe)


def _probe(exp: Experiment) -> ForgettingProbe | None:
    return ForgettingProbe() if exp.cfg.train.forgetting_diagnostics else None


def step_point(instruction: Instruction) -> str:
    """Stable name of a step, e.g. ``task1.round0`` or ``task0.stats`` (0-based; logs, test hooks)."""
    if instruction.phase == "task_stats":
        return f"task{instruction.task}.stats"
    return f"task{instruction.task}.round{instruction.round}"


def fold_replies(
    server: Server, instruction: Instruction, replies: Iterable[tuple[int, ClientReply]]
) -> StepTally:
    """Check each client's reply, sum the valid ones, hand the sums to the server (both runtimes).

    A reply that fails :func:`check_reply` is logged and left out; if every reply fails, the
    server's state stays as it was. Without :meth:`Server.expected_reply`, the first valid reply
    fixes the keys, shapes and dtypes the others must have.
    """
    expected = server.expected_reply(instruction)
    tally = StepTally()
    sums = None
    for k, reply in replies:
        tally.clients += 1
        tally.upload_bytes += reply.upload_bytes
        try:
            check_reply(reply, expected)
        except InvalidReplyError as err:
            tally.rejected += 1
            logger.warning("%s: client %d rejected: %s", step_name(instruction), k, err)
            continue
        if expected is None:
            expected = reply_spec(reply.summands)
        sums = add_arrays(sums, reply.summands)
        tally.examples += reply.num_examples
        tally.loss_sum += reply.metrics.get("train_loss", 0.0) * reply.num_examples
    started = time.perf_counter()
    if sums is None:
        logger.warning(
            "%s: every client was rejected; the previous global state stays", step_name(instruction)
        )
    else:
        server.aggregate(instruction, sums, tally.examples)
    tally.merge_seconds = time.perf_counter() - started
    return tally


def _simulate(
    exp: Experiment,
    out: Path | None,
    state: RunProgress,
    server_rng: torch.Generator,
    show: bool,
    probe: ForgettingProbe | None,
) -> dict[str, Any]:
    """The task/step loop from ``state`` on: steps, evaluation, checkpoints, results files."""
    started = time.perf_counter()
    cfg, scenario, server = exp.cfg, exp.scenario, exp.server
    plan = step_plan(exp)
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

    while state.task < scenario.num_tasks:
        task, steps = state.task, plan[state.task]
        classes = scenario.task_classes(task)
        shares = exp.client_data(task)
        if state.step == 0:
            server.start_task(task, classes, server_rng)
        for step in range(state.step, len(steps)):
            instruction, last = steps[step], step == len(steps) - 1
            bar.set_description(f"task {task + 1}/{scenario.num_tasks} {round_name(instruction)}")
            row = _run_step(exp, instruction, shares, bar)
            note_divergence(exp, state, instruction, row)
            if cfg.train.eval_every_round or last:
                evaluation = evaluate_step(exp, task, row)
            state.step_done(row)
            if last:
                state.task_done(evaluation.class_il, evaluation.task_aware, task_diagnostics(exp, evaluation))
                if probe is not None:
                    probe.task_end(exp, task)
                logger.info("task %d: accuracy on seen classes %.2f%%", task + 1, evaluation.seen_accuracy)
            if out is not None:
                if last:
                    write_json_atomic(out / "results.json", run_results(exp, state, test_sizes, wall()))
                _save(out, exp, state, server_rng, wall(), step_point(instruction), probe)
                assert csv is not None
                csv.append(row)
            _kill_point(f"{step_point(instruction)}.done")
    bar.close()
    extra = {"forgetting_diagnostics": probe.report(exp)} if probe is not None else None
    results = run_results(exp, state, test_sizes, wall(), extra)
    if out is not None:
        write_json_atomic(out / "results.json", results)
        plot_run(results, out / "accuracy.png")
        save_run_model(exp, out)
        remove_checkpoint(out)
    return results


def step_plan(exp: Experiment) -> list[list[Instruction]]:
    """Every task's steps in order (both runtimes run this plan)."""
    scenario = exp.scenario
    return [list(exp.server.instructions(t, scenario.task_classes(t))) for t in range(scenario.num_tasks)]


def step_clients(cfg: RunConfig, instruction: Instruction) -> list[int]:
    """The clients (ascending) a step asks; both runtimes ask exactly these.

    A training step asks the ``scenario.participation`` sample of its task and round
    (:func:`fedlorm.fcl.sample_clients`, a pure function of seed, task and round, so a resumed run
    asks the same clients). The statistics steps (``task_stats``, ``head_stats``) ask every client:
    the cross-task merge and the analytic head need the sums over every client's data.
    """
    clients = cfg.scenario.num_clients
    if instruction.phase != "train":
        return list(range(clients))
    return sample_clients(cfg.seed, clients, cfg.scenario.participation, instruction.task, instruction.round)


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
    if last is None or step_point(last) != completed:
        raise CheckpointError(
            f"checkpoint position (task {task + 1}, step {step + 1}, after {completed!r}) does not fit "
            "this run's plan of steps"
        )


def _run_step(exp: Experiment, instruction: Instruction, shares: list[ClientData], bar) -> dict[str, Any]:
    """One broadcast → local work on the step's clients → checked, summed replies → server merge."""
    arrays = exp.server.arrays(instruction)
    clients = step_clients(exp.cfg, instruction)
    replies = _client_replies(exp, instruction, shares, bar, arrays, clients)
    tally = fold_replies(exp.server, instruction, replies)
    return metrics_row(
        exp,
        instruction,
        tally,
        upload_bytes=tally.upload_bytes,
        download_bytes=payload_bytes(arrays) * len(clients),
        clients=tally.clients,
        rejected=tally.rejected,
    )


def _client_replies(
    exp: Experiment,
    instruction: Instruction,
    shares: list[ClientData],
    bar,
    arrays: dict[str, Tensor] | None = None,
    clients: Sequence[int] | None = None,
) -> Iterator[tuple[int, ClientReply]]:
    """The step's clients' replies in turn; client k's RNG stream is derived from (seed, task, round, k).

    ``arrays``: the step's broadcast, if the caller already has it (else asked of the server);
    ``clients``: the clients asked, if the caller already has them (else :func:`step_clients`).
    """
    arrays = exp.server.arrays(instruction) if arrays is None else arrays
    clients = step_clients(exp.cfg, instruction) if clients is None else clients
    for k in clients:
        generator = torch_generator(exp.cfg.seed, "client", instruction.task, instruction.round, k)
        reply = exp.client.update(arrays, instruction, shares[k], generator)
        bar.update(1)
        yield k, reply
        _kill_point(f"{step_point(instruction)}.client{k}")


def _save(
    out: Path,
    exp: Experiment,
    state: RunProgress,
    server_rng: torch.Generator,
    wall: float,
    point: str,
    probe: ForgettingProbe | None,
) -> None:
    """Checkpoint the state after the step named ``point``."""
    record = {
        "config": config_to_dict(exp.cfg),
        "completed_step": point,
        "progress": {**state.to_record(), "elapsed": round(wall, 3)},
    }
    tensors: dict[str, Tensor] = {_SERVER + k: v for k, v in exp.server.state_dict().items()}
    tensors.update(rng_tensors(server_rng))
    if probe is not None:
        tensors.update(probe.state_dict())
    save_checkpoint(out, record, tensors, hook=lambda stage: _kill_point(f"{point}.checkpoint.{stage}"))


def _metrics_csv(out: Path, rows: list[dict[str, Any]]) -> MetricsCSV:
    """The run's metrics.csv; a resumed run rewrites it from the checkpoint's rows first."""
    path = out / "metrics.csv"
    if rows:
        path.unlink(missing_ok=True)
    csv = MetricsCSV(path, METRICS_FIELDS)
    for row in rows:
        csv.append(row)
    return csv


def _kill_point(name: str) -> None:
    """Test hook (see :data:`KILL_ENV`): SIGKILL this process if ``$FEDLORM_TEST_KILL_AT`` names ``name``."""
    if os.environ.get(KILL_ENV) == name:
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
