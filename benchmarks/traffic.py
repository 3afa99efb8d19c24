"""Bytes one client sends and receives over a run: fedlorm's LoRM protocol against the reference's.

Run on demand: ``python benchmarks/traffic.py [--quick] [--presets NAME ...]``.

For every paper preset (``fedlorm.presets.PAPER_PRESETS``) with its real shapes (ViT-B/16: 12 blocks
with LoRA on attn.qkv 768→2304, attn.proj 768→768, mlp.fc1 768→3072, mlp.fc2 3072→768; head
768→classes; rank, rounds, tasks, head merge, head shrink and statistics model from the preset) it
counts, per client:

- ours: a real ``TaskLoRAServer`` on a real (randomly initialised) ViT is driven through the preset's
  plan of steps (``start_task``, ``instructions``, ``arrays``, ``aggregate``) with synthetic sums of
  the shapes ``expected_reply`` gives (positive Grams). Upload = the payload of one expected reply
  (float64 summands), download = what a client asked in every step is sent of ``arrays(instruction)``:
  only the arrays it does not hold from earlier steps, and of the earlier tasks' factors only the
  newest task's (``fedlorm.runtime.delivery``, as both runtimes count it);
- reference: the authors' (fed-mammoth) protocol by arithmetic on the same shapes, float32. In every
  step (each training round and the end-of-task statistics pass) a client uploads its LoRA state (A
  and B of every layer, the head) plus a dense d_in × d_in Gram per adapted layer (dense even for
  diagonal statistics) plus the head's 768 × 768 Gram, and downloads the global state (A, B, head)
  plus, from the second task on, a dense d_out × d_in sum of the earlier tasks' updates per layer.

The acceptance line compares one client's whole-run traffic on cifar100-b0.1 with the goal of at
most 1/20 of the reference's, for the preset's statistics model (``reference``) and for
``lorm.stats_model=trained``. ``--quick`` shrinks the ViT (width 96, 2 blocks) and runs two presets.

``--head-projections 0,500,...`` prints instead one client's upload on the built-in benchmark
(``default`` preset, EfficientNet-Lite0) with the analytic head on M random features
(``lorm.head_projection``), per ``head_stats`` step and over the whole run, as the float64 sums
fedlorm sends and as float32 sums would be, next to LoRM's full-statistics run
(``lorm.alpha_backbone=0.5``). Reply specs only: nothing is solved.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer, inject_lora
from fedlorm.backbones import Backbone, create_backbone
from fedlorm.config import RunConfig, apply_overrides
from fedlorm.fcl import make_scenario
from fedlorm.methods import METHODS, payload_bytes
from fedlorm.methods.base import Arrays, ReplySpec
from fedlorm.methods.replies import Kind
from fedlorm.methods.task_lora import TaskLoRAServer
from fedlorm.presets import PAPER_PRESETS, PAPER_SETTINGS, preset_config
from fedlorm.runtime.delivery import Broadcast, Ledger

F32 = 4  # bytes per float32 value: what the reference sends
ACCEPTANCE = "cifar100-b0.1"
GOAL = 20  # ours must be at most 1/GOAL of the reference's whole-run traffic


@dataclass
class Traffic:
    """Per-client bytes of one run, by step; ``earlier_down``: ours, of the earlier tasks' factors."""

    up: list[int] = field(default_factory=list)
    down: list[int] = field(default_factory=list)
    earlier_down: int = 0
    max_rel_diff: float | None = None

    @property
    def total(self) -> int:
        return sum(self.up) + sum(self.down)


def preset_classes(name: str) -> int:
    """Number of classes of a paper preset."""
    return next(s.classes for s in PAPER_SETTINGS for b in s.betas if s.name(b) == name)


def build_model(cfg: RunConfig, classes: int, width: int | None, blocks: int | None) -> tuple[Backbone, dict]:
    """The preset's backbone with random weights (ViT-B/16 unless shrunk) and its LoRA layers."""
    shrink = {} if width is None else {"embed_dim": width, "depth": blocks, "num_heads": 2}
    torch.manual_seed(0)
    model = create_backbone(cfg.model.backbone, classes, pretrained=False, img_size=224, **shrink)
    model.requires_grad_(False)
    layers = inject_lora(model, cfg.model.targets or model.lora_targets, cfg.model.rank, cfg.model.scaling)
    return model, layers


