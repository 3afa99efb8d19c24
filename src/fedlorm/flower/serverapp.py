"""The Flower ServerApp: builds the run from the run config, then runs :func:`run_federation`.

Its output folder follows the rules of every other run (:mod:`fedlorm.run_setup`): a folder that
holds an earlier run's results or checkpoint is refused, with one logged line and nothing in it
changed, unless the run config sets ``overwrite = true`` (or ``resume = true`` to continue it).

With ``resume = true`` it continues the run checkpointed in ``out`` from its last completed step
(the engine checkpoints after every step), so a ServerApp or SuperLink that was killed loses at most
the step in flight. With the run-config key ``server-data`` (the ``server/`` folder ``fedlorm
partition`` wrote), the ServerApp evaluates on that folder and loads no dataset, so the server host
needs nothing but it.
"""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedlorm.config import ConfigError, RunConfig
from fedlorm.flower.federation import run_federation
from fedlorm.flower.logs import use_flower_logging
from fedlorm.flower.settings import FlowerSettings, settings_from_run_config
from fedlorm.run_setup import server_setup
from fedlorm.runtime.checkpoint import CheckpointError
from fedlorm.runtime.experiment import Experiment, build_experiment

__all__ = ["app", "server_experiment"]

logger = logging.getLogger(__name__)

app = ServerApp()


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
    """Run the federated class-incremental experiment the run config describes.

    Args:
        grid: Flower's grid, through which the steps reach the SuperNodes.
        context: The ServerApp's context; its run config holds the fedlorm config and the runtime
            keys (``out``, ``overwrite``, ``resume``, ...; :mod:`fedlorm.flower.settings`).

    Raises:
        ConfigError: Logged as one line first, if the run config or the output folder cannot be
            used; nothing in the folder changes then.
    """
    use_flower_logging()
    cfg, settings = settings_from_run_config(context.run_config)
    try:  # before any data loads: a refusal costs nothing and nothing in the folder changes
        setup = server_setup(
            cfg,
            out=settings.out,
            preset=settings.preset,
            resume=settings.resume,
            overwrite=settings.overwrite,
        )
    except ConfigError as err:
        logger.error("%s", err)
        raise
    exp = server_experiment(cfg, settings)
    out = setup.prepare()
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
