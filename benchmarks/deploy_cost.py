"""Where a deployed Flower run's time goes: one ClientApp message, phase by phase, and a whole smoke run.

Run on demand: ``python benchmarks/deploy_cost.py [--preset smoke] [--no-runs] [key=value ...]``.

In deployment (flwr 1.42, ``--isolation subprocess`` or ``process``) a SuperNode runs every message
in a fresh ``flwr-clientapp`` process, so each message pays for a Python start, the imports and the
client's set-up before its actual work. This script replays one train message of the run's first
step in fresh processes, exactly as ``flwr-clientapp`` would call the ClientApp (a Flower ``Message``
and ``Context`` through ``fedlorm.flower.clientapp.app``), and times:

- start: from spawning the process to its first line (interpreter start);
- import flwr: what ``flwr-clientapp`` imports before it loads the app;
- import app: ``fedlorm.flower.clientapp`` and the modules its train handler imports (torch, timm);
- build: the client's experiment (of which: data = the node's shares; model = backbone, weights,
  LoRA), or its copy from the node cache (:mod:`fedlorm.flower.node_cache`);
- decode: the broadcast ``ArrayRecord`` to tensors;
- work: the client's protocol step (:func:`fedlorm.flower.client.local_update`);
- encode: the reply records and their serialisation into Flower's object tree.

Each message runs twice: ``cold`` (empty node cache, as a run's first message on a node) and ``warm``
(the cache the cold message wrote, as every later message). Then, unless ``--no-runs``, it times the
whole run both ways, in this same invocation: ``fedlorm run`` (in process) and ``fedlorm flower
deploy-local`` (a SuperLink and one SuperNode process per client on 127.0.0.1), and prints the ratio.

Measurements pin OMP_NUM_THREADS=1 (and ``train.threads=1``) so that the runs compare on a busy machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PHASES = ("start", "import flwr", "import app", "setup", "build", "  data", "  model", "decode", "work",
          "encode", "exit")


def _child(spec_path: str) -> None:
    """One train message in this fresh process; prints its phase times as JSON (last line)."""
    started = time.time()
    spec = json.loads(Path(spec_path).read_text())
    times: dict[str, float] = {"start": started - spec["spawned"]}
    clock = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        times[name] = times.get(name, 0.0) + now - clock
        clock = now

    import flwr.supernode.runtime.run_clientapp  # noqa: F401  (what flwr-clientapp loads first)
    from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.task_identity import TaskIdentity

    lap("import flwr")
    from fedlorm.flower import client, clientapp, messages  # noqa: F401  (what the handler imports)

    lap("import app")
    from safetensors.torch import load_file

    from fedlorm.flower.messages import ARRAYS, CONFIG

    broadcast = load_file(spec["arrays"])
    content = RecordDict(
        {ARRAYS: messages.to_array_record(broadcast), CONFIG: ConfigRecord(spec["instruction"])}
    )
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1  # as flwr-clientapp sets
    message = Message(content, dst_node_id=1, message_type="train")
    context = Context(
        run_id=1, node_id=1, node_config=spec["node_config"], state=RecordDict(),
        run_config=spec["run_config"],
    )
    _time_parts(lap, times)
    lap("_harness")  # the test message itself: not a cost of deployment
    reply = clientapp.app(message=message, context=context)
    lap("encode")
    if reply.has_error():
        raise SystemExit(f"error reply: {reply.error.reason}")
    get_all_nested_objects(reply)  # Flower serialises the reply into its object tree to push it
    lap("encode")
    assert isinstance(reply.content.array_records["summands"], ArrayRecord)
    print(json.dumps(times))


def _time_parts(lap: Callable[[str], None], times: dict[str, float]) -> None:
    """Wrap the handler's steps: a top-level step's time goes to its phase and the time before it to
    "setup" (the handler's own glue); a nested step (data, model) only adds to its own line."""
    import fedlorm.runtime.experiment as experiment
    import fedlorm.runtime.partitions as partitions
    from fedlorm.flower import client, messages

    def timed(module: object, name: str, phase: str, top: bool) -> None:
        original = getattr(module, name, None)
        if original is None:
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if top:
                lap("setup")
            began = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                times[phase] = times.get(phase, 0.0) + time.perf_counter() - began
                if top:
                    lap("_done")

        setattr(module, name, wrapper)

    timed(client, "client_experiment", "build", top=True)
    timed(messages, "from_array_record", "decode", top=True)
    timed(client, "local_update", "work", top=True)
    timed(experiment, "build_data", "  data", top=False)
    timed(partitions, "_read", "  data", top=False)
    timed(experiment, "build_model", "  model", top=False)


def _spec(cfg_args: argparse.Namespace, work: Path) -> Path:
    """The first step's broadcast and instruction, the run config and the node config, in ``work``."""
    import torch
    from safetensors.torch import save_file

    from fedlorm.config import apply_overrides
    from fedlorm.flower.settings import FlowerSettings, run_config_for
    from fedlorm.presets import preset_config
    from fedlorm.runtime.experiment import build_experiment
    from fedlorm.seeding import torch_generator

    cfg = apply_overrides(preset_config(cfg_args.preset), ["train.threads=1", *cfg_args.overrides])
    exp = build_experiment(cfg)
    exp.server.start_task(0, exp.scenario.task_classes(0), torch_generator(cfg.seed, "server"))
    instruction = next(iter(exp.server.instructions(0, exp.scenario.task_classes(0))))
    arrays = {k: v.contiguous() for k, v in exp.server.arrays(instruction).items()}
    save_file(arrays, str(work / "arrays.safetensors"))
    settings = FlowerSettings(preset=cfg_args.preset, federated_eval=False)
    spec = {
        "arrays": str(work / "arrays.safetensors"),
        "instruction": instruction.to_record(),
        "run_config": run_config_for(cfg, settings),
        "node_config": {"partition-id": 0, "num-partitions": cfg.scenario.num_clients},
    }
    path = work / "spec.json"
    path.write_text(json.dumps(spec))
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return path


def _message(spec: Path, env: dict[str, str]) -> dict[str, float]:
    data = json.loads(spec.read_text())
    data["spawned"] = time.time()
    spec.write_text(json.dumps(data))
    began = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", str(spec)], env=env, capture_output=True, text=True,
        check=False,
    )
    total = time.perf_counter() - began
    if proc.returncode:
        raise SystemExit(f"message process failed:\n{proc.stderr[-3000:]}")
    times = json.loads(proc.stdout.strip().splitlines()[-1])
    times.pop("_done", None)
    harness = times.pop("_harness", 0.0)
    times["total"] = total - harness
    times["exit"] = times["total"] - sum(v for k, v in times.items() if k in PHASES and k[0] != " ")
    return times