def synthetic_sums(spec: ReplySpec, generator: torch.Generator) -> Arrays:
    """Random sums of the expected reply's shapes and kinds: Grams positive definite, counts > 0."""
    out: Arrays = {}
    for key, summand in spec.items():
        shape, dtype = summand.shape, summand.dtype
        if summand.kind is Kind.COUNT:
            out[key] = torch.full(shape, 1000.0, dtype=dtype)
        elif summand.kind is Kind.GRAM and len(shape) == 1:
            out[key] = torch.rand(shape, generator=generator, dtype=dtype) + 0.5
        elif summand.kind is Kind.GRAM:
            low = torch.randn(shape[0], 8, generator=generator, dtype=dtype)
            out[key] = low @ low.T + torch.eye(shape[0], dtype=dtype)
        else:
            out[key] = torch.randn(shape, generator=generator, dtype=dtype)
    return out


def spec_bytes(spec: ReplySpec) -> int:
    """Payload of one reply of this spec."""
    return sum(math.prod(s.shape) * s.dtype.itemsize for s in spec.values())


def ours(cfg: RunConfig, model: Backbone, layers: Mapping[str, LoRALayer], classes: int) -> Traffic:
    """Drive a real TaskLoRAServer through the preset's steps; bytes per client per step."""
    server = METHODS[cfg.method].build_server(cfg, model, layers)
    assert isinstance(server, TaskLoRAServer)
    scenario = make_scenario(classes, cfg.scenario.tasks, "natural")
    rng, sums_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    traffic, ledger = Traffic(), Ledger()
    for task in range(scenario.num_tasks):
        task_classes = scenario.task_classes(task)
        server.start_task(task, task_classes, rng)
        for instruction in server.instructions(task, task_classes):
            broadcast = Broadcast(server.arrays(instruction))
            sent = ledger.plan(0, broadcast).arrays
            ledger.delivered(0, broadcast)
            spec = server.expected_reply(instruction)
            traffic.down.append(payload_bytes(sent))
            traffic.earlier_down += payload_bytes({k: v for k, v in sent.items() if ".earlier_" in k})
            traffic.up.append(spec_bytes(spec))
            server.aggregate(instruction, synthetic_sums(spec, sums_rng), 1000)
    traffic.max_rel_diff = factor_form_error(server)
    return traffic


def factor_form_error(server: TaskLoRAServer) -> float | None:
    """Largest relative difference between the broadcast's factor products and the server's dense ΔW.

    None when no layer's deployed ΔW goes as factors.
    """
    deployed, worst = server.deployed_arrays(), None
    for name, dense in server.merged.items():
        if f"{name}.fixed_B" in deployed:
            product = deployed[f"{name}.fixed_B"].double() @ deployed[f"{name}.fixed_A"].double()
            error = float((product - dense.double()).abs().max() / dense.double().abs().max())
            worst = error if worst is None else max(worst, error)
    return worst


def reference(cfg: RunConfig, server_shapes: Mapping[str, tuple[int, int, int]], head: Tensor) -> Traffic:
    """The authors' protocol by arithmetic (float32): see the module docstring."""
    classes, features = head.shape
    head_state = classes * features + classes
    lora_state = sum(r * (d_in + d_out) for d_out, d_in, r in server_shapes.values())
    grams = sum(d_in * d_in for _, d_in, _ in server_shapes.values()) + features * features
    earlier = sum(d_out * d_in for d_out, d_in, _ in server_shapes.values())
    tasks = cfg.scenario.tasks if isinstance(cfg.scenario.tasks, int) else len(cfg.scenario.tasks)
    traffic = Traffic()
    for task in range(tasks):
        for _ in range(cfg.train.rounds + 1):  # training rounds, then the statistics pass
            traffic.up.append(F32 * (lora_state + head_state + grams))
            traffic.down.append(F32 * (lora_state + head_state + (earlier if task else 0)))
    return traffic


