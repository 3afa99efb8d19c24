"""A model's named arrays: the keys of its LoRA factors and head, and loading them into the model.

Every message of the protocol names arrays this way (``{layer}.lora_A``, ``head.weight``, a layer's
frozen update as ``{layer}.fixed_B``/``fixed_A`` or ``fixed_delta``), so servers, clients and the
exported model agree on one set of keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from fedlorm.adapters import LoRALayer
from fedlorm.backbones import Backbone

__all__ = ["HEAD", "PROJECTED_HEAD", "apply_arrays", "factor_key", "shared_model_arrays"]

HEAD = "head"
"""Prefix of the head's arrays (``head.weight``, ``head.bias``)."""
PROJECTED_HEAD = f"{HEAD}.projected"
"""Prefix of the deployed head over projected features (``head.projected.weight``, ``.bias``)."""


def factor_key(layer: str, factor: str) -> str:
    """Array name of one LoRA factor, e.g. ``blocks.0.attn.qkv.lora_A``."""
    return f"{layer}.lora_{factor}"


def apply_arrays(model: Backbone, layers: Mapping[str, LoRALayer], arrays: Mapping[str, Tensor]) -> None:
    """Copy the named arrays into the model in place.

    A layer's frozen update comes as factors (``{layer}.fixed_B``, ``{layer}.fixed_A``) or dense
    (``{layer}.fixed_delta``); a layer with neither gets none. Arrays with a head deploy the head
    over projected features (``head.projected.*``) if they carry one, else the plain head alone.
    """
    with torch.no_grad():
        for name, layer in layers.items():
            for factor in ("A", "B"):
                key = factor_key(name, factor)
                if key in arrays:
                    getattr(layer, f"lora_{factor}").copy_(arrays[key])
            fixed_b, fixed_a = arrays.get(f"{name}.fixed_B"), arrays.get(f"{name}.fixed_A")
            delta = arrays.get(f"{name}.fixed_delta")
            if fixed_b is not None and fixed_a is not None:
                layer.set_fixed_delta((fixed_b, fixed_a))
            else:
                layer.set_fixed_delta(None if delta is None else delta.to(layer.lora_A.dtype))
        if f"{HEAD}.weight" in arrays:
            model.head.weight.copy_(arrays[f"{HEAD}.weight"])
            model.head.bias.copy_(arrays[f"{HEAD}.bias"])
            projected = (arrays.get(f"{PROJECTED_HEAD}.weight"), arrays.get(f"{PROJECTED_HEAD}.bias"))
            model.set_projected_head(*projected)


def shared_model_arrays(model: Backbone, layers: Mapping[str, LoRALayer]) -> dict[str, Tensor]:
    """The model's current factors and head (detached copies)."""
    out: dict[str, Tensor] = {}
    for name, layer in layers.items():
        out[factor_key(name, "A")] = layer.lora_A.detach().clone()
        out[factor_key(name, "B")] = layer.lora_B.detach().clone()
    out[f"{HEAD}.weight"] = model.head.weight.detach().clone()
    out[f"{HEAD}.bias"] = model.head.bias.detach().clone()
    return out
