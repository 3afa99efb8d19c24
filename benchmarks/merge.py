"""Server-side merge cost of fedlorm.merging against the reference implementation's style.

Run on demand: ``python benchmarks/merge.py [--quick]``.

ViT-B/16 LoRA layers (12 blocks × qkv 768→2304, proj 768→768, fc1 768→3072, fc2 3072→768), 10
clients, ranks 1/16/32, diagonal (α = 0) and full statistics, synthetic SPD Grams. For one B-round
and one A-round over all layers it times, in the same run:

- ours: the server's work in fedlorm: sum the clients' summands, then ``merge_*_solve``
  (Cholesky; a column-wise division for diagonal statistics);
- baseline: what fed-mammoth's LoRM server does: dense per-client fp32 Grams (a dense diagonal
  matrix even for α = 0), cast to float64, B = (Σ B_i A G_i) Aᵀ pinv(A ΣG_i Aᵀ) and
  A = (Σ A_i G_i) pinv(ΣG_i). Its cost does not depend on the layer's block, so it is timed on the
  first ``--baseline-blocks`` blocks and extrapolated to all blocks (the output says so).

It checks that both give the same merged factors on the timed layers (max relative difference) and
prints the bytes one client uploads per round. Clients' own work (computing summands) is not timed.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from fedlorm import merging

F32, F64 = torch.float32, torch.float64


@dataclass(frozen=True)
class Layer:
    name: str
    d_in: int
    d_out: int


def vit_layers(width: int, blocks: int) -> list[list[Layer]]:
    """Per block: qkv, proj, fc1, fc2 of a ViT of the given width (MLP ratio 4)."""
    return [
        [
            Layer(f"blocks.{b}.attn.qkv", width, 3 * width),
            Layer(f"blocks.{b}.attn.proj", width, width),
            Layer(f"blocks.{b}.mlp.fc1", width, 4 * width),
            Layer(f"blocks.{b}.mlp.fc2", 4 * width, width),
        ]
        for b in range(blocks)
    ]


class GramFactory:
    """Synthetic client Grams: n_i · S_i C S_i with one shared SPD C per d_in, S_i diagonal."""

    _base: ClassVar[dict[tuple[int, int], Tensor]] = {}  # shared C per (seed, d), all configs

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.g = torch.Generator().manual_seed(seed)

    def shared(self, d: int) -> Tensor:
        key = (self.seed, d)
        if key not in self._base:
            g = torch.Generator().manual_seed(self.seed * 100_003 + d)
            X = torch.randn(2 * d, d, generator=g) + 0.5 * torch.randn(1, d, generator=g)
            self._base[key] = X.T @ X / (2 * d)
        return self._base[key]

    def client(self, d: int, full: bool) -> Tensor:
        """One client's statistic as the fp32 values it would ship: (d, d) or (d,)."""
        s = torch.rand(d, generator=self.g) + 0.5
        n = float(torch.randint(1_000, 50_000, (1,), generator=self.g))
        C = self.shared(d)
        if full:
            s = s * n**0.5
            return C * s[:, None] * s[None, :]
        return C.diagonal() * (n * s * s)