def upload_by_phase(cfg: RunConfig, classes: int) -> dict[str, int]:
    """One client's whole-run upload per step phase (float64 summands, as sent), from the reply specs
    of a real TaskLoRAServer for ``cfg`` on its backbone (random weights: shapes only). Training and
    statistics steps are folded with synthetic sums; ``head_stats`` steps are not (nothing later
    depends on them, and a large M would only cost solve time)."""
    torch.manual_seed(0)
    model = create_backbone(cfg.model.backbone, classes, pretrained=False, img_size=cfg.data.image_size)
    model.requires_grad_(False)
    layers = inject_lora(model, cfg.model.targets or model.lora_targets, cfg.model.rank, cfg.model.scaling)
    server = TaskLoRAServer(cfg, model, layers)
    scenario = make_scenario(classes, cfg.scenario.tasks, "natural")
    rng, sums_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    out: dict[str, int] = {}
    for task in range(scenario.num_tasks):
        task_classes = scenario.task_classes(task)
        server.start_task(task, task_classes, rng)
        for instruction in server.instructions(task, task_classes):
            spec = server.expected_reply(instruction)
            phase = instruction.phase.value
            out[phase] = out.get(phase, 0) + spec_bytes(spec)
            if phase != "head_stats":
                server.aggregate(instruction, synthetic_sums(spec, sums_rng), 1000)
    return out


