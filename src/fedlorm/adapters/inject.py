"""Put LoRA into a model by module-name pattern, pick the trainable factor, save/load factors."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from fedlorm.adapters.lora import LoRAConv2d, LoRALayer, LoRALinear

__all__ = [
    "VIT_TARGETS",
    "inject_lora",
    "load_lora_state_dict",
    "lora_layers",
    "lora_state_dict",
    "reset_lora",
    "set_trainable_factor",
]

#: The linear layers of a timm ViT that LoRM adapts (never ``patch_embed.proj``).
VIT_TARGETS = r"blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"

Factor = Literal["A", "B", "both", "none"]
_FACTORS: dict[str, tuple[bool, bool]] = {
    "A": (True, False),
    "B": (False, True),
    "both": (True, True),
    "none": (False, False),
}


def inject_lora(
    model: nn.Module,
    targets: str | Sequence[str],
    rank: int,
    scaling: float = 1.0,
    exclude: str | None = None,
) -> dict[str, LoRALayer]:
    r"""Wrap every module whose name fully matches one of ``targets`` (and not ``exclude``).

    Matches must be ``nn.Linear`` or 1×1 ``nn.Conv2d`` modules; each is replaced in its parent
    by a :class:`LoRALinear` / :class:`LoRAConv2d` (which freezes the wrapped module's parameters;
    other parameters' ``requires_grad`` is left to the caller). Matching a module that already
    is, or is inside, a LoRA layer is an error; calls on disjoint targets (e.g. different ranks)
    are fine. Nothing is changed if any check fails.

    Args:
        model: The model to change in place.
        targets: Regular expressions, each of which must fully match at least one module name
            (e.g. ``r"blocks\.\d+\.attn\.qkv"``).
        rank: The rank of every new layer.
        scaling: The factor on B A of every new layer (default 1).
        exclude: A regular expression of module names to leave alone.

    Returns:
        The new layers, name → layer, in model order (:func:`lora_layers` lists all of them).

    Raises:
        ValueError: If a pattern matches nothing, a match is not a linear or pointwise
            convolution, is already adapted, or every match is excluded.
    """
    patterns = [targets] if isinstance(targets, str) else list(targets)
    if not patterns:
        raise ValueError("targets is empty: give at least one module-name pattern")
    existing = [name for name, m in model.named_modules() if isinstance(m, LoRALayer)]
    compiled = [re.compile(p) for p in patterns]
    excluded = re.compile(exclude) if exclude is not None else None
    named = [(name, m) for name, m in model.named_modules() if name]  # "" is the model itself

    for pattern in compiled:
        if not any(pattern.fullmatch(name) for name, _ in named):
            examples = ", ".join(name for name, _ in named[:8])
            raise ValueError(
                f"target pattern {pattern.pattern!r} matches no module name (full match); "
                f"module names look like: {examples}"
            )

    wrappers: dict[str, LoRALayer] = {}
    for name, module in named:
        if not any(p.fullmatch(name) for p in compiled):
            continue
        if excluded is not None and excluded.fullmatch(name):
            continue
        owner = next((e for e in existing if name == e or name.startswith(e + ".")), None)
        if owner is not None:
            raise ValueError(
                f"module {name!r} matches the targets but is already part of the LoRA layer "
                f"{owner!r}: LoRA was injected there before"
            )
        if isinstance(module, nn.Linear):
            wrappers[name] = _wrap(name, LoRALinear, module, rank, scaling)
        elif isinstance(module, nn.Conv2d):
            wrappers[name] = _wrap(name, LoRAConv2d, module, rank, scaling)
        else:
            raise ValueError(
                f"module {name!r} matches the targets but is a {type(module).__name__}, "
                "not an nn.Linear or a 1×1 nn.Conv2d"
            )
    if not wrappers:
        raise ValueError(f"every module matching {patterns} is excluded by {exclude!r}")

    for name, layer in wrappers.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, layer)
    return wrappers


def _wrap(name: str, cls: type[LoRALayer], module: nn.Module, rank: int, scaling: float):
    try:
        return cls(module, rank, scaling)
    except ValueError as err:
        raise ValueError(f"module {name!r}: {err}") from err


def lora_layers(model: nn.Module) -> dict[str, LoRALayer]:
    """The LoRA layers already in ``model``.

    Args:
        model: Any module.

    Returns:
        Name → layer, in model order.
    """
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALayer)}


def set_trainable_factor(layers: Mapping[str, LoRALayer], factor: Factor) -> None:
    """Choose which factors train, by their ``requires_grad``.

    Args:
        layers: The LoRA layers, name → layer.
        factor: ``"A"``, ``"B"``, ``"both"`` or ``"none"``.

    Raises:
        ValueError: If ``factor`` is none of these.
    """
    if factor not in _FACTORS:
        raise ValueError(f"factor must be one of {sorted(_FACTORS)}, got {factor!r}")
    train_A, train_B = _FACTORS[factor]
    for layer in layers.values():
        layer.lora_A.requires_grad_(train_A)
        layer.lora_B.requires_grad_(train_B)


def reset_lora(layers: Mapping[str, LoRALayer], generator: torch.Generator | None = None) -> None:
    """Start every layer's adapter anew: B = 0 and a fresh kaiming-uniform A.

    Args:
        layers: The LoRA layers, drawn in their order.
        generator: The one random stream every A is drawn from (default: torch's global one).
    """
    for layer in layers.values():
        layer.reset_parameters(generator)


def lora_state_dict(layers: Mapping[str, LoRALayer]) -> dict[str, Tensor]:
    """The layers' factors, for saving.

    Args:
        layers: The LoRA layers, name → layer.

    Returns:
        Detached copies under ``f"{name}.lora_A"`` and ``f"{name}.lora_B"``.
    """
    state = {}
    for name, layer in layers.items():
        state[f"{name}.lora_A"] = layer.lora_A.detach().clone()
        state[f"{name}.lora_B"] = layer.lora_B.detach().clone()
    return state


@torch.no_grad()
def load_lora_state_dict(
    layers: Mapping[str, LoRALayer], state: Mapping[str, Tensor], strict: bool = True
) -> None:
    """Copy factors into the layers in place, in each layer's dtype and on its device.

    Args:
        layers: The LoRA layers, name → layer.
        state: Factors keyed as :func:`lora_state_dict` writes them.
        strict: Require every key and no other (default); otherwise load what is there.

    Raises:
        ValueError: If a shape does not match, or with ``strict`` a key is missing or unexpected;
            nothing is loaded then.
    """
    params = {}
    for name, layer in layers.items():
        params[f"{name}.lora_A"] = layer.lora_A
        params[f"{name}.lora_B"] = layer.lora_B
    if strict:
        missing = [k for k in params if k not in state]
        unexpected = [k for k in state if k not in params]
        if missing or unexpected:
            raise ValueError(
                f"LoRA state dict does not fit the layers: missing keys {missing[:5]}"
                f"{' ...' if len(missing) > 5 else ''}, unexpected keys {unexpected[:5]}"
                f"{' ...' if len(unexpected) > 5 else ''}"
            )
    for key, param in params.items():
        if key not in state:
            continue
        value = state[key]
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(
                f"shape mismatch for {key!r}: state has {tuple(value.shape)}, "
                f"layer has {tuple(param.shape)}"
            )
    for key, param in params.items():
        if key in state:
            param.copy_(state[key])
