"""The default run's wall time against the pure forward and backward passes it makes, in one process.

Run on demand: ``python benchmarks/default_run.py [--threads N] [--preset P] [key=value ...]``.

It runs ``fedlorm run``'s job (the preset's config, in process, with its output folder in a temporary
directory) while a hook on the model counts every image that goes through it, with and without
gradients. Then, on the same model and threads, it times a training step (forward, masked
cross-entropy, backward and AdamW on factor B, batch ``train.batch_size``) and a no-grad pass
(batch ``train.eval_batch_size``), each the best of several calls. The pure cost is the counted
images times those rates; the ratio wall / pure is what the run spends beyond its passes: start-up,
data loading, per-client overheads, merges, checkpoints and the files it writes. The target is a
ratio of at most 1.5 (docs/performance.md).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from fedlorm.adapters import set_trainable_factor
from fedlorm.presets import resolve_config
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import run_simulation


def best_seconds(call, repeats: int) -> float:
    call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return min(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="default")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    cfg = resolve_config(args.preset, overrides=[f"train.threads={args.threads}", *args.overrides])
    exp = build_experiment(cfg)
    counts = {"grad": 0, "no-grad": 0}

    def count(module, inputs) -> None:
        counts["grad" if torch.is_grad_enabled() else "no-grad"] += len(inputs[0])

    handle = exp.model.register_forward_pre_hook(count)
    with tempfile.TemporaryDirectory() as out:
        results = run_simulation(cfg, out, experiment=exp)
    wall = time.perf_counter() - started
    handle.remove()

    model, layers, train = exp.model, exp.layers, cfg.train
    images = exp.train.images
    batch = images[: train.batch_size]
    labels = exp.train.labels[: train.batch_size] % 2
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_(0, 1e-3)
    set_trainable_factor(layers, "B")
    optimizer = torch.optim.AdamW([layer.lora_B for layer in layers.values()], lr=1e-3)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(model.training_input(batch, torch.Generator()))[:, :2], labels)
        loss.backward()
        optimizer.step()

    eval_batch = images[: train.eval_batch_size]

    def no_grad_pass() -> None:
        with torch.no_grad():
            model(eval_batch)

    model.eval()
    per_train = best_seconds(train_step, args.repeats) / len(batch)
    per_pass = best_seconds(no_grad_pass, args.repeats) / len(eval_batch)
    pure = counts["grad"] * per_train + counts["no-grad"] * per_pass
    print(f"preset {args.preset}, method {cfg.method}, {args.threads} threads, final accuracy "
          f"{results['final_accuracy']:.2f} %")
    print(f"images with gradients {counts['grad']:,} at {1e3 * per_train:.2f} ms each; "
          f"without {counts['no-grad']:,} at {1e3 * per_pass:.2f} ms each")
    print(f"wall {wall:.1f} s (build, run and files), pure passes {pure:.1f} s, ratio {wall / pure:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