def head_projection_table(widths: list[int]) -> None:
    """Markdown table: one client's upload on the built-in benchmark per M (module docstring)."""
    classes = 20  # the default preset: Fashion-MNIST then MNIST
    base = preset_config("default")
    full = apply_overrides(base, ["method=lorm", "lorm.alpha_backbone=0.5"])
    lorm_full = sum(upload_by_phase(full, classes).values())
    print(f"One client's upload on the built-in benchmark ({classes} classes, 5 tasks, EfficientNet-Lite0,")
    print(f"d = 1280); LoRM, full statistics (lorm.alpha_backbone=0.5): {lorm_full / 1e6:.1f} MB per run.")
    print()
    print(
        "| M | head_stats step, float64 | float32 | head-only run, float64 | float32 | lorm-fsa run, "
        "float64 | lorm run (α = 0), float64 | largest run ÷ LoRM full statistics |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for width in widths:
        head = [f"lorm.head_projection={width}"]
        runs = {
            method: upload_by_phase(apply_overrides(base, [f"method={method}", *head]), classes)
            for method in ("head-only", "lorm-fsa", "lorm")
        }
        step = runs["head-only"]["head_stats"] / 5
        totals = {method: sum(phases.values()) for method, phases in runs.items()}
        largest = max(totals.values())
        print(
            f"| {width} | {step / 1e6:.2f} MB | {step / 2e6:.2f} MB | {totals['head-only'] / 1e6:.1f} MB | "
            f"{totals['head-only'] / 2e6:.1f} MB | {totals['lorm-fsa'] / 1e6:.1f} MB | "
            f"{totals['lorm'] / 1e6:.1f} MB | {largest / lorm_full:.2f} |"
        )


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def relative(error: float | None) -> str:
    return "-" if error is None else f"{error:.1e}"


def mean(values: list[int]) -> float:
    return sum(values) / len(values)


def measure(
    name: str, overrides: list[str], width: int | None, blocks: int | None, models: dict
) -> tuple[RunConfig, Traffic, Traffic]:
    """(config, ours, reference) for one preset with ``overrides``."""
    cfg = apply_overrides(preset_config(name), overrides)
    classes = preset_classes(name)
    key = (classes, cfg.model.rank)
    if key not in models:
        models.clear()  # one ViT-B at a time
        models[key] = build_model(cfg, classes, width, blocks)
    model, layers = models[key]
    mine = ours(cfg, model, layers, classes)
    shapes = {n: (lay.out_features, lay.in_features, lay.rank) for n, lay in layers.items()}
    return cfg, mine, reference(cfg, shapes, model.head.weight)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ViT width 96, 2 blocks; two presets")
    ap.add_argument("--presets", nargs="+", default=None, help="paper presets (default: all 18)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--head-projections", default=None, help="M values: the built-in benchmark's upload table instead"
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.head_projections is not None:
        head_projection_table([int(v) for v in args.head_projections.split(",")])
        return
    width, blocks = (96, 2) if args.quick else (None, None)
    names = args.presets or ([ACCEPTANCE, "eurosat-b1.0"] if args.quick else list(PAPER_PRESETS))
    shape = "ViT width 96, 2 blocks (--quick)" if args.quick else "ViT-B/16, 12 blocks"
    print(f"Per-client traffic, {shape}, LoRA on qkv/proj/fc1/fc2; ours: real TaskLoRAServer, reference:")
    print("fed-mammoth's protocol by arithmetic (float32, dense Grams and dense earlier-task deltas).")
    print("Per step: mean over the run's steps (training rounds and statistics passes); ×: ref / ours.")
    head = (
        f"{'preset':<22} {'rank':>4} {'steps':>5} {'up/step ours':>13} {'ref':>9} {'×':>6} "
        f"{'down/step ours':>15} {'ref':>9} {'×':>6} {'run ours':>9} {'ref':>9} {'×':>6} {'max rel':>8}"
    )
    print()
    print(head)
    print("-" * len(head))
    started = time.perf_counter()
    models: dict = {}
    runs: dict[str, tuple[Traffic, Traffic]] = {}
    for name in names:
        cfg, mine, ref = measure(name, [], width, blocks, models)
        runs[name] = (mine, ref)
        print(
            f"{name:<22} {cfg.model.rank:>4} {len(mine.up):>5} {fmt_bytes(mean(mine.up)):>13} "
            f"{fmt_bytes(mean(ref.up)):>9} {mean(ref.up) / mean(mine.up):>5.0f}× "
            f"{fmt_bytes(mean(mine.down)):>15} {fmt_bytes(mean(ref.down)):>9} "
            f"{mean(ref.down) / mean(mine.down):>5.1f}× {fmt_bytes(mine.total):>9} "
            f"{fmt_bytes(ref.total):>9} {ref.total / mine.total:>5.1f}× {relative(mine.max_rel_diff):>8}"
        )
    print("(max rel: the broadcast's factor products against the server's dense merged ΔW; -: none)")
    if ACCEPTANCE in runs:
        acceptance(runs[ACCEPTANCE], width, blocks, models)
    print(f"\nbenchmark wall time {time.perf_counter() - started:.0f} s")


def acceptance(
    preset_run: tuple[Traffic, Traffic], width: int | None, blocks: int | None, models: dict
) -> None:
    """Whole-run bytes of one client on the acceptance preset, both statistics models, vs the goal."""
    _, trained, _ = measure(ACCEPTANCE, ["lorm.stats_model=trained"], width, blocks, models)
    mine, ref = preset_run
    print(f"\nAcceptance: one client's whole run on {ACCEPTANCE}, goal ours <= 1/{GOAL} of the reference")
    for label, run in (("stats_model=reference (preset)", mine), ("stats_model=trained", trained)):
        ratio = ref.total / run.total
        verdict = "meets" if ratio >= GOAL else "misses"
        print(
            f"  {label:<31} up {fmt_bytes(sum(run.up)):>9}  down {fmt_bytes(sum(run.down)):>9}  "
            f"total {fmt_bytes(run.total):>9}  vs reference {fmt_bytes(ref.total)} (up "
            f"{fmt_bytes(sum(ref.up))}, down {fmt_bytes(sum(ref.down))}): 1/{ratio:.1f}, {verdict} 1/{GOAL}"
        )
    print(
        f"  Of the preset's run, the earlier tasks' factors Σ_(j<t) B_j A_j (the reference statistics "
        f"model) are {fmt_bytes(mine.earlier_down)}: a client keeps them, so each task's factors travel "
        f"once, when the next task starts."
    )

if __name__ == "__main__":
    main()
