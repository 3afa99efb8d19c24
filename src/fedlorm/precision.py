"""Training precision: ``32``, ``bf16-mixed`` or ``16-mixed`` (float16 autocast + gradient scaling).

The names are Lightning's, which the LoRM reference trains with (``16-mixed``). Parameters and
optimizer state stay float32 under every choice; only the forward runs in the lower precision, and
input statistics are upcast to float64 inside their hooks whatever the precision.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = ["PRECISIONS", "autocast", "backward_and_step", "check_precision", "grad_scaler"]

PRECISIONS = ("32", "bf16-mixed", "16-mixed")

_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def check_precision(precision: str, device: torch.device) -> None:
    """Raise a one-line ValueError if ``device`` cannot run ``precision``."""
    if precision not in PRECISIONS:
        raise ValueError(f"train.precision = {precision!r} is not allowed; expected one of {PRECISIONS}")
    if precision == "16-mixed" and device.type != "cuda":
        raise ValueError(
            f"train.precision = '16-mixed' needs a CUDA device (float16 autocast with gradient "
            f"scaling); this run is on {device.type}: use bf16-mixed or 32"
        )
    if precision == "bf16-mixed" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"train.precision = 'bf16-mixed' is not supported by {torch.cuda.get_device_name(device)}: "
            "use 16-mixed or 32"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The autocast context for ``precision`` on ``device`` (a no-op context for ``32``)."""
    if precision == "32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """A fresh gradient scaler for ``16-mixed`` (float16 gradients underflow without one), else None."""
    return torch.amp.GradScaler(device.type) if precision == "16-mixed" else None


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None
) -> None:
    """Backpropagate ``loss`` and take the optimizer's step, through ``scaler`` when there is one
    (``16-mixed``: the loss is scaled against float16 underflow and the step unscales it)."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
