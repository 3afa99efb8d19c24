"""The Flower ServerApp: builds the run from the run config, then runs :func:`run_federation`.

With ``resume = true`` it continues the run checkpointed in ``out`` from its last completed step
(the engine checkpoints after every step), so a ServerApp or SuperLink that was killed loses at most
the step in flight. With the run-config key ``server-data`` (the ``server/`` folder ``fedlorm
partition`` wrote), the ServerApp evaluates on that folder and loads no dataset, so the server host
needs nothing but it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlorm.config import RunConfig
from fedlorm.flower.federation import SERVER_STATE, run_federation
from fedlorm.flower.logs import use_flower_logging
from fedlorm.flower.settings import FlowerSettings, settings_from_run_config
from fedlorm.runtime.checkpoint import CheckpointError
from fedlorm.runtime.experiment import Experiment, build_experiment

__all__ = ["app", "output_dir", "server_experiment"]

logger = logging.getLogger(__name__)

RESULT_FILES = ("results.json", "metrics.csv", "accuracy.png", SERVER_STATE)

app = ServerApp()


def output_dir(cfg: RunConfig, settings: FlowerSettings) -> Path:
    """``out`` or runs/flower-PRESET-METHOD-sSEED: absolute, created, earlier results removed (kept
    when resuming: the checkpoint and metrics.csv are the run's own)."""
    out = (
        Path(settings.out)
        if settings.out
        else Path("runs") / f"flower-{settings.preset}-{cfg.method}-s{cfg.seed}"
    )
    out = out.expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if settings.resume:
        return out
    stale = [out / name for name in RESULT_FILES if (out / name).exists()]
    if stale:
        logger.warning("replacing the results of an earlier run in %s", out)
        for path in stale:
            path.unlink()
    return out


def server_experiment(cfg: RunConfig, settings: FlowerSettings) -> Experiment:
    """The server's experiment: evaluation set from ``settings.server_data``, else from the datasets."""
    if not settings.server_data:
        return build_experiment(cfg)
    from fedlorm.runtime.partitions import server_experiment as from_folder

    try:
        exp = from_folder(cfg, settings.server_data)
    except ValueError as err:
        logger.error("server-data: %s", err)
        raise
    logger.info("evaluation set: %d images from %s", len(exp.test), settings.server_data)
    return exp


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federated class-incremental experiment the run config describes."""
    use_flower_logging()
    cfg, settings = settings_from_run_config(context.run_config)
    exp = server_experiment(cfg, settings)
    out = output_dir(exp.cfg, settings)
    logger.info("fedlorm %s on Flower; results in %s", exp.cfg.method, out)
    try:
        results = run_federation(grid, exp, settings, out, resume=settings.resume, context=context)
    except CheckpointError as err:
        logger.error("resume: %s", err)
        raise
    logger.info(
        "fedlorm run finished: final accuracy %.2f%%, %d clients dropped over the run; results in %s",
        results["final_accuracy"],
        len(results["flower"]["dropped"]),
        out,
    )
