"""A paper preset's client step and statistics pass, timed per precision, and the projected wall time
of the whole preset.

Run on demand: ``python benchmarks/paper_step.py [--preset cifar100-b0.5] [--device cuda] [--quick]``.

It builds the preset's real model (``vit_base_patch16_224``, random weights: speed does not depend
on them; the preset's rank, LoRA targets, augmentation and head) and times, at the preset's batch
size, best of ``--repeats`` after a warm-up:

- step: one LoRM B-round optimizer step (augmentation, forward, masked cross-entropy, backward,
  AdamW), as a client runs it;
- statistics: a no-grad pass over augmented images collecting every adapted layer's float64 input
  Gram diagonal (and the head's Gram), as a client's statistics pass does;
- evaluation: a no-grad forward of test-transformed images.

The baseline is float32 (``32``), measured in the same run; the other precisions print their speed-up
against it. The projection counts the images the preset processes (R rounds × E epochs of training
over the training set, R + 1 statistics passes, an evaluation of the seen test classes after every
step) and divides by the measured rates: the time of one client training after another on this
device, ignoring data loading and the server's merges (milliseconds, ``benchmarks/merge.py``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fedlorm.methods import METHODS, ClientData
from fedlorm.methods.common import collect_statistics, train_with_config
from fedlorm.precision import PRECISIONS, autocast, check_precision
from fedlorm.presets import PAPER_PRESETS, preset_config
from fedlorm.runtime.experiment import build_model, resolve_device

SPLITS = {
    "cifar100": (50_000, 10_000, 100),
    "imagenet_r": (24_000, 6_000, 200),
    "imagenet_a": (6_000, 1_500, 200),
    "cub200": (5_994, 5_794, 200),
    "cars196": (8_144, 8_041, 196),
    "eurosat": (21_600, 5_400, 10),
}
"""(train images, test images, classes) of the splits fedlorm loads for each paper dataset (ImageNet-A
and EuroSAT without split files: the seeded 80/20 split)."""

NATIVE = {"cifar100": 32, "eurosat": 64}
"""Datasets stored at their own size; photo datasets are stored at the preprocessing's size."""


@dataclass
class Rates:
    """Images per second of one client's step, statistics pass and evaluation."""

    step: float
    statistics: float
    evaluation: float


def best_time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Best wall time of ``repeats`` calls after one warm-up call (CUDA work synchronised)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return min(times)


def measure(preset: str, backbone: str, precision: str, device: torch.device, batch: int,
            repeats: int) -> Rates:
    """Rates of the preset's client work at ``precision`` on ``device``."""
    cfg = preset_config(preset)
    cfg.model.backbone, cfg.model.weights = backbone, "none"
    cfg.train.precision, cfg.train.local_epochs = precision, 1
    cfg.train.batch_size = cfg.train.eval_batch_size = batch
    dataset = cfg.data.datasets[0]
    model, layers = build_model(cfg, SPLITS[dataset][2], device)
    method = METHODS["lorm"]
    server, client = method.build_server(cfg, model, layers), method.build_client(cfg, model, layers)
    classes = range(0, 10)
    server.start_task(0, classes, torch.Generator().manual_seed(0))
    instruction = next(iter(server.instructions(0, classes)))
    client.update(server.arrays(instruction), instruction, ClientData(*_images(2, dataset, model)),
                  torch.Generator().manual_seed(0))  # loads the broadcast factors into the model
    data = ClientData(*_images(batch, dataset, model))
    generator = torch.Generator().manual_seed(1)
    modules = {**layers, "head": model.head}
    modes = {name: "diag" for name in layers} | {"head": "full"}

    def step() -> None:
        train_with_config(model, layers, data, cfg.train, factor="B", classes=classes, generator=generator)

    def statistics() -> None:
        collect_statistics(model, modules, data, modes=modes, batch_size=batch, precision=precision,
                           generator=generator)

    @torch.no_grad()
    def evaluation() -> None:
        with autocast(device, precision):
            model.eval()(data.images.to(device))

    times = [best_time(fn, repeats, device) for fn in (step, statistics, evaluation)]
    return Rates(*(batch / t for t in times))


def _images(n: int, dataset: str, model) -> tuple[torch.Tensor, torch.Tensor]:
    side = NATIVE.get(dataset, model.preprocessing.storage_size)
    g = torch.Generator().manual_seed(n)
    return torch.randint(0, 256, (n, 3, side, side), dtype=torch.uint8, generator=g), torch.arange(n) % 10


def projected_seconds(preset: str, rates: Rates) -> float:
    """Wall time of the whole preset from the measured rates (see the module docstring)."""
    cfg = preset_config(preset)
    train, test, _ = SPLITS[cfg.data.datasets[0]]
    tasks = cfg.scenario.tasks if isinstance(cfg.scenario.tasks, int) else len(cfg.scenario.tasks)
    rounds, epochs = cfg.train.rounds, cfg.train.local_epochs
    steps_per_task = rounds + 1
    evaluated = steps_per_task * test * (tasks + 1) / 2  # the seen test classes after every step
    return (rounds * epochs * train / rates.step + (rounds + 1) * train / rates.statistics
            + evaluated / rates.evaluation)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="cifar100-b0.5", choices=PAPER_PRESETS)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precisions", help="comma-separated; default: every one the device runs")
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--batch", type=int, help="default: the preset's batch size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--quick", action="store_true",
                        help="ViT-Ti/16 at batch 2, one repeat, float32 only (seconds; for the tests)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    batch = args.batch or preset_config(args.preset).train.batch_size
    backbone, repeats = args.backbone, args.repeats
    if args.quick:
        backbone, batch, repeats = "vit_tiny_patch16_224", 2, 1
    wanted = args.precisions.split(",") if args.precisions else list(PRECISIONS)
    if args.quick:
        wanted = ["32"]
    runnable = []
    for precision in wanted:
        try:
            check_precision(precision, device)
            runnable.append(precision)
        except ValueError as err:
            print(f"skipped: {err}")
    if "32" not in runnable:
        runnable.insert(0, "32")
    name = f"CPU, {torch.get_num_threads()} threads"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    print(f"{args.preset}: {backbone}, 224 px, batch {batch}, best of {repeats} on {name}")
    print("| precision | step (img/s) | statistics (img/s) | evaluation (img/s) | step speed-up vs 32 | "
          "projected preset wall time (h) |")
    print("|---|---:|---:|---:|---:|---:|")
    baseline = None
    for precision in runnable:
        rates = measure(args.preset, backbone, precision, device, batch, repeats)
        baseline = baseline or rates
        hours = projected_seconds(args.preset, rates) / 3600
        print(f"| {precision} | {rates.step:.1f} | {rates.statistics:.1f} | {rates.evaluation:.1f} | "
              f"{rates.step / baseline.step:.2f}x | {hours:.2f} |")


if __name__ == "__main__":
    main()
