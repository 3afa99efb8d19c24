"""Streaming input statistics (Gram XᵀX or its diagonal) of linear layers, via forward hooks.

X stacks every row the layer maps: every token of every sample for a Linear (x reshaped to
(-1, d_in)), every strided spatial position for a 1×1 Conv2d ((N, C, H, W) → x[:, :, ::s, ::s] →
(N·H'·W', C)). Sums are accumulated in float64 on the input's device; memory does not grow with
the number of samples.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
from torch import Tensor, nn

from fedlorm.adapters.lora import LoRAConv2d, LoRALinear, check_pointwise_conv

__all__ = ["InputStatistics", "StatMode"]

StatMode = Literal["full", "diag"]
_MODES = ("full", "diag")


def _geometry(name: str, module: nn.Module) -> tuple[int, tuple[int, int] | None]:
    """(d_in, conv stride or None for a Linear) of a supported module."""
    if isinstance(module, LoRALinear | nn.Linear):
        return module.in_features, None
    if isinstance(module, LoRAConv2d):
        return module.in_features, tuple(module.base.stride)
    if isinstance(module, nn.Conv2d):
        try:
            check_pointwise_conv(module)
        except ValueError as err:
            raise ValueError(f"module {name!r}: {err}") from err
        return module.in_channels, tuple(module.stride)
    raise ValueError(
        f"module {name!r}: cannot collect input statistics of a {type(module).__name__}; "
        "supported are nn.Linear, 1×1 nn.Conv2d, LoRALinear and LoRAConv2d"
    )


class InputStatistics:
    """Context manager that accumulates each module's input Gram while the model runs.

    ``mode`` is "full" (XᵀX, d × d) or "diag" (column sums of squares, d), for all modules or per
    name. Use it around forward passes; statistics persist after ``__exit__`` (which removes the
    hooks) until :meth:`reset`. Hooked inputs are upcast to float64 (also under autocast).

    Args:
        modules: The modules whose inputs are counted, name → module (linear layers, whose
            inputs are flattened to (tokens, d_in), or pointwise convolutions, counted at each
            strided position).
        mode: ``"full"`` or ``"diag"`` for every module, or one of them per name.

    Raises:
        ValueError: If a mode is unknown, or a per-name mapping misses or adds a name.
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        mode: StatMode | Mapping[str, StatMode] = "diag",
    ) -> None:
        self.modules = dict(modules)
        if isinstance(mode, str):
            modes = dict.fromkeys(self.modules, mode)
        else:
            modes = dict(mode)
            missing = sorted(set(self.modules) - set(modes))
            extra = sorted(set(modes) - set(self.modules))
            if missing or extra:
                raise ValueError(f"mode mapping: missing names {missing}, unknown names {extra}")
        for name, m in modes.items():
            if m not in _MODES:
                raise ValueError(f"mode for {name!r} must be one of {_MODES}, got {m!r}")
        self.modes: dict[str, StatMode] = modes
        self._geometry = {name: _geometry(name, m) for name, m in self.modules.items()}
        self._sums: dict[str, Tensor] = {}
        self._rows: dict[str, int] = dict.fromkeys(self.modules, 0)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> InputStatistics:
        if self._handles:
            raise RuntimeError("InputStatistics is already active")
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        d_in, stride = self._geometry[name]
        full = self.modes[name] == "full"

        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
                if stride is None:
                    X = x.detach().reshape(-1, d_in)
                else:
                    x = x.detach()
                    if x.dim() == 3:  # unbatched (C, H, W)
                        x = x.unsqueeze(0)
                    X = x[:, :, :: stride[0], :: stride[1]].permute(0, 2, 3, 1).reshape(-1, d_in)
                X = X.to(torch.float64)
                buf = self._sums.get(name)
                if buf is None:
                    shape = (d_in, d_in) if full else (d_in,)
                    buf = self._sums[name] = X.new_zeros(shape)
                if full:
                    buf.addmm_(X.T, X)
                else:
                    buf.add_((X * X).sum(0))  # bit-identical to X.square(), whose pow kernel is ~1.7x slower
                self._rows[name] += X.shape[0]

        return hook

    def grams(self) -> dict[str, Tensor]:
        """The Grams accumulated so far.

        Returns:
            Name → float64 copy: (d_in, d_in) for ``"full"``, (d_in,) for ``"diag"``; zeros for a
            module that has not run yet.
        """
        out = {}
        for name, module in self.modules.items():
            buf = self._sums.get(name)
            if buf is None:
                d_in = self._geometry[name][0]
                shape = (d_in, d_in) if self.modes[name] == "full" else (d_in,)
                device = next(module.parameters()).device
                buf = torch.zeros(shape, dtype=torch.float64, device=device)
            out[name] = buf.clone()
        return out

    def rows(self) -> dict[str, int]:
        """How many input rows each Gram sums over.

        Returns:
            Name → the number of tokens (or strided positions) accumulated.
        """
        return dict(self._rows)

    def reset(self) -> None:
        """Forget everything accumulated so far (hooks stay as they are)."""
        self._sums = {}
        self._rows = dict.fromkeys(self.modules, 0)