def _wall(command: list[str], env: dict[str, str]) -> float:
    began = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if proc.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--no-runs", action="store_true", help="only the per-message breakdown")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    }
    with tempfile.TemporaryDirectory(prefix="fedlorm-deploy-cost-") as tmp:
        work = Path(tmp)
        env["FEDLORM_NODE_CACHE"] = str(work / "node-cache")
        spec = _spec(args, work)
        cold = _message(spec, env)
        warm = _message(spec, env)
        print(f"one train message of {args.preset} (client 0, first step), in a fresh process (s):")
        print(f"  {'phase':<12} {'cold':>7} {'warm':>7}")
        for name in (*PHASES, "total"):
            print(f"  {name:<12} {cold.get(name, 0.0):7.2f} {warm.get(name, 0.0):7.2f}")
        if args.no_runs:
            return
        base = [sys.executable, "-m", "fedlorm"]
        common = ["--preset", args.preset, "--overwrite", "train.threads=1", *args.overrides]
        local = _wall([*base, "run", "--out", str(work / "in-process"), *common], env)
        deployed = _wall(
            [*base, "flower", "deploy-local", "--out", str(work / "deployed"), *common], env
        )
        print(f"whole {args.preset} run, wall time (s): in process {local:.1f}, deployed on loopback "
              f"{deployed:.1f}, ratio {deployed / local:.1f}")


if __name__ == "__main__":
    main()
