"""One client's training step and statistics pass: fedlorm's LoRA against peft's, on the same timm ViT.

Run on demand: ``python benchmarks/train_step.py [--quick] [--threads N]``.

For timm ``vit_tiny_patch16_224`` at 112 px and ``vit_small_patch16_224`` at 224 px (random weights),
LoRA of rank 16 on every block's qkv, proj, fc1 and fc2, batch 32, it times in the same process,
alternating the two sides so that a changing machine load hits both alike (best of N calls each):

- step: forward, masked-free cross-entropy, backward, AdamW step over both LoRA factors;
- statistics: a no-grad forward with :class:`fedlorm.adapters.InputStatistics` collecting every
  adapted layer's input Gram diagonal (the paper's backbone setting, float64), hooked on our LoRA
  layers or on peft's wrapped base layers.

The baseline is peft's ``LoraConfig(r=16, target_modules=<the same four layers>)`` on a model built
from the same seed; both sides are first checked to compute the same function. The target is a step
time ratio (fedlorm / peft) of at most 1.05.

Memory: peak resident set size (RSS: the process's ``VmHWM``, Linux) of a whole simulated federated
run, in a fresh process each, with 10 clients against 1 client on the same data (target ratio at
most 1.2).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedlorm.adapters import VIT_TARGETS, InputStatistics, inject_lora

PEFT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"  # not patch_embed.proj


@dataclass
class Side:
    """One way of putting LoRA on the model: the model, its optimiser and the hooked layers."""

    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    hooked: dict[str, nn.Module]


def build(kind: str, arch: str, img: int, rank: int, seed: int) -> Side:
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, img_size=img, num_classes=10)
    model.requires_grad_(False)
    if kind == "fedlorm":
        layers = inject_lora(model, VIT_TARGETS, rank)
        for layer in layers.values():
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        hooked: dict[str, nn.Module] = dict(layers)
    else:
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=PEFT_TARGETS)
        model = inject_adapter_in_model(config, model)
        hooked = {n: m.base_layer for n, m in model.named_modules() if hasattr(m, "lora_A")}
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    return Side(kind, model, torch.optim.AdamW(params, lr=1e-4), hooked)


def same_function(ours: Side, theirs: Side, x: Tensor) -> float:
    """Give both sides the same nonzero factors; the largest output difference (should be ~1e-6)."""
    g = torch.Generator().manual_seed(1)
    peft_layers = {n: m for n, m in theirs.model.named_modules() if hasattr(m, "lora_A")}
    with torch.no_grad():
        for name, layer in ours.hooked.items():
            layer.lora_B.copy_(0.02 * torch.randn(layer.lora_B.shape, generator=g))
            peft_layer = peft_layers[name]
            peft_layer.lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer.lora_B["default"].weight.copy_(layer.lora_B)
        ours.model.eval()
        theirs.model.eval()
        diff = float((ours.model(x) - theirs.model(x)).abs().max())
    ours.model.train()
    theirs.model.train()
    return diff


def train_step(side: Side, x: Tensor, y: Tensor) -> None:
    loss = F.cross_entropy(side.model(x), y)
    side.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    side.optimizer.step()


def stats_pass(side: Side, x: Tensor) -> None:
    side.model.eval()
    with InputStatistics(side.hooked, mode="diag"), torch.no_grad():
        side.model(x)
    side.model.train()


def interleaved(fns: list[Callable[[], None]], repeats: int, warmup: int) -> list[float]:
    """Best seconds per call of each function, calls alternating between them.

    The best of several calls, not the median: on a shared machine other processes only ever add
    time, so the minimum is the steadiest estimate of what the code itself costs.
    """
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            t0 = time.perf_counter()
            fns[i]()
            times[i].append(time.perf_counter() - t0)
    return [min(t) for t in times]


def time_config(arch: str, img: int, batch: int, rank: int, repeats: int) -> dict[str, float]:
    ours, theirs = build("fedlorm", arch, img, rank, 0), build("peft", arch, img, rank, 0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(batch, 3, img, img, generator=g)
    y = torch.randint(0, 10, (batch,), generator=g)
    diff = same_function(ours, theirs, x[:4])
    step = interleaved([lambda: train_step(ours, x, y), lambda: train_step(theirs, x, y)], repeats, 2)
    stat = interleaved([lambda: stats_pass(ours, x), lambda: stats_pass(theirs, x)], repeats, 1)
    return {"diff": diff, "step_ours": step[0], "step_peft": step[1], "stat_ours": stat[0],
            "stat_peft": stat[1]}


# ----------------------------------------------------------------------------------- memory


def run_config_args(clients: int, quick: bool, threads: int) -> list[str]:
    size, per_class, rounds = (32, 8, 1) if quick else (112, 40, 2)
    return [
        "model.backbone=vit_tiny_patch16_224",
        "model.weights=random",
        "model.rank=16",
        "data.datasets=mnist",
        f"data.image_size={size}",
        f"data.train_per_class={per_class}",
        f"data.test_per_class={5 if quick else 20}",
        "scenario.tasks=2",
        f"scenario.num_clients={clients}",
        "scenario.min_samples=2",
        f"train.rounds={rounds}",
        "train.local_epochs=1",
        "train.batch_size=32",
        f"train.threads={threads}",
    ]


# The child reports its own high-water mark: wait4's ru_maxrss would include the parent's RSS,
# which a forked child counts until it execs.
_CHILD = (
    "import sys; from fedlorm.cli import main; code = main(sys.argv[1:]); "
    "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM:')), file=sys.stderr); "
    "sys.exit(code)"
)


def peak_rss(clients: int, quick: bool, threads: int) -> tuple[float, float]:
    """(peak RSS in MiB, wall seconds) of one whole simulated run in a fresh process (Linux)."""
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-c", _CHILD, "run", "--quiet", "--out", out,
               *run_config_args(clients, quick, threads)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"memory run with {clients} clients failed: {proc.stderr}")
        line = next(x for x in proc.stderr.splitlines() if x.startswith("VmHWM:"))
        return int(line.split()[1]) / 1024, wall  # kB


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="vit_tiny at 64 px only, batch 8, rank 4, 3 repeats, tiny memory runs")
    ap.add_argument("--repeats", type=int, default=None, help="timed calls per side (default 7)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.quick:
        configs, batch, rank, repeats = [("vit_tiny_patch16_224", 64)], 8, 4, args.repeats or 3
    else:
        configs = [("vit_tiny_patch16_224", 112), ("vit_small_patch16_224", 224)]
        batch, rank, repeats = 32, 16, args.repeats or 7
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    device = "cpu"
    print(f"fedlorm LoRA vs peft LoRA: batch {batch}, rank {rank}, {device}, torch {torch.__version__}, "
          f"timm {timm.__version__}, {threads} threads, load average {load} (1/5/15 min)")
    print(f"best of {repeats} interleaved calls per side; baseline = peft, measured in the same run")
    print()
    head = (f"{'model':<22} {'px':>4} {'same fn':>8} {'step ours':>10} {'step peft':>10} "
            f"{'ratio':>6} {'stats ours':>11} {'stats peft':>11} {'ratio':>6}")
    print(head)
    print("-" * len(head))
    worst = 0.0
    for arch, img in configs:
        r = time_config(arch, img, batch, rank, repeats)
        step_ratio = r["step_ours"] / r["step_peft"]
        worst = max(worst, step_ratio)
        print(f"{arch:<22} {img:>4} {r['diff']:>8.1e} {r['step_ours'] * 1e3:>8.0f}ms "
              f"{r['step_peft'] * 1e3:>8.0f}ms {step_ratio:>6.3f} {r['stat_ours'] * 1e3:>9.0f}ms "
              f"{r['stat_peft'] * 1e3:>9.0f}ms {r['stat_ours'] / r['stat_peft']:>6.3f}")
    print(f"step time ratio fedlorm / peft, worst: {worst:.3f} (target <= 1.05)")

    print()
    one, t_one = peak_rss(1, args.quick, threads)
    ten, t_ten = peak_rss(10, args.quick, threads)
    print("peak RSS of a whole simulated run (vit_tiny_patch16_224, rank 16, same data; fresh process each):")
    print(f"  1 client: {one:.0f} MiB ({t_one:.0f} s)   10 clients: {ten:.0f} MiB ({t_ten:.0f} s)   "
          f"ratio {ten / one:.3f} (target <= 1.2)")
    load = " / ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"load average at the end {load} (1/5/15 min)")


if __name__ == "__main__":
    main()