def timed(fn: Callable[..., Tensor], *args: object, repeats: int = 1) -> tuple[Tensor, float]:
    """(result, best wall time over ``repeats`` calls)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return out, best


# ------------------------------------------------------------------------------ server sides


def ours_b(Ms: list[Tensor], Hs: list[Tensor], reference: Tensor) -> Tensor:
    M, H = Ms[0].clone(), Hs[0].clone()
    for M_i, H_i in zip(Ms[1:], Hs[1:], strict=True):
        M += M_i
        H += H_i
    return merging.merge_b_solve(M, H, reference=reference, dtype=F32)


def ours_a(Ns: list[Tensor], Gs: list[Tensor], reference: Tensor) -> Tensor:
    N, G = Ns[0].clone(), Gs[0].clone()
    for N_i, G_i in zip(Ns[1:], Gs[1:], strict=True):
        N += N_i
        G += G_i
    return merging.merge_a_solve(N, G, reference=reference, dtype=F32)


def baseline_b(Bs: list[Tensor], A: Tensor, grams: list[Tensor]) -> Tensor:
    A = A.to(F64)
    E2 = torch.stack([(B.to(F64) @ A) @ G.to(F64) for B, G in zip(Bs, grams, strict=True)]).sum(0)
    G_inv = torch.linalg.pinv(A @ torch.stack([G.to(F64) for G in grams]).sum(0) @ A.T)
    return (E2 @ A.T @ G_inv).to(F32)


def baseline_a(As: list[Tensor], grams: list[Tensor]) -> Tensor:
    E = torch.stack([A.to(F64) @ G.to(F64) for A, G in zip(As, grams, strict=True)]).sum(0)
    G = torch.stack([G.to(F64) for G in grams]).sum(0)
    return (E @ torch.linalg.pinv(G)).to(F32)


def max_rel(a: Tensor, b: Tensor) -> float:
    return float((a.to(F64) - b.to(F64)).abs().max() / b.to(F64).abs().max())


# ----------------------------------------------------------------------------------- runner


@dataclass
class Row:
    stat: str
    rank: int
    ours_b: float = 0.0
    ours_a: float = 0.0
    base_b: float = 0.0  # on the baseline's blocks only
    base_a: float = 0.0
    ours_b_sub: float = 0.0  # ours on the baseline's blocks, for the same-layer ratio
    ours_a_sub: float = 0.0
    diff_b: float = 0.0
    diff_a: float = 0.0
    up_b: int = 0  # bytes one client uploads per round, all layers
    up_a: int = 0


def run_config(
    blocks: list[list[Layer]],
    rank: int,
    full: bool,
    clients: int,
    base_blocks: int,
    repeats: tuple[int, int],
    seed: int,
) -> Row:
    row = Row("full" if full else "diag", rank)
    factory = GramFactory(seed)
    g = factory.g
    for b, block in enumerate(blocks):
        with_baseline = b < base_blocks
        for layer in block:
            d_in, d_out = layer.d_in, layer.d_out
            grams = [factory.client(d_in, full) for _ in range(clients)]  # fp32, as shipped
            grams64 = [G.to(F64) for G in grams]
            A = torch.randn(rank, d_in, generator=g) / d_in**0.5
            B = torch.randn(d_out, rank, generator=g) * 0.1
            Bs = [B + 0.01 * torch.randn(d_out, rank, generator=g) for _ in range(clients)]
            As = [
                A + 0.01 * torch.randn(rank, d_in, generator=g) / d_in**0.5 for _ in range(clients)
            ]

            # client side (not timed): our summands
            b_parts = [
                merging.merge_b_summands(B_i, A, G) for B_i, G in zip(Bs, grams64, strict=True)
            ]
            a_parts = [merging.merge_a_summands(A_i, G) for A_i, G in zip(As, grams64, strict=True)]
            row.up_b += sum(t.numel() * t.element_size() for t in b_parts[0])
            row.up_a += sum(t.numel() * t.element_size() for t in a_parts[0])

            Ms, Hs = [p[0] for p in b_parts], [p[1] for p in b_parts]
            Ns, Gs = [p[0] for p in a_parts], [p[1] for p in a_parts]
            new_b, t_b = timed(ours_b, Ms, Hs, B, repeats=repeats[0])
            new_a, t_a = timed(ours_a, Ns, Gs, A, repeats=repeats[0])
            row.ours_b += t_b
            row.ours_a += t_a
            if with_baseline:
                dense = grams if full else [torch.diag(v) for v in grams]  # what it ships
                row.ours_b_sub += t_b
                row.ours_a_sub += t_a
                ref_b, tb_b = timed(baseline_b, Bs, A, dense, repeats=repeats[1])
                ref_a, tb_a = timed(baseline_a, As, dense, repeats=repeats[1])
                row.base_b += tb_b
                row.base_a += tb_a
                row.diff_b = max(row.diff_b, max_rel(new_b, ref_b))
                row.diff_a = max(row.diff_a, max_rel(new_a, ref_a))
                del dense
            del grams, grams64, b_parts, a_parts, Ms, Hs, Ns, Gs
    return row


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return ""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick", action="store_true", help="width 96, 2 blocks, 4 clients, ranks 1 and 8"
    )
    ap.add_argument("--width", type=int, default=None, help="embedding width (ViT-B: 768)")
    ap.add_argument("--blocks", type=int, default=None, help="transformer blocks (ViT-B: 12)")
    ap.add_argument("--clients", type=int, default=None, help="clients per round (paper: 10)")
    ap.add_argument("--ranks", type=int, nargs="+", default=None, help="LoRA ranks")
    ap.add_argument(
        "--baseline-blocks", type=int, default=None, help="blocks to time the baseline on"
    )
    ap.add_argument(
        "--repeats",
        type=int,
        nargs=2,
        default=None,
        metavar=("OURS", "BASELINE"),
        help="timed calls per layer, best kept (default 3 3 with --quick, else 3 1)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    q = args.quick
    if args.threads:
        torch.set_num_threads(args.threads)
    width = args.width or (96 if q else 768)
    n_blocks = args.blocks or (2 if q else 12)
    clients = args.clients or (4 if q else 10)
    ranks = args.ranks or ([1, 8] if q else [1, 16, 32])
    base_blocks = min(n_blocks, args.baseline_blocks or (n_blocks if q else 1))
    repeats = tuple(args.repeats or ((3, 3) if q else (3, 1)))
    blocks = vit_layers(width, n_blocks)
    n_layers = sum(len(b) for b in blocks)
    scale = n_blocks / base_blocks

    # warm up the kernels so that the first timed layer does not pay for it
    Qw = torch.eye(64, dtype=F64)
    torch.linalg.cholesky_ex(Qw)
    torch.linalg.pinv(Qw)

    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"fedlorm.merging server merge: ViT width {width}, {n_blocks} blocks × "
        f"(qkv, proj, fc1, fc2) = {n_layers} layers, {clients} clients, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {load}"
    )
    extrap = "" if base_blocks == n_blocks else f", extrapolated ×{scale:g} from {base_blocks}"
    print(
        f"baseline (dense fp32 Grams → float64, pinv) timed on {base_blocks} of {n_blocks} "
        f"blocks{extrap}; ours timed on all {n_blocks} blocks; best of {repeats[0]} (ours) and "
        f"{repeats[1]} (baseline) calls per layer"
    )
    rows = []
    t0 = time.perf_counter()
    for full in (False, True):
        for rank in ranks:
            rows.append(run_config(blocks, rank, full, clients, base_blocks, repeats, args.seed))
    elapsed = time.perf_counter() - t0

    head = (
        f"{'stat':<5} {'rank':>4} {'round':<5} {'ours [s]':>9} {'baseline [s]':>13} "
        f"{'speed-up':>9} {'same-layer':>10} {'max rel diff':>12}"
    )
    print()
    print(f"Server merge time, {n_layers} layers (speed-up = baseline / ours; same-layer = on the")
    print("baseline's timed blocks only, no extrapolation)")
    print(head)
    print("-" * len(head))
    for r in rows:
        for rnd, ours, base, sub, diff in (
            ("B", r.ours_b, r.base_b, r.ours_b_sub, r.diff_b),
            ("A", r.ours_a, r.base_a, r.ours_a_sub, r.diff_a),
        ):
            print(
                f"{r.stat:<5} {r.rank:>4} {rnd:<5} {ours:>9.3f} {base * scale:>13.2f} "
                f"{base * scale / ours:>8.0f}× {base / sub:>9.0f}× {diff:>12.1e}"
            )
        total_ours, total_base = r.ours_a + r.ours_b, (r.base_a + r.base_b) * scale
        print(
            f"{r.stat:<5} {r.rank:>4} {'B+A':<5} {total_ours:>9.3f} {total_base:>13.2f} "
            f"{total_base / total_ours:>8.0f}×"
        )

    gram_bytes = sum(layer.d_in**2 * 4 for block in blocks for layer in block)
    head = (
        f"{'stat':<5} {'rank':>4} {'ours B-round':>13} {'ours A-round':>13} "
        f"{'dense fp32 Gram':>16} {'Gram / ours B':>14} {'Gram / ours A':>14}"
    )
    print()
    print(f"Upload per client per round, {n_layers} layers (ours: float64 summands; baseline: one")
    print("dense fp32 Gram per layer, same for both rounds, plus the trained factor not counted)")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r.stat:<5} {r.rank:>4} {fmt_bytes(r.up_b):>13} {fmt_bytes(r.up_a):>13} "
            f"{fmt_bytes(gram_bytes):>16} {gram_bytes / r.up_b:>13.0f}× "
            f"{gram_bytes / r.up_a:>13.1f}×"
        )
    print()
    load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"benchmark wall time {elapsed:.0f} s; load average at the end {load} (1/5/15 min)")


if __name__ == "__main__":
    main()
