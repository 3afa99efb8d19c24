"""How far apart honest clients' replies are: the measurement behind plain mode's reply bounds.

Run on demand: ``python benchmarks/reply_spread.py --preset smoke [--methods lorm,fedavg] [key=value ...]``.

Runs each method in process on the preset (plus overrides) and records, for every reply of every step,
its per-sample magnitudes (:func:`fedlorm.methods.bounds.sample_magnitudes`: a Gram's trace, a value's
norm, a count, each per sample, and the sample count). Per method it prints one JSON line with: the
largest ratio of one reply's magnitude to the median of the other replies of its step, for Grams,
counts and sample counts (what ``secure.spread_limit`` bounds) and for values
(``secure.value_spread_limit``); the largest entry and per-sample magnitude of any reply (the public
bound 2^``secure.bound_exponent`` bounds the latter); and, for every full Gram a reply or a step's
sum holds, the smallest eigenvalue relative to d·max|G| and to d·median(diag G) (what the PSD checks
allow). docs/security.md quotes these numbers.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from fedlorm.config import apply_overrides
from fedlorm.methods import ClientReply, Instruction
from fedlorm.methods.bounds import NUM_EXAMPLES, sample_magnitudes, spread
from fedlorm.methods.replies import Kind
from fedlorm.methods.steps import step_label
from fedlorm.presets import preset_config
from fedlorm.runtime.engine import run
from fedlorm.runtime.experiment import build_experiment
from fedlorm.runtime.simulator import InProcess


def _psd_margins(gram: Tensor) -> tuple[float, float]:
    """Smallest eigenvalue / (d·max|G|) and / (d·median of the positive diagonal)."""
    gram = gram.to(torch.float64)
    d = gram.shape[0]
    low = float(torch.linalg.eigvalsh((gram + gram.T) / 2)[0])
    scale = float(gram.abs().max())
    diag = gram.diagonal()
    positive = diag[diag > 0]
    median = float(positive.median()) if positive.numel() else 0.0
    return low / (d * scale) if scale else 0.0, low / (d * median) if median else 0.0


class Recording(InProcess):
    """The in-process transport, keeping every reply's magnitudes and Gram margins per step."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[dict[str, Any]] = []
        self.kinds: dict[str, Kind] = {}

    def replies(
        self,
        exp: Any,
        instruction: Instruction,
        arrays: Mapping[str, Tensor],
        clients: Sequence[int],
        advance: Callable[[int], None] = lambda n: None,
    ) -> Iterator[tuple[int, ClientReply]]:
        expected = exp.server.expected_reply(instruction)
        self.kinds.update({key: summand.kind for key, summand in expected.items()})
        step: dict[str, Any] = {"step": f"task{instruction.task}.{step_label(instruction)}", "magnitudes": []}
        step["largest_entry"] = 0.0
        step["margins"] = []
        sums: dict[str, Tensor] = {}
        for k, reply in InProcess.replies(exp, instruction, arrays, clients, advance):
            step["magnitudes"].append(sample_magnitudes(reply, expected))
            for key, value in reply.summands.items():
                if value.numel():
                    step["largest_entry"] = max(step["largest_entry"], float(value.abs().max()))
                summand = expected[key]
                if summand.kind is Kind.GRAM and value.ndim == 2:
                    step["margins"].append(_psd_margins(value))
                    sums[key] = sums.get(key, 0) + value.to(torch.float64)
            yield k, reply
        step["sum_margins"] = [_psd_margins(g) for g in sums.values()]
        self.steps.append(step)


def _summary(steps: list[dict[str, Any]], kinds: dict[str, Kind]) -> dict[str, Any]:
    worst: dict[str, tuple[float, str, str]] = {}
    for step in steps:
        for key, ratio in spread(step["magnitudes"]).items():
            group = "num_examples" if key == NUM_EXAMPLES else kinds.get(key, Kind.VALUE).value
            if ratio > worst.get(group, (0.0, "", ""))[0]:
                worst[group] = (ratio, step["step"], key)
    per_sample = max(
        (size for s in steps for m in s["magnitudes"] for key, size in m.items() if key != NUM_EXAMPLES),
        default=0.0,
    )
    margins = [m for s in steps for m in s["margins"]]
    sum_margins = [m for s in steps for m in s["sum_margins"]]
    return {
        "largest_ratio_to_median_of_others": {
            g: {"ratio": round(r, 3), "step": s, "key": k} for g, (r, s, k) in sorted(worst.items())
        },
        "largest_entry": max(s["largest_entry"] for s in steps),
        "largest_per_sample_magnitude": per_sample,
        "smallest_sample_count": min(m[NUM_EXAMPLES] for s in steps for m in s["magnitudes"]),
        "largest_sample_count": max(m[NUM_EXAMPLES] for s in steps for m in s["magnitudes"]),
        "reply_gram_min_eig_over_d_max": min((m[0] for m in margins), default=None),
        "reply_gram_min_eig_over_d_median_diag": min((m[1] for m in margins), default=None),
        "sum_gram_min_eig_over_d_max": min((m[0] for m in sum_margins), default=None),
        "sum_gram_min_eig_over_d_median_diag": min((m[1] for m in sum_margins), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="smoke")
    parser.add_argument("--methods", default="lorm", help="comma-separated method names")
    parser.add_argument("overrides", nargs="*", help="fedlorm config overrides, key=value")
    args = parser.parse_args()
    for method in args.methods.split(","):
        cfg = apply_overrides(preset_config(args.preset), [f"method={method}", *args.overrides])
        exp = build_experiment(cfg)
        transport = Recording()
        started = time.perf_counter()
        results = run(exp, transport)
        summary = _summary(transport.steps, transport.kinds)
        summary.update(
            preset=args.preset,
            method=method,
            overrides=args.overrides,
            final_accuracy=results["final_accuracy"],
            seconds=round(time.perf_counter() - started, 1),
        )
        print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
